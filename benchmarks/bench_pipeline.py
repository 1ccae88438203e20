"""Seconds per denoising step and peak memory of a full-size SDXL U-Net, four ways; and the
largest image that fits in a memory cap.

    python benchmarks/bench_pipeline.py                 # CPU: fp32 at 512^2; CUDA: fp16 at 1024^2 and 2048^2
    python benchmarks/bench_pipeline.py --quick         # smoke run on a tiny U-Net (< 1 minute on 2 cores)
    python benchmarks/bench_pipeline.py --max-size      # CUDA: largest square size within 8/12/16 GiB
    python benchmarks/bench_pipeline.py --max-size --quick --device cpu   # its CPU dry run (tiny models)

One step is one U-Net forward on the classifier-free-guidance batch (B = 2). The
U-Net is built from stabilityai/stable-diffusion-xl-base-1.0's published config
(hard-coded below; it cannot be downloaded here) with RANDOM weights: time and
memory do not depend on the weights' values. Variants, on the same U-Net and inputs:

    none    no IP-Adapter (diffusers' AttnProcessor2_0 everywhere)
    plain   IP-Adapter, 1 image (IPAdapterAttnProcessor2_0, random to_k_ip / to_v_ip)
    b0      IPAdapterAttnProcessor2_0 with 5 images and ip_adapter_masks (image-size binary
            masks, which diffusers resizes bicubically at each layer): what users run today
    anyms   the same processors converted by anyms.apply_anyms, 5 subjects, overwrite mode

The image projection is skipped: image embeddings are random tensors of the
post-projection shape [B, S, T, 2048] fed through an identity projection, so every
variant differs only in its cross-attention processors.

Peak memory. CUDA: torch.cuda.max_memory_allocated over the step (weights and inputs
included). CPU: the weights' and inputs' bytes plus the peak of the CPU allocator's
running total during the step, read from torch.profiler's allocation events
(profile_memory=True; every allocation, those inside C++ kernels included), the CPU
counterpart of max_memory_allocated. Both are reported: peak_bytes (total) and
peak_extra_bytes (above weights and inputs).

Largest size (--max-size). For each cap (--caps-gib, default 16 12 8: 8/12/16 GB cards
emulated with torch.cuda.set_per_process_memory_fraction(cap / total_memory)), each of
plain / b0 / anyms, VAE tiling on and off: the largest square side, a multiple of 64,
at which ONE denoising step of the U-Net (fp16, CFG batch 2) followed by the decode of
its batch-1 latent by a full-size SDXL VAE (random weights, fp16; tiled = enable_tiling())
runs without torch.cuda.OutOfMemoryError. Weights on the GPU: U-Net, IP-Adapter
projections, VAE (text and image encoders are not: offloaded or freed by then). B0's
image-size masks sit on the GPU in fp16 (they count, 5 * side^2 * 2 bytes). The search
predicts the side from the peaks of the tries that fitted (peak ~ fixed + a * side^2),
checks it and its neighbour, and falls back to grow-then-bisect; between tries it frees
memory (gc, empty_cache). The cap holds PyTorch's allocator only: a real card of that
size also holds the CUDA context (env line of the summary), so its limit is a little lower.
--time-limit stops starting tries that would end past it; every search writes its row the
moment it ends. The CPU dry run (--quick --device cpu) does the same with tiny models of
the same structure, "fits" meaning weights + the profiler's allocator peak <= a cap of a
few MiB (--caps-mib).

Rows go to benchmarks/results/pipeline_<machine>.csv (appended; --max-size:
pipeline_maxsize_<machine>.csv) one at a time as they are measured, each naming the
machine, dtype, shape, torch/triton/diffusers versions, threads and git commit;
--summary FILE also gets one line per row as it is measured.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import math
import os
import re
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ may be loaded by path
from _env import git_commit, machine_name  # noqa: E402  (one place for what names a result)

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (diffusers 0.19 era keys).
SDXL_UNET_CONFIG = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    center_input_sample=False,
    class_embed_type=None,
    class_embeddings_concat=False,
    conv_in_kernel=3,
    conv_out_kernel=3,
    cross_attention_dim=2048,
    cross_attention_norm=None,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1,
    dual_cross_attention=False,
    encoder_hid_dim=None,
    encoder_hid_dim_type=None,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_only_cross_attention=None,
    mid_block_scale_factor=1,
    mid_block_type="UNetMidBlock2DCrossAttn",
    norm_eps=1e-05,
    norm_num_groups=32,
    num_attention_heads=None,
    num_class_embeds=None,
    only_cross_attention=False,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,
    resnet_out_scale_factor=1.0,
    resnet_skip_time_act=False,
    resnet_time_scale_shift="default",
    sample_size=128,
    time_cond_proj_dim=None,
    time_embedding_act_fn=None,
    time_embedding_dim=None,
    time_embedding_type="positional",
    timestep_post_act=None,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    upcast_attention=None,
    use_linear_projection=True,
)

# --quick: the same structure, tiny widths (head dim 64 kept), cross-attention dim 2048 kept.
QUICK_UNET_CONFIG = dict(
    SDXL_UNET_CONFIG, block_out_channels=[32, 64, 128], attention_head_dim=[1, 1, 2],
    transformer_layers_per_block=[1, 1, 2], layers_per_block=1, norm_num_groups=8,
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32,
)

# stabilityai/stable-diffusion-xl-base-1.0, vae/config.json (83.65 M parameters).
SDXL_VAE_CONFIG = dict(
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=1024,          # tiles of 1024^2 pixels (128^2 latents) when tiling is on
    scaling_factor=0.13025,
    force_upcast=True,
)

# --quick: the same structure (4 blocks: latent = image / 8, mid-block attention), tiny widths,
# tiles of 128^2 pixels so that tiling acts in the dry run's sizes.
QUICK_VAE_CONFIG = dict(SDXL_VAE_CONFIG, block_out_channels=[8, 16, 16, 16], layers_per_block=1,
                        norm_num_groups=4, sample_size=128)

# Five subjects (normalised x0, y0, x1, y1, ascending priority): a 2x2 grid and a centre box on top.
FIVE_BOXES = [[0.0, 0.0, 0.5, 0.5], [0.5, 0.0, 1.0, 0.5], [0.0, 0.5, 0.5, 1.0], [0.5, 0.5, 1.0, 1.0],
              [0.25, 0.25, 0.75, 0.75]]
IP_TOKENS = 4          # the base SDXL IP-Adapter (ip-adapter_sdxl)
BATCH = 2              # classifier-free guidance: unconditional + conditional
VARIANTS = ("none", "plain", "b0", "anyms")
GIB = 1024 ** 3


# ------------------------------------------------------------------ environment
def versions() -> Dict[str, str]:
    import diffusers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version, "diffusers": diffusers.__version__}


# ------------------------------------------------------------------------ model
def build_unet(config: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """The U-Net with random weights, allocated directly on ``device`` (no full init pass).

    Matrices get N(0, 1/fan_in) (activations keep their scale through the depth), norm
    weights 1, biases N(0, 0.01^2): finite, non-degenerate values, which is all that
    time and memory depend on.
    """
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    # Cast on the meta device, then allocate once, in the target dtype, on the target device.
    unet = unet.to(dtype).to_empty(device=device).eval().requires_grad_(False)
    _randomise(unet, seed)
    return unet


def build_vae(config: dict, device: str, dtype: torch.dtype, seed: int = 3):
    """The SDXL VAE (AutoencoderKL) with random weights, allocated directly on ``device``."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    vae = vae.to(dtype).to_empty(device=device).eval().requires_grad_(False)
    _randomise(vae, seed)
    return vae


def _randomise(module: torch.nn.Module, seed: int) -> None:
    gen_device = next(module.parameters()).device
    g = torch.Generator(device=gen_device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.01, generator=g)


def install_ip_adapter(unet, num_tokens: int = IP_TOKENS, seed: int = 1):
    """Random IP-Adapter processors on every cross-attention layer, as load_ip_adapter lays them out,
    and an identity image projection (image embeddings are given post-projection)."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    param = next(unet.parameters())
    cross_dim = unet.config.cross_attention_dim
    procs = {}
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            procs[name] = AttnProcessor2_0()
            continue
        attn = unet.get_submodule(name[: -len(".processor")])
        with torch.device("meta"):
            proc = IPAdapterAttnProcessor2_0(attn.to_k.out_features, cross_dim, num_tokens=(num_tokens,), scale=1.0)
        procs[name] = proc.to_empty(device=param.device).to(param.dtype).requires_grad_(False)
    unet.set_attn_processor(procs)
    for i, proc in enumerate(p for p in unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)):
        _randomise(proc, seed + i)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([torch.nn.Identity()])
    unet.config.encoder_hid_dim_type = "ip_image_proj"   # as UNet2DConditionModel._load_ip_adapter_weights does


def remove_ip_adapter(unet):
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor({name: AttnProcessor2_0() for name in unet.attn_processors})
    unet.encoder_hid_proj = None
    unet.config.encoder_hid_dim_type = None


def box_masks(boxes, size: int) -> torch.Tensor:
    """``[1, S, size, size]`` binary masks at image resolution, as IPAdapterMaskProcessor makes them."""
    masks = torch.zeros(1, len(boxes), size, size)
    for s, (x0, y0, x1, y1) in enumerate(boxes):
        masks[0, s, round(y0 * size):round(y1 * size), round(x0 * size):round(x1 * size)] = 1.0
    return masks


def make_inputs(unet, size: int, subjects: int, device: str, dtype: torch.dtype, seed: int = 2) -> dict:
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    latent = size // 8
    text_embeds_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    added = {"text_embeds": rnd(BATCH, text_embeds_dim),
             "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * BATCH, device=device, dtype=dtype)}
    if subjects:
        added["image_embeds"] = [rnd(BATCH, subjects, IP_TOKENS, cfg.cross_attention_dim)]
    return dict(sample=rnd(BATCH, cfg.in_channels, latent, latent), timestep=torch.tensor(500, device=device),
                encoder_hidden_states=rnd(BATCH, 77, cfg.cross_attention_dim), added_cond_kwargs=added)


def configure(unet, variant: str, size: int, device: str, dtype: torch.dtype,
              mask_dtype: torch.dtype = torch.float32) -> dict:
    """Install the variant's processors on ``unet``; return the forward's kwargs.

    B0's image-size masks go to ``device`` in ``mask_dtype`` (float32 as IPAdapterMaskProcessor
    makes them; --max-size uses the U-Net's dtype, the lighter choice)."""
    from anyms.layout import Layout
    from anyms.processor import apply_anyms, remove_anyms

    remove_anyms(unet) if _has_anyms(unet) else None
    if variant == "none":
        if unet.encoder_hid_proj is not None:
            remove_ip_adapter(unet)
        return make_inputs(unet, size, 0, device, dtype)
    if unet.encoder_hid_proj is None:
        install_ip_adapter(unet)
    if variant == "plain":
        return make_inputs(unet, size, 1, device, dtype)
    kwargs = make_inputs(unet, size, len(FIVE_BOXES), device, dtype)
    if variant == "b0":
        masks = box_masks(FIVE_BOXES, size).to(device=device, dtype=mask_dtype)
        kwargs["cross_attention_kwargs"] = {"ip_adapter_masks": [masks]}
    elif variant == "anyms":
        apply_anyms(unet, Layout(FIVE_BOXES, (size // 8, size // 8), mode="overwrite"))
    else:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return kwargs


def _has_anyms(unet) -> bool:
    from anyms.processor import AnyMSAttnProcessor

    return any(isinstance(p, AnyMSAttnProcessor) for p in unet.attn_processors.values())


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _input_tensors(kwargs) -> List[torch.Tensor]:
    out = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(kwargs)
    return out


# ---------------------------------------------------------------------- measure
def _step(unet, kwargs, device):
    with torch.no_grad():
        out = unet(**kwargs).sample
    if device == "cuda":
        torch.cuda.synchronize()
    return out


def peak_memory_cpu(unet, kwargs) -> int:
    """Peak of the CPU allocator's running total during one step, above what was live before."""
    return cpu_alloc_peak(lambda: _step(unet, kwargs, "cpu"))[0]


def cpu_alloc_peak(fn: Callable):
    """``(peak, fn())``: the peak of the CPU allocator's running total while ``fn`` runs, above what
    was live before it, from torch.profiler's allocation events (frees are negative sizes)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    allocs = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            allocs.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    allocs.sort()
    live = peak = 0
    for _, size in allocs:
        live += size
        peak = max(peak, live)
    return peak, result


def measure(unet, kwargs, device: str, repeats: int) -> dict:
    base = _tensor_bytes(list(unet.parameters()) + list(unet.buffers()) + _input_tensors(kwargs))
    if device == "cuda":
        _step(unet, kwargs, device)                       # warm-up (kernels, autotune-free configs)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        _step(unet, kwargs, device)
        peak = torch.cuda.max_memory_allocated()
        extra, total, method = peak - start, peak, "torch.cuda.max_memory_allocated"
    else:
        extra = peak_memory_cpu(unet, kwargs)             # also the warm-up
        total, method = base + extra, "weights+inputs + torch.profiler allocator peak"
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _step(unet, kwargs, device)
        times.append(time.perf_counter() - t0)
    return dict(step_s=statistics.median(times), step_s_min=min(times), repeats=repeats,
                peak_bytes=total, peak_extra_bytes=extra, peak_method=method)


def run_size(unet, size: int, device: str, dtype: torch.dtype, repeats: int, variants=VARIANTS,
             log=print, on_row: Optional[Callable[[dict], None]] = None,
             stop_at: Optional[float] = None) -> List[dict]:
    """One row per variant; ``on_row`` gets each row the moment it is measured. No variant is
    started after ``stop_at`` (a time.perf_counter() value)."""
    rows = []
    for variant in variants:
        if stop_at is not None and time.perf_counter() > stop_at:
            log(f"  {size}^2 {variant:6s} not run: time limit")
            continue
        kwargs = configure(unet, variant, size, device, dtype)
        res = measure(unet, kwargs, device, repeats)
        subjects = {"none": 0, "plain": 1}.get(variant, len(FIVE_BOXES))
        rows.append(dict(variant=variant, subjects=subjects, image_size=size, latent=size // 8, **res))
        log(f"  {size}^2 {variant:6s} step {res['step_s']:.3f} s (min {res['step_s_min']:.3f}, n={repeats})  "
            f"peak {res['peak_bytes'] / GIB:.3f} GiB (extra {res['peak_extra_bytes'] / GIB:.3f} GiB)")
        if on_row is not None:
            on_row(rows[-1])
        del kwargs
    return rows


def targets(rows: List[dict], judge: bool = True) -> List[str]:
    """The targets, as ratios within one run; ``judge=False`` (a --quick smoke run on a tiny U-Net,
    whose ratios say nothing about SDXL) shows the ratios without a verdict."""
    def verdict(ok: bool) -> str:
        return ("met" if ok else "NOT met") if judge else "not judged: smoke run"

    lines = []
    for size in sorted({r["image_size"] for r in rows}):
        by = {r["variant"]: r for r in rows if r["image_size"] == size}
        if not {"plain", "b0", "anyms"} <= by.keys():
            continue
        a, p, b = by["anyms"], by["plain"], by["b0"]
        t_ratio, m_ratio = a["step_s"] / p["step_s"], a["peak_bytes"] / p["peak_bytes"]
        lines += [
            f"{size}^2: AnyMS step / plain IP-Adapter = {t_ratio:.3f} (target <= 1.05: {verdict(t_ratio <= 1.05)})",
            f"{size}^2: AnyMS step / B0 = {a['step_s'] / b['step_s']:.3f} (target < 1: {verdict(a['step_s'] < b['step_s'])})",
            f"{size}^2: AnyMS peak / plain IP-Adapter = {m_ratio:.4f} (target within 2%: {verdict(abs(m_ratio - 1) <= 0.02)}); "
            f"extra above weights: {a['peak_extra_bytes'] / GIB:.3f} vs {p['peak_extra_bytes'] / GIB:.3f} GiB",
            f"{size}^2: AnyMS peak / B0 = {a['peak_bytes'] / b['peak_bytes']:.4f} (target < 1: {verdict(a['peak_bytes'] < b['peak_bytes'])})",
        ]
    return lines


# ------------------------------------------------------------------ largest size
MAX_SIZE_VARIANTS = ("anyms", "b0", "plain")
SIZE_STEP = 64          # image sides: multiples of 64 (latents: multiples of 8)
MIB = 1024 ** 2
CAPS_GIB = (16, 12, 8)          # 16, 12 and 8 GB cards; the most wanted first, should the time run out
QUICK_CAPS_MIB = (72, 68, 64)   # the dry run's tiny models: weights 58 MiB, maxima between 128^2 and 512^2
MAX_SIZE_FIELDS = ["variant", "subjects", "ip_tokens", "batch", "vae_tiling", "cap", "cap_bytes", "max_size",
                   "first_oom", "first_oom_from", "status", "tries", "peak_bytes", "step_s", "decode_s",
                   "search_s", "peak_method"]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, or a library's allocation failure surfacing as a RuntimeError."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in msg.lower() or "ALLOC_FAILED" in msg)


def generate_once(unet, vae, variant: str, size: int, device: str, dtype: torch.dtype) -> Tuple[float, float]:
    """One denoising step at ``size`` on the CFG batch, then the VAE decode of the batch-1 latent
    (the guidance has merged the two halves by then). Returns (step seconds, decode seconds)."""
    kwargs = configure(unet, variant, size, device, dtype, mask_dtype=dtype)
    t0 = time.perf_counter()
    with torch.no_grad():
        noise = unet(**kwargs).sample
        _sync(device)
        t1 = time.perf_counter()
        latents = noise[:1].clone()
        del noise, kwargs
        image = vae.decode(latents / vae.config.scaling_factor).sample
        _sync(device)
        t2 = time.perf_counter()
    del image, latents
    return t1 - t0, t2 - t1


class Prober:
    """One try: does a step + decode at ``size`` fit under the cap (bytes)?

    CUDA: the caching allocator is capped with set_per_process_memory_fraction(cap / total
    memory) and torch.cuda.OutOfMemoryError means no. CPU (the dry run): the try runs uncapped
    and fits when the weights' bytes plus the allocator's peak (cpu_alloc_peak) are <= cap.
    Memory is freed (gc, empty_cache) before and after every try."""

    def __init__(self, unet, vae, device: str, dtype: torch.dtype):
        self.unet, self.vae, self.device, self.dtype = unet, vae, device, dtype
        mods = [unet, vae]
        self.weights = _tensor_bytes([t for m in mods for t in list(m.parameters()) + list(m.buffers())])
        self.total = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else None
        self.cap: Optional[int] = None

    def set_cap(self, cap: Optional[int]) -> None:
        self.cap = cap
        if self.device == "cuda":
            _free(self.device)
            torch.cuda.set_per_process_memory_fraction(1.0 if cap is None else min(1.0, cap / self.total))

    def __call__(self, variant: str, tiled: bool, size: int) -> dict:
        (self.vae.enable_tiling if tiled else self.vae.disable_tiling)()
        _free(self.device)
        t0 = time.perf_counter()
        step_s = decode_s = float("nan")
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            try:
                step_s, decode_s = generate_once(self.unet, self.vae, variant, size, self.device, self.dtype)
                fits = True
            except Exception as exc:     # noqa: BLE001  (only allocation failures are a "no")
                if not _is_oom(exc):
                    raise
                fits = False
            peak = torch.cuda.max_memory_allocated()
        else:
            extra, (step_s, decode_s) = cpu_alloc_peak(
                lambda: generate_once(self.unet, self.vae, variant, size, self.device, self.dtype))
            peak = self.weights + extra
            fits = peak <= self.cap
        _free(self.device)
        return dict(variant=variant, tiled=tiled, cap=self.cap, size=size, fits=fits, peak=peak,
                    step_s=step_s, decode_s=decode_s, seconds=time.perf_counter() - t0)


def search_max_size(probe: Callable[[int], dict], *, lo_hint: Optional[int] = None,
                    hi_known: Optional[int] = None, predict: Optional[Callable[[], Optional[float]]] = None,
                    start: int = 1024, min_size: int = SIZE_STEP, max_size: int = 8192, step: int = SIZE_STEP,
                    affordable: Optional[Callable[[int], bool]] = None, model_probes: int = 3) -> dict:
    """The largest multiple of ``step`` in [min_size, max_size] for which ``probe(size)["fits"]``.

    lo_hint: a size believed to fit (it fitted under a smaller cap, or without tiling); it is
    tried before it is reported. hi_known: a size known not to fit (it failed under a larger cap,
    or with tiling); it is not tried again. predict(): the predicted largest side (or None); the
    first ``model_probes`` tries follow it (clamped inside the bracket), then grow (x1.5) or
    bisect. affordable(size): False when a try of that size would end past the time limit.

    Returns dict(max_size, first_oom, first_oom_known (True: failed under this cap), status =
    "exact" | "none fits" | "search limit" | "time limit", tries = [probe results]).
    """
    lo: Optional[int] = None                     # the largest size that fitted here
    hi, hi_here = hi_known, False                # the smallest size known not to fit
    tries: List[dict] = []
    guided = 0
    snap = lambda x: int(x) // step * step       # noqa: E731
    while True:
        known = max([x for x in (lo, lo_hint) if x is not None], default=None)   # believed to fit
        if hi is not None and hi <= min_size:
            status = "none fits"
            break
        if known is not None and hi is not None and hi - known <= step or known is not None and known >= max_size:
            if lo == known:
                status = "exact" if hi is not None and hi - known <= step else "search limit"
                break
            cand = known                          # the hint decides: try it here
        else:
            floor_ = known + step if known is not None else min_size
            ceil_ = min(hi - step if hi is not None else max_size, max_size)
            cand = None
            if predict is not None and guided < model_probes:
                g = predict()
                if g is not None and math.isfinite(g):
                    cand, guided = snap(g), guided + 1
            if cand is None:
                if known is None and hi is None:
                    cand = start
                elif hi is None:
                    cand = snap(known * 1.5)
                elif known is None:
                    cand = snap(hi / 2)
                else:
                    cand = snap((known + hi) / 2)
            cand = min(max(cand, floor_), ceil_)
        if affordable is not None and not affordable(cand):
            status = "time limit"
            break
        t = probe(cand)
        tries.append(t)
        if t["fits"]:
            lo = cand if lo is None else max(lo, cand)
        else:
            if hi is None or cand < hi:
                hi, hi_here = cand, True
            if lo_hint is not None and cand <= lo_hint:
                lo_hint = None                   # the hint does not hold under this cap
    return dict(max_size=lo, first_oom=hi, first_oom_known=hi_here, status=status, tries=tries)


def _predictor(history: List[dict], variant: str, tiled: bool, cap: int, weights: int) -> Callable[[], Optional[float]]:
    """predict(): the side at which peak = cap, from the peaks of the tries that fitted (any cap),
    peak ~ w + a * side^2; the curve of another variant with the same tiling when this one has no
    fitted try yet. A try that failed below the curve lowers the usable cap (fragmentation,
    curvature) so that the next guess lands under it."""
    def predict() -> Optional[float]:
        def fitted(same_variant):
            return sorted({(h["size"], h["peak"]) for h in history if h["fits"] and h["tiled"] == tiled
                           and (h["variant"] == variant) == same_variant})
        pts = fitted(True) or fitted(False)
        if not pts:
            return None
        (s0, p0), (s1, p1) = pts[0], pts[-1]
        if len(pts) >= 3 and pts[-1][0] - pts[-2][0] >= 4 * SIZE_STEP:
            (s0, p0) = pts[-2]                     # the two largest when they are far enough apart
        if s1 > s0 and p1 > p0:
            a = (p1 - p0) / (s1 ** 2 - s0 ** 2)
            w = p1 - a * s1 ** 2
        else:
            w = weights
            a = (p1 - w) / s1 ** 2
        if a <= 0:
            return None
        usable = cap
        for h in history:                          # failures under this cap that the curve says fit
            if not h["fits"] and h["cap"] == cap and h["variant"] == variant and h["tiled"] == tiled:
                usable = min(usable, 0.995 * (w + a * h["size"] ** 2))
        return math.sqrt(max(usable - w, 0.0) / a)
    return predict


def _timer(history: List[dict], variant: str, tiled: bool, deadline: Optional[float]) -> Callable[[int], bool]:
    """affordable(size): the try's predicted duration (the nearest completed try of this variant and
    tiling, else of any, scaled by (size / its size)^3, + 25%) ends before the deadline."""
    def affordable(size: int) -> bool:
        if deadline is None:
            return True
        done = [h for h in history if h["fits"]] or history      # a failed try stops early: a poor guide
        ref = [h for h in done if h["variant"] == variant and h["tiled"] == tiled] or done
        if not ref:
            return time.perf_counter() < deadline
        h = min(ref, key=lambda h: abs(h["size"] - size))
        est = 1.25 * h["seconds"] * max(size / h["size"], 1.0) ** 3
        return time.perf_counter() + est < deadline
    return affordable


def max_size_rows(unet, vae, device: str, dtype: torch.dtype, caps: List[Tuple[str, int]],
                  variants=MAX_SIZE_VARIANTS, start: int = 1024, max_size: int = 8192,
                  deadline: Optional[float] = None, log=print,
                  on_row: Optional[Callable[[dict], None]] = None, note=print) -> List[dict]:
    """One row per (cap, VAE tiling, variant), in that order (caps as given: (label, bytes); tiling
    on first); ``on_row`` gets each row the moment its search ends. A search that the time limit
    stops before its first try has no row: ``note`` gets one line naming them all."""
    probe = Prober(unet, vae, device, dtype)
    log(f"  weights on the {device}: {probe.weights / GIB:.3f} GiB (U-Net + IP-Adapter projections + VAE)")
    history: List[dict] = []
    rows: List[dict] = []
    skipped: List[str] = []
    labels = {cap: name for name, cap in caps}
    for cap_name, cap in caps:
        probe.set_cap(cap)
        for tiled in (True, False):
            for variant in variants:
                label = f"{cap_name}, tiling {'on' if tiled else 'off'}, {variant}"
                if deadline is not None and time.perf_counter() > deadline:
                    skipped.append(label)
                    continue
                same = lambda h: h["variant"] == variant       # noqa: E731
                fits_below = [h["size"] for h in history if same(h) and h["fits"] and h["cap"] <= cap
                              and (h["tiled"] == tiled or tiled)]
                fails_above = [(h["size"], h) for h in history if same(h) and not h["fits"] and h["cap"] >= cap
                               and (h["tiled"] == tiled or not tiled)]
                hi_known, hi_from = None, ""
                if fails_above:
                    hi_known, h = min(fails_above, key=lambda x: x[0])
                    hi_from = f"{labels[h['cap']]}, tiling {'on' if h['tiled'] else 'off'}"

                def run(size, variant=variant, tiled=tiled):
                    t = probe(variant, tiled, size)
                    history.append(t)
                    peak = f", peak {t['peak'] / GIB:.3f} GiB" if t["fits"] else ""
                    log(f"    {label}: {size}^2 {'fits' if t['fits'] else 'does not fit'}{peak} ({t['seconds']:.1f} s)")
                    return t

                t0 = time.perf_counter()
                res = search_max_size(run, lo_hint=max(fits_below, default=None), hi_known=hi_known,
                                      predict=_predictor(history, variant, tiled, cap, probe.weights),
                                      start=start, max_size=max_size,
                                      affordable=_timer(history, variant, tiled, deadline))
                if not res["tries"]:
                    skipped.append(label)
                    continue
                at = next((t for t in res["tries"] if t["fits"] and t["size"] == res["max_size"]), None)
                row = dict(variant=variant, subjects=1 if variant == "plain" else len(FIVE_BOXES),
                           vae_tiling="on" if tiled else "off", cap=cap_name, cap_bytes=cap, max_size=res["max_size"],
                           first_oom=res["first_oom"],
                           first_oom_from="this search" if res["first_oom_known"] else hi_from,
                           status=res["status"], tries=len(res["tries"]),
                           peak_bytes=at["peak"] if at else None, step_s=at["step_s"] if at else None,
                           decode_s=at["decode_s"] if at else None, search_s=round(time.perf_counter() - t0, 1),
                           peak_method=("torch.cuda.OutOfMemoryError under set_per_process_memory_fraction; "
                                        "peak = max_memory_allocated" if device == "cuda" else
                                        "weights + torch.profiler allocator peak <= cap (dry run)"))
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    probe.set_cap(None)
    if skipped:
        note(f"time limit: not run: {'; '.join(skipped)}")
    return rows


def max_size_line(row: dict) -> str:
    side = lambda s: f"{s}^2" if s not in (None, "") else "-"    # noqa: E731
    oom = "" if row["first_oom"] is None else f"; {row['first_oom']}^2 does not fit" + (
        f" (from {row['first_oom_from']})" if row["first_oom_from"] not in ("this search", "") else "")
    unit, scale = ("GiB", GIB) if row["cap"].endswith("GiB") else ("MiB", MIB)
    at = (f"peak {row['peak_bytes'] / scale:.3f} {unit}, step {row['step_s']:.3f} s, decode {row['decode_s']:.3f} s"
          if row["peak_bytes"] is not None else "nothing fitted")
    return (f"{row['cap']} | tiling {row['vae_tiling']:3s} | {row['variant']:5s} | max {side(row['max_size'])}"
            f" ({row['status']}{oom}) | {at} | {row['tries']} {'try' if row['tries'] == 1 else 'tries'}, {row['search_s']:.0f} s")


def max_size_comparison(rows: List[dict]) -> List[str]:
    """Per cap and tiling: AnyMS against B0 and plain IP-Adapter, in sides and in pixels."""
    lines = []
    for key in dict.fromkeys((r["cap"], r["vae_tiling"]) for r in rows):
        by = {r["variant"]: r for r in rows if (r["cap"], r["vae_tiling"]) == key}
        parts = [f"{v} {by[v]['max_size']}^2" + ("" if by[v]["status"] == "exact" else f" ({by[v]['status']})")
                 for v in MAX_SIZE_VARIANTS if v in by and by[v]["max_size"]]
        a, b = by.get("anyms"), by.get("b0")
        if a and b and a["max_size"] and b["max_size"]:
            parts.append(f"AnyMS / B0 pixels {(a['max_size'] / b['max_size']) ** 2:.2f}x")
        if parts:
            lines.append(f"{key[0]}, tiling {key[1]}: " + ", ".join(parts))
    return lines


# ------------------------------------------------------------------------ main
TIMING_FIELDS = ["variant", "subjects", "ip_tokens", "batch", "image_size", "latent", "step_s",
                 "step_s_min", "repeats", "peak_bytes", "peak_extra_bytes", "peak_method"]


def write_csv(path: str, rows: List[dict], common: dict, fields: List[str] = TIMING_FIELDS) -> None:
    """Append ``rows`` (header first if the file is new), flushed: a run cut later keeps them."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(common) + fields)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**common, "ip_tokens": IP_TOKENS, "batch": BATCH, **r})


def result_tag(device: str) -> str:
    """``<machine>_<commit>``, file-name safe: what names every result file of gpu/run.sh."""
    machine = machine_name(device)
    slug = "-".join(p for p in re.sub(r"[^A-Za-z0-9]+", "-", machine).split("-") if p)[:40]
    return f"{slug}_{re.sub(r'[^A-Za-z0-9.-]+', '-', git_commit())}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", type=int, nargs="+", help="image sides (multiples of 64); default: 512 on CPU, "
                                                         "1024 and 2048 on CUDA, 128 with --quick")
    p.add_argument("--repeats", type=int, help="timed steps per variant (median reported); default 3 (1 with --quick)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS,
                   help=f"default {' '.join(VARIANTS)}; --max-size: {' '.join(MAX_SIZE_VARIANTS)} ('none' refused)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="tiny U-Net (and VAE) of the same structure: a smoke run "
                                                        "for CI, and with --max-size the CPU dry run")
    p.add_argument("--max-size", "--gpu-max-size", dest="max_size", action="store_true",
                   help="largest square side per cap, plain / b0 / anyms, VAE tiling on and off (CUDA; CPU with --quick)")
    caps = p.add_mutually_exclusive_group()
    caps.add_argument("--caps-gib", type=float, nargs="+", help="--max-size caps, in this order (default 16 12 8)")
    caps.add_argument("--caps-mib", type=float, nargs="+", help="--max-size caps in MiB (default with --quick: "
                                                                "72 68 64, for the dry run's tiny models)")
    p.add_argument("--size-limit", type=int, help="--max-size: largest side tried (default 8192; 512 with --quick)")
    p.add_argument("--start-size", type=int, help="--max-size: first side tried without a prediction "
                                                  "(default 1024; 128 with --quick)")
    p.add_argument("--time-limit", type=float, default=0, help="seconds: start no variant (timing) or try "
                                                               "(--max-size) that would end after this; 0 = none")
    p.add_argument("--out", help="CSV path (appended); default benchmarks/results/pipeline[_maxsize]_<machine>.csv")
    p.add_argument("--summary", help="text file that gets one line per row the moment it is measured (appended)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.max_size and args.device != "cuda" and not args.quick:
        p.error("--max-size needs --device cuda (or --quick for its CPU dry run)")
    if args.max_size and args.variants and "none" in args.variants:
        p.error("--max-size compares IP-Adapter variants: 'none' is not one")
    for s in (args.sizes or []) + [x for x in (args.size_limit, args.start_size) if x is not None]:
        if s < 64 or s % 64:
            p.error(f"sizes must be positive multiples of 64, got {s}")
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be at least 1")
    for c in (args.caps_gib or []) + (args.caps_mib or []):
        if not c > 0:
            p.error(f"caps must be positive, got {c}")
    return args


def main(argv=None) -> List[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    deadline = t_start + args.time_limit if args.time_limit else None
    device = args.device
    dtype = torch.float32 if device == "cpu" else torch.float16
    config = QUICK_UNET_CONFIG if args.quick else SDXL_UNET_CONFIG
    machine = machine_name(device)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", machine).strip("-").lower()
    kind = "pipeline_maxsize" if args.max_size else "pipeline"
    default_out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                               f"{kind}_{slug}{'_quick' if args.quick else ''}.csv")
    out = args.out or default_out
    common = dict(date=_dt.datetime.now().isoformat(timespec="seconds"), machine=machine, device=device,
                  dtype=str(dtype).replace("torch.", ""), unet="tiny-sdxl-structure" if args.quick else "sdxl-base-1.0",
                  threads=torch.get_num_threads() if device == "cpu" else "", commit=git_commit(), **versions())
    head = (f"{machine} | {common['dtype']} | torch {common['torch']} | triton {common['triton']} | diffusers "
            f"{common['diffusers']} | threads {common['threads']} | commit {common['commit']}")
    print(head, flush=True)

    def summarise(line: str) -> None:
        if args.summary:
            with open(args.summary, "a") as f:
                f.write(line + "\n")

    rows: List[dict] = []
    if args.max_size:
        if args.caps_mib or (args.quick and not args.caps_gib):
            caps = [(f"{c:g} MiB", int(c * MIB)) for c in args.caps_mib or QUICK_CAPS_MIB]
        else:
            caps = [(f"{c:g} GiB", int(c * GIB)) for c in args.caps_gib or CAPS_GIB]
        common = dict(common, vae="tiny-sdxl-vae-structure" if args.quick else "sdxl-vae")

        def on_max_row(row: dict) -> None:
            write_csv(out, [row], common, MAX_SIZE_FIELDS)
            line = max_size_line(row)
            print("  " + line, flush=True)
            summarise("max-size " + line)

        unet = build_unet(config, device, dtype)
        install_ip_adapter(unet)
        vae = build_vae(QUICK_VAE_CONFIG if args.quick else SDXL_VAE_CONFIG, device, dtype)
        print(f"built the U-Net and the VAE in {time.perf_counter() - t_start:.1f} s", flush=True)
        if device == "cuda":
            free, total = torch.cuda.mem_get_info()
            outside = total - free - torch.cuda.memory_reserved()
            print(f"  memory outside PyTorch's allocator (CUDA context, libraries): {outside / GIB:.2f} GiB "
                  f"of {total / GIB:.1f} GiB", flush=True)
            summarise(f"max-size: CUDA context and libraries hold {outside / GIB:.2f} GiB outside the capped allocator")
        rows = max_size_rows(unet, vae, device, dtype, caps, variants=args.variants or MAX_SIZE_VARIANTS,
                             start=args.start_size or (128 if args.quick else 1024),
                             max_size=args.size_limit or (512 if args.quick else 8192), deadline=deadline,
                             log=lambda m: print(m, flush=True), on_row=on_max_row,
                             note=lambda m: (print("  " + m, flush=True), summarise("max-size " + m)))
        for line in max_size_comparison(rows):
            print(line)
            summarise("max-size " + line)
    else:
        sizes = args.sizes or ([128] if args.quick else [512] if device == "cpu" else [1024, 2048])
        repeats = args.repeats or (1 if args.quick else 3)

        def on_row(row: dict) -> None:
            write_csv(out, [row], common)
            summarise(f"pipeline {row['image_size']}^2 {row['variant']:6s} step {row['step_s']:.3f} s "
                      f"(min {row['step_s_min']:.3f}, n={row['repeats']}) peak {row['peak_bytes'] / GIB:.3f} GiB "
                      f"(extra {row['peak_extra_bytes'] / GIB:.3f}) | {common['dtype']} | {machine}")

        unet = build_unet(config, device, dtype)
        print(f"built the U-Net ({sum(p.numel() for p in unet.parameters()) / 1e9:.3f} B parameters) "
              f"in {time.perf_counter() - t_start:.1f} s", flush=True)
        for size in sizes:
            rows += run_size(unet, size, device, dtype, repeats, args.variants or VARIANTS,
                             log=lambda m: print(m, flush=True), on_row=on_row, stop_at=deadline)
        for line in targets(rows, judge=not args.quick):
            print(line)
            summarise("pipeline " + line)
    print(f"wrote {len(rows)} rows to {out} in {time.perf_counter() - t_start:.0f} s")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
