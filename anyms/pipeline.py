"""The AnyMS pipelines: diffusers' SDXL and SD 1.5 pipelines that take subjects with boxes or masks.

    pipe = AnyMSStableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")
    pipe.load_ip_adapter("h94/IP-Adapter", subfolder="sdxl_models", weight_name="ip-adapter_sdxl.safetensors")
    image = pipe("a dog and a cat on a sofa", subjects=[
        Subject("dog.png", box=(0.05, 0.3, 0.5, 0.95), label="dog"),
        Subject("cat.png", mask="cat_mask.png", label="cat"),      # any shape, at the image's size
    ]).images[0]

A call with ``subjects`` does, in order:
1. checks every AnyMS argument (subjects, boxes, masks and their size, images, mode,
   priority, the loaded IP-Adapter) without touching a model, naming the bad argument;
2. runs the parent pipeline with each loaded IP-Adapter's subject images (``Subject.adapter``;
   each image encoded on its own, by its adapter's image encoder), after installing the
   AnyMS processors if they are not installed yet;
3. when the parent checks its inputs (its first step, before any model work), takes
   the height and width it settled on, builds the :class:`~anyms.Layout` on the
   latent grid with the routing of every U-Net level (so that the denoising loop,
   compiled or not, only reads it) and sets it on every AnyMS processor;
4. always puts back the processors (and layouts) that were there before, so that a
   plain call afterwards is plain diffusers.

Without ``subjects`` the pipelines are their parents, unchanged: the same ``__call__``
signature (plus the keyword-only AnyMS arguments), and ``save_pretrained`` writes a
folder of the parent pipeline. A pipeline runs one call at a time (a concurrent call
raises ``RuntimeError``, see :class:`AnyMSPipelineMixin`).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

from anyms_kernels.regions import MODES, check_normalized_boxes, mask_bbox

from .auto_pipeline import register_auto_pipelines
from .layout import Layout, load_mask
from .images import read_image
from .blocks import check_blocks, resolve_blocks
from .branches import adapter_layers, anyms_attention, set_anyms_layout
from .priority import PRIORITIES
from .processor import AnyMSAttnProcessor  # noqa: F401  the U-Net's AnyMS processor, which anyms_attention installs
from .regional_prompts import (check_prompt_lengths, check_regional_prompt, encode_regional_prompts,
                               prompt_tokenizers)
from .timing import check_schedule, check_window

__all__ = [
    "Subject",
    "AnyMSPlan",
    "PRIORITIES",
    "prepare_subjects",
    "AnyMSStableDiffusionXLPipeline",
    "AnyMSStableDiffusionPipeline",
]


@dataclass
class Subject:
    """One subject: its reference image and/or its regional prompt, its region (a box or a mask)
    and its scale.

    Args:
        image: a PIL image, a path to an image file, or an ``H x W`` / ``H x W x C``
            array (uint8, or floats in ``[0, 1]``; C = 1, 3 or 4). None for a text-only
            region (a subject with a ``prompt`` and no image).
        box: ``(x0, y0, x1, y1)`` normalised to ``[0, 1]`` of the output image, x to
            the right, y down; ``x1 > x0`` and ``y1 > y0``. Optional with a mask: it is
            then only where the pictures put the label (default: the mask's bounding box).
        scale: lambda_s, this subject's IP-Adapter scale (multiplies the adapter's own).
        label: a name for the pictures (default: the file name, or ``"subject i"``).
        mask: (keyword only) the region as a mask of any shape, at the generated
            image's resolution, ``height x width`` pixels: a PIL image (greyscale), a
            path to an image file, or a 2-D numpy array / torch tensor of bools or
            numbers. Nonzero pixels are inside; a token of a layer is in the region when
            its cell holds at least one of them (the rule boxes follow, so a rectangular
            mask routes exactly like its box). A mask of another size is an error, not
            resized: resizing would move the region's edges. Without ``height`` and
            ``width`` the pipeline makes an image of the masks' size.
        start, end: (keyword only) the window of denoising steps the subject acts in, as
            fractions of the steps, ``0 <= start <= end <= 1`` (default: every step). Step
            ``i`` of ``N`` acts when ``start <= i / N`` and ``(i + 1) / N <= end``: diffusers'
            rule for ControlNet's ``control_guidance_start`` / ``control_guidance_end``.
        schedule: (keyword only) how the scale changes over the window: ``"constant"`` (the
            default), ``"linear_up"``, ``"linear_down"``, ``"ease_in"`` or ``"ease_out"``
            (the formulas: :mod:`anyms.timing`).
        negative_image: (keyword only) an image (as ``image``) that this subject's branch sees
            in classifier-free guidance's unconditional pass, in place of diffusers' default
            there (a zero embedding for the 4-token adapters, the encoder's features of an
            all-zero image for the "plus" ones): guidance then pushes the region away from
            it. It needs a call that runs that pass: ``guidance_scale > 1`` on SD / SDXL,
            true CFG (``true_cfg_scale > 1`` and a negative prompt) on FLUX; a call without
            one refuses it (it could have no effect).
        blocks: (keyword only) which blocks of the model the subject's image acts on (the
            InstantStyle idea, :mod:`anyms.blocks`): a preset (``"all"``, ``"style"``,
            ``"layout"``, ``"style_and_layout"``), a list of block names
            (``["up_blocks.0.attentions.1"]``) or a dict ``{block name: weight}``. Default
            None: the call's ``anyms_blocks``, else every block.
        prompt: (keyword only) a regional prompt (SD 1.5 and SDXL): inside the subject's region
            its text replaces the global prompt's in every cross-attention layer, in the same
            routing rule as images (``overwrite``: the last covering region with a prompt;
            ``sum``: every covering one adds); the global prompt acts exactly where no region
            with a prompt is. It changes only the cross-attention keys and values there: on
            SDXL the prompt goes through both text encoders and their hidden states are
            concatenated, as diffusers does for the global prompt, while the pooled text
            embedding and ``add_time_ids`` stay the global prompt's. In classifier-free
            guidance's unconditional pass the region sees the global negative prompt (so with
            ``overwrite``, or regions with prompts that do not overlap, that pass is the one
            without regional prompts). At most the tokenizer's length (77 tokens for CLIP).
            The prompt acts within the subject's window (``start``, ``end``), at weight 1 (it
            replaces the text); ``scale``, ``schedule``, ``blocks`` and ``negative_image`` are the
            image's, so a subject with a prompt and no image must leave them at their defaults.
            A subject with both acts twice in its region: its image branch adds, its text
            branch replaces the global text.
        adapter: (keyword only) which loaded IP-Adapter encodes the subject's image and projects
            it (its ``to_k_ip`` / ``to_v_ip``): an index into the adapters loaded with the list form
            ``pipe.load_ip_adapter(repo, subfolder=..., weight_name=[w0, w1])``. Default 0. Subjects
            of different adapters (4-token and 16-token "plus" ones too) act in the same call, with
            the regional prompts. The image's: a subject without an image leaves it at 0.

    At a step where its scale is 0 (outside its window, or ``scale=0``) a subject is absent:
    in ``overwrite`` mode the subject under it takes its tokens, as if it had not been given.

    Give a box, a mask or both (the mask is the region); a subject with neither is an error,
    as is a subject with neither an image nor a prompt.
    """

    image: Any = None
    box: Optional[Tuple[float, float, float, float]] = None
    scale: float = 1.0
    label: Optional[str] = None
    mask: Any = field(default=None, kw_only=True)
    start: float = field(default=0.0, kw_only=True)
    end: float = field(default=1.0, kw_only=True)
    schedule: str = field(default="constant", kw_only=True)
    negative_image: Any = field(default=None, kw_only=True)
    blocks: Any = field(default=None, kw_only=True)
    prompt: Optional[str] = field(default=None, kw_only=True)
    adapter: int = field(default=0, kw_only=True)

    @property
    def kind(self) -> str:
        """``"image"``, ``"prompt"`` (a text-only region) or ``"both"`` (:data:`anyms.layout.KINDS`)."""
        if self.prompt is None:
            return "image"
        return "prompt" if self.image is None else "both"

    @property
    def timed(self) -> bool:
        """Whether the subject has a window or schedule other than the defaults."""
        return (self.start, self.end, self.schedule) != (0.0, 1.0, "constant")

    def load_image(self, name: str = "image") -> Image.Image:
        """The image as an RGB PIL image; raises ValueError/TypeError naming ``name``."""
        return _load_image(self.image, name)


def _every_block(blocks) -> bool:
    return blocks is None or (isinstance(blocks, str) and blocks == "all")


def _load_image(image, name: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        return read_image(os.fspath(image), name, "RGB")
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or 0 in arr.shape:
            raise ValueError(f"{name}: an array image must be H x W or H x W x C with C in (1, 3, 4), "
                             f"got shape {image.shape}")
        if arr.dtype == np.uint8:
            pass
        elif np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
                raise ValueError(f"{name}: a float array image must hold values in [0, 1]")
            arr = (arr * 255).round().astype(np.uint8)
        else:
            raise ValueError(f"{name}: an array image must be uint8 or float in [0, 1], got {arr.dtype}")
        return Image.fromarray(arr).convert("RGB")
    raise TypeError(f"{name} must be a PIL image, a path or a numpy array, got {type(image).__name__}")


def _check_box(box, name: str) -> Tuple[float, float, float, float]:
    from anyms_kernels.regions import as_box_tensor

    try:
        if isinstance(box, torch.Tensor):   # read as rasterize_boxes reads a tensor (float32 0.3 is 0.3)
            box = as_box_tensor(box, name).tolist()
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 4 numbers (x0, y0, x1, y1), got {box!r}") from None
    if len(values) != 4:
        raise ValueError(f"{name} must be 4 numbers (x0, y0, x1, y1), got {len(values)}: {box!r}")
    check_normalized_boxes(torch.tensor([values], dtype=torch.float64), name)
    return values


def _check_scale(scale, name: str) -> float:
    """A subject's scale as a float; ValueError naming ``name`` unless it is a number that stays
    finite in float32, the dtype the layout keeps scales in (1e39 is finite as a Python float
    but inf there)."""
    message = f"{name} must be a finite number (at most {float(np.finfo(np.float32).max):.4g} in magnitude), " \
              f"got {scale!r}"
    if isinstance(scale, (bool, str, bytes)):       # float("1.0") would read a string as a number
        raise ValueError(message)
    try:
        value = float(scale)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(message) from None
    if not torch.isfinite(torch.tensor(value, dtype=torch.float32)):
        raise ValueError(message)
    return value


def _check_adapter_index(adapter, name: str, loaded: Optional[int] = None) -> int:
    """A subject's IP-Adapter index: an int in ``[0, loaded)`` (``loaded`` None: not known yet, >= 0)."""
    if isinstance(adapter, bool) or not isinstance(adapter, (int, np.integer)):
        raise ValueError(f"{name} must be an int, the index of a loaded IP-Adapter, got {adapter!r}")
    adapter = int(adapter)
    if adapter < 0 or (loaded is not None and adapter >= loaded):
        have = "" if loaded is None else (f": {loaded} IP-Adapter{'s are' if loaded != 1 else ' is'} loaded, "
                                          f"0 .. {loaded - 1}")
        raise ValueError(f"{name} is {adapter}, no loaded IP-Adapter{have or ' (indices start at 0)'}")
    return adapter


@dataclass
class AnyMSPlan:
    """A checked set of subjects, in priority order (ascending: the last one is on top).

    ``order[i]`` is the index in the user's list of the i-th subject here. ``images`` are the
    subjects' images in that order, for the subjects that have one (the IP-Adapter's images).
    ``layout`` is set once the pipeline knows the latent size (``None`` before).
    """

    subjects: List[Subject]
    images: List[Image.Image]
    order: List[int]
    mode: str
    layout: Optional[Layout] = None
    blocks: Any = None              # the call's anyms_blocks (checked), for subjects without their own
    # each subject's blocks resolved on the model (resolve_blocks); None: every block
    resolved_blocks: Optional[List[Any]] = None
    # the image tokens of each loaded IP-Adapter (check_adapters); None: not checked against a model
    adapter_tokens: Optional[List[int]] = None

    @property
    def adapters(self) -> List[int]:
        """Each subject's IP-Adapter index, in plan order."""
        return [s.adapter for s in self.subjects]

    def adapter_images(self, num_adapters: int) -> List[List[Image.Image]]:
        """The subjects' images of each of ``num_adapters`` adapters, in plan order (the embeddings'
        order, :meth:`anyms.Layout.adapter_subjects`); subjects without an image have none."""
        return [[s.image for s in self.subjects if s.image is not None and s.adapter == a]
                for a in range(num_adapters)]

    def check_adapters(self, adapter_tokens: Sequence[int]) -> "AnyMSPlan":
        """Check every subject's adapter against the loaded IP-Adapters, whose image tokens are
        ``adapter_tokens`` (one count per adapter); ValueError naming ``subjects[i].adapter``. No
        model work. Returns self."""
        for i, subject in zip(self.order, self.subjects):
            _check_adapter_index(subject.adapter, f"subjects[{i}].adapter", len(adapter_tokens))
        self.adapter_tokens = [int(t) for t in adapter_tokens]
        return self

    @property
    def image_tokens(self) -> Optional[int]:
        """The token count the layers pad the image branches to: the largest of the adapters the
        subjects' images use (each branch's own count is the layout's, :meth:`Layout.branch_tokens`);
        None without images or before :meth:`check_adapters`."""
        if self.adapter_tokens is None:
            return None
        return max((self.adapter_tokens[s.adapter] for s in self.subjects if s.image is not None), default=None)

    @property
    def labels(self) -> List[str]:
        return [s.label for s in self.subjects]

    @property
    def prompts(self) -> List[str]:
        """The regional prompts, in priority order (the layout's prompt branches)."""
        return [s.prompt for s in self.subjects if s.prompt is not None]

    def refuse_prompts(self, why: str) -> None:
        """ValueError naming the first ``subjects[i].prompt`` given, saying ``why`` it cannot act."""
        given = sorted(i for i, s in zip(self.order, self.subjects) if s.prompt is not None)
        if given:
            raise ValueError(f"subjects[{given[0]}].prompt: {why}")

    @property
    def timed(self) -> bool:
        """Whether any subject has a window or a schedule (the pipeline then sets each step)."""
        return any(s.timed for s in self.subjects)

    def layout_args(self) -> dict:
        """The :class:`Layout` arguments of these subjects, but the grid: scales, mode, masks,
        windows and schedules."""
        masks = [s.mask for s in self.subjects]
        args = dict(scales=[s.scale for s in self.subjects], mode=self.mode,
                    masks=masks if any(m is not None for m in masks) else None,
                    windows=[(s.start, s.end) for s in self.subjects],
                    schedules=[s.schedule for s in self.subjects])
        if self.prompts:
            args["kinds"] = [s.kind for s in self.subjects]
        if any(self.adapters):
            args["adapters"] = self.adapters
        # the image subjects' token counts, when their adapters differ in it (a prompt-only
        # subject's entry is not read: its count is its text states' length)
        counts = None if self.adapter_tokens is None else [self.adapter_tokens[a] for a in self.adapters]
        if counts is not None and len({c for c, s in zip(counts, self.subjects) if s.image is not None}) > 1:
            args["subject_tokens"] = counts
        if self.resolved_blocks is None:      # never run a selection as "every block" silently
            given = [i for i, s in zip(self.order, self.subjects) if not _every_block(s.blocks)]
            if given or not _every_block(self.blocks):
                name = f"subjects[{given[0]}].blocks" if given else "anyms_blocks"
                raise ValueError(f"{name} selects blocks, which need the model's layer names: call "
                                 f"plan.resolve_blocks(model) before making the layout")
        elif any(b is not None for b in self.resolved_blocks):
            args["blocks"] = list(self.resolved_blocks)
        return args

    def resolve_blocks(self, model) -> "AnyMSPlan":
        """Turn every subject's blocks (or the call's ``anyms_blocks``) into block names of
        ``model`` (a pipeline, U-Net or transformer with IP-Adapter processors); ValueError naming
        ``subjects[i].blocks`` (``anyms_blocks`` for the call's) when a name or preset has no block
        there. No model work: names only. Returns self."""
        layers = adapter_layers(model)
        resolved, done = [], {}
        for i, subject in zip(self.order, self.subjects):
            own = subject.blocks is not None
            spec = subject.blocks if own else self.blocks
            if own or "call" not in done:
                value = resolve_blocks(spec, layers, f"subjects[{i}].blocks" if own else "anyms_blocks")
                if not own:
                    done["call"] = value
            else:
                value = done["call"]
            resolved.append(value)
        self.resolved_blocks = resolved
        return self

    @property
    def mask_hw(self) -> Optional[Tuple[int, int]]:
        """``(height, width)`` of the subjects' masks (all the same), or None without masks."""
        for s in self.subjects:
            if s.mask is not None:
                return tuple(s.mask.shape)
        return None

    def image_size(self, height: Optional[int], width: Optional[int],
                   multiple: int = 8) -> Tuple[Optional[int], Optional[int]]:
        """The ``(height, width)`` to generate: the masks' size where not given.

        Raises ValueError naming the mask when a given size differs from the masks', or
        when the masks' size is not a multiple of ``multiple`` (the pipelines' rule).
        Without masks it returns its arguments.
        """
        hw = self.mask_hw
        if hw is None:
            return height, width
        name = self._first_mask_name()
        for what, given, size in (("height", height, hw[0]), ("width", width, hw[1])):
            if given is not None and int(given) != size:
                raise ValueError(f"{name} is {hw[0]}x{hw[1]} pixels (height x width) but the image's {what} is "
                                 f"{given}: give masks at the image's size (or leave height and width out: they "
                                 f"default to the masks' size)")
        if hw[0] % multiple or hw[1] % multiple:
            raise ValueError(f"{name} is {hw[0]}x{hw[1]} pixels, and the image takes its size: both sides must be "
                             f"multiples of {multiple}")
        return hw

    def _first_mask_name(self) -> str:
        i = next(i for i, s in enumerate(self.subjects) if s.mask is not None)
        return f"subjects[{self.order[i]}].mask"

    def make_layout(self, latent_hw) -> Layout:
        return Layout([list(s.box) for s in self.subjects], latent_hw, **self.layout_args())

    def negative_image_names(self) -> List[str]:
        """``subjects[i].negative_image`` of the subjects that have one, by the user's index."""
        return [f"subjects[{i}].negative_image"
                for i in sorted(self.order[k] for k, s in enumerate(self.subjects) if s.negative_image is not None)]

    def require_guidance(self, guided: bool, why: str) -> None:
        """Refuse negative images in a call that runs no unconditional pass (``guided`` False):
        there they could change nothing, and a silent no-op would hide the mistake. ``why``
        says what turned guidance off."""
        names = self.negative_image_names()
        if names and not guided:
            raise ValueError(f"{names[0]} acts only in classifier-free guidance's unconditional pass, and this "
                             f"call runs none ({why}): leave the negative image out, or turn guidance on")


def prepare_subjects(subjects, mode: str = "overwrite", priority: str = "order", blocks=None) -> AnyMSPlan:
    """Check the subjects, read their images and sort them by priority. No model work.

    Raises ValueError/TypeError naming the argument: ``subjects`` not a non-empty list
    of :class:`Subject`; a subject with neither box nor mask; a box that is not 4
    numbers in ``[0, 1]`` with ``x1 > x0`` and ``y1 > y0``; a mask that is not 2-D,
    is empty, holds NaN, has another dtype than bool or real numbers, or another size
    than the other subjects' masks (:func:`anyms.layout.load_mask`); a scale that is
    not a finite number; a ``start`` / ``end`` that is not a number in ``[0, 1]``, or a
    ``start`` after its ``end``; an unknown ``schedule``; a ``blocks`` (the subject's, or
    ``blocks``, the call's ``anyms_blocks``) that is no preset, block list or dict
    (:func:`anyms.blocks.check_blocks`: the names are checked against the model by
    :meth:`AnyMSPlan.resolve_blocks`); an ``adapter`` that is not an int >= 0 (checked against the
    loaded adapters by :meth:`AnyMSPlan.check_adapters`); an image or a negative image that cannot be read; an
    unknown ``anyms_mode`` or ``anyms_priority``.

    The checked subjects hold RGB PIL images, bool ``[H, W]`` mask tensors, and a box
    for each subject (a masked subject without one gets its mask's bounding box).
    ``smaller_on_top`` compares region areas: a mask's pixel count, a box's area.
    """
    if mode not in MODES:
        raise ValueError(f"anyms_mode must be one of {MODES}, got {mode!r}")
    if priority not in PRIORITIES:
        raise ValueError(f"anyms_priority must be one of {PRIORITIES}, got {priority!r}")
    if isinstance(subjects, Subject) or not isinstance(subjects, (list, tuple)):
        raise TypeError(f"subjects must be a list of anyms.Subject, got {type(subjects).__name__}")
    if len(subjects) == 0:
        raise ValueError("subjects is empty: give at least one anyms.Subject, or leave subjects out")
    check_blocks(blocks, "anyms_blocks")
    checked, images = [], []
    mask_hw, mask_from = None, None
    for i, subject in enumerate(subjects):
        name = f"subjects[{i}]"
        if not isinstance(subject, Subject):
            raise TypeError(f"{name} must be an anyms.Subject, got {type(subject).__name__}")
        if subject.box is None and subject.mask is None:
            raise ValueError(f"{name} has neither a box nor a mask: give box=(x0, y0, x1, y1) or mask=...")
        if subject.image is None and subject.prompt is None:
            raise ValueError(f"{name} has neither an image nor a prompt: give image=... (a reference image), "
                             f"prompt=\"...\" (a regional prompt), or both")
        mask = None if subject.mask is None else load_mask(subject.mask, f"{name}.mask")
        if mask is not None:
            if mask_hw is None:
                mask_hw, mask_from = tuple(mask.shape), f"{name}.mask"
            elif tuple(mask.shape) != mask_hw:
                raise ValueError(f"{name}.mask is {mask.shape[0]}x{mask.shape[1]} pixels but {mask_from} is "
                                 f"{mask_hw[0]}x{mask_hw[1]}: every mask must have the image's size")
        box = _check_box(subject.box, f"{name}.box") if subject.box is not None else mask_bbox(mask)
        scale = _check_scale(subject.scale, f"{name}.scale")
        start, end = check_window(subject.start, subject.end, name)
        schedule = check_schedule(subject.schedule, f"{name}.schedule")
        check_blocks(subject.blocks, f"{name}.blocks")
        adapter = _check_adapter_index(subject.adapter, f"{name}.adapter")
        if subject.prompt is not None:
            check_regional_prompt(subject, name, scale, schedule)
        images.append(None if subject.image is None else subject.load_image(f"{name}.image"))
        negative = None if subject.negative_image is None else _load_image(subject.negative_image,
                                                                          f"{name}.negative_image")
        label = subject.label
        if not label:
            is_path = isinstance(subject.image, (str, os.PathLike))
            label = os.path.splitext(os.path.basename(os.fspath(subject.image)))[0] if is_path else \
                subject.prompt if subject.image is None else f"subject {i}"
        checked.append(Subject(images[-1], box, scale, label, mask=mask, start=start, end=end, schedule=schedule,
                               negative_image=negative, blocks=subject.blocks, prompt=subject.prompt,
                               adapter=adapter))
    order = list(range(len(checked)))
    if priority == "smaller_on_top":
        # Largest region first (bottom), smallest last (top); equal areas keep the given order.
        def area(i):
            if checked[i].mask is not None:
                return float(checked[i].mask.float().mean())
            x0, y0, x1, y1 = checked[i].box
            return (x1 - x0) * (y1 - y0)
        order.sort(key=lambda i: -area(i))
    return AnyMSPlan([checked[i] for i in order], [images[i] for i in order if images[i] is not None], order, mode,
                     blocks=blocks)


class AnyMSPipelineMixin:
    """The AnyMS call, shared by the SDXL and SD 1.5 pipelines (put it first in the bases).

    A subclass's ``__call__`` has its diffusers parent's signature plus the keyword-only
    ``subjects``, ``anyms_mode`` and ``anyms_priority`` (``inspect.signature`` shows
    them all, as diffusers' tools and tests expect). After a call with subjects,
    ``anyms_last_plan`` holds its :class:`AnyMSPlan` (subjects in priority order and the
    :class:`Layout` used), for the pictures.

    One call at a time: a call while another runs on the same pipeline (any thread),
    or a ``subjects=`` call while another AnyMS pipeline runs on the same U-Net (as
    after ``from_pipe``), raises ``RuntimeError`` and changes nothing. diffusers'
    pipelines are not reentrant either (the scheduler's step index, the guidance
    state, the U-Net's attention processors belong to the objects, not to the call);
    for concurrent generations give each thread its own pipeline and U-Net.
    """

    _anyms_pending: Optional[AnyMSPlan] = None
    anyms_last_plan: Optional[AnyMSPlan] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__call__" not in vars(cls):
            cls.__call__ = _call_with_parent_signature(cls)

    def _anyms_check_adapter(self, plan: Optional[AnyMSPlan] = None) -> None:
        """A loaded IP-Adapter whose processors hold its weights, and an image encoder for every
        adapter ``plan``'s subject images use (:meth:`AnyMSPlan.check_adapters`; regional prompts
        need the adapter, not an encoder). No model work."""
        unet = self.unet
        proj = getattr(unet, "encoder_hid_proj", None)
        layers = getattr(proj, "image_projection_layers", None)
        if unet.config.encoder_hid_dim_type != "ip_image_proj" or layers is None:
            # the AnyMS processors take the IP-Adapter's place (its to_k_ip / to_v_ip), prompts' branches included
            raise ValueError("subjects need a loaded IP-Adapter, regional prompts alone too (AnyMS's attention "
                             "processors replace the IP-Adapter's): call pipe.load_ip_adapter(...) first")
        processors = [p for p in unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)]
        if not processors:
            kinds = sorted({type(p).__name__ for p in unet.attn_processors.values()})
            raise ValueError(
                f"an IP-Adapter is loaded (its image projection is in unet.encoder_hid_proj), but no attention "
                f"processor of the U-Net holds its to_k_ip / to_v_ip weights any more: something replaced them "
                f"after load_ip_adapter (the U-Net's processors are {', '.join(kinds)}; unet.set_attn_processor, "
                f"set_default_attn_processor and unet.set_attention_slice do). Load the adapter again "
                f"(pipe.load_ip_adapter(...)); pipe.enable_attention_slicing() keeps it")
        used = [0]
        if plan is not None:
            plan.check_adapters(list(processors[0].num_tokens))
            # the adapters whose encoder encodes a subject image (a text-only subject's is none)
            used = sorted({s.adapter for s in plan.subjects if s.image is not None})
        for adapter in used:
            if self.ip_adapter_image_encoder(adapter)[0] is None:
                which = "" if len(layers) == 1 else f" {adapter}"
                raise ValueError(f"subjects need the IP-Adapter{which}'s image encoder, and the pipeline has none: "
                                 f"load the adapter with its image_encoder_folder, or pass image_encoder= "
                                 f"(pipe.set_ip_adapter_image_encoder(adapter, encoder) for one adapter)")

    # ------------------------------------------------------------ one image encoder per adapter
    _anyms_image_encoders: Optional[dict] = None      # adapter -> (image encoder, feature extractor or None)

    def set_ip_adapter_image_encoder(self, adapter: int, image_encoder, feature_extractor=None) -> None:
        """Give IP-Adapter ``adapter`` (an index into the loaded adapters) an image encoder of its
        own, e.g. the ViT-H of ``ip-adapter-plus-face_sdxl_vit-h`` beside the ViT-bigG that
        ``pipe.image_encoder`` holds for ``ip-adapter_sdxl``. Adapters without one use
        ``pipe.image_encoder``; ``feature_extractor`` None: ``pipe.feature_extractor`` prepares the
        images. ``image_encoder`` None removes the adapter's own. The encoder follows ``pipe.to()``;
        it is not part of ``save_pretrained`` (nor of CPU offload: place it yourself). The list form
        of :meth:`load_ip_adapter` calls this for every adapter whose encoder folder differs from
        the first's. Raises ValueError for an index that is no loaded adapter."""
        layers = getattr(getattr(self.unet, "encoder_hid_proj", None), "image_projection_layers", None)
        loaded = 0 if layers is None else len(layers)
        _check_adapter_index(adapter, "adapter", loaded)
        encoders = dict(self._anyms_image_encoders or {})
        if image_encoder is None:
            encoders.pop(int(adapter), None)
        else:
            encoders[int(adapter)] = (image_encoder, feature_extractor)
        self._anyms_image_encoders = encoders

    @property
    def adapter_image_encoders(self) -> dict:
        """``{adapter: image encoder}`` of the IP-Adapters with an encoder of their own (the memory
        estimate counts them beside ``image_encoder``)."""
        return {a: encoder for a, (encoder, _) in (self._anyms_image_encoders or {}).items()}

    def ip_adapter_image_encoder(self, adapter: int = 0):
        """``(image encoder, feature extractor)`` of IP-Adapter ``adapter``: its own
        (:meth:`set_ip_adapter_image_encoder`), else the pipeline's."""
        encoder, extractor = (self._anyms_image_encoders or {}).get(adapter, (None, None))
        if encoder is None:
            return getattr(self, "image_encoder", None), self.feature_extractor
        return encoder, extractor if extractor is not None else self.feature_extractor

    def load_ip_adapter(self, pretrained_model_name_or_path_or_dict, subfolder, weight_name,
                        image_encoder_folder="image_encoder", **kwargs):
        """diffusers' ``load_ip_adapter``, plus ``image_encoder_folder`` as a list, one entry per
        adapter (as ``weight_name``): adapter 0's is loaded as diffusers loads it (into
        ``pipe.image_encoder``, when the pipeline has none), and every other adapter whose folder
        is another gets that encoder of its own (:meth:`set_ip_adapter_image_encoder`); None: the
        pipeline's. Folders resolve as diffusers' do (a bare name is inside the adapter's subfolder).

            pipe.load_ip_adapter("h94/IP-Adapter", subfolder="sdxl_models",
                                 weight_name=["ip-adapter_sdxl.safetensors",
                                              "ip-adapter-plus-face_sdxl_vit-h.safetensors"],
                                 image_encoder_folder=["image_encoder", "models/image_encoder"])

        Loading replaces the adapters loaded before, and the encoders of their own; a load that
        fails leaves them as they were (the encoders of their own are read before the adapters).
        Adapter 0's encoder is ``pipe.image_encoder``: as in diffusers, it is read from adapter 0's
        folder only when the pipeline has none, so loading adapters over loaded ones keeps the
        encoder the pipeline has, whatever ``image_encoder_folder[0]`` names (and so does every
        adapter whose folder is adapter 0's); call :meth:`unload_ip_adapter` first to read it again."""
        weights = weight_name if isinstance(weight_name, list) else [weight_name]
        if not isinstance(image_encoder_folder, (list, tuple)):
            out = super().load_ip_adapter(pretrained_model_name_or_path_or_dict, subfolder, weight_name,
                                          image_encoder_folder=image_encoder_folder, **kwargs)
            self._anyms_image_encoders = None
            return out
        folders = list(image_encoder_folder)
        if len(folders) != len(weights):
            raise ValueError(f"image_encoder_folder has {len(folders)} entries but weight_name {len(weights)}: give "
                             f"one folder (or None) per adapter")
        sources = pretrained_model_name_or_path_or_dict
        sources = list(sources) if isinstance(sources, list) else [sources]
        sources = sources * len(weights) if len(sources) == 1 else sources
        subfolders = list(subfolder) if isinstance(subfolder, list) else [subfolder]
        subfolders = subfolders * len(weights) if len(subfolders) == 1 else subfolders
        if len(sources) != len(weights) or len(subfolders) != len(weights):
            raise ValueError("pretrained_model_name_or_path_or_dict, subfolder and weight_name must have the same "
                             "length")

        def where(i):
            folder = folders[i]
            if folder is None or isinstance(sources[i], dict):
                return None
            return sources[i], (folder if "/" in folder else "/".join(p for p in (subfolders[i], folder) if p))

        # the encoders of their own first, the adapters last: a failure leaves the pipeline as it was
        own = {}
        first = where(0)
        for i in range(1, len(weights)):
            folder = where(i)
            if folder is None or folder == first:
                continue
            from diffusers.utils import is_transformers_version
            from transformers import CLIPVisionModelWithProjection

            dtype_kwarg = {"dtype" if is_transformers_version(">=", "4.56.0") else "torch_dtype": self.dtype}
            options = {k: kwargs[k] for k in ("cache_dir", "local_files_only", "token", "revision") if k in kwargs}
            own[i] = CLIPVisionModelWithProjection.from_pretrained(folder[0], subfolder=folder[1], **dtype_kwarg,
                                                                   **options).to(self.device)
        super().load_ip_adapter(sources, subfolders, weights, image_encoder_folder=folders[0], **kwargs)
        self._anyms_image_encoders = None
        for i, encoder in own.items():
            self.set_ip_adapter_image_encoder(i, encoder)

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """diffusers' ``from_pipe``; an AnyMS pipeline made from one keeps its adapters' own image
        encoders (the same modules), as it keeps the adapters (a plain diffusers pipeline has
        ``image_encoder`` only)."""
        new = super().from_pipe(pipeline, **kwargs)
        encoders = getattr(pipeline, "_anyms_image_encoders", None)
        if encoders and isinstance(new, AnyMSPipelineMixin) and getattr(new, "unet", None) is pipeline.unet:
            new._anyms_image_encoders = dict(encoders)
        return new

    def unload_ip_adapter(self):
        """diffusers' ``unload_ip_adapter``; the adapters' own image encoders go too."""
        self._anyms_image_encoders = None
        return super().unload_ip_adapter()

    def to(self, *args, **kwargs):
        """diffusers' ``to``; the adapters' own image encoders move with the pipeline."""
        out = super().to(*args, **kwargs)
        options = {k: v for k, v in kwargs.items() if k in ("device", "dtype")}
        for encoder, _ in (self._anyms_image_encoders or {}).values():
            encoder.to(*args, **options)
        return out

    def _anyms_call(self, args: tuple, kwargs: dict, subjects: Optional[Sequence[Subject]],
                    anyms_mode: Optional[str], anyms_priority: Optional[str], anyms_blocks=None):
        """The parent pipeline's call, plus AnyMS's arguments:

        Args:
            subjects: :class:`Subject` objects (image, box and/or mask, scale, label).
                Later subjects are on top where regions overlap (see ``anyms_priority``).
                Without them the call is exactly the parent's. With masks, ``height`` and
                ``width`` default to the masks' size, and a given size must equal it.
            anyms_mode: ``"overwrite"`` (AnyMS crop and merge, the default) or ``"sum"``
                (the paper's Eq. 7: overlapping subjects add up).
            anyms_priority: ``"order"`` (the default: the list's order, later on top) or
                ``"smaller_on_top"`` (smaller regions on top of larger ones).
            anyms_blocks: the blocks every subject without its own ``blocks`` acts on: a
                preset, a list of block names or a dict of weights (:mod:`anyms.blocks`;
                default: every block).
            everything else: as the parent pipeline. ``ip_adapter_image`` and
                ``ip_adapter_image_embeds`` cannot be given together with ``subjects``.
                With timed subjects (``start``, ``end``, ``schedule``) the pipeline sets each
                step on the layout: step 0 right before the loop, the next one after your
                ``callback_on_step_end`` (which sees the step that ran) returns.

        Raises:
            ValueError/TypeError before any model work, naming the argument (see
            :func:`prepare_subjects`), and also when no IP-Adapter is loaded, a subject's
            ``adapter`` is no loaded adapter (naming ``subjects[i].adapter``), an adapter the
            subjects use has no image encoder, ``ip_adapter_image``/``ip_adapter_image_embeds`` is
            given with ``subjects``, or a mask's size is not the image's (naming
            ``subjects[i].mask``), a regional prompt is empty, not a string or longer than the
            tokenizer's limit (naming ``subjects[i].prompt``), or a subject has a negative image and the call runs no
            classifier-free guidance (``guidance_scale <= 1``, naming
            ``subjects[i].negative_image``). The parent's own checks (height and width divisible
            by 8, ...) run next, still before any model work.
            RuntimeError, before anything else, when another call runs on this pipeline,
            or (with subjects) on its U-Net (see :class:`AnyMSPipelineMixin`).
        """
        with _one_call_at_a_time(self, with_subjects=subjects is not None):
            parent_call = super().__call__
            if subjects is None:
                for name, value in (("anyms_mode", anyms_mode), ("anyms_priority", anyms_priority),
                                    ("anyms_blocks", anyms_blocks)):
                    if value is not None:
                        raise ValueError(f"{name} was given without subjects; give subjects=[anyms.Subject(...)]")
                return parent_call(*args, **kwargs)
            bound = inspect.signature(parent_call).bind_partial(*args, **kwargs)
            for name in ("ip_adapter_image", "ip_adapter_image_embeds"):
                if bound.arguments.get(name) is not None:
                    raise ValueError(f"give either subjects or {name}, not both: the subjects' images are the "
                                     f"IP-Adapter images")
            plan = prepare_subjects(subjects, anyms_mode or "overwrite", anyms_priority or "order", anyms_blocks)
            self._anyms_check_adapter(plan)
            plan.resolve_blocks(self.unet)
            check_prompt_lengths(subjects, prompt_tokenizers(self))
            call_kwargs = dict(bound.arguments)
            call_kwargs.update(call_kwargs.pop("kwargs", {}))
            # the parent's rule for classifier-free guidance (its do_classifier_free_guidance)
            guidance = call_kwargs.get("guidance_scale",
                                       inspect.signature(parent_call).parameters["guidance_scale"].default)
            distilled = self.unet.config.time_cond_proj_dim is not None
            plan.require_guidance(float(guidance) > 1 and not distilled,
                                  "a guidance-distilled U-Net" if distilled else f"guidance_scale {guidance:g} <= 1")
            if plan.mask_hw is not None:       # the masks fix the image size (checked before any model work)
                call_kwargs["height"], call_kwargs["width"] = plan.image_size(
                    call_kwargs.get("height"), call_kwargs.get("width"), self.vae_scale_factor)
            # one entry per loaded adapter (its subjects' images), as the parent checks them;
            # prepare_ip_adapter_image_embeds encodes them, each with its adapter's encoder
            call_kwargs["ip_adapter_image"] = plan.adapter_images(len(plan.adapter_tokens))
            if plan.timed:
                chain_step_callback(self, plan, call_kwargs)

            # anyms_attention installs the AnyMS processors (layout None until check_inputs
            # sets it) and, on exit, puts back exactly the processors and layouts of before.
            with anyms_attention(self):
                self._anyms_pending = plan
                try:
                    return parent_call(**call_kwargs)
                finally:
                    self._anyms_pending = None

    def encode_image(self, image, device, num_images_per_prompt, output_hidden_states=None, adapter: int = 0):
        """The parent's, with IP-Adapter ``adapter``'s image encoder (:meth:`ip_adapter_image_encoder`),
        and during an AnyMS call each subject image goes through the image encoder alone (batch 1).

        A batch of S images and S batches of one need not give the same last bits (the
        encoder's matmuls may reduce in another order for another batch size, on some
        CPUs), so encoding each image alone makes a subject's embedding independent of
        the other subjects of the call: ``pipe(...)``, ``anyms generate``, ``--jobs`` (whose
        :class:`~anyms.embeddings.SubjectEmbeddingCache` encodes one image at a time) and
        ``--from`` run the same operations and give the same bytes.
        """
        encoder, extractor = self.ip_adapter_image_encoder(adapter)
        if encoder is getattr(self, "image_encoder", None) and extractor is self.feature_extractor:
            encode = super().encode_image
        else:
            def encode(images, dev, num, hidden):
                return _encode_with(encoder, extractor, images, dev, num, hidden)
        if self._anyms_pending is None or not isinstance(image, (list, tuple)) or len(image) <= 1:
            return encode(image, device, num_images_per_prompt, output_hidden_states)
        parts = [encode([one], device, num_images_per_prompt, output_hidden_states) for one in image]
        # the parent repeats each image's rows num_images_per_prompt times, image after image
        return torch.cat([cond for cond, _ in parts]), torch.cat([uncond for _, uncond in parts])

    def prepare_ip_adapter_image_embeds(self, ip_adapter_image, ip_adapter_image_embeds, device,
                                        num_images_per_prompt, do_classifier_free_guidance):
        """The parent's; during an AnyMS call, each adapter's subjects are encoded with that
        adapter's encoder (``encode_image(..., adapter=a)``, each image alone), and with guidance a
        subject with a negative image has that image's embedding in the unconditional half, in
        place of the parent's default.

        The negative image goes through ``encode_image`` alone (batch 1), as the subject images
        do, so ``--jobs``'s embedding cache serves it and every path runs the same operations.
        The embedding is what the conditional pass would take for that image: the image
        embedding for the 4-token adapters, the encoder's penultimate hidden states for the
        "plus" ones. An adapter none of whose subjects has an image (every adapter, in a call with
        regional prompts only) gets a placeholder of zeros for one image (the U-Net projects every
        loaded adapter's embeddings; the AnyMS processors do not read it).
        """
        plan = self._anyms_pending
        if plan is None or ip_adapter_image_embeds is not None:
            return super().prepare_ip_adapter_image_embeds(ip_adapter_image, ip_adapter_image_embeds, device,
                                                           num_images_per_prompt, do_classifier_free_guidance)
        from diffusers.models.embeddings import ImageProjection

        embeds = []
        for adapter, layer in enumerate(self.unet.encoder_hid_proj.image_projection_layers):
            hidden = not isinstance(layer, ImageProjection)
            subjects = [s for s in plan.subjects if s.image is not None and s.adapter == adapter]
            if not subjects:
                embeds.append(_placeholder_embeds(layer, 2 if do_classifier_free_guidance else 1, device))
                continue
            positive, negative = self.encode_image([s.image for s in subjects], device, 1, hidden, adapter=adapter)
            positive, negative = positive[None], negative[None]
            if do_classifier_free_guidance:
                if any(s.negative_image is not None for s in subjects):
                    negative = negative.clone()
                    for j, subject in enumerate(subjects):
                        if subject.negative_image is not None:
                            embedding, _ = self.encode_image([subject.negative_image], device, 1, hidden,
                                                             adapter=adapter)
                            negative[:, j] = embedding[0].to(negative.dtype)
                embeds.append(torch.cat([negative, positive]))
            else:
                embeds.append(positive)
        return super().prepare_ip_adapter_image_embeds(None, embeds, device, num_images_per_prompt,
                                                       do_classifier_free_guidance)

    def encode_prompt(self, *args, **kwargs):
        """The parent's; during an AnyMS call with regional prompts it also encodes them
        (:func:`anyms.regional_prompts.encode_regional_prompts`: the parent's own encoder on each
        prompt, the global negative prompt in the unconditional half) and sets their states on
        the call's layout. The parent's outputs are returned unchanged (on SDXL the pooled
        embedding and the time ids stay the global prompt's)."""
        out = super().encode_prompt(*args, **kwargs)
        plan = self._anyms_pending
        if plan is not None and plan.prompts and plan.layout is not None:
            arguments = inspect.signature(super().encode_prompt).bind(*args, **kwargs)
            arguments.apply_defaults()
            arguments = arguments.arguments
            plan.layout.set_prompt_states(encode_regional_prompts(
                super().encode_prompt, plan.prompts, arguments, out[0], out[1],
                bool(arguments["do_classifier_free_guidance"])))
        return out

    def progress_bar(self, iterable=None, total=None):
        """The parent's; during an AnyMS call with timed subjects it first sets step 0 (see
        :func:`start_steps`): the pipelines open it once, right before the denoising loop."""
        if self._anyms_pending is not None:
            start_steps(self, self._anyms_pending)
        return super().progress_bar(iterable, total)

    def check_inputs(self, *args, **kwargs):
        """The parent's check; during an AnyMS call it also sets the layout.

        The parent calls this first thing, with the height and width it settled on
        (its defaults applied), before any model work: the one place where the
        latent size is known for sure, so the layout is built here, with the routing
        of every U-Net level on the device the U-Net runs on (:meth:`Layout.prepare`):
        the denoising loop, compiled or not, only reads it.
        """
        super().check_inputs(*args, **kwargs)
        plan = self._anyms_pending
        if plan is not None:
            sizes = inspect.signature(super().check_inputs).bind(*args, **kwargs).arguments
            height, width = int(sizes["height"]), int(sizes["width"])
            layout = plan.make_layout((height // self.vae_scale_factor, width // self.vae_scale_factor))
            tokens = None
            if plan.prompts:        # the token counts the layers will hand the op (its routing carries them)
                tokens = (plan.image_tokens, prompt_tokenizers(self)[0].model_max_length)
            plan.layout = layout.prepare(self._execution_device, levels=len(self.unet.config.block_out_channels),
                                         tokens=tokens)
            set_anyms_layout(self, plan.layout)
            self.anyms_last_plan = plan

    def enable_attention_slicing(self, slice_size: Union[str, int, None] = "auto"):
        """diffusers' attention slicing, except that the IP-Adapter's layers keep their processors.

        diffusers' own replaces every attention processor, the IP-Adapter's too, which
        drops their ``to_k_ip`` / ``to_v_ip`` weights (an ``ip_adapter_image`` call then
        fails). Here the other layers are sliced and the adapter's cross-attention layers
        (the AnyMS op's, which needs no slicing) stay as they are; ``disable_attention_slicing``
        (``slice_size=None``) likewise.
        """
        unet = self.unet
        adapter = {name: p for name, p in unet.attn_processors.items() if isinstance(p, IPAdapterAttnProcessor2_0)}
        super().enable_attention_slicing(slice_size)
        if adapter:
            processors = dict(unet.attn_processors)
            processors.update(adapter)
            unet.set_attn_processor(processors)

    def to_json_string(self) -> str:
        """The pipeline's config as JSON, naming the diffusers pipeline this one extends.

        ``save_pretrained`` writes it to ``model_index.json``. AnyMS adds no weights and
        no config to its parent, so the folder is the parent's: ``DiffusionPipeline``
        and the ``AutoPipeline`` classes load it (as the parent, which they know), and
        ``AnyMSStableDiffusionXLPipeline.from_pretrained`` (or ``from_pipe``) as AnyMS.
        """
        config = json.loads(super().to_json_string())
        config["_class_name"] = _parent_pipeline(type(self)).__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"


def _encode_with(encoder, feature_extractor, image, device, num_images_per_prompt, output_hidden_states):
    """The SD / SDXL pipelines' ``encode_image`` with another image encoder (an adapter's own):
    ``(embeds, negative embeds)``, the penultimate hidden states with ``output_hidden_states``."""
    dtype = next(encoder.parameters()).dtype
    if not isinstance(image, torch.Tensor):
        image = feature_extractor(image, return_tensors="pt").pixel_values
    image = image.to(device=encoder.device, dtype=dtype)
    if output_hidden_states:
        positive = encoder(image, output_hidden_states=True).hidden_states[-2]
        negative = encoder(torch.zeros_like(image), output_hidden_states=True).hidden_states[-2]
    else:
        positive = encoder(image).image_embeds
        negative = torch.zeros_like(positive)
    return (positive.to(device).repeat_interleave(num_images_per_prompt, dim=0),
            negative.to(device).repeat_interleave(num_images_per_prompt, dim=0))


def _placeholder_embeds(layer, rows: int, device) -> torch.Tensor:
    """Zeros for one image per row, ``[rows, 1, E]`` (or ``[rows, 1, 1, C]`` for a "plus" projection,
    one token), for the IP-Adapter whose image projection is ``layer`` when no subject of the call
    has an image of it: the U-Net projects every loaded adapter's embeddings, and the AnyMS
    processors read none of that adapter (a call with regional prompts only reads no image at
    all), so the values never reach the output. ValueError for a projection of another kind."""
    from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection

    dtype = next(layer.parameters()).dtype
    if isinstance(layer, ImageProjection):
        shape = (rows, 1, layer.image_embeds.in_features)
    elif isinstance(layer, IPAdapterPlusImageProjection):
        shape = (rows, 1, 1, layer.proj_in.in_features)
    else:
        raise ValueError(f"an IP-Adapter none of whose subjects has an image (a call with prompts only, or an "
                         f"adapter no subject uses) needs an image projection of ImageProjection or "
                         f"IPAdapterPlusImageProjection, this one's is {type(layer).__name__}: give it a subject image")
    return torch.zeros(shape, dtype=dtype, device=device)


# ---------------------------------------------------------------- the steps of a timed call
def start_steps(pipe, plan: AnyMSPlan) -> None:
    """Set step 0 of ``pipe.num_timesteps`` on a timed plan's layout.

    diffusers' SD, SDXL and FLUX pipelines set ``num_timesteps`` (the steps the loop will
    run, after ``timesteps``, ``sigmas`` or ``denoising_end``) and then open the progress
    bar, once, right before the loop: the one moment both are known and no step has run.
    """
    if plan.timed and plan.layout is not None:
        plan.layout.set_step(0, pipe.num_timesteps)


def chain_step_callback(pipe, plan: AnyMSPlan, arguments: dict, set_step=None) -> None:
    """Put, in a timed call's ``arguments``, a ``callback_on_step_end`` that calls the user's
    (which sees the scales of the step that ran) and then sets the next step on the layout
    (``set_step(step, num_steps)`` in its place: a call with several layouts, the tiles')."""
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    user = arguments.get("callback_on_step_end")
    if isinstance(user, (PipelineCallback, MultiPipelineCallbacks)):
        # the parent reads the tensors such an object wants from the object itself
        arguments["callback_on_step_end_tensor_inputs"] = user.tensor_inputs

    def on_step_end(p, i, t, tensors):
        out = tensors if user is None else user(p, i, t, tensors)
        if i + 1 < p.num_timesteps:
            (set_step or plan.layout.set_step)(i + 1, p.num_timesteps)
        return out

    arguments["callback_on_step_end"] = on_step_end


_ANYMS_PARAMETERS = (("subjects", Optional[Sequence[Subject]]), ("anyms_mode", Optional[str]),
                     ("anyms_priority", Optional[str]), ("anyms_blocks", Any))


def _parent_pipeline(cls) -> type:
    """The diffusers pipeline class that an AnyMS pipeline class extends."""
    for base in cls.__mro__[1:]:
        if not issubclass(base, AnyMSPipelineMixin) and "__call__" in vars(base):
            return base
    raise TypeError(f"{cls.__name__} has no diffusers pipeline among its bases")


def _call_with_parent_signature(cls):
    """``cls.__call__``: the parent's parameters, then AnyMS's keyword-only ones, then its ``**kwargs``.

    diffusers' tests and tools read ``inspect.signature(pipeline_class.__call__)`` (which
    arguments exist: guidance_scale, callback_on_step_end, num_images_per_prompt, ...), so
    the signature is the parent's own, not ``(*args, **kwargs)``. Arguments are bound by
    the parent's signature, so a wrong one fails as it would in the parent.
    """
    parent = _parent_pipeline(cls)
    signature = inspect.signature(parent.__call__)
    params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    var_keyword = [p for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD]
    clash = {p.name for p in params} & {name for name, _ in _ANYMS_PARAMETERS}
    if clash:
        raise TypeError(f"{parent.__name__}.__call__ already has {sorted(clash)}: AnyMS's arguments would shadow them")
    anyms = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
             for name, annotation in _ANYMS_PARAMETERS]

    def __call__(self, *args, subjects=None, anyms_mode=None, anyms_priority=None, anyms_blocks=None, **kwargs):
        return self._anyms_call(args, kwargs, subjects, anyms_mode, anyms_priority, anyms_blocks=anyms_blocks)

    __call__.__signature__ = signature.replace(parameters=params + anyms + var_keyword)
    __call__.__doc__ = AnyMSPipelineMixin._anyms_call.__doc__
    __call__.__qualname__ = f"{cls.__qualname__}.__call__"
    __call__.__module__ = cls.__module__
    return __call__


# ---------------------------------------------------------------- one call at a time
# The calls in progress: pipeline -> its thread's name; underlying U-Net -> [plain calls,
# subjects= calls] of AnyMS pipelines on it. Weak keys: they hold no model alive.
_CALLS_LOCK = threading.Lock()
_BUSY_PIPELINES: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
_BUSY_UNETS: "weakref.WeakKeyDictionary[Any, List[int]]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _one_call_at_a_time(pipe, with_subjects: bool):
    """Hold ``pipe`` (and its U-Net) for one call; raise RuntimeError, changing nothing, when busy.

    A pipeline runs one call at a time. A U-Net runs any number of plain calls of
    pipelines sharing it, or one ``subjects=`` call (which installs its layout in the
    U-Net's attention processors, where every other call would see it).
    """
    unet = getattr(pipe, "unet", None)
    if unet is None:                                 # FLUX: its transformer (no truth test: a compiled
        unet = getattr(pipe, "transformer", None)    # module's wrapper has no __bool__ / __len__)
    unet = getattr(unet, "_orig_mod", unet)          # torch.compile's wrapper: the module it wraps
    name = type(pipe).__name__
    with _CALLS_LOCK:
        thread = _BUSY_PIPELINES.get(pipe)
        if thread is not None:
            raise RuntimeError(
                f"this {name} is already running a call (thread {thread!r}): a pipeline runs one call at a "
                f"time, as diffusers' pipelines do (the scheduler's step index and the guidance state belong to "
                f"the pipeline, and a subjects= call sets its layout in the U-Net's attention processors). Wait "
                f"for that call (e.g. share a threading.Lock), or give each thread its own pipeline and U-Net")
        counts = _BUSY_UNETS.get(unet) if unet is not None else None
        if counts is not None and (counts[1] or (with_subjects and counts[0])):
            what = "a subjects= call" if counts[1] else "a call"
            raise RuntimeError(
                f"another pipeline is running {what} on this {name}'s U-Net (pipelines made with from_pipe share "
                f"it): a subjects= call sets its layout in the U-Net's attention processors, which every call on "
                f"that U-Net would see. Wait for that call, or give each thread its own U-Net")
        _BUSY_PIPELINES[pipe] = threading.current_thread().name
        if unet is not None:
            _BUSY_UNETS.setdefault(unet, [0, 0])[with_subjects] += 1
    try:
        yield
    finally:
        with _CALLS_LOCK:
            del _BUSY_PIPELINES[pipe]
            if unet is not None:
                counts = _BUSY_UNETS[unet]
                counts[with_subjects] -= 1
                if not any(counts):
                    del _BUSY_UNETS[unet]


class AnyMSStableDiffusionXLPipeline(AnyMSPipelineMixin, StableDiffusionXLPipeline):
    """:class:`diffusers.StableDiffusionXLPipeline` with ``subjects=`` (see :class:`AnyMSPipelineMixin`)."""


class AnyMSStableDiffusionPipeline(AnyMSPipelineMixin, StableDiffusionPipeline):
    """:class:`diffusers.StableDiffusionPipeline` with ``subjects=`` (see :class:`AnyMSPipelineMixin`)."""


# AutoPipelineFor*.from_pipe(pipe) takes them as their parents (see anyms.auto_pipeline)
register_auto_pipelines(AnyMSStableDiffusionXLPipeline, AnyMSStableDiffusionPipeline)
