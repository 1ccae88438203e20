"""Seconds per denoising step and peak memory of a full-size SDXL U-Net, four ways.

    python benchmarks/bench_pipeline.py                 # CPU: fp32 at 512^2; CUDA: fp16 at 1024^2 and 2048^2
    python benchmarks/bench_pipeline.py --quick         # smoke run on a tiny U-Net (< 1 minute on 2 cores)
    python benchmarks/bench_pipeline.py --gpu-max-size  # CUDA: largest size within 16 GiB, AnyMS vs B0

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

Rows go to benchmarks/results/pipeline_<machine>.csv (appended), each naming the
machine, dtype, shape, torch/triton/diffusers versions, threads and git commit.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import re
import statistics
import sys
import time
from typing import Dict, List, Optional

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


def configure(unet, variant: str, size: int, device: str, dtype: torch.dtype) -> dict:
    """Install the variant's processors on ``unet``; return the forward's kwargs."""
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
        kwargs["cross_attention_kwargs"] = {"ip_adapter_masks": [box_masks(FIVE_BOXES, size).to(device)]}
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
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(unet, kwargs, "cpu")
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
    return peak


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
             log=print) -> List[dict]:
    rows = []
    for variant in variants:
        kwargs = configure(unet, variant, size, device, dtype)
        res = measure(unet, kwargs, device, repeats)
        subjects = {"none": 0, "plain": 1}.get(variant, len(FIVE_BOXES))
        rows.append(dict(variant=variant, subjects=subjects, image_size=size, latent=size // 8, **res))
        log(f"  {size}^2 {variant:6s} step {res['step_s']:.3f} s (min {res['step_s_min']:.3f}, n={repeats})  "
            f"peak {res['peak_bytes'] / GIB:.3f} GiB (extra {res['peak_extra_bytes'] / GIB:.3f} GiB)")
        del kwargs
    return rows


def targets(rows: List[dict]) -> List[str]:
    """The issue's targets, as ratios within one run."""
    lines = []
    for size in sorted({r["image_size"] for r in rows}):
        by = {r["variant"]: r for r in rows if r["image_size"] == size}
        if not {"plain", "b0", "anyms"} <= by.keys():
            continue
        a, p, b = by["anyms"], by["plain"], by["b0"]
        t_ratio, m_ratio = a["step_s"] / p["step_s"], a["peak_bytes"] / p["peak_bytes"]
        lines += [
            f"{size}^2: AnyMS step / plain IP-Adapter = {t_ratio:.3f} (target <= 1.05: {'met' if t_ratio <= 1.05 else 'NOT met'})",
            f"{size}^2: AnyMS step / B0 = {a['step_s'] / b['step_s']:.3f} (target < 1: {'met' if a['step_s'] < b['step_s'] else 'NOT met'})",
            f"{size}^2: AnyMS peak / plain IP-Adapter = {m_ratio:.4f} (target within 2%: {'met' if abs(m_ratio - 1) <= 0.02 else 'NOT met'}); "
            f"extra above weights: {a['peak_extra_bytes'] / GIB:.3f} vs {p['peak_extra_bytes'] / GIB:.3f} GiB",
            f"{size}^2: AnyMS peak / B0 = {a['peak_bytes'] / b['peak_bytes']:.4f} (target < 1: {'met' if a['peak_bytes'] < b['peak_bytes'] else 'NOT met'})",
        ]
    return lines


# ----------------------------------------------------------------- GPU max size
def gpu_max_size(config: dict, budget_gib: float = 16.0, start: int = 1024, step: int = 256, limit: int = 8192,
                 log=print) -> List[dict]:
    """Largest square size whose U-Net step fits in ``budget_gib`` with the memory options on:
    fp16, sequential CPU offload of the weights (accelerate), forward chunking of the
    feed-forwards. AnyMS and B0, one after the other, on the same U-Net."""
    from accelerate import cpu_offload

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib * GIB / total))
    unet = build_unet(config, "cpu", torch.float16)
    install_ip_adapter(unet)
    unet.enable_forward_chunking(chunk_size=1, dim=1)
    cpu_offload(unet, execution_device=torch.device("cuda"))
    rows = []
    for variant in ("anyms", "b0"):
        best: Optional[dict] = None
        size = start
        while size <= limit:
            try:
                kwargs = configure(unet, variant, size, "cuda", torch.float16)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                _step(unet, kwargs, "cuda")
                best = dict(variant=variant, subjects=len(FIVE_BOXES), image_size=size, latent=size // 8,
                            step_s=time.perf_counter() - t0, step_s_min=float("nan"), repeats=1,
                            peak_bytes=torch.cuda.max_memory_allocated(), peak_extra_bytes=float("nan"),
                            peak_method=f"max size within {budget_gib} GiB: fp16 + sequential offload + "
                                        "forward chunking; torch.cuda.max_memory_allocated")
                log(f"  {variant} {size}^2 fits: peak {best['peak_bytes'] / GIB:.2f} GiB")
                del kwargs
                size += step
            except torch.OutOfMemoryError:
                log(f"  {variant} {size}^2 does not fit in {budget_gib} GiB")
                break
        if best is not None:
            rows.append(best)
    torch.cuda.set_per_process_memory_fraction(1.0)
    return rows


# ------------------------------------------------------------------------ main
def write_csv(path: str, rows: List[dict], common: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields = list(common) + ["variant", "subjects", "ip_tokens", "batch", "image_size", "latent", "step_s",
                             "step_s_min", "repeats", "peak_bytes", "peak_extra_bytes", "peak_method"]
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**common, "ip_tokens": IP_TOKENS, "batch": BATCH, **r})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", type=int, nargs="+", help="image sides (multiples of 64); default: 512 on CPU, "
                                                         "1024 and 2048 on CUDA, 128 with --quick")
    p.add_argument("--repeats", type=int, help="timed steps per variant (median reported); default 3 (1 with --quick)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="tiny U-Net of the same structure: a smoke run for CI")
    p.add_argument("--gpu-max-size", action="store_true", help="CUDA: largest size within --budget-gib, AnyMS vs B0")
    p.add_argument("--budget-gib", type=float, default=16.0)
    p.add_argument("--out", help="CSV path (appended); default benchmarks/results/pipeline_<machine>.csv")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.gpu_max_size and args.device != "cuda":
        p.error("--gpu-max-size needs --device cuda")
    for s in args.sizes or []:
        if s < 64 or s % 64:
            p.error(f"--sizes: {s} is not a positive multiple of 64")
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def main(argv=None) -> List[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dtype = torch.float32 if device == "cpu" else torch.float16
    config = QUICK_UNET_CONFIG if args.quick else SDXL_UNET_CONFIG
    sizes = args.sizes or ([128] if args.quick else [512] if device == "cpu" else [1024, 2048])
    repeats = args.repeats or (1 if args.quick else 3)
    machine = machine_name(device)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", machine).strip("-").lower()
    default_out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                               f"pipeline_{slug}{'_quick' if args.quick else ''}.csv")
    out = args.out or default_out
    common = dict(date=_dt.datetime.now().isoformat(timespec="seconds"), machine=machine, device=device,
                  dtype=str(dtype).replace("torch.", ""), unet="tiny-sdxl-structure" if args.quick else "sdxl-base-1.0",
                  threads=torch.get_num_threads() if device == "cpu" else "", commit=git_commit(), **versions())
    print(f"{machine} | {common['dtype']} | torch {common['torch']} | threads {common['threads']} | "
          f"commit {common['commit']}", flush=True)

    rows: List[dict] = []
    if args.gpu_max_size:
        rows = gpu_max_size(config, args.budget_gib)
    else:
        t0 = time.perf_counter()
        unet = build_unet(config, device, dtype)
        print(f"built the U-Net ({sum(p.numel() for p in unet.parameters()) / 1e9:.3f} B parameters) "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
        for size in sizes:
            rows += run_size(unet, size, device, dtype, repeats, args.variants,
                             log=lambda m: print(m, flush=True))
        for line in targets(rows):
            print(line)
    write_csv(out, rows, common)
    print(f"wrote {len(rows)} rows to {out}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
