"""Checks before a generation: sizes, an estimate of peak memory, subjects that get no token.

- :func:`check_image_size` refuses sizes no model here can make (not a multiple of 8,
  or a side above ``MAX_SIDE``), naming the argument.
- :func:`estimate_peak_memory` estimates the device's peak memory of one generation
  from the loaded pipeline's configs, the size and the options (CFG, offload, VAE
  tiling), for the U-Net pipelines (SD 1.5, SDXL) and FLUX. It is a model, not a
  measurement: see its docstring for what it counts.
- :func:`fit_memory` picks, in a fixed order, the first plan (dtype, offload, VAE tiling)
  whose estimate fits a budget, within the options the caller fixed, or says the smallest
  budget that would fit. Both read only configs and parameter shapes: they work on a pipeline
  built on the meta device (``anyms.budget``, before any weights load).
- :func:`unreached_subjects` lists the (subject, grid) pairs where a subject owns no
  token: in ``overwrite`` mode a subject whose cells are all covered by subjects on top
  of it vanishes at that U-Net level (the coarser the grid, the likelier), counting only
  the layers its blocks select and the subjects active at the steps it acts;
  :func:`idle_subjects` those that act nowhere (scale 0, a window holding no step, blocks
  selecting no layer).

No diffusers import here, and torch only inside the functions (the CLI imports this module).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .images import MAX_SIDE

__all__ = ["MAX_SIDE", "MAX_STEPS", "check_image_size", "MemoryEstimate", "UpscaleEstimate", "estimate_peak_memory",
           "MemoryPlan",
           "flux_step_bytes", "t5_encode_bytes", "vae_encode_bytes",
           "fit_memory", "MemoryBudgetError", "OFFLOADS", "device_memory",
           "unreached_subjects", "idle_subjects", "unreached_message"]

# The SD-family schedulers are trained on 1000 timesteps; more steps than that repeat timesteps.
MAX_STEPS = 1000
GIB = 1024 ** 3


def check_image_size(value: Optional[int], name: str, multiple: int = 8) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is None or a multiple of ``multiple`` in
    ``[multiple, MAX_SIDE]``."""
    if value is None:
        return
    if value < multiple or value % multiple:
        raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value}")
    if value > MAX_SIDE:
        raise ValueError(f"{name} {value} is above the largest side accepted, {MAX_SIDE} pixels (SDXL's latent "
                         f"would be {value // 8} tokens a side)")


# ------------------------------------------------------------------ memory
@dataclass
class MemoryEstimate:
    """Bytes: ``weights`` resident on the device at the peak, ``unet`` the activations of one
    denoising step (the U-Net's, or FLUX's transformer's), ``decode`` those of the VAE decode,
    ``encode`` those of the text encoders (counted for FLUX: T5 over 512 tokens; 0 for the
    U-Nets, whose CLIP encoders over 77 tokens hold a few MB), ``total`` the estimated peak."""

    weights: int
    unet: int
    decode: int
    total: int
    encode: int = 0
    denoiser: str = "U-Net"
    upscale: Optional["UpscaleEstimate"] = None
    generation: Optional[int] = None

    def describe(self) -> str:
        if self.denoiser == "U-Net":
            text = (f"weights {_gib(self.weights)} + the larger of a U-Net step {_gib(self.unet)} "
                    f"and the VAE decode {_gib(self.decode)}")
        else:
            text = (f"weights {_gib(self.weights)} + the largest of a {self.denoiser} step "
                    f"{_gib(self.unet)}, the text encoders {_gib(self.encode)} and the VAE decode {_gib(self.decode)}")
        if self.upscale is None:
            return f"{_gib(self.total)} GiB ({text})"
        return (f"{_gib(self.total)} GiB, the larger of the generation's {_gib(self.generation)} ({text}) and "
                f"{self.upscale.describe()}")


def _gib(x) -> str:
    return f"{x / GIB:.2f}" if x >= 0.01 * GIB else f"{x / GIB:.3f}"


@dataclass
class UpscaleEstimate:
    """Bytes of the tiled upscale pass (:func:`anyms.tiled_upscale`, an img2img pass at ``scale``
    times the generation's size): ``size`` the output's (height, width) pixels, ``tile`` the
    largest tile's; ``step`` the activations of one U-Net step on a tile; ``buffers`` what the pass
    holds at the output's size through its steps (the latents, the blend's float32 sums and
    weights, the upscaled input image in float32); ``encode`` the VAE encode of the upscaled input
    and ``decode`` the VAE decode of the output (each one tile's where the VAE tiles), with the
    input image; ``total`` the pass's peak with the weights on the device."""

    scale: int
    size: Tuple[int, int]
    tile: Tuple[int, int]
    step: int
    buffers: int
    encode: int
    decode: int
    total: int

    def describe(self) -> str:
        return (f"the {self.scale}x upscale pass's {_gib(self.total)} (to {self.size[1]}x{self.size[0]}: weights + the "
                f"largest of a {self.tile[1]}x{self.tile[0]} tile's U-Net step {_gib(self.step)} with the output's "
                f"buffers {_gib(self.buffers)}, the VAE encode {_gib(self.encode)} and decode {_gib(self.decode)})")


def _module_bytes(module, dtype_size: Optional[int] = None) -> int:
    if module is None:
        return 0
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        size = dtype_size if (dtype_size and t.is_floating_point()) else t.element_size()
        total += t.numel() * size
    return total


def _largest_leaf_bytes(module, dtype_size: Optional[int] = None) -> int:
    best = 0
    for m in module.modules():
        if next(m.children(), None) is None:
            best = max(best, sum(p.numel() * (dtype_size if dtype_size and p.is_floating_point() else p.element_size())
                                 for p in m.parameters(recurse=False)))
    return best


def _as_list(value, n: int) -> List[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


# Values per token and channel the allocator holds at a transformer block's feed-forward (see
# unet_step_elements): the largest transient of an attention level unless its cross-attention holds more.
FEED_FORWARD_VALUES = 21


def unet_step_elements(config, latent_hw: Tuple[int, int], attention_values: float = 0) -> int:
    """Activation elements of one U-Net step for one batch element (see :func:`estimate_peak_memory`).
    ``attention_values``: values per token and channel held at a cross-attention layer's peak,
    where that exceeds the feed-forward's (``FEED_FORWARD_VALUES``)."""
    channels = list(config.block_out_channels)
    levels = len(channels)
    layers = _as_list(config.layers_per_block, levels)
    attention = ["CrossAttn" in t or "Attn" in t for t in config.down_block_types]
    h, w = latent_hw
    tokens = []
    for _ in range(levels):
        tokens.append(h * w)
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    # the skip connections kept for the up path: conv_in, every down resnet, every downsampler
    skips = channels[0] * tokens[0]
    for i in range(levels):
        skips += layers[i] * channels[i] * tokens[i]
        if i < levels - 1:
            skips += channels[i] * tokens[i + 1]
    # the largest transient: a transformer block's feed-forward or an up resnet on the concatenated
    # input. At the feed-forward the allocator holds (torch.profiler, SD 1.5's structure) GEGLU's 8c
    # projection, its 4c gelu and 4c product, and about 5c more: the block's input and residual
    # stream, the norm's output, the transformer's input and its projection, 21 values per token
    # and channel above the skips
    transient = 0
    for i in range(levels):
        per_token = max(FEED_FORWARD_VALUES, attention_values) if attention[i] else 9
        transient = max(transient, per_token * channels[i] * tokens[i])
    return skips + transient


def vae_decode_elements(config, image_hw: Tuple[int, int]) -> int:
    """Activation elements of decoding one image of ``image_hw`` pixels (see :func:`estimate_peak_memory`)."""
    rev = list(reversed(config.block_out_channels))
    levels = len(rev)
    pixels = image_hw[0] * image_hw[1]
    peak = 0
    c_in = rev[0]
    for j, c_out in enumerate(rev):
        p = pixels / 4 ** (levels - 1 - j)
        # a resnet: at its first conv the input, the norm's and the activation's outputs and the
        # conv's; at its second, the input and four of its width. Measured (torch.profiler, SDXL's
        # VAE in bf16): the first resnet after an upsampler also has the upsampler's interpolated
        # copy and its input still live, and that is the decode's peak.
        resnet = max(3 * c_in + c_out, c_in + 4 * c_out)
        if j > 0:
            resnet += c_in + c_in / 4
        peak = max(peak, resnet * p)
        if j < levels - 1:
            peak = max(peak, c_out * p + 2 * c_out * 4 * p)       # the upsampler: input, 4x copy, conv
        c_in = c_out
    return int(peak + 2 * 3 * pixels)                              # + the decoded image


def vae_encode_elements(config, image_hw: Tuple[int, int]) -> int:
    """Activation elements of encoding one image of ``image_hw`` pixels, the image included (see
    :func:`estimate_upscale_memory`). A resnet as in :func:`vae_decode_elements`; from a block's
    second resnet on, the block's input (held by the encoder's loop) is live beside it: measured
    (the CPU allocator's peak, SDXL's VAE structure narrower, bf16), the peak is the finest level's
    second resnet, ``6 c`` per pixel (``5 c`` with one resnet a block)."""
    channels = list(config.block_out_channels)
    layers = _as_list(config.layers_per_block, len(channels))
    pixels = image_hw[0] * image_hw[1]
    peak = 0
    c_in = channels[0]                                             # conv_in's output
    for i, c_out in enumerate(channels):
        p = pixels / 4 ** i
        peak = max(peak, max(3 * c_in + c_out, c_in + 4 * c_out) * p)
        if layers[i] > 1:
            peak = max(peak, (c_in + 5 * c_out) * p)
        if i < len(channels) - 1:
            peak = max(peak, (c_in + 2 * c_out + c_out / 4) * p)  # the downsampler: input, padded copy, output
        c_in = c_out
    return int(peak + 3 * pixels)                                  # + the image


# FLUX: FluxPipeline's default max_sequence_length (T5 tokens), the single-stream blocks' MLP ratio,
# and the bytes of apply_rotary_emb's float32 temporaries per element of one projection (x * cos,
# x_rotated * sin and their sum, or x_rotated's float copy in their place: three live at its peak).
FLUX_TEXT_TOKENS = 512
FLUX_MLP_RATIO = 4
_ROTARY_BYTES = 12


def flux_step_bytes(config, image_tokens: int, text_tokens: int, size: int) -> int:
    """Activation bytes of one FLUX transformer step, batch 1 (see :func:`estimate_peak_memory`).

    ``size``: bytes per element. The peak is inside a block's joint attention, at the rotary
    embedding of a projection (three float32 temporaries of the joint tokens live). Counted from a
    torch.profiler trace of FLUX.1's width in bf16 (the live tensors at the allocator's peak), per
    channel of the width C:

    - a single-stream block: over the N + L joint tokens, its MLP branch (4C, computed before the
      attention), the residual, the norm's output, the projections and rotated copies in flight
      and the previous block's output: ``4 + 7`` values, plus the rotary temporaries; at its output
      projection (the peak in float32, traced on a narrower model), the MLP branch and its
      concatenation with the attention's output (4 + 5), the attention's output before and after
      its projection, the residual, the norm, the projection, its gated copy and the previous
      block's output: ``2 * 4 + 7`` values;
    - a double-stream block's attention: the joint q, k, v (3) and a rotated copy (1) over N + L,
      and per stream the norm's output, a projection and a rotated copy (3 more per image token,
      5 per text token), plus the rotary temporaries;
    - a double-stream block's feed-forward (image stream: input, residual, norm, IP term, the 4C
      projection and its activation, about 13 per image token; the text stream about 3 per text
      token): below the attention in bf16, counted for 4-byte dtypes.

    The IP-Adapter branch (S subjects' 4 tokens, projected) and the rotary tables are small beside
    these; the rotary tables (cos and sin, float32, N + L by the head dim) are added.
    """
    width = config.num_attention_heads * config.attention_head_dim
    n, l = int(image_tokens), int(text_tokens)
    rotary = _ROTARY_BYTES * width * (n + l)
    peaks = []
    if config.num_single_layers:
        peaks.append(size * (FLUX_MLP_RATIO + 7) * width * (n + l) + rotary)
        peaks.append(size * (2 * FLUX_MLP_RATIO + 7) * width * (n + l))
    if config.num_layers:
        peaks.append(size * width * (7 * n + 9 * l) + rotary)
        peaks.append(size * width * (13 * n + 3 * l))
    tables = 2 * 4 * (n + l) * config.attention_head_dim
    return int(max(peaks, default=0) + tables)


def t5_encode_bytes(config, tokens: int, size: int) -> int:
    """Activation bytes of T5's encoder over ``tokens`` tokens, batch 1: its relative position bias
    (heads x tokens x tokens, and the mask made of it, both live through every layer) and, per
    token, a layer's widest point (the gated feed-forward's three d_ff tensors and two of d_model;
    at the attention, about nine of d_model: the same within 5% for T5-XXL)."""
    return int(size * (2 * config.num_heads * tokens * tokens
                       + (2 * config.d_model + 3 * config.d_ff) * tokens))


def estimate_peak_memory(pipe, height: int, width: int, *, cfg: bool = True, offload: str = "none",
                         vae_tiling: bool = False, dtype=None, attention_values: float = 0,
                         conditioning_bytes: int = 0,
                         upscale: Optional[Tuple[int, int, int]] = None) -> MemoryEstimate:
    """An estimate of the peak device memory of one generation (one image).

    Counts: the weights on the device (every component; with ``offload="model"`` the
    largest component at a time; with ``"sequential"`` the largest layer), plus the
    largest of the activation peaks, each phase with the weights it has on the device.

    U-Net pipelines (SD 1.5, SDXL). A U-Net step: its skip connections and its largest
    transient (a transformer block at the finest attention level, 21 values per token and
    channel; a resnet, 9), times the batch (2 with CFG). The text and image encoders'
    activations are small beside these and not counted.

    FLUX (a pipeline with a ``transformer`` and no ``unet``). A transformer step on batch 1
    (FLUX.1-dev is guidance-distilled; true CFG runs the unconditional pass after the
    conditional one, not beside it, so ``cfg`` changes nothing): the peak inside a block's
    joint attention over the text (512 T5 tokens) and image tokens (:func:`flux_step_bytes`).
    The text encoders: T5's encoder over 512 tokens (:func:`t5_encode_bytes`); CLIP's over
    77 tokens and the IP-Adapter's image encoder hold a few MB and are not counted.

    Both: the VAE decode, its largest resnet or upsampler at full resolution (with tiling,
    at the tile's size) and the decoded image, in float32 where an SDXL pipeline upcasts a
    float16 VAE (``force_upcast``; StableDiffusionPipeline and FluxPipeline decode in the VAE's
    dtype). It assumes
    fused attention (no token x token score matrix), what PyTorch's SDPA runs on CUDA and
    CPU. Weights count in ``dtype`` where it is given (the pipeline would be cast to it).
    ``attention_values``: values per token and channel a U-Net cross-attention layer holds at
    its peak, for processors that hold more than the feed-forward's 21 (the masked sum of
    diffusers' IP-Adapter holds fewer; benchmarks/bench_memory.py --fits); ``conditioning_bytes``:
    bytes held on the device through the U-Net steps beside the activations (diffusers'
    IP-Adapter masks). Only configs, parameter shapes and dtypes are read: a pipeline of
    meta-device modules (anyms.budget) is estimated as the loaded one.
    Checked against the CPU allocator's peak on the full-size SD 1.5 and SDXL architectures
    and FLUX.1's width with fewer blocks, in bf16 (benchmarks/bench_memory.py,
    docs/memory.md: within 15%), and on the tiny models (tests/anyms/test_preflight.py).

    ``upscale``: ``(scale, tile, overlap)`` (pixels of the output, the defaults resolved:
    :func:`anyms.upscale_args.check_upscale_options`) adds the tiled upscale pass that follows the
    generation (:func:`anyms.tiled_upscale`, U-Net pipelines): ``.upscale`` holds its
    :class:`UpscaleEstimate` and ``total`` is the larger of the two passes' peaks. The pass has the
    same weights and offload; its phases: a U-Net step on one tile (the same term at the tile's
    size) beside what the pass holds at the output's size, the VAE encode of the upscaled input
    (:func:`vae_encode_elements`; in float32 where an SDXL pipeline's VAE says ``force_upcast``,
    whatever the dtype), and the VAE decode of the output, each with the upscaled input in float32
    the call holds (on CUDA that tensor stays in host memory: the estimate counts it anyway).
    """
    import torch

    vae = pipe.vae
    denoiser, den_key, flux = _denoiser(pipe)
    explicit_dtype = dtype is not None
    dtype = dtype or denoiser.dtype
    size = torch.empty((), dtype=dtype).element_size()
    components = {name: getattr(pipe, name, None) for name in
                  (den_key, "vae", "text_encoder", "text_encoder_2", "image_encoder")}
    # the image encoders of their own of IP-Adapters beside the first (AnyMS pipelines, anyms.budget's skeleton)
    for adapter, module in sorted((getattr(pipe, "adapter_image_encoders", None) or {}).items()):
        components[f"image_encoder[{adapter}]"] = module
    # weights in ``dtype`` where it is given (the pipeline would be cast to it), else as they are
    comp_bytes = {k: _module_bytes(m, size if explicit_dtype else None) for k, m in components.items() if m is not None}
    upcast = _upcasts_vae(pipe, flux) and bool(getattr(vae.config, "force_upcast", False)) and dtype == torch.float16
    vae_size = 4 if upcast else size
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if flux:
        # FluxPipeline rounds the image down to whole 2x2 patches of the latent (anyms.flux.flux_latent_hw)
        latent = (2 * (height // (2 * factor)), 2 * (width // (2 * factor)))
        height, width = latent[0] * factor, latent[1] * factor           # FluxPipeline's rounding down
        step_act = flux_step_bytes(denoiser.config, (latent[0] // 2) * (latent[1] // 2), FLUX_TEXT_TOKENS, size)
        t5 = components.get("text_encoder_2")
        encode_act = t5_encode_bytes(t5.config, FLUX_TEXT_TOKENS, size) if t5 is not None else 0
    else:
        latent = (math.ceil(height / factor), math.ceil(width / factor))
        step_act = (2 if cfg else 1) * size * unet_step_elements(denoiser.config, latent, attention_values) \
            + int(conditioning_bytes)
        encode_act = 0
    tile = int(getattr(vae, "tile_sample_min_size", 0) or vae.config.sample_size)
    decode_act = vae_size * _vae_elements(vae_decode_elements, vae.config, (height, width), tile, vae_tiling, 6)
    vae_weights_decoding = _module_bytes(vae, 4) if upcast else comp_bytes.get("vae", 0)
    encoder = "text_encoder_2" if flux else "text_encoder"
    weights, total = _peak(offload, comp_bytes, den_key, components, size if explicit_dtype else None,
                           (den_key, step_act), ("vae", decode_act, vae_weights_decoding), (encoder, encode_act))
    est = MemoryEstimate(int(weights), int(step_act), int(decode_act), int(total), int(encode_act),
                         "transformer" if flux else "U-Net")
    if upscale is None:
        return est
    if flux:
        raise ValueError("upscale: the tiled upscale pass runs a U-Net (SD 1.5, SDXL), not FLUX")
    scale, up_tile, overlap = upscale
    out = (height * scale, width * scale)
    cells = (out[0] // factor) * (out[1] // factor)
    from .upscale import plan_tiles              # pure geometry (torch is imported by now)

    unit = factor * 2 ** (len(denoiser.config.block_out_channels) - 1)
    tiles = plan_tiles(out, up_tile, overlap, unit, factor)
    tile_latent = tiles[0].hw                    # every tile has the same size
    batch = 2 if cfg else 1
    tile_step = batch * size * unet_step_elements(denoiser.config, tile_latent, attention_values) \
        + int(conditioning_bytes)
    channels = denoiser.config.in_channels
    image_bytes = 3 * 4 * out[0] * out[1]        # the upscaled input, preprocessed in float32, held by the call
    # through the steps, per latent cell: the latents, the CFG batch and its scaled copy (the
    # pipeline's dtype), the blend's sum of the batch's predictions and its weight sum (float32);
    # and each tile's float32 weights
    buffers = (channels * (1 + 2 * batch) * size + 4 * (channels * batch + 1)) * cells \
        + 4 * sum(t.hw[0] * t.hw[1] for t in tiles) + image_bytes
    # SDXL's img2img encodes in float32 with the VAE cast to float32 where its config says
    # force_upcast, whatever the dtype; SD 1.5's in the VAE's dtype
    encode_upcast = _upcasts_vae(pipe, flux) and bool(getattr(vae.config, "force_upcast", False))
    encode_size = 4 if encode_upcast else size
    up_encode = vae_encode_bytes(vae, out, vae_tiling, encode_size) + image_bytes
    up_decode = vae_size * _vae_elements(vae_decode_elements, vae.config, out, tile, vae_tiling, 6) + image_bytes \
        + size * channels * cells
    vae_weights_encoding = _module_bytes(vae, 4) if encode_upcast else comp_bytes.get("vae", 0)
    up_weights, up_total = _peak(offload, comp_bytes, den_key, components, size if explicit_dtype else None,
                                 (den_key, tile_step + buffers), ("vae", up_decode, vae_weights_decoding),
                                 ("vae", up_encode, vae_weights_encoding))
    up = UpscaleEstimate(int(scale), out, (tile_latent[0] * factor, tile_latent[1] * factor), int(tile_step),
                         int(buffers), int(up_encode), int(up_decode), int(up_total))
    return dataclasses.replace(est, total=max(est.total, up.total), upscale=up, generation=est.total)


def vae_encode_bytes(vae, image_hw: Tuple[int, int], vae_tiling: bool, size: int) -> int:
    """Activation bytes of ``vae.encode`` of one image of ``image_hw`` pixels in a ``size``-byte dtype,
    the image included: whole, or where diffusers tiles it (tiling on and a side above the VAE's
    tile), one tile's encode beside the whole image and the tiles' moments (kept, then blended)."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    tile = int(getattr(vae, "tile_sample_min_size", 0) or vae.config.sample_size)
    return int(size * _vae_elements(vae_encode_elements, vae.config, image_hw, tile, vae_tiling,
                                    3 + 4 * vae.config.latent_channels / factor ** 2))


def _vae_elements(elements, config, image_hw: Tuple[int, int], tile: int, vae_tiling: bool, kept: float) -> float:
    """``elements(config, hw)`` of the whole image, or, where diffusers tiles it (tiling on and the
    image larger than one ``tile`` of pixels), of one tile plus ``kept`` values per pixel of the
    image (the tiles' results kept and blended)."""
    height, width = image_hw
    if vae_tiling and (height > tile or width > tile):
        return elements(config, (min(height, tile), min(width, tile))) + kept * height * width
    return elements(config, image_hw)


def _peak(offload: str, comp_bytes: Dict[str, int], den_key: str, components, dtype_size, *phases) -> Tuple[int, int]:
    """``(weights, peak)`` of phases ``(component, activations[, its weights while it runs])``, each
    with the weights ``offload`` keeps on the device: all of them (``"none"``; a component's own
    weights as given, e.g. a VAE cast to float32), its component alone (``"model"``), the largest
    layer (``"sequential"``)."""
    def own(phase):
        return phase[2] if len(phase) > 2 else comp_bytes.get(phase[0], 0)

    if offload == "model":
        return max(comp_bytes.values()), max(own(p) + p[1] for p in phases)
    if offload == "sequential":
        weights = max(_largest_leaf_bytes(m, dtype_size) for m in components.values() if m is not None)
        return weights, weights + max(p[1] for p in phases)
    weights = sum(comp_bytes.values())
    return weights, max(weights - comp_bytes.get(p[0], 0) + own(p) + p[1] for p in phases)


def _upcasts_vae(pipe, flux: bool) -> bool:
    """Whether the pipeline decodes a float16 VAE whose config says ``force_upcast`` in float32:
    diffusers' SDXL pipelines do (``needs_upcasting`` in StableDiffusionXLPipeline and its img2img);
    StableDiffusionPipeline (SD 1.5) and FluxPipeline decode in the VAE's dtype whatever the config
    says. The SDXL family is the U-Net pipelines with a second text encoder (the refiner has only
    that one); a meta-device skeleton (anyms.budget) is told apart the same way."""
    return not flux and getattr(pipe, "text_encoder_2", None) is not None


def _denoiser(pipe):
    """``(module, attribute name, is FLUX)``: the pipeline's U-Net, or its FLUX transformer."""
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        return unet, "unet", False
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ValueError("pipe must have a .unet (SD 1.5, SDXL) or a .transformer (FLUX) to estimate its memory")
    return transformer, "transformer", True


@dataclass
class MemoryPlan:
    """What :func:`fit_memory` chose: the dtype, the offload, VAE tiling, and the estimate with them."""

    dtype: object
    offload: str
    vae_tiling: bool
    estimate: MemoryEstimate
    image: Optional[tuple] = None      # (height, width, cfg, upscale) of the image the estimate is of

    def options(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        offload = {"none": "no offload", "model": "model offload", "sequential": "sequential offload"}[self.offload]
        return f"{dtype}, {offload}, VAE tiling {'on' if self.vae_tiling else 'off'}"

    def describe(self) -> str:
        return f"memory plan: {self.options()}: estimated peak {self.estimate.describe()}"


OFFLOADS = ("none", "model", "sequential")


class MemoryBudgetError(ValueError):
    """No plan fits the budget: ``smallest`` is the plan with the smallest estimated peak (its
    ``estimate.total`` is the smallest budget that would fit)."""

    def __init__(self, message: str, smallest: MemoryPlan):
        super().__init__(message)
        self.smallest = smallest


def fit_memory(pipe, height: int, width: int, budget_bytes, *, cfg: bool = True, upscale=None,
               half_dtype=None, dtype=None, offloads: Sequence[str] = OFFLOADS,
               vae_tiling: Optional[bool] = None, images: Sequence[tuple] = ()) -> MemoryPlan:
    """The first plan, in a fixed order, whose estimated peak (:func:`estimate_peak_memory`) is
    within ``budget_bytes``; each step keeps the ones before it:

    1. as the pipeline is (its dtype, no offload, no VAE tiling);
    2. half precision (``half_dtype``, default float16), where the pipeline is in float32;
    3. VAE tiling;
    4. model offload (one component on the device at a time);
    5. sequential offload (one layer at a time: slowest).

    The order is by what each costs in speed. Constraints, for options the caller fixed:
    ``dtype`` (that dtype in every step: no step 2), ``offloads`` (the offloads allowed; a step
    whose offload is not allowed takes the first allowed instead of ``"none"``, or is skipped),
    ``vae_tiling`` (True or False in every step). Attention slicing is not a step: the estimate
    assumes fused attention (no token x token scores), where slicing saves nothing.

    ``upscale``: the tiled upscale pass that follows the generation, ``(scale, tile, overlap)``
    (:func:`estimate_peak_memory`): the plan must fit both passes. ``images``: more images the one
    plan must fit, as ``(height, width, cfg, upscale)`` (a run of several); a plan's estimate is
    then that of the image with the largest peak, and ``plan.image`` says which.

    ``pipe`` needs only its components' configs and parameters' shapes and dtypes: a pipeline
    built on the meta device (anyms.budget) is estimated as the loaded one would be.

    Raises ValueError naming ``budget_bytes`` when it is not a positive number, and
    :class:`MemoryBudgetError` (a ValueError) when no plan fits: its message gives the smallest
    estimated peak among the plans allowed, the smallest budget that would fit. Applying the
    plan (``pipe.to(dtype)``, ``enable_model_cpu_offload()``, ...) is the caller's.
    """
    import torch

    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, float)) or not budget_bytes > 0 \
            or math.isinf(budget_bytes):
        raise ValueError(f"budget_bytes must be a positive number of bytes, got {budget_bytes!r}")
    everything = [(height, width, cfg, upscale)] + [tuple(image) for image in images]
    for i, image in enumerate(everything):
        where = "" if i == 0 else f"images[{i - 1}]: "
        check_image_size(image[0], f"{where}height")
        check_image_size(image[1], f"{where}width")
    offloads = tuple(offloads)
    if not offloads or any(o not in OFFLOADS for o in offloads):
        raise ValueError(f"offloads must be a non-empty sequence of {list(OFFLOADS)}, got {offloads!r}")
    half = half_dtype or torch.float16
    if torch.empty((), dtype=half).element_size() != 2:
        raise ValueError(f"half_dtype must be a 2-byte floating dtype (float16, bfloat16), got {half_dtype}")
    start = dtype or _denoiser(pipe)[0].dtype
    if dtype is None and torch.empty((), dtype=start).element_size() > 2:
        half_steps = [(start, "none", False), (half, "none", False)]
    else:
        half_steps = [(start, "none", False)]
    d = half_steps[-1][0]
    plans = []
    for d, offload, tiled in half_steps + [(d, "none", True), (d, "model", True), (d, "sequential", True)]:
        if offload not in offloads:
            if offload != "none":
                continue
            offload = offloads[0]
        tiled = tiled if vae_tiling is None else bool(vae_tiling)
        if (d, offload, tiled) not in plans:
            plans.append((d, offload, tiled))
    tried = []
    for d, offload, tiled in plans:
        est, image = max(((estimate_peak_memory(pipe, h, w, cfg=c, offload=offload, vae_tiling=tiled, dtype=d,
                                                upscale=up), (h, w, c, up)) for h, w, c, up in everything),
                         key=lambda pair: pair[0].total)
        plan = MemoryPlan(d, offload, tiled, est, image)
        if est.total <= budget_bytes:
            return plan
        tried.append(plan)
    smallest = min(tried, key=lambda p: p.estimate.total)
    h, w, _, up = smallest.image
    what = f"{h}x{w} generation" + (f" upscaled {up[0]}x" if up else "")
    raise MemoryBudgetError(f"budget_bytes {budget_bytes / GIB:.2f} GiB is below the smallest estimated peak of a "
                            f"{what}, {smallest.estimate.total / GIB:.2f} GiB ({smallest.options()})", smallest)


def device_memory(device) -> Optional[Tuple[int, int]]:
    """``(available, total)`` bytes of ``device``'s memory (CUDA: free and total; CPU: the
    system's available and total RAM), or None where unknown."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, total = torch.cuda.mem_get_info(device)
            return int(free), int(total)
        except (RuntimeError, AssertionError):
            return None
    if device.type == "cpu":
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
        available = total
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        available = int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
        return available, total
    return None


# ------------------------------------------------------------------ subjects
def unreached_subjects(layout, grids, num_steps: Optional[int] = None
                       ) -> List[Tuple[int, Tuple[int, int], Optional[int]]]:
    """``(subject, grid, layers)`` for every grid where a subject acts and yet its branch gets no
    token: at every layer of that grid its blocks select and every step its window holds, the
    subjects active on top of it then cover every cell of its region.

    ``layout`` is an :class:`anyms.Layout`; ``grids`` ``(h, w)`` pairs or the dicts
    :func:`anyms.visualize.cross_attention_grids` (grid -> number of layers) or
    :func:`anyms.visualize.cross_attention_layers` (grid -> layer names: needed when subjects
    select blocks) return; ``num_steps`` the denoising loop's length for a timed layout
    (:func:`anyms.visualize.routing_rows`). ``layers`` counts the grid's layers where the
    subject acts. A grid where a subject does not act at all (its blocks leave it out) is not
    listed, nor is a subject that acts nowhere (:func:`idle_subjects`). Subjects are in the
    layout's (priority) order. Only ``overwrite`` mode can lose a subject: a region always
    meets at least one cell of a grid.
    """
    from .visualize import routing_rows

    by_grid: Dict[Tuple[int, int], List] = {}
    for row in routing_rows(layout, grids, num_steps):
        by_grid.setdefault(row.grid, []).append(row)
    out = []
    for grid, rows in by_grid.items():
        for s in range(layout.num_subjects):
            acting = [row for row in rows if row.acts[s]]
            if acting and not any(bool(row.masks[s].any()) for row in acting):
                layers = None if any(row.layers is None for row in acting) else sum(row.layers for row in acting)
                out.append((s, grid, layers))
    return out


def idle_subjects(layout, grids, num_steps: Optional[int] = None) -> List[Tuple[int, str]]:
    """``(subject, why)`` for every subject that acts at no layer of ``grids`` at any step: an
    image at a scale of 0, a window that holds no step, or blocks that select none of the layers
    (a subject's regional prompt acts at every layer of its window: such a subject acts)
    (arguments as :func:`unreached_subjects`)."""
    from .visualize import routing_rows

    rows = routing_rows(layout, grids, num_steps)
    out = []
    for s in range(layout.num_subjects):
        if not any(row.acts[s] for row in rows):
            why = rows[0].why_not[s]
            if why == "its blocks leave these layers out":
                why = "its blocks select none of the model's cross-attention layers (or weigh them all 0)"
            out.append((s, why))
    return out


def unreached_message(unreached, labels: Sequence[str], names: Optional[Sequence[str]] = None,
                      idle: Sequence[Tuple[int, str]] = (), kinds: Optional[Sequence[str]] = None) -> List[str]:
    """One line per subject that acts nowhere (``idle``, :func:`idle_subjects`) or vanishes at
    some level (``unreached``, :func:`unreached_subjects`): its label, its name and why or where.
    ``kinds``: the subjects' (``Layout.kinds``; default: each an image), which branches to name."""
    branches = {"image": "its image does", "prompt": "its prompt does", "both": "its image and its prompt do"}
    def named(s):
        return f"subject {labels[s]!r}" + (f" ({names[s]})" if names else "")

    lines = [f"{named(s)} never acts: {why}" for s, why in idle]
    by_subject: Dict[int, List[str]] = {}
    for s, (h, w), layers in unreached:
        by_subject.setdefault(s, []).append(f"{h}x{w}" + (f" ({layers} layer{'s' * (layers != 1)})" if layers else ""))
    for s, where in by_subject.items():
        several = len(where) > 1
        lines.append(f"{named(s)} gets no token at the {', '.join(where)} level"
                     f"{'s' if several else ''}: the subjects on top of it cover every cell of its region "
                     f"there whenever it acts, so {branches[kinds[s] if kinds else 'image']} not act at "
                     f"{'those levels' if several else 'that level'} (enlarge its region, move it on top, or use "
                     f"--mode sum)")
    return lines
