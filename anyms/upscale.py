"""Tiled upscaling that keeps every subject: an img2img pass at 2x or 4x over overlapping latent tiles.

    import anyms
    big = anyms.tiled_upscale(pipe, image, "a dog and a cat on a sofa", subjects=subjects,
                              scale=2, strength=0.3, seed=0).images[0]

The image is resized (Lanczos) to ``scale`` times its size and denoised again from ``strength``
by diffusers' own img2img pipeline for the model (``AutoPipelineForImage2Image.from_pipe``:
the same U-Net, VAE, text and image encoders and IP-Adapter). Only the U-Net's forward is
tiled: for the call, each U-Net evaluation on the full latent runs tile by tile, and the
tiles' noise predictions are blended into one prediction for the whole latent, which the
scheduler then steps once.

Blending (why this one). MultiDiffusion-style: the tiles are averaged at *every* denoising
step, so that all tiles agree on one latent at every step and no seam can form between
independently denoised tiles (what blending only the final tiles, as Ultimate SD Upscale
does, leaves to chance). The average is weighted by linear feathering: along a side that
has a neighbouring tile, a tile's weight ramps from near 0 at its edge to 1 at ``overlap``
cells in, because near its edge the tile's U-Net saw the least context (its convolutions
pad with zeros there), so its prediction is the least trustworthy; along the image's own
border the weight stays 1. The weights are normalised per latent cell. Averaging the noise
predictions and stepping once equals averaging the stepped latents for the schedulers these
pipelines use (each step is affine in the prediction), and keeps the scheduler's state one
state. Mixture of Diffusers' Gaussian weights would do as well; feathering has the property
that one tile covering the image has weight exactly 1 everywhere, which is what makes the
one-tile pass equal, bit for bit, to the untiled img2img pass.

Routing per tile. The call builds the image's :class:`~anyms.Layout` once (on the output's
latent grid) and, for each tile, a layout of its own: every subject's coverage of the latent
grid (its box or mask, by the layout's covering rule) cropped to the tile, routed as a mask
at the latent's size, with the subject's scale, window, schedule and blocks (a timed layout's
steps are the img2img loop's, set on every tile's layout after each step). Tiles start on
multiples of the U-Net's coarsest cell
(``2 ** (levels - 1)`` latent cells), so the tile's cells at every U-Net level are the image's
cells and its routing is the image's routing cropped, at every level. A subject whose region
misses a tile is inactive there: it is left out of that tile's layout and its image
embedding out of that tile's U-Net call. A subject's branch thus acts only where its region
is, in every tile.

Memory. The U-Net never sees more than one tile (with CFG, a batch of two), so its peak is
flat in the output size; the latents of the whole image are small (4 values per 8x8 pixels).
The VAE still encodes and decodes the whole image: call ``pipe.vae.enable_tiling()`` for
large outputs (the img2img pipeline shares the VAE).

Units: ``tile`` and ``overlap`` are in pixels of the output image. Sides, tile and overlap
are multiples of the U-Net's unit, the VAE's scale factor times the U-Net's downsampling
(``8 * 2 ** (levels - 1)``: 32 for SDXL, 64 for SD 1.5).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import torch

from .branches import anyms_attention, set_anyms_layout
from .layout import Layout, load_mask
from .pipeline import (AnyMSPipelineMixin, Subject, _load_image, _one_call_at_a_time, chain_step_callback,
                       prepare_subjects)
from .upscale_args import DEFAULT_STRENGTH, SCALES, check_upscale_options, geometry_of_pipe

__all__ = ["SCALES", "TILE_EVENT", "Tile", "UpscalePlan", "unet_unit", "plan_tiles", "tile_layout", "tiled_upscale"]

TILE_EVENT = "anyms.upscale.tile"   # the profiler's name for one tile's U-Net forward


@dataclass(frozen=True)
class Tile:
    """One tile, in latent cells of the output: rows ``y0:y1``, columns ``x0:x1``."""

    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def hw(self) -> Tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0


@dataclass
class UpscalePlan:
    """What a :func:`tiled_upscale` call ran: sizes in pixels, its tiles (latent cells) and, per
    tile, the indices (in the layout's priority order) of the subjects active there and the
    tile's :class:`Layout` (None before the call builds it)."""

    size: Tuple[int, int]
    tile: int
    overlap: int
    tiles: List[Tile]
    layout: Optional[Layout] = None
    active: List[List[int]] = field(default_factory=list)
    tile_layouts: List[Layout] = field(default_factory=list)

    def set_step(self, step: int, num_steps: int) -> None:
        """Make step ``step`` of the img2img loop's ``num_steps`` the current one on the image's
        layout and every tile's (a timed layout's windows count the steps of the pass that runs)."""
        for layout in (self.layout, *self.tile_layouts):
            layout.set_step(step, num_steps)


def unet_unit(pipe) -> int:
    """The pixel multiple a U-Net of ``pipe`` takes: the VAE's scale factor times its downsampling."""
    return geometry_of_pipe(pipe).unit


def _positions(length: int, tile: int, overlap: int, unit: int) -> List[int]:
    """Tile starts along one side (all in one unit): the first at 0, the last flush with the end,
    evenly spread and rounded down to the unit, so neighbours overlap by at least ``overlap``."""
    if length <= tile:
        return [0]
    n = math.ceil((length - tile) / (tile - overlap)) + 1
    return [(i * (length - tile) // (n - 1)) // unit * unit for i in range(n)]


def plan_tiles(size: Tuple[int, int], tile: int, overlap: int, unit: int, factor: int = 8) -> List[Tile]:
    """The tiles of an output of ``size`` (height, width) pixels, in latent cells (``factor``
    pixels a cell, the VAE's); every size a multiple of ``unit`` pixels (as checked)."""
    f = factor
    tiles = []
    height, width = size
    th, tw = min(tile, height), min(tile, width)
    for y in _positions(height, th, overlap, unit):
        for x in _positions(width, tw, overlap, unit):
            tiles.append(Tile(y // f, x // f, (y + th) // f, (x + tw) // f))
    return tiles


def tile_layout(layout: Layout, tile: Tile) -> Tuple[List[int], Layout]:
    """``(active, layout)`` of one tile: the subjects whose coverage of the latent meets the
    tile (indices in ``layout``'s order) and a layout of the tile's size routing each by its
    coverage cropped to the tile (a latent-sized mask), with the image's mode and, per subject,
    everything else the image's layout holds for it: its scale, window, schedule and blocks.

    A tile that no region meets has no active subject; its layout then holds subject 0 over
    the whole tile at scale 0, whose branch adds exactly zero (the U-Net's image projection
    takes no empty set of images, so some embedding must go in)."""
    cover = layout.coverage(layout.latent_hw)[:, tile.y0:tile.y1, tile.x0:tile.x1]
    active = [s for s in range(layout.num_subjects) if bool(cover[s].any())]
    if not active:
        return [], Layout(None, tile.hw, scales=[0.0], mode=layout.mode,
                          masks=[torch.ones(tile.hw, dtype=torch.bool)])
    return active, Layout(None, tile.hw, scales=layout.scales[active].tolist(), mode=layout.mode,
                          masks=[cover[s].clone() for s in active], windows=[layout.windows[s] for s in active],
                          schedules=[layout.schedules[s] for s in active],
                          blocks=[layout.blocks[s] for s in active] if layout.has_blocks else None)


# ------------------------------------------------------------------ checks
def check_upscale_args(pipe, image, scale, tile, overlap, strength, num_inference_steps=1,
                       seed=None) -> Tuple[Any, int, int, int, float]:
    """Check everything but the subjects, before any model work; return ``(image, unit, tile,
    overlap, strength)`` with the defaults applied. Each error is one line naming the argument.
    The options' rules are :func:`anyms.upscale_args.check_upscale_options`' (the command line's too)."""
    if not isinstance(pipe, AnyMSPipelineMixin) or getattr(pipe, "unet", None) is None:
        raise TypeError(f"pipe must be an AnyMS SDXL or SD 1.5 pipeline (tiled upscaling runs a U-Net; FLUX is not "
                        f"supported), got {type(pipe).__name__}")
    geometry = geometry_of_pipe(pipe)
    scale, tile, overlap, strength = check_upscale_options(scale, tile, overlap, strength, num_inference_steps,
                                                           geometry=geometry)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    image = _load_image(image, "image")
    unit = geometry.unit
    out_h, out_w = image.height * scale, image.width * scale
    if out_h % unit or out_w % unit:
        raise ValueError(f"image is {image.width}x{image.height} pixels (width x height): at scale {scale} the output "
                         f"{out_w}x{out_h} must have sides that are multiples of {unit} (this U-Net's unit)")
    return image, unit, tile, overlap, strength


def _subjects_at_scale(subjects: Sequence[Subject], image_hw, scale: int) -> List[Subject]:
    """The subjects with masks at the output's size: a mask at the input image's size is repeated
    ``scale`` times along each side (exact: no edge moves); one at the output's size is kept."""
    if not isinstance(subjects, (list, tuple)):
        return subjects                      # prepare_subjects names what is wrong
    out = []
    for i, s in enumerate(subjects):
        if not isinstance(s, Subject) or s.mask is None:
            out.append(s)
            continue
        mask = load_mask(s.mask, f"subjects[{i}].mask")
        hw = tuple(mask.shape)
        big = (image_hw[0] * scale, image_hw[1] * scale)
        if hw == tuple(image_hw):
            mask = mask.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        elif hw != big:
            raise ValueError(f"subjects[{i}].mask is {hw[0]}x{hw[1]} pixels (height x width): give it at the input "
                             f"image's size {image_hw[0]}x{image_hw[1]} or the output's {big[0]}x{big[1]}")
        out.append(dataclasses.replace(s, mask=mask))    # every other field as given (a prompt: refused after)
    return out


# ------------------------------------------------------------------ the call
def _subject_embeds(pipe, subjects: Sequence[Subject], device, cfg: bool) -> List[torch.Tensor]:
    """One adapter's embeddings of the S (checked) subjects' images, each image encoded alone (as
    the AnyMS pipelines do), laid out as diffusers' ``ip_adapter_image_embeds``: ``[2 or 1, S, ...]``.
    With ``cfg``, a subject's negative image takes its place in the unconditional half, embedded
    as the pipelines embed it (``prepare_ip_adapter_image_embeds``: the conditional embedding of
    that image, encoded alone)."""
    from diffusers.models.embeddings import ImageProjection

    hidden = not isinstance(pipe.unet.encoder_hid_proj.image_projection_layers[0], ImageProjection)
    parts = [pipe.encode_image([s.image], device, 1, hidden) for s in subjects]
    cond = torch.cat([c for c, _ in parts])[None]
    if not cfg:
        return [cond]
    uncond = [u if s.negative_image is None else pipe.encode_image([s.negative_image], device, 1, hidden)[0]
              for s, (_, u) in zip(subjects, parts)]
    return [torch.cat([torch.cat(uncond)[None], cond])]


def _feather(n: int, ramp_start: int, ramp_end: int, device) -> torch.Tensor:
    """Weights along one side of a tile of ``n`` cells: linear ramps of ``ramp_start`` /
    ``ramp_end`` cells at its ends (0: none), 1 elsewhere; never 0."""
    i = torch.arange(n, dtype=torch.float32, device=device) + 0.5
    w = torch.ones(n, dtype=torch.float32, device=device)
    if ramp_start:
        w = torch.minimum(w, i / ramp_start)
    if ramp_end:
        w = torch.minimum(w, i.flip(0) / ramp_end)
    return w


def _tile_weights(tiles: List[Tile], latent_hw, ramp: int, device) -> List[torch.Tensor]:
    out = []
    h, w = latent_hw
    for t in tiles:
        wy = _feather(t.y1 - t.y0, ramp if t.y0 > 0 else 0, ramp if t.y1 < h else 0, device)
        wx = _feather(t.x1 - t.x0, ramp if t.x0 > 0 else 0, ramp if t.x1 < w else 0, device)
        out.append(wy[:, None] * wx[None, :])
    return out


class _TiledForward:
    """The U-Net's forward for one call: each evaluation on the whole latent runs tile by tile,
    each tile with its own layout and its active subjects' embeddings, blended by weight.

    It is set as the U-Net's ``forward`` for the call (and the one it replaced put back), so
    the U-Net's module hooks run once per evaluation, on the whole latent, and each tile calls
    the replaced ``forward``: accelerate's offload hooks, which wrap ``forward`` itself, still
    run per tile; a tile's layout matches its latent by construction."""

    def __init__(self, unet, forward, plan: UpscalePlan, weights: List[torch.Tensor], img2img=None):
        self.unet, self.forward, self.plan, self.weights = unet, forward, plan, weights
        self.img2img = img2img
        self.started = False

    def __call__(self, sample, *args, **kwargs):
        plan = self.plan
        if not self.started:
            self.started = True
            if plan.layout.timed:     # the loop's length is set by now (the first evaluation is step 0's)
                plan.set_step(0, self.img2img.num_timesteps)
        if tuple(sample.shape[-2:]) != plan.layout.latent_hw:
            raise RuntimeError(f"the U-Net got a {tuple(sample.shape[-2:])} latent during a tiled upscale of "
                               f"{plan.layout.latent_hw}")
        if kwargs.get("return_dict", True):
            raise RuntimeError("the tiled U-Net forward serves the img2img pipeline's return_dict=False calls")
        added = kwargs.get("added_cond_kwargs") or {}
        embeds = added.get("image_embeds")
        total = weight_sum = None
        for tile, active, layout, weight in zip(plan.tiles, plan.active, plan.tile_layouts, self.weights):
            set_anyms_layout(self.unet, layout)
            tile_kwargs = dict(kwargs)
            if embeds is not None and len(active) != plan.layout.num_subjects:
                index = torch.tensor(active or [0], dtype=torch.long, device=embeds[0].device)
                tile_kwargs["added_cond_kwargs"] = {**added, "image_embeds": [embeds[0].index_select(1, index)]}
            with torch.profiler.record_function(TILE_EVENT):     # where a profiler finds one tile's work
                out = self.forward(sample[..., tile.y0:tile.y1, tile.x0:tile.x1], *args, **tile_kwargs)[0]
            if total is None:
                total = torch.zeros(*out.shape[:-2], *sample.shape[-2:], dtype=torch.float32, device=out.device)
                weight_sum = torch.zeros(sample.shape[-2:], dtype=torch.float32, device=out.device)
            total[..., tile.y0:tile.y1, tile.x0:tile.x1] += out.float() * weight
            weight_sum[tile.y0:tile.y1, tile.x0:tile.x1] += weight
            del out
        # between evaluations the image's layout is installed: the U-Net's latent check (a
        # forward pre-hook, which sees the whole latent) compares the latent with it
        set_anyms_layout(self.unet, plan.layout)
        return ((total / weight_sum).to(sample.dtype),)


def tiled_upscale(pipe, image, prompt=None, *, subjects: Sequence[Subject], scale: int = 2,
                  tile: Optional[int] = None, overlap: Optional[int] = None, strength: float = DEFAULT_STRENGTH,
                  num_inference_steps: int = 30, seed: Optional[int] = None, anyms_mode: str = "overwrite",
                  anyms_priority: str = "order", anyms_blocks=None, **kwargs):
    """Upscale ``image`` by ``scale`` with an img2img pass over overlapping tiles, keeping every subject.

    Args:
        pipe: an :class:`~anyms.AnyMSStableDiffusionXLPipeline` or
            :class:`~anyms.AnyMSStableDiffusionPipeline` with its IP-Adapter loaded (FLUX: not supported).
        image: the image to upscale (a PIL image, a path or an array), e.g. a native-size generation.
        prompt: as the pipelines' (``negative_prompt``, ``guidance_scale``... go in ``kwargs``).
        subjects: the subjects of the generation: boxes are normalised, so the same boxes hold;
            masks at the input image's size (repeated ``scale`` times, exactly) or the output's.
            Every other field holds in every tile: scale, ``start`` / ``end`` / ``schedule``
            (fractions of the steps this pass runs, as in any call), ``negative_image`` (with
            guidance; refused without, as the pipelines refuse it) and ``blocks``.
        scale: 2 or 4.
        tile: the tile's side in pixels of the output (default: the U-Net's native size, 1024 for
            SDXL); a multiple of the U-Net's unit (:func:`unet_unit`), clipped to the image.
        overlap: pixels shared by neighbouring tiles (default a quarter of the tile), a multiple of
            the unit, smaller than ``tile``; the blend's ramps are this wide.
        strength: in (0, 1], how far the upscaled image is noised again (img2img's).
        num_inference_steps: img2img's (``strength`` of them run).
        seed: the seed of a CPU generator (None: unseeded); or give ``generator`` (not both).
        anyms_mode, anyms_priority, anyms_blocks: as the pipelines'.
        kwargs: the rest of the img2img pipeline's arguments.

    Returns the img2img pipeline's output (``.images``). ``pipe.anyms_last_upscale`` holds the
    :class:`UpscalePlan` (tiles, per-tile active subjects and layouts).

    Raises ValueError/TypeError naming the argument before any model work: a pipe that is not an
    AnyMS U-Net pipeline, ``scale`` not 2 or 4, ``strength`` outside (0, 1], ``num_inference_steps``
    not a positive int or too few to run one step at ``strength``, ``seed`` not an int, ``image`` not an
    image or whose output size is no multiple of the unit, ``tile`` below the unit or no multiple
    of it, ``overlap`` negative, no multiple of the unit or not smaller than ``tile``, the
    subjects' errors (:func:`anyms.pipeline.prepare_subjects`), a mask of neither size.
    """
    image, unit, tile, overlap, strength = check_upscale_args(pipe, image, scale, tile, overlap, strength,
                                                              num_inference_steps, seed)
    for name in ("image", "ip_adapter_image", "ip_adapter_image_embeds", "height", "width"):
        if name in kwargs:
            raise ValueError(f"{name} cannot be given to tiled_upscale: the call sets it from image, scale and "
                             f"subjects")
    if seed is not None and kwargs.get("generator") is not None:
        raise ValueError("give seed or generator, not both")
    size = (image.height * scale, image.width * scale)
    for i, subject in enumerate(subjects if isinstance(subjects, (list, tuple)) else ()):
        if isinstance(subject, Subject) and subject.adapter != 0:
            raise ValueError(f"subjects[{i}].adapter is {subject.adapter}: tiled upscaling takes every subject "
                             f"from IP-Adapter 0")
    plan_subjects = prepare_subjects(_subjects_at_scale(subjects, (image.height, image.width), scale),
                                     anyms_mode, anyms_priority, anyms_blocks)
    plan_subjects.refuse_prompts("tiled upscaling does not take regional prompts (each tile's layout routes "
                                 "images only); leave the prompt out")
    pipe._anyms_check_adapter()
    loaded = len(pipe.unet.encoder_hid_proj.image_projection_layers)
    if loaded != 1:
        raise ValueError(f"tiled upscaling takes its subjects from one IP-Adapter, but {loaded} are loaded: "
                         f"unload_ip_adapter() and load one")
    plan_subjects.resolve_blocks(pipe.unet)
    factor = int(pipe.vae_scale_factor)
    levels = len(pipe.unet.config.block_out_channels)
    plan = UpscalePlan(size, tile, overlap, plan_tiles(size, tile, overlap, unit, factor))

    from diffusers import AutoPipelineForImage2Image
    from PIL import Image

    with _one_call_at_a_time(pipe, with_subjects=True):
        device = pipe._execution_device
        plan.layout = plan_subjects.make_layout((size[0] // factor, size[1] // factor))
        for t in plan.tiles:
            active, layout = tile_layout(plan.layout, t)
            plan.active.append(active)
            plan.tile_layouts.append(layout.prepare(device, levels=levels))
        pipe.anyms_last_upscale = plan
        img2img = AutoPipelineForImage2Image.from_pipe(pipe)
        img2img.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
        guidance = inspect.signature(img2img.__call__).parameters["guidance_scale"].default
        distilled = pipe.unet.config.time_cond_proj_dim is not None
        cfg = kwargs.get("guidance_scale", guidance) > 1 and not distilled
        plan_subjects.require_guidance(cfg, "a guidance-distilled U-Net" if distilled else
                                       f"guidance_scale {kwargs.get('guidance_scale', guidance):g} <= 1")
        embeds = _subject_embeds(pipe, plan_subjects.subjects, device, cfg)
        if plan.layout.timed:        # step 0 at the first U-Net evaluation, each next one after a step
            chain_step_callback(img2img, plan_subjects, kwargs, set_step=plan.set_step)
        if seed is not None:
            kwargs.setdefault("generator", torch.Generator(device="cpu").manual_seed(int(seed)))
        big = image.resize((size[1], size[0]), Image.LANCZOS)
        unet = pipe.unet
        weights = _tile_weights(plan.tiles, plan.layout.latent_hw, overlap // factor, device)
        had_forward = "forward" in vars(unet)
        forward = unet.forward
        with anyms_attention(pipe, plan.layout):
            unet.forward = _TiledForward(unet, forward, plan, weights, img2img)
            try:
                return img2img(prompt, image=big, strength=strength, num_inference_steps=num_inference_steps,
                               ip_adapter_image_embeds=embeds, **kwargs)
            finally:
                if had_forward:
                    unet.forward = forward
                else:
                    del unet.forward
