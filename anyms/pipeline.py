"""The AnyMS pipelines: diffusers' SDXL and SD 1.5 pipelines that take subjects with boxes.

    pipe = AnyMSStableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")
    pipe.load_ip_adapter("h94/IP-Adapter", subfolder="sdxl_models", weight_name="ip-adapter_sdxl.safetensors")
    image = pipe("a dog and a cat on a sofa", subjects=[
        Subject("dog.png", box=(0.05, 0.3, 0.5, 0.95), label="dog"),
        Subject("cat.png", box=(0.5, 0.3, 0.95, 0.95), label="cat"),
    ]).images[0]

A call with ``subjects`` does, in order:
1. checks every AnyMS argument (subjects, boxes, images, mode, priority, the loaded
   IP-Adapter) without touching a model, naming the bad argument;
2. runs the parent pipeline with ``ip_adapter_image=[[image_1, ..., image_S]]``
   (one IP-Adapter, S images, each encoded on its own), after installing the AnyMS
   processors if they are not installed yet;
3. when the parent checks its inputs (its first step, before any model work), takes
   the height and width it settled on, builds the :class:`~anyms.Layout` on the
   latent grid and sets it on every AnyMS processor;
4. always puts back the processors (and layouts) that were there before, so that a
   plain call afterwards is plain diffusers.

Without ``subjects`` the pipelines are their parents, unchanged.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from anyms_kernels.regions import MODES, check_normalized_boxes

from .layout import Layout
from .processor import anyms_attention, set_anyms_layout

__all__ = [
    "Subject",
    "AnyMSPlan",
    "PRIORITIES",
    "prepare_subjects",
    "AnyMSStableDiffusionXLPipeline",
    "AnyMSStableDiffusionPipeline",
]

PRIORITIES = ("order", "smaller_on_top")


@dataclass
class Subject:
    """One subject: its reference image, its box and its scale.

    Args:
        image: a PIL image, a path to an image file, or an ``H x W`` / ``H x W x C``
            array (uint8, or floats in ``[0, 1]``; C = 1, 3 or 4).
        box: ``(x0, y0, x1, y1)`` normalised to ``[0, 1]`` of the output image, x to
            the right, y down; ``x1 > x0`` and ``y1 > y0``.
        scale: lambda_s, this subject's IP-Adapter scale (multiplies the adapter's own).
        label: a name for the pictures (default: the file name, or ``"subject i"``).
    """

    image: Any
    box: Tuple[float, float, float, float]
    scale: float = 1.0
    label: Optional[str] = None

    def load_image(self, name: str = "image") -> Image.Image:
        """The image as an RGB PIL image; raises ValueError/TypeError naming ``name``."""
        return _load_image(self.image, name)


def _load_image(image, name: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise ValueError(f"{name}: no image file at {path!r}")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")  # convert() reads the pixels, so a truncated file fails here
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(f"{name}: cannot read {path!r} as an image ({e})") from None
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
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 4 numbers (x0, y0, x1, y1), got {box!r}") from None
    if len(values) != 4:
        raise ValueError(f"{name} must be 4 numbers (x0, y0, x1, y1), got {len(values)}: {box!r}")
    check_normalized_boxes(torch.tensor([values], dtype=torch.float64), name)
    return values


def _check_scale(scale, name: str) -> float:
    if isinstance(scale, bool):
        raise ValueError(f"{name} must be a finite number, got {scale!r}")
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number, got {scale!r}") from None
    if not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {scale!r}")
    return value


@dataclass
class AnyMSPlan:
    """A checked set of subjects, in priority order (ascending: the last one is on top).

    ``order[i]`` is the index in the user's list of the i-th subject here.
    ``layout`` is set once the pipeline knows the latent size (``None`` before).
    """

    subjects: List[Subject]
    images: List[Image.Image]
    order: List[int]
    mode: str
    layout: Optional[Layout] = None

    @property
    def labels(self) -> List[str]:
        return [s.label for s in self.subjects]

    def make_layout(self, latent_hw) -> Layout:
        return Layout([list(s.box) for s in self.subjects], latent_hw,
                      scales=[s.scale for s in self.subjects], mode=self.mode)


def prepare_subjects(subjects, mode: str = "overwrite", priority: str = "order") -> AnyMSPlan:
    """Check the subjects, read their images and sort them by priority. No model work.

    Raises ValueError/TypeError naming the argument: ``subjects`` not a non-empty list
    of :class:`Subject`; a box that is not 4 numbers in ``[0, 1]`` with ``x1 > x0``
    and ``y1 > y0``; a scale that is not a finite number; an image that cannot be
    read; an unknown ``anyms_mode`` or ``anyms_priority``.
    """
    if mode not in MODES:
        raise ValueError(f"anyms_mode must be one of {MODES}, got {mode!r}")
    if priority not in PRIORITIES:
        raise ValueError(f"anyms_priority must be one of {PRIORITIES}, got {priority!r}")
    if isinstance(subjects, Subject) or not isinstance(subjects, (list, tuple)):
        raise TypeError(f"subjects must be a list of anyms.Subject, got {type(subjects).__name__}")
    if len(subjects) == 0:
        raise ValueError("subjects is empty: give at least one anyms.Subject, or leave subjects out")
    checked, images = [], []
    for i, subject in enumerate(subjects):
        name = f"subjects[{i}]"
        if not isinstance(subject, Subject):
            raise TypeError(f"{name} must be an anyms.Subject, got {type(subject).__name__}")
        box = _check_box(subject.box, f"{name}.box")
        scale = _check_scale(subject.scale, f"{name}.scale")
        images.append(subject.load_image(f"{name}.image"))
        label = subject.label
        if not label:
            is_path = isinstance(subject.image, (str, os.PathLike))
            label = os.path.splitext(os.path.basename(os.fspath(subject.image)))[0] if is_path else f"subject {i}"
        checked.append(Subject(images[-1], box, scale, label))
    order = list(range(len(checked)))
    if priority == "smaller_on_top":
        # Largest box first (bottom), smallest last (top); equal areas keep the given order.
        def area(i):
            x0, y0, x1, y1 = checked[i].box
            return (x1 - x0) * (y1 - y0)
        order.sort(key=lambda i: -area(i))
    return AnyMSPlan([checked[i] for i in order], [images[i] for i in order], order, mode)


class AnyMSPipelineMixin:
    """The AnyMS call, shared by the SDXL and SD 1.5 pipelines (put it first in the bases).

    After a call with subjects, ``anyms_last_plan`` holds its :class:`AnyMSPlan`
    (subjects in priority order and the :class:`Layout` used), for the pictures.
    """

    _anyms_pending: Optional[AnyMSPlan] = None
    anyms_last_plan: Optional[AnyMSPlan] = None

    def _anyms_check_adapter(self) -> None:
        unet = self.unet
        proj = getattr(unet, "encoder_hid_proj", None)
        layers = getattr(proj, "image_projection_layers", None)
        if unet.config.encoder_hid_dim_type != "ip_image_proj" or layers is None:
            raise ValueError("subjects need a loaded IP-Adapter: call pipe.load_ip_adapter(...) first")
        if len(layers) != 1:
            raise ValueError(f"subjects use exactly one IP-Adapter (its images are the subjects), "
                             f"but {len(layers)} are loaded: unload_ip_adapter() and load one")
        if getattr(self, "image_encoder", None) is None:
            raise ValueError("subjects need the IP-Adapter's image encoder, and the pipeline has none: "
                             "load the adapter with its image_encoder_folder, or pass image_encoder=")

    def __call__(self, prompt=None, *args, subjects: Optional[Sequence[Subject]] = None,
                 anyms_mode: Optional[str] = None, anyms_priority: Optional[str] = None, **kwargs):
        """The parent pipeline's call, plus AnyMS's arguments:

        Args:
            subjects: :class:`Subject` objects (image, box, scale, label). Later subjects
                are on top where boxes overlap (see ``anyms_priority``). Without them the
                call is exactly the parent's.
            anyms_mode: ``"overwrite"`` (AnyMS crop and merge, the default) or ``"sum"``
                (the paper's Eq. 7: overlapping subjects add up).
            anyms_priority: ``"order"`` (the default: the list's order, later on top) or
                ``"smaller_on_top"`` (smaller boxes on top of larger ones).
            everything else: as the parent pipeline. ``ip_adapter_image`` and
                ``ip_adapter_image_embeds`` cannot be given together with ``subjects``.

        Raises:
            ValueError/TypeError before any model work, naming the argument (see
            :func:`prepare_subjects`), and also when no single IP-Adapter with its image
            encoder is loaded, or ``ip_adapter_image``/``ip_adapter_image_embeds`` is
            given with ``subjects``. The parent's own checks (height and width divisible
            by 8, ...) run next, still before any model work.
        """
        parent_call = super().__call__
        if subjects is None:
            for name, value in (("anyms_mode", anyms_mode), ("anyms_priority", anyms_priority)):
                if value is not None:
                    raise ValueError(f"{name} was given without subjects; give subjects=[anyms.Subject(...)]")
            return parent_call(prompt, *args, **kwargs)
        bound = inspect.signature(parent_call).bind_partial(prompt, *args, **kwargs)
        for name in ("ip_adapter_image", "ip_adapter_image_embeds"):
            if bound.arguments.get(name) is not None:
                raise ValueError(f"give either subjects or {name}, not both: the subjects' images are the "
                                 f"IP-Adapter images")
        plan = prepare_subjects(subjects, anyms_mode or "overwrite", anyms_priority or "order")
        self._anyms_check_adapter()
        call_kwargs = dict(bound.arguments)
        call_kwargs.update(call_kwargs.pop("kwargs", {}))
        call_kwargs["ip_adapter_image"] = [plan.images]  # one adapter, S images

        # anyms_attention installs the AnyMS processors (layout None until check_inputs
        # sets it) and, on exit, puts back exactly the processors and layouts of before.
        with anyms_attention(self):
            self._anyms_pending = plan
            try:
                return parent_call(**call_kwargs)
            finally:
                self._anyms_pending = None

    def check_inputs(self, *args, **kwargs):
        """The parent's check; during an AnyMS call it also sets the layout.

        The parent calls this first thing, with the height and width it settled on
        (its defaults applied), before any model work: the one place where the
        latent size is known for sure, so the layout is built here.
        """
        super().check_inputs(*args, **kwargs)
        plan = self._anyms_pending
        if plan is not None:
            sizes = inspect.signature(super().check_inputs).bind(*args, **kwargs).arguments
            height, width = int(sizes["height"]), int(sizes["width"])
            plan.layout = plan.make_layout((height // self.vae_scale_factor, width // self.vae_scale_factor))
            set_anyms_layout(self, plan.layout)
            self.anyms_last_plan = plan


class AnyMSStableDiffusionXLPipeline(AnyMSPipelineMixin, StableDiffusionXLPipeline):
    """:class:`diffusers.StableDiffusionXLPipeline` with ``subjects=`` (see :class:`AnyMSPipelineMixin`)."""


class AnyMSStableDiffusionPipeline(AnyMSPipelineMixin, StableDiffusionPipeline):
    """:class:`diffusers.StableDiffusionPipeline` with ``subjects=`` (see :class:`AnyMSPipelineMixin`)."""
