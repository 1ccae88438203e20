"""The layout of one generation: subjects' regions (boxes or masks), scales and the overlap mode.

A ``Layout`` is made once per generation (by the pipeline, or by a user of the
processor) and shared by every AnyMS processor of the U-Net. It turns the regions
into a :class:`anyms_kernels.Routing` once per layer grid and device and keeps it,
so that the 70 cross-attention layers of SDXL, at every step, do no region
arithmetic and build nothing: they hand the op the prebuilt routing.

Regions. Each subject's region is its mask if it has one, else its box:

- a box is normalised ``(x0, y0, x1, y1)``; on a layer grid it covers every token
  whose cell it meets (:func:`anyms_kernels.rasterize_boxes`);
- a mask is an image-resolution ``[H, W]`` map (nonzero = inside); it covers every
  token whose cell holds at least one of its pixels
  (:func:`anyms_kernels.rasterize_masks`). The rule is the boxes' rule, so a
  rectangular mask routes exactly like its box, bit for bit.

A masked subject's box, when not given, is its mask's bounding box: it is used for
the pictures only (where the label goes), never for routing.

Timing. Each subject may act only in a window ``[start, end)`` of the denoising steps,
its scale following a schedule there (:mod:`anyms.timing` has the rules). A subject
whose scale at the current step is 0 is absent from the routing at that step; the
routing is built once per (grid, device, set of active subjects) and kept, and the
subject scales live in one tensor per device whose values :meth:`Layout.set_step`
rewrites in place (a compiled U-Net reads the same tensor at every step: no recompile
when only the scales change; a new set of active subjects is a new routing).

Kinds. A subject carries an image (its IP-Adapter image branch, the default), a regional
prompt (a text branch that replaces the global prompt's text branch in its region) or both
(``kinds``). The op's branches are the image branches, in priority order, then the prompt
branches, in priority order: the two kinds route apart (:func:`anyms_kernels.region_cross_attention`),
so their relative order changes nothing. A prompt branch acts at weight 1 (it replaces the
text) at every layer, within its subject's window; its subject's scale, schedule and blocks
are the image branch's. The prompts' text states are the call's: :meth:`set_prompt_states`.

Blocks. Each subject may act only at some attention layers of the model, with a weight
per block (:mod:`anyms.blocks`). The layers that share one vector of subject weights
form a *group*; group 0 is every subject at weight 1 (the layers of a layout without
blocks, and the only group then). A subject at weight 0 in a group is absent from that
group's routing, so a routing is still built once per (grid, device, set of active
subjects), and each group has its one scale tensor per device, rewritten in place.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from anyms_kernels.regions import (
    Grid, as_mask_tensor, boxes_cover, check_grid, check_mode, check_normalized_boxes, layer_grid, mask_bbox,
    rasterize_boxes, rasterize_masks,
)
from anyms_kernels.routing import Routing, build_routing

from .blocks import BlockWeights, check_blocks, layer_weight
from .timing import check_schedule, check_window, step_acts, step_weight

__all__ = ["Layout", "load_mask", "KINDS"]

# what a subject carries: its image (an IP-Adapter branch), a regional prompt (a text branch), or both
KINDS = ("image", "prompt", "both")


def load_mask(mask, name: str = "mask") -> torch.Tensor:
    """One subject's mask as a bool CPU tensor ``[H, W]`` (True = inside the region).

    Args:
        mask: a PIL image (converted to greyscale), a path to an image file, or a 2-D
            numpy array / torch tensor / nested list of bools or real numbers. Any
            nonzero pixel is inside (so store masks losslessly, e.g. PNG: a JPEG's
            compression noise would be inside too).
        name: the argument's name, for the errors.

    Raises:
        TypeError: not one of those types, or an array of another dtype (complex, strings).
        ValueError: not 2-D, a side above ``anyms.images.MAX_SIDE`` (checked in a
            file's header, before decoding), NaN values, an empty mask (no pixel inside),
            a file that does not exist, cannot be read as an image, or claims more
            pixels than Pillow decodes (a decompression bomb).
    """
    from PIL import Image

    from .images import MAX_SIDE, read_image

    if isinstance(mask, (str, os.PathLike)):
        # a mask is at the generated image's size: its side is checked before it is decoded
        mask = read_image(os.fspath(mask), name, "L", what="mask", max_side=MAX_SIDE)
    if isinstance(mask, Image.Image):
        m = torch.from_numpy(np.asarray(mask.convert("L")) != 0)
    elif isinstance(mask, (torch.Tensor, np.ndarray, list, tuple)):
        m = as_mask_tensor(mask.detach() if isinstance(mask, torch.Tensor) else mask, name)
    else:
        raise TypeError(f"{name} must be a PIL image, a path, or a 2-D numpy array / torch tensor of bools or "
                        f"numbers, got {type(mask).__name__}")
    if m.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [H, W] mask at the image's resolution, got shape {tuple(m.shape)}")
    if max(m.shape) > MAX_SIDE:
        raise ValueError(f"{name} is {m.shape[0]}x{m.shape[1]} pixels (height x width), above the largest side "
                         f"accepted, {MAX_SIDE} pixels")
    if not m.any():
        raise ValueError(f"{name} is empty: it must cover at least one pixel (nonzero = inside)")
    return m.to("cpu").contiguous()


class Layout:
    """Regions (boxes and/or masks, ascending priority), scales and mode of one generation.

    Args:
        boxes: ``[S, 4]`` normalised ``(x0, y0, x1, y1)`` in ``[0, 1]`` (x right, y down),
            or a list of S entries each 4 numbers or None (None only for a subject with a
            mask), or None when every subject has a mask.
        latent_hw: ``(h, w)`` of the latent the U-Net denoises (image size / 8 for SD).
        scales: lambda_s, a float or ``S`` floats (IP-Adapter scale per subject).
        mode: ``"overwrite"`` (AnyMS: a token takes the last region covering it) or
            ``"sum"`` (the paper's Eq. 7, diffusers' masks: covering regions add up).
        masks: None, an ``[S, H, W]`` array/tensor, or a list of S entries each a mask
            (anything :func:`load_mask` takes) or None (that subject uses its box). All
            masks share one size, the image's: ``H = f * h`` and ``W = f * w`` for one
            integer ``f`` (the VAE's scale factor, 8 for SD; 1 for masks at latent size).
        patch: None (a U-Net: each layer's grid is the level of the latent whose size
            matches its number of tokens, :func:`anyms_kernels.layer_grid`), or ``p`` for a
            diffusion transformer whose tokens are ``p x p`` patches of the latent: one
            token grid ``(h / p, w / p)`` at every layer (FLUX packs 2x2: ``patch=2``, the
            image / 16). ``h`` and ``w`` must be multiples of ``p``.
        windows: None (every subject acts at every step), or S ``(start, end)`` pairs,
            fractions of the denoising steps in ``[0, 1]`` with ``start <= end``.
        schedules: None (constant), a schedule name for every subject, or S names, from
            :data:`anyms.timing.SCHEDULES`.
        blocks: None (every subject acts at every layer), or S entries, each None or
            ``"all"`` (every layer), a list of block names or a dict ``{block name: weight}``
            (:mod:`anyms.blocks`; presets other than ``"all"`` depend on the model: turn them
            into names with :func:`anyms.blocks.resolve_blocks`). A layer's name is the
            attention module's (``up_blocks.0.attentions.1.transformer_blocks.0.attn2``);
            the processors :func:`anyms.apply_anyms` installs know theirs.
        kinds: None (every subject carries an image), or S entries of :data:`KINDS`:
            ``"image"``, ``"prompt"`` (a regional prompt: a text branch that replaces the
            global prompt's text branch in the region, at weight 1, within the subject's window;
            ``scales``, ``schedules`` and ``blocks`` are the image branch's and do not touch it)
            or ``"both"``. The prompts' text states: :meth:`set_prompt_states`.
        adapters: None (every subject's image is IP-Adapter 0's), or S ints: the IP-Adapter
            whose projections (``to_k_ip[a]`` / ``to_v_ip[a]``) and scale take subject ``s``'s
            image. Image ``j`` of adapter ``a``'s embeddings is :meth:`adapter_subjects` ``(a)[j]``.
            A subject without an image (kind ``"prompt"``) has no adapter: its entry is not read.
        subject_tokens: None (every image has the token count the layers find), or S ints: the
            image token count of each subject's adapter (4 for an IP-Adapter, 16 for a Plus one);
            needed when the subjects' adapters differ in it. Not read for a subject without an
            image (a prompt branch's count is its text states' length). See :meth:`branch_tokens`.

    A layout with windows or schedules other than the defaults is *timed*: whoever runs
    the steps calls :meth:`set_step` before each one (the pipelines do; with your own
    pipeline, from ``callback_on_step_end``, see :meth:`step_callback`), and a forward
    before the first :meth:`set_step` raises rather than ignore the timing.

    A subject with a mask is routed by its mask; ``boxes[s]``, given or (when None)
    the mask's bounding box, is then only for the pictures. Later subjects are on top
    where regions overlap. Every error names the argument (``boxes``, ``masks[i]``, ...).

    Attributes:
        boxes: float64 ``[S, 4]``, every subject's box (given, or its mask's bounding box).
        masks: a tuple of S bool ``[H, W]`` CPU tensors or None.
        image_hw: ``(H, W)`` of the masks, or None without masks.
    """

    def __init__(self, boxes=None, latent_hw: Optional[Grid] = None, scales=1.0, mode: str = "overwrite",
                 masks=None, patch: Optional[int] = None, windows=None, schedules=None, blocks=None,
                 kinds=None, adapters=None, subject_tokens=None):
        self.latent_hw = check_grid(latent_hw, "latent_hw")
        self.mode = check_mode(mode)
        self.patch = _check_patch(patch, self.latent_hw)
        # Stored tensors are ordinary tensors even when the Layout is made under
        # torch.inference_mode(), so that later grad-mode calls can use them.
        with torch.inference_mode(False):
            mask_list = _masks_argument(masks)
            box_list = _boxes_argument(boxes, mask_list)
            if mask_list is None:
                mask_list = [None] * len(box_list)
            if len(mask_list) != len(box_list):
                raise ValueError(f"boxes has {len(box_list)} entries but masks has {len(mask_list)}: give one per "
                                 f"subject (None where a subject has only a mask, or only a box)")
            self.image_hw = _check_mask_sizes(mask_list, self.latent_hw)
            for s, (box, mask) in enumerate(zip(box_list, mask_list)):
                if box is None and mask is None:
                    raise ValueError(f"subject {s} has neither a box (boxes[{s}] is None) nor a mask (masks[{s}])")
                if box is None:
                    box_list[s] = mask_bbox(mask)
            self.boxes = torch.tensor(box_list, dtype=torch.float64).reshape(-1, 4)
            self.masks: Tuple[Optional[torch.Tensor], ...] = tuple(mask_list)
            num = self.boxes.shape[0]
            scales = torch.as_tensor(scales, dtype=torch.float32).clone()
            if scales.dim() == 0:
                scales = scales.expand(num).clone()
            if scales.shape != (num,):
                raise ValueError(f"scales must be a float or {num} floats (one per subject), "
                                 f"got shape {tuple(scales.shape)}")
            if not torch.isfinite(scales).all():
                raise ValueError("scales holds NaN or inf")
            self.scales = scales
        self.windows: Tuple[Tuple[float, float], ...] = _windows_argument(windows, num)
        self.schedules: Tuple[str, ...] = _schedules_argument(schedules, num)
        self.timed = any(w != (0.0, 1.0) for w in self.windows) or any(s != "constant" for s in self.schedules)
        self.kinds: Tuple[str, ...] = _kinds_argument(kinds, num)
        # the op's branches: the image branches' subjects, then the prompt branches' (priority order each)
        self.image_subjects = tuple(s for s, k in enumerate(self.kinds) if k != "prompt")
        self.prompt_subjects = tuple(s for s, k in enumerate(self.kinds) if k != "image")
        self._prompt_weights: List[float] = [1.0] * num        # 1 inside the subject's window, else 0
        # the call's regional prompt states [B, P, L, C] (set_prompt_states); the image and prompt token
        # counts the routing is prepared for (prepare)
        self.prompt_states: Optional[torch.Tensor] = None
        self._tokens: Optional[Tuple[int, int]] = None
        # The current step: None before set_step (an untimed layout acts the same at every step).
        self.step: Optional[Tuple[int, int]] = None
        self._awaiting_step = self.timed       # a bool that forwards read (never the changing step)
        self._weights: List[float] = [1.0] * num
        # per branch (image branches, then prompt branches): whether it acts now
        self.active: Tuple[bool, ...] = tuple(bool(v) for v in (self._step_scales() != 0).tolist())
        self._coverage: Dict[Grid, torch.Tensor] = {}
        self._routing: Dict[Tuple[Grid, torch.device, Tuple[bool, ...]], Routing] = {}
        self._counted_routing: Dict[Tuple[int, ...], Dict[Tuple[Grid, torch.device, Tuple[bool, ...]], Routing]] = {}
        self._token_boxes: Dict[Tuple[Grid, torch.device], torch.Tensor] = {}
        self._scale_cache: Dict[torch.device, torch.Tensor] = {}     # group 0's scales
        self.blocks: Tuple[BlockWeights, ...] = _blocks_argument(blocks, num)
        self.adapters: Tuple[int, ...] = _ints_argument(adapters, num, "adapters", 0, default=0)
        self.subject_tokens: Optional[Tuple[int, ...]] = (
            None if subject_tokens is None else _ints_argument(subject_tokens, num, "subject_tokens", 1))
        self._adapter_subjects: Dict[int, List[int]] = {}      # the subjects with an image, per adapter
        for s in self.image_subjects:
            self._adapter_subjects.setdefault(self.adapters[s], []).append(s)
        # group g: its subject weights and active set; layer name -> group; (device, g > 0) -> scales
        self._group_weights: List[Tuple[float, ...]] = [(1.0,) * num]
        self._group_active: List[Tuple[bool, ...]] = [self.active]
        self._layer_groups: Dict[str, int] = {}
        self._group_scales: Dict[Tuple[torch.device, int], torch.Tensor] = {}
        self._prepared: List[Tuple[Grid, torch.device]] = []
        self.version = 0            # bumped by every set_step that changes the scales

    @property
    def num_subjects(self) -> int:
        return self.boxes.shape[0]

    def adapter_subjects(self, adapter: int) -> List[int]:
        """The subjects with an image of IP-Adapter ``adapter``, in this layout's order: image ``j`` of
        that adapter's embeddings is subject ``adapter_subjects(adapter)[j]`` (every layer reads it: kept)."""
        return self._adapter_subjects.get(adapter, [])

    @property
    def used_adapters(self) -> Tuple[int, ...]:
        """The IP-Adapters some subject's image uses, ascending."""
        return tuple(sorted(self._adapter_subjects))

    @property
    def has_prompts(self) -> bool:
        """Whether some subject carries a regional prompt (a text branch)."""
        return bool(self.prompt_subjects)

    @property
    def num_image_subjects(self) -> int:
        """The subjects with an image: how many images the IP-Adapter embeddings must hold."""
        return len(self.image_subjects)

    @property
    def num_branches(self) -> int:
        """The op's branches: one per image, then one per regional prompt."""
        return len(self.image_subjects) + len(self.prompt_subjects)

    def set_prompt_states(self, states: Optional[torch.Tensor]) -> "Layout":
        """Set the text states ``[B, P, L, C]`` of the ``P`` regional prompts (subjects of kind
        ``"prompt"`` or ``"both"``, in priority order) for the batch the model runs, e.g. with
        classifier-free guidance the unconditional rows first, as the pipeline's prompt
        embeddings; each attention layer turns them into keys and values with its own
        ``to_k`` / ``to_v``. None clears them. Returns self."""
        if states is not None:
            if not isinstance(states, torch.Tensor) or states.dim() != 4:
                raise ValueError(f"the regional prompt states must be a [B, P, L, C] tensor, got "
                                 f"{type(states).__name__ if not isinstance(states, torch.Tensor) else tuple(states.shape)}")
            if states.shape[1] != len(self.prompt_subjects):
                raise ValueError(f"the regional prompt states hold P={states.shape[1]} prompts but the layout has "
                                 f"{len(self.prompt_subjects)} subjects with a prompt")
        self.prompt_states = states
        return self

    def branch_tokens(self, image_tokens: Optional[int] = None,
                      prompt_tokens: Optional[int] = None) -> Optional[Tuple[int, ...]]:
        """The op's ``subject_tokens``, one count per branch, the one place they are decided: an
        image branch's is its subject's ``subject_tokens`` entry (its adapter's count), or
        ``image_tokens`` without ``subject_tokens``; a prompt branch's is ``prompt_tokens`` (its
        text states' length). None when every branch has the same count (no padding to skip)
        or when a count is not known (``image_tokens`` / ``prompt_tokens`` None where needed)."""
        if self.subject_tokens is not None:
            counts = tuple(self.subject_tokens[s] for s in self.image_subjects)
        else:
            counts = (image_tokens,) * len(self.image_subjects)
        counts += (prompt_tokens,) * len(self.prompt_subjects)
        if None in counts or len(set(counts)) <= 1:
            return None
        return tuple(int(c) for c in counts)

    @property
    def has_masks(self) -> bool:
        return self.image_hw is not None

    @property
    def token_grid(self) -> Optional[Grid]:
        """With ``patch``: the transformer's one token grid ``(h / p, w / p)``; None for a U-Net."""
        if self.patch is None:
            return None
        return self.latent_hw[0] // self.patch, self.latent_hw[1] // self.patch

    def grid_for(self, num_tokens: int) -> Grid:
        """The ``(h, w)`` of a layer with ``num_tokens`` query tokens: the U-Net level of that
        size (odd sizes round up), or with ``patch`` the token grid, which must have that many."""
        grid = self.token_grid
        if grid is None:
            try:
                return layer_grid(self.latent_hw, num_tokens)
            except ValueError:
                raise ValueError(
                    f"the layer has {num_tokens} tokens, which no U-Net level of the layout's latent_hw "
                    f"{self.latent_hw} has: make the Layout with latent_hw = (height // 8, width // 8) of the image "
                    f"being generated, height first") from None
        if num_tokens != grid[0] * grid[1]:
            raise ValueError(
                f"the layer has {num_tokens} image tokens but the layout's latent_hw {self.latent_hw}, "
                f"in {self.patch}x{self.patch} patches, is a {grid[0]}x{grid[1]} grid of {grid[0] * grid[1]}: "
                f"make the Layout with the latent size being denoised"
            )
        return grid

    def coverage(self, grid: Grid) -> torch.Tensor:
        """bool ``[S, h, w]`` on the CPU: which tokens of ``grid`` each subject's region covers
        (mask or box, before priorities). Computed once per grid."""
        grid = check_grid(grid)
        if grid not in self._coverage:
            with torch.inference_mode(False), torch.no_grad():
                self._coverage[grid] = _coverage(self.boxes, self.masks, grid)
        return self._coverage[grid]

    @property
    def has_blocks(self) -> bool:
        """Whether some subject acts at some layers only (or with a weight other than 1)."""
        return any(b is not None for b in self.blocks)

    def layer_group(self, layer: Optional[str]) -> int:
        """The group of the attention layer named ``layer`` (0 for every layer without blocks);
        computed once per name (:meth:`bind_layers` does it before the loop)."""
        if not self.has_blocks:
            return 0
        group = self._layer_groups.get(layer) if layer is not None else None
        if group is None:
            if layer is None:
                raise ValueError("this Layout selects blocks per subject, and the attention processor has no layer "
                                 "name: install the processors with anyms.apply_anyms (which names each)")
            group = self._add_layer(layer)
        return group

    def block_weights(self, layer: str) -> Tuple[float, ...]:
        """Each subject's block weight at the attention layer named ``layer`` (1 without blocks;
        0 where the subject's blocks leave the layer out: it is absent from that layer's routing)."""
        return tuple(layer_weight(b, layer) for b in self.blocks)

    def step_weights(self, step: int, num_steps: int) -> List[float]:
        """Each subject's timing weight at step ``step`` of ``num_steps`` (0 outside its window,
        its schedule's weight inside: :func:`anyms.timing.step_weight`)."""
        return [step_weight(step, num_steps, start, end, schedule)
                for (start, end), schedule in zip(self.windows, self.schedules)]

    def _add_layer(self, layer: str) -> int:
        weights = self.block_weights(layer)
        if weights not in self._group_weights:
            self._group_weights.append(weights)
            self._group_active.append(self._active_in(weights))
            for grid, device in self._prepared:      # built before the loop, as set_step does
                if not self._awaiting_step:
                    self.routing_at(grid, device, len(self._group_weights) - 1, self._tokens)
        group = self._group_weights.index(weights)
        self._layer_groups[layer] = group
        for device in {d for _, d in self._prepared}:  # its scales too: a compiled forward only reads
            self.subject_scale(device, layer)
        return group

    def bind_layers(self, layers) -> "Layout":
        """Compute the group of every layer name in ``layers`` now (and, on the grids
        :meth:`prepare` built, their routing), so that a forward only looks them up. Raises
        ValueError naming ``blocks[s]`` when a subject's block names cover none of ``layers``.
        Returns self."""
        layers = list(layers)
        if self.has_blocks:
            for s, blocks in enumerate(self.blocks):
                for block, _ in blocks or ():
                    if not any(layer == block or layer.startswith(block + ".") for layer in layers):
                        raise ValueError(f"blocks[{s}]: the model has no AnyMS layer in block {block!r}")
            for layer in layers:
                self.layer_group(layer)
        return self

    def _active_in(self, weights: Tuple[float, ...]) -> Tuple[bool, ...]:
        # block weights are the image branches' (a prompt branch acts at every layer)
        branch_weights = [weights[s] for s in self.image_subjects] + [1.0] * len(self.prompt_subjects)
        return tuple(a and w != 0 for a, w in zip(self.active, branch_weights))

    def routing(self, num_tokens: int, device, layer: Optional[str] = None,
                tokens: Optional[Tuple[int, int]] = None) -> Tuple[Grid, Routing]:
        """``(grid, Routing)`` of the layer with ``num_tokens`` tokens, on ``device``, for the
        attention layer named ``layer`` (which subjects act there: see ``blocks``).

        Built once per grid and device and kept on this Layout (not process-wide), from
        :meth:`coverage` in this layout's mode: pass it to
        ``anyms_kernels.region_cross_attention`` as its regions. Its tensors are
        ordinary tensors even when first built under ``torch.inference_mode()``.
        ``tokens``: ``(image tokens, prompt tokens)`` of the branches the layer hands the op
        (either None where it has none); each branch's count travels in the routing when
        they differ (:meth:`branch_tokens`).
        """
        grid = self.grid_for(num_tokens)
        return grid, self.routing_at(grid, device, self.layer_group(layer), tokens)

    def routing_at(self, grid: Grid, device, group: int = 0, tokens: Optional[Tuple[int, int]] = None) -> Routing:
        """The :class:`Routing` of ``grid`` on ``device`` for the branches active now in layer
        group ``group`` (see :meth:`routing`); an inactive branch covers no token, so in
        ``overwrite`` mode the branch of its kind under it takes them (the global text, for a
        prompt). Built once per (grid, device, active set, token counts)."""
        if self._awaiting_step:
            raise ValueError(
                "this Layout has windows or schedules, and no step was set: call layout.set_step(i, num_steps) "
                "before each denoising step (callback_on_step_end=layout.step_callback(...) does it after step 0)")
        grid = check_grid(grid)
        active = self._group_active[group]
        counts = self.branch_tokens(*(tokens or (None, None)))
        # a routing carries its branches' token counts: one table per counts (None: all T)
        table = self._routing if counts is None else self._counted_routing.setdefault(counts, {})
        key = (grid, torch.device(device), active)
        routing = table.get(key)
        if routing is None:
            cover = self.coverage(grid)
            with torch.inference_mode(False), torch.no_grad():
                kinds = None
                if self.has_prompts:        # one region per branch: the images', then the prompts'
                    cover = cover[list(self.image_subjects + self.prompt_subjects)]
                    kinds = [False] * len(self.image_subjects) + [True] * len(self.prompt_subjects)
                if not all(active):
                    cover = cover & torch.tensor(active, dtype=torch.bool)[:, None, None]
                routing = build_routing(cover.to(key[1]), grid, self.mode, replaces_text=kinds,
                                        subject_tokens=None if counts is None else list(counts))
            table[key] = routing
        return routing

    def active_coverage(self, grid: Grid, active: Sequence[bool]) -> torch.Tensor:
        """bool ``[S, h, w]`` on the CPU: :meth:`coverage` with the subjects not in ``active`` (one
        bool per subject) covering no token: where each subject of that active set can act (the
        routing orders the same regions by branch, images then prompts)."""
        cover = self.coverage(grid)
        if len(active) != self.num_subjects:
            raise ValueError(f"active must hold {self.num_subjects} bools (one per subject), got {len(active)}")
        if all(active):
            return cover
        with torch.inference_mode(False), torch.no_grad():
            return cover & torch.tensor(tuple(bool(a) for a in active), dtype=torch.bool)[:, None, None]

    def set_step(self, step: int, num_steps: int) -> "Layout":
        """Make step ``step`` of ``num_steps`` (0-based, as ``callback_on_step_end`` counts) the current one.

        Each subject's scale becomes ``scales[s] * w_s(step)`` (0 outside its window; the
        schedule's weight inside, :mod:`anyms.timing`), written in place into the scale
        tensors already handed out, and the subjects whose scale is 0 leave the routing.
        The routing of a new active set is built here, on every grid and device
        :meth:`prepare` built, so the forward only looks it up. Returns self.
        """
        for name, value in (("step", step), ("num_steps", num_steps)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if num_steps < 1 or not 0 <= step < num_steps:
            raise ValueError(f"step must be in [0, num_steps) with num_steps >= 1, got step={step}, "
                             f"num_steps={num_steps}")
        weights = self.step_weights(step, num_steps)
        prompt_weights = [float(step_acts(step, num_steps, start, end)) for start, end in self.windows]
        self.step = (step, num_steps)
        self._awaiting_step = False
        if weights != self._weights or prompt_weights != self._prompt_weights:
            self._weights, self._prompt_weights = weights, prompt_weights
            with torch.inference_mode(False), torch.no_grad():
                values = self._step_scales()
                self.active = tuple(bool(v) for v in (values != 0).tolist())
                self._group_active = [self._active_in(w) for w in self._group_weights]
                for tensor in self._scale_cache.values():
                    tensor.copy_(values)
                for (_, group), tensor in self._group_scales.items():
                    tensor.copy_(self._step_scales(group))
            self.version += 1
        for grid, device in self._prepared:      # looked up when built already
            for group in range(len(self._group_weights)):
                self.routing_at(grid, device, group, self._tokens)
        return self

    def step_callback(self, callback=None):
        """A ``callback_on_step_end`` for a diffusers pipeline running this layout through
        :func:`anyms.anyms_attention`: after step ``i`` it calls ``callback`` (if any; it
        sees step ``i``'s scales) and then sets step ``i + 1`` of ``pipe.num_timesteps``.
        Call ``layout.set_step(0, num_steps)`` before the call yourself."""
        def on_step_end(pipe, i, t, tensors):
            out = tensors if callback is None else callback(pipe, i, t, tensors)
            if i + 1 < pipe.num_timesteps:
                self.set_step(i + 1, pipe.num_timesteps)
            return out
        return on_step_end

    def _step_scales(self, group: int = 0) -> torch.Tensor:
        """float32 ``[branches]``: each branch's scale at the current step, in layer group ``group``:
        the image branches' (their subject's scale, schedule and block weight), then the prompt
        branches' (1 inside the subject's window, 0 outside)."""
        values = self.scales * torch.tensor(self._weights, dtype=torch.float32)
        if group:
            values = values * torch.tensor(self._group_weights[group], dtype=torch.float32)
        if not self.has_prompts:
            return values
        prompts = torch.tensor([self._prompt_weights[s] for s in self.prompt_subjects], dtype=torch.float32)
        return torch.cat([values[list(self.image_subjects)], prompts])

    def prepare(self, device, levels: int = 1, tokens: Optional[Tuple[int, int]] = None) -> "Layout":
        """Build now, on ``device``, everything the attention layers read; returns self.

        That is the :class:`Routing` of every grid the model's layers have (with
        ``patch``: the one token grid; else the latent and its next ``levels - 1``
        halvings, odd sizes rounding up: a U-Net with ``levels`` resolutions) and the
        scales. Afterwards a forward only looks them up: no region arithmetic, no value
        checks and no writes to this Layout, so a ``torch.compile(fullgraph=True)``
        forward has no data-dependent branch and reads tensors only. Without it each is
        built on first use (eagerly). The pipelines call it when a call's layout is made.
        ``tokens``: the ``(image tokens, prompt tokens)`` the layers will hand the op (see
        :meth:`routing`; either None where there is none); other counts are built on first use.
        """
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
            raise ValueError(f"levels must be a positive int (the U-Net's resolutions), got {levels!r}")
        device = torch.empty(0, device=device).device      # "cuda" -> "cuda:0": the key a forward looks up
        if tokens is not None:
            self._tokens = tuple(None if t is None else int(t) for t in tokens)
        grid = self.token_grid or self.latent_hw
        for _ in range(1 if self.patch is not None else levels):
            if (grid, device) not in self._prepared:
                self._prepared.append((grid, device))
            if not self._awaiting_step:     # a timed layout's routing waits for set_step
                for group in range(len(self._group_weights)):
                    self.routing_at(grid, device, group, self._tokens)
            grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
        for layer in self._layer_groups:
            self.subject_scale(device, layer)
        self.subject_scale(device)
        return self

    def token_boxes(self, num_tokens: int, device) -> Tuple[Grid, torch.Tensor]:
        """``(grid, int32 [S, 4] token boxes on device)``, computed once per grid and device.

        Every subject's box, whatever the step (the op's box form has no active set). Box
        layouts only: a mask is not a box, so a layout with masks raises
        ``ValueError`` (use :meth:`routing`, which serves both).
        """
        if self.has_masks:
            raise ValueError("this Layout has masks: its regions are not token boxes; use Layout.routing()")
        grid = self.grid_for(num_tokens)
        key = (grid, torch.device(device))
        if key not in self._token_boxes:
            with torch.inference_mode(False):
                self._token_boxes[key] = rasterize_boxes(self.boxes, grid).to(device)
        return grid, self._token_boxes[key]

    def subject_scale(self, device, layer: Optional[str] = None) -> torch.Tensor:
        """float32 ``[branches]`` on ``device`` (``[S]`` without regional prompts): the branches'
        scales at the current step at the attention layer named ``layer`` (times each image
        subject's block weight there). One tensor per device and
        layer group, the same object at every step (:meth:`set_step` rewrites its values). ``layer``
        None: every subject at block weight 1."""
        device = torch.device(device)
        group = 0 if layer is None else self.layer_group(layer)    # None: every subject at weight 1
        if group:
            key = (device, group)
            if key not in self._group_scales:
                with torch.inference_mode(False):
                    self._group_scales[key] = self._step_scales(group).to(device)
            return self._group_scales[key]
        if device not in self._scale_cache:
            with torch.inference_mode(False):
                self._scale_cache[device] = self._step_scales().to(device)
        return self._scale_cache[device]

    def __repr__(self) -> str:
        masked = sum(m is not None for m in self.masks)
        extra = f", masks={masked} at {self.image_hw[0]}x{self.image_hw[1]}" if masked else ""
        extra += f", patch={self.patch}" if self.patch is not None else ""
        extra += f", prompts={len(self.prompt_subjects)}" if self.has_prompts else ""
        return f"Layout(S={self.num_subjects}, latent_hw={self.latent_hw}, mode={self.mode!r}{extra})"


# ---------------------------------------------------------------------- helpers
def _check_patch(patch, latent_hw: Grid) -> Optional[int]:
    """``patch`` as None or a positive int dividing both sides of the latent."""
    if patch is None:
        return None
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise ValueError(f"patch must be None or a positive int, got {patch!r}")
    h, w = latent_hw
    if h % patch or w % patch:
        raise ValueError(f"latent_hw {h}x{w} is not a whole number of {patch}x{patch} patches (patch={patch}): "
                         f"both sides must be multiples of {patch}")
    return patch


def _blocks_argument(blocks, num: int) -> Tuple[BlockWeights, ...]:
    if blocks is None:
        return (None,) * num
    if not isinstance(blocks, (list, tuple)) or len(blocks) != num:
        raise ValueError(f"blocks must be None or {num} entries, one per subject, got {blocks!r}")
    out = []
    for s, entry in enumerate(blocks):
        if isinstance(entry, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in entry):
            entry = dict(entry)                  # already checked: ((name, weight), ...)
        checked = check_blocks(entry, f"blocks[{s}]")
        if isinstance(checked, str):
            raise ValueError(f"blocks[{s}] is the preset {checked!r}, which depends on the model: give its block "
                             f"names (anyms.blocks.resolve_blocks({checked!r}, layer names) gives them)")
        out.append(checked)
    return tuple(out)


def _kinds_argument(kinds, num: int) -> Tuple[str, ...]:
    if kinds is None:
        return ("image",) * num
    if not isinstance(kinds, (list, tuple)) or len(kinds) != num:
        raise ValueError(f"kinds must be None or {num} entries, one per subject, got {kinds!r}")
    for s, kind in enumerate(kinds):
        if kind not in KINDS:
            raise ValueError(f"kinds[{s}] must be one of {KINDS}, got {kind!r}")
    return tuple(kinds)


def _ints_argument(values, num: int, name: str, low: int, default=None) -> Tuple[int, ...]:
    """``values``: None (``default`` for every subject, when there is one) or ``num`` ints >= ``low``."""
    if values is None:
        return (default,) * num
    if not isinstance(values, (list, tuple)) or len(values) != num:
        raise ValueError(f"{name} must be None or {num} ints, one per subject, got {values!r}")
    for s, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}[{s}] must be an int >= {low}, got {value!r}")
    return tuple(int(v) for v in values)


def _windows_argument(windows, num: int) -> Tuple[Tuple[float, float], ...]:
    if windows is None:
        return ((0.0, 1.0),) * num
    if not isinstance(windows, (list, tuple)) or len(windows) != num:
        raise ValueError(f"windows must be None or {num} (start, end) pairs, one per subject, got {windows!r}")
    out = []
    for s, window in enumerate(windows):
        if not isinstance(window, (list, tuple)) or len(window) != 2:
            raise ValueError(f"windows[{s}] must be a (start, end) pair, got {window!r}")
        out.append(check_window(window[0], window[1], f"windows[{s}]"))
    return tuple(out)


def _schedules_argument(schedules, num: int) -> Tuple[str, ...]:
    if schedules is None:
        return ("constant",) * num
    if isinstance(schedules, str):
        return (check_schedule(schedules, "schedules"),) * num
    if not isinstance(schedules, (list, tuple)) or len(schedules) != num:
        raise ValueError(f"schedules must be None, a name or {num} names, one per subject, got {schedules!r}")
    return tuple(check_schedule(name, f"schedules[{s}]") for s, name in enumerate(schedules))


def _masks_argument(masks) -> Optional[List[Optional[torch.Tensor]]]:
    """``masks`` as a list of S bool [H, W] tensors or None entries (or None)."""
    if masks is None:
        return None
    if isinstance(masks, (torch.Tensor, np.ndarray)):
        if masks.ndim != 3:
            raise ValueError(f"masks must be [S, H, W] (one mask per subject) or a list of S masks, "
                             f"got shape {tuple(masks.shape)}")
        return [load_mask(masks[s], f"masks[{s}]") for s in range(masks.shape[0])]
    if isinstance(masks, (list, tuple)):
        return [None if m is None else load_mask(m, f"masks[{s}]") for s, m in enumerate(masks)]
    raise TypeError(f"masks must be a list of S masks (PIL images, arrays, tensors or None) or an [S, H, W] "
                    f"array/tensor, got {type(masks).__name__}")


def _boxes_argument(boxes, masks) -> List[Optional[Tuple[float, ...]]]:
    """``boxes`` as a list of S checked 4-tuples or None entries."""
    if boxes is None:
        if masks is None:
            raise ValueError("a Layout needs boxes or masks (or both): give boxes=[S, 4] and/or masks=[...]")
        return [None] * len(masks)
    if isinstance(boxes, (list, tuple)) and any(b is None for b in boxes):
        out: List[Optional[Tuple[float, ...]]] = []
        for s, box in enumerate(boxes):
            if box is None:
                out.append(None)
                continue
            t = torch.as_tensor(box, dtype=torch.float64)
            if t.shape != (4,):
                raise ValueError(f"boxes[{s}] must be 4 numbers (x0, y0, x1, y1) or None, got shape {tuple(t.shape)}")
            check_normalized_boxes(t[None], f"boxes[{s}]")
            out.append(tuple(t.tolist()))
        return out
    t = torch.as_tensor(boxes, dtype=torch.float64)
    if t.numel() == 0:
        t = t.reshape(0, 4)
    if t.dim() != 2 or t.shape[-1] != 4:
        raise ValueError(f"boxes must be [S, 4] normalised (x0, y0, x1, y1), got shape {tuple(t.shape)}")
    if t.numel():
        check_normalized_boxes(t, "boxes")
    return [tuple(b) for b in t.tolist()]


def _check_mask_sizes(masks: Sequence[Optional[torch.Tensor]], latent_hw: Grid) -> Optional[Grid]:
    """The masks' common ``(H, W)`` (None without masks); it must be the latent times one integer."""
    sized = [(s, tuple(m.shape)) for s, m in enumerate(masks) if m is not None]
    if not sized:
        return None
    first, (H, W) = sized[0]
    for s, hw in sized[1:]:
        if hw != (H, W):
            raise ValueError(f"masks[{s}] is {hw[0]}x{hw[1]} pixels but masks[{first}] is {H}x{W}: every mask "
                             f"must have the image's size")
    h, w = latent_hw
    if H % h or W % w or H // h != W // w:
        raise ValueError(f"masks are {H}x{W} pixels, which is no image of the {h}x{w} latent (latent_hw): give "
                         f"masks at the image's resolution, the latent's size times the VAE's scale factor "
                         f"(e.g. {8 * h}x{8 * w} for SD)")
    return H, W


def _coverage(boxes: torch.Tensor, masks: Sequence[Optional[torch.Tensor]], grid: Grid) -> torch.Tensor:
    h, w = grid
    num = boxes.shape[0]
    cover = torch.zeros(num, h, w, dtype=torch.bool)
    if num:
        cover[:] = boxes_cover(rasterize_boxes(boxes, grid), grid).view(num, h, w)
    for s, mask in enumerate(masks):
        if mask is not None:                      # one at a time: bounded temporaries at large sizes
            cover[s] = rasterize_masks(mask[None], grid)[0]
    return cover
