"""Time and peak memory of full-width FLUX.1 transformer blocks with the IP-Adapter branch, four ways.

    python benchmarks/bench_flux.py                     # CPU: fp32 at 512^2, threads 1 and 2
    python benchmarks/bench_flux.py --device cuda       # GPU: bf16 at 1024^2
    python benchmarks/bench_flux.py --quick             # smoke run at tiny widths (< 1 minute on 2 cores)

The full 12 B model does not fit this machine's memory, so a step here is a few blocks
of FLUX.1-dev's exact width (3072 = 24 heads of 128, joint attention dim 4096, MLP
ratio 4), with RANDOM weights (time and memory do not depend on their values), run in
sequence as the transformer runs them: ``--double`` double-stream blocks (default 1) then
``--single`` single-stream blocks (default 2: FLUX.1 has 19 and 38, so the default step
has FLUX's proportion). Batch 1 (FLUX.1-dev's guidance-distilled call, no CFG), 512 T5
text tokens, ``(size / 16)^2`` image tokens, rotary embeddings as the transformer makes
them. The IP-Adapter's image tokens are given after its projection (random
``[B, S, 4, 4096]``), so every variant differs only in the double blocks' processors,
which share one set of random ``to_k_ip`` / ``to_v_ip`` weights:

    none     no IP-Adapter (diffusers' FluxAttnProcessor)
    plain    diffusers' FluxIPAdapterAttnProcessor, 1 image, over the whole image
    masked   B0, the masked sum done the diffusers way: S full IP attention passes over
             every image token, each multiplied by its subject's mask, resized from
             image-size binary masks at every call by diffusers'
             IPAdapterMaskProcessor.downsample (bicubic, repeated to the hidden width),
             as IPAdapterAttnProcessor2_0 does on the U-Net (FLUX's own processor has no
             masks); joint attention computed as AnyMS computes it
    anyms    anyms.AnyMSFluxAttnProcessor, S subjects, overwrite mode

S = ``--subjects`` (default 2 5 10). The S boxes are S vertical strips over the band
y in [0.125, 0.875], each 10% of a strip wider on both sides, so neighbours overlap
and the covered area is 75% whatever S (cost that grows with S is per-subject
overhead, not more covered tokens).

Timing. On CPU the ratios compare the process's CPU time (all its threads), wall time
beside it: on a shared machine other jobs stretch a step's wall time by tens of percent
from one minute to the next, but barely the CPU time it uses (caches and memory bandwidth
are still shared). With 2 threads the CPU time also counts OpenMP's spin-waits. CUDA:
wall time. One warm-up step per variant (it also measures the memory), then ``--rounds``
rounds; in each round every variant runs one step, in an order rotated from round to
round, so that the shared machine's load drifts over all of them alike. Ratios are
taken within a round (variant time / plain time of the same round) and reported as
the median over rounds, with their min and max: the spread is the noise. Beside it,
the ratio of the variants' fastest steps ("of minima"): other jobs only ever slow a
step down, so each variant's fastest step is its least disturbed one. Each block is
timed on its own too, so the double block's ratio (where the IP branch is) is
reported beside the step's; ``--single 0`` times the double block alone, for more
rounds in the same time.

Peak memory. CUDA: torch.cuda.max_memory_allocated over one step. CPU: the weights'
and inputs' bytes plus the peak of the CPU allocator's running total during the step,
from torch.profiler's allocation events (bench_pipeline.cpu_alloc_peak).

Rows go to benchmarks/results/flux_<machine>_<commit>.csv (one per threads, variant
and S), naming the machine, dtype, shape, versions and commit; the summary (ratios
and targets) is printed and written beside it as ``..._summary.txt``. Targets (issue
8): AnyMS at most 1.05x the plain IP-Adapter's time, and flat in S: S = 10 within 1.1x
of S = 2.
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
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ may be loaded by path
from _env import ROOT, git_commit, machine_name  # noqa: E402
from bench_pipeline import _randomise, _tensor_bytes, cpu_alloc_peak, versions  # noqa: E402

# black-forest-labs/FLUX.1-dev, transformer/config.json
FLUX_DEV = dict(dim=3072, heads=24, head_dim=128, joint_dim=4096, axes=(16, 56, 56))
QUICK = dict(dim=256, heads=2, head_dim=128, joint_dim=64, axes=(16, 56, 56))
TEXT_TOKENS = 512          # FluxPipeline's max_sequence_length
IP_TOKENS = 4              # XLabs-AI/flux-ip-adapter
GIB = 1024 ** 3
FIELDS = ["machine", "device", "dtype", "threads", "image_size", "grid", "text_tokens", "width", "heads", "head_dim",
          "double_blocks", "single_blocks", "part", "variant", "subjects", "rounds", "clock", "step_wall_s", "step_s",
          "step_s_min", "step_s_max", "double_s", "single_s", "ratio_vs_plain", "ratio_min", "ratio_max",
          "double_ratio_vs_plain", "double_ratio_min", "double_ratio_max", "ratio_of_minima",
          "double_ratio_of_minima", "est_step_ratio", "peak_bytes", "peak_extra_bytes", "peak_method", "torch",
          "triton", "diffusers",
          "commit", "date"]


# ------------------------------------------------------------------------ model
def strip_boxes(num: int) -> List[List[float]]:
    """S overlapping vertical strips covering 75% of the image (x0, y0, x1, y1), ascending priority."""
    width, pad = 1.0 / num, 0.1 / num
    return [[max(0.0, s * width - pad), 0.125, min(1.0, (s + 1) * width + pad), 0.875] for s in range(num)]


def build_blocks(shape: dict, n_double: int, n_single: int, device, dtype, seed: int = 0):
    """FLUX double- and single-stream blocks of ``shape``'s width, random weights, allocated once on ``device``."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    args = dict(dim=shape["dim"], num_attention_heads=shape["heads"], attention_head_dim=shape["head_dim"])
    with torch.device("meta"):
        doubles = torch.nn.ModuleList([FluxTransformerBlock(**args) for _ in range(n_double)])
        singles = torch.nn.ModuleList([FluxSingleTransformerBlock(**args) for _ in range(n_single)])
    blocks = []
    for i, mods in enumerate((doubles, singles)):
        mods = mods.to(dtype).to_empty(device=device).eval().requires_grad_(False)
        if len(mods):
            _randomise(mods, seed + i)
        blocks.append(mods)
    return blocks


def ip_processors(shape: dict, n_double: int, device, dtype, seed: int = 10):
    """One random FluxIPAdapterAttnProcessor per double block (4 tokens, as load_ip_adapter makes them)."""
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    procs = []
    for i in range(n_double):
        with torch.device("meta"):
            proc = FluxIPAdapterAttnProcessor(shape["dim"], shape["joint_dim"], num_tokens=(IP_TOKENS,), scale=1.0)
        proc = proc.to(dtype).to_empty(device=device).requires_grad_(False)
        _randomise(proc, seed + i)
        procs.append(proc)
    return procs


def masked_sum_processor_class():
    """B0: the masked sum the diffusers way, on FLUX (see the module docstring)."""
    from diffusers.image_processor import IPAdapterMaskProcessor
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    from anyms.flux import AnyMSFluxAttnProcessor

    class DiffusersMaskedSum(AnyMSFluxAttnProcessor):
        masks: Optional[torch.Tensor] = None          # [1, S, H, W] image-size binary masks

        def _ip_term(self, ip_query, k_subj, v_subj, layout):
            # k_subj, v_subj: [B, H, S, T, D], each subject's keys and values (the adapter's projections)
            batch, num_tokens, heads, head_dim = ip_query.shape
            out = torch.zeros(batch, num_tokens, heads * head_dim, device=ip_query.device, dtype=ip_query.dtype)
            scales = (layout.scales * float(self.scale[0])).tolist()
            for s in range(k_subj.shape[2]):
                key = k_subj[:, :, s].transpose(1, 2).to(ip_query.dtype)
                value = v_subj[:, :, s].transpose(1, 2).to(ip_query.dtype)
                z = dispatch_attention_fn(ip_query, key, value, dropout_p=0.0, is_causal=False,
                                          backend=self._attention_backend, parallel_config=self._parallel_config)
                z = z.reshape(batch, num_tokens, heads * head_dim).to(ip_query.dtype)
                mask = IPAdapterMaskProcessor.downsample(self.masks[:, s], batch, num_tokens, heads * head_dim)
                out = out + scales[s] * (z * mask.to(z.dtype))
            return out

    return DiffusersMaskedSum


def anyms_ip_term(proc, ip_query, images) -> torch.Tensor:
    """The IP term of an AnyMS FLUX processor (or a subclass) on its own: the adapter's k/v
    projections of the subjects' ``images`` ``[B, S, T, C]``, then the routed attention."""
    k_subj, v_subj, _ = proc._branches(proc.layout, [images], ip_query.shape[0], ip_query.shape[2])
    return proc._ip_term(ip_query, k_subj, v_subj, proc.layout)


def plain_ip_term(proc, ip_query, images) -> torch.Tensor:
    """The IP term of diffusers' FluxIPAdapterAttnProcessor on its own (its operations, in its
    order: the adapter's k/v projections, one attention over all image tokens, the scale, the sum
    into a zero tensor), for timing it apart from the block."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    batch, num_tokens, heads, head_dim = ip_query.shape
    out = torch.zeros(batch, num_tokens, heads * head_dim, device=ip_query.device, dtype=ip_query.dtype)
    for states, scale, to_k, to_v in zip([images], proc.scale, proc.to_k_ip, proc.to_v_ip):
        key = to_k(states).view(batch, -1, heads, head_dim)
        value = to_v(states).view(batch, -1, heads, head_dim)
        z = dispatch_attention_fn(ip_query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                  backend=proc._attention_backend, parallel_config=proc._parallel_config)
        out += scale * z.reshape(batch, -1, heads * head_dim).to(ip_query.dtype)
    return out


def box_masks(boxes, size: int, device, dtype) -> torch.Tensor:
    masks = torch.zeros(1, len(boxes), size, size)
    for s, (x0, y0, x1, y1) in enumerate(boxes):
        masks[0, s, round(y0 * size):round(y1 * size), round(x0 * size):round(x1 * size)] = 1.0
    return masks.to(device=device, dtype=dtype)


class Bench:
    """The blocks, the inputs and the processors of every variant, built once."""

    def __init__(self, shape: dict, size: int, n_double: int, n_single: int, subjects, device, dtype):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxPosEmbed

        from anyms.flux import AnyMSFluxAttnProcessor, flux_layout

        self.device, self.dtype, self.size = device, dtype, size
        self.doubles, self.singles = build_blocks(shape, n_double, n_single, device, dtype)
        self.plain = ip_processors(shape, n_double, device, dtype)
        g = torch.Generator().manual_seed(2)
        rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
        side = size // 16
        self.grid = (side, side)
        self.hidden = rnd(1, side * side, shape["dim"])
        self.text = rnd(1, TEXT_TOKENS, shape["dim"])
        self.temb = rnd(1, shape["dim"])
        ids = torch.zeros(side, side, 3)
        ids[..., 1] += torch.arange(side)[:, None]
        ids[..., 2] += torch.arange(side)[None, :]
        ids = torch.cat([torch.zeros(TEXT_TOKENS, 3), ids.reshape(-1, 3)]).to(device)
        self.rope = FluxPosEmbed(10000, list(shape["axes"]))(ids)
        self.images = {s: rnd(1, s, IP_TOKENS, shape["joint_dim"]) for s in {1, *subjects}}
        masked_cls = masked_sum_processor_class()
        self.procs: Dict[Tuple[str, int], list] = {("none", 0): [FluxAttnProcessor() for _ in self.plain],
                                                   ("plain", 1): self.plain}
        for num in subjects:
            boxes = strip_boxes(num)
            layout = flux_layout(boxes, size, size, mode="overwrite")
            self.procs[("anyms", num)] = [AnyMSFluxAttnProcessor.from_ip_adapter_processor(p, layout)
                                          for p in self.plain]
            masked = []
            for p in self.plain:
                proc = masked_cls.from_ip_adapter_processor(p, layout)
                proc.masks = box_masks(boxes, size, device, torch.float32)   # IPAdapterMaskProcessor's dtype
                masked.append(proc)
            self.procs[("masked", num)] = masked

    def variants(self) -> List[Tuple[str, int]]:
        return list(self.procs)

    def weight_bytes(self) -> int:
        tensors = [t for m in (self.doubles, self.singles, *self.plain) for t in list(m.parameters())
                   + list(m.buffers())]
        return _tensor_bytes(tensors + [self.hidden, self.text, self.temb, *self.rope, *self.images.values()])

    def step(self, variant: Tuple[str, int]) -> Dict[str, Tuple[float, float]]:
        """One step of the variant: ``{"wall": (double s, single s), "cpu": (double s, single s)}``
        (wall-clock seconds, and the process's CPU seconds, all its threads)."""
        name, num = variant
        for block, proc in zip(self.doubles, self.procs[variant]):
            block.attn.set_processor(proc)
        kwargs = None if name == "none" else {"ip_hidden_states": [self.images[num]]}
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        hs, ehs = self.hidden, self.text
        with torch.no_grad():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            for block in self.doubles:
                ehs, hs = block(hs, ehs, self.temb, self.rope, joint_attention_kwargs=dict(kwargs or {}))
            sync()
            t1, c1 = time.perf_counter(), time.process_time()
            for block in self.singles:
                ehs, hs = block(hs, ehs, self.temb, self.rope, joint_attention_kwargs=dict(kwargs or {}))
            sync()
            t2, c2 = time.perf_counter(), time.process_time()
        return {"wall": (t1 - t0, t2 - t1), "cpu": (c1 - c0, c2 - c1)}

    def ip_term(self, variant) -> Dict[str, float]:
        """The IP term of the first double block alone, on its own image queries: ``{"wall": s, "cpu": s}``."""
        if getattr(self, "_ip_query", None) is None:
            block = self.doubles[0]
            with torch.no_grad():
                x = block.norm1(self.hidden, emb=self.temb)[0]
                self._ip_query = block.attn.norm_q(block.attn.to_q(x).unflatten(-1, (block.attn.heads, -1)))
        name, num = variant
        proc, q = self.procs[variant][0], self._ip_query
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        with torch.no_grad():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            if name == "plain":
                plain_ip_term(proc, q, self.images[1])
            else:
                anyms_ip_term(proc, q, self.images[num])
            sync()
            return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}

    def peak(self, variant, fn=None) -> Tuple[int, int, str]:
        """(peak bytes, peak above weights and inputs, method) of one step, or of ``fn(variant)``
        (also a warm-up)."""
        fn = fn or self.step
        base = self.weight_bytes()
        if self.device.type == "cuda":
            fn(variant)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            fn(variant)
            peak = torch.cuda.max_memory_allocated()
            return peak, peak - start, "torch.cuda.max_memory_allocated"
        extra, _ = cpu_alloc_peak(lambda: fn(variant))
        return base + extra, extra, "weights+inputs + torch.profiler allocator peak"


# ---------------------------------------------------------------------- measure
def measure(bench: Bench, rounds: int, clock: str, log=print) -> List[dict]:
    """One row per variant; times and ratios in ``clock`` ("cpu" or "wall"), wall medians beside."""
    variants = bench.variants()
    peaks = {}
    for v in variants:
        peaks[v] = bench.peak(v)
        log(f"    warm-up {v[0]:6s} S={v[1]:<2d} peak {peaks[v][0] / GIB:.3f} GiB (extra {peaks[v][1] / GIB:.3f})")
    times: Dict[tuple, List[Tuple[float, float]]] = {v: [] for v in variants}
    walls: Dict[tuple, List[float]] = {v: [] for v in variants}
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            t = bench.step(v)
            times[v].append(t[clock])
            walls[v].append(sum(t["wall"]))
        log(f"    round {r + 1}/{rounds} ({clock}, wall): " + ", ".join(
            f"{v[0]}{v[1] if v[0] in ('masked', 'anyms') else ''} {sum(times[v][-1]):.2f} {walls[v][-1]:.2f}"
            for v in variants))
    plain = times[("plain", 1)]
    plain_min, plain_d_min = min(d + s for d, s in plain), min(d for d, _ in plain)
    rows = []
    for v in variants:
        steps = [d + s for d, s in times[v]]
        ratios = [(d + s) / (pd + ps) for (d, s), (pd, ps) in zip(times[v], plain)]
        d_ratios = [d / pd for (d, _), (pd, _) in zip(times[v], plain)]
        rows.append(dict(
            part="step", variant=v[0], subjects=v[1], rounds=rounds, clock=clock,
            step_wall_s=statistics.median(walls[v]),
            step_s=statistics.median(steps), step_s_min=min(steps),
            step_s_max=max(steps), double_s=statistics.median(d for d, _ in times[v]),
            single_s=statistics.median(s for _, s in times[v]), ratio_vs_plain=statistics.median(ratios),
            ratio_min=min(ratios), ratio_max=max(ratios), double_ratio_vs_plain=statistics.median(d_ratios),
            double_ratio_min=min(d_ratios), double_ratio_max=max(d_ratios),
            ratio_of_minima=min(steps) / plain_min, double_ratio_of_minima=min(d for d, _ in times[v]) / plain_d_min,
            peak_bytes=peaks[v][0],
            peak_extra_bytes=peaks[v][1], peak_method=peaks[v][2]))
    return rows


def measure_ip(bench: Bench, rounds: int, clock: str, steps: List[dict], log=print) -> List[dict]:
    """The IP term alone (first double block), every variant but none, ``rounds`` interleaved
    rounds. ``est_step_ratio``: the step's ratio to plain estimated from it, (plain step + this
    IP term - plain's IP term) / plain step, with the plain step's median from ``steps``: the
    variants differ only in the IP term, which is timed here many times, close together."""
    variants = [v for v in bench.variants() if v[0] != "none"]
    peaks = {v: bench.peak(v, bench.ip_term) for v in variants}
    times: Dict[tuple, List[float]] = {v: [] for v in variants}
    walls: Dict[tuple, List[float]] = {v: [] for v in variants}
    for r in range(rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            t = bench.ip_term(v)
            times[v].append(t[clock])
            walls[v].append(t["wall"])
    plain = times[("plain", 1)]
    plain_step = next(r for r in steps if r["variant"] == "plain")
    per_block = plain_step["step_s"] / max(1, len(bench.doubles))    # each double block has an IP term
    rows = []
    for v in variants:
        ratios = [t / p for t, p in zip(times[v], plain)]
        extra = (statistics.median(times[v]) - statistics.median(plain)) / per_block
        rows.append(dict(
            part="ip_term", variant=v[0], subjects=v[1], rounds=rounds, clock=clock,
            step_wall_s=statistics.median(walls[v]), step_s=statistics.median(times[v]), step_s_min=min(times[v]),
            step_s_max=max(times[v]), ratio_vs_plain=statistics.median(ratios), ratio_min=min(ratios),
            ratio_max=max(ratios), ratio_of_minima=min(times[v]) / min(plain), est_step_ratio=1.0 + extra,
            peak_bytes=peaks[v][0], peak_extra_bytes=peaks[v][1], peak_method=peaks[v][2]))
        log(f"    IP term {v[0]:6s} S={v[1]:<2d} {rows[-1]['step_s'] * 1e3:8.1f} ms ({clock}), "
            f"{rows[-1]['ratio_vs_plain']:.2f}x plain's; step estimate {rows[-1]['est_step_ratio']:.4f}x plain")
    return rows


def summary(rows: List[dict], subjects, judge: bool = True) -> List[str]:
    """Ratios and the targets, per thread count; ``judge=False`` (a --quick smoke run at tiny widths,
    whose ratios say nothing about FLUX.1) shows the ratios without a verdict."""
    def verdict(ok: bool) -> str:
        return ("met" if ok else "NOT met") if judge else "not judged: smoke run"

    lines = []
    for threads in sorted({r["threads"] for r in rows}):
        by = {(r["variant"], r["subjects"]): r for r in rows if r["threads"] == threads and r["part"] == "step"}
        ip = {(r["variant"], r["subjects"]): r for r in rows if r["threads"] == threads and r["part"] == "ip_term"}
        plain, none = by[("plain", 1)], by[("none", 0)]
        head = f"threads={threads}"
        lines.append(f"{head}: plain IP-Adapter step {plain['step_s']:.3f} s {plain['clock']} time (double "
                     f"{plain['double_s']:.3f}, single {plain['single_s']:.3f}; wall {plain['step_wall_s']:.3f} s); "
                     f"no adapter {none['ratio_vs_plain']:.3f}x of plain")
        for kind in ("anyms", "masked"):
            for num in subjects:
                r = by[(kind, num)]
                lines.append(
                    f"{head}: {kind:6s} S={num:<2d} step {r['ratio_vs_plain']:.3f}x plain "
                    f"[{r['ratio_min']:.3f}, {r['ratio_max']:.3f}], double block {r['double_ratio_vs_plain']:.3f}x "
                    f"[{r['double_ratio_min']:.3f}, {r['double_ratio_max']:.3f}]; of minima {r['ratio_of_minima']:.3f} "
                    f"(double {r['double_ratio_of_minima']:.3f}); peak "
                    f"{r['peak_bytes'] / plain['peak_bytes']:.4f}x plain (extra {r['peak_extra_bytes'] / GIB:.3f} vs "
                    f"{plain['peak_extra_bytes'] / GIB:.3f} GiB)")
        for kind in ("anyms", "masked"):
            for num in subjects if ip else ():
                r = ip[(kind, num)]
                lines.append(
                    f"{head}: IP term alone, {kind:6s} S={num:<2d} {r['step_s'] * 1e3:.1f} ms = "
                    f"{r['ratio_vs_plain']:.2f}x "
                    f"plain's {ip[('plain', 1)]['step_s'] * 1e3:.1f} ms [{r['ratio_min']:.2f}, {r['ratio_max']:.2f}] "
                    f"-> step estimate {r['est_step_ratio']:.4f}x plain; IP term peak extra "
                    f"{r['peak_extra_bytes'] / 2**20:.1f} MiB (plain "
                    f"{ip[('plain', 1)]['peak_extra_bytes'] / 2**20:.1f})")
        worst = max(by[("anyms", n)]["ratio_vs_plain"] for n in subjects)
        lines.append(f"{head}: target AnyMS <= 1.05x plain (step, median over rounds): worst S {worst:.3f} -> "
                     f"{verdict(worst <= 1.05)}")
        if ip:
            est = max(ip[("anyms", n)]["est_step_ratio"] for n in subjects)
            lines.append(f"{head}: the same from the IP term timed alone: worst S {est:.4f} -> "
                         f"{verdict(est <= 1.05)}")
        lo, hi = min(subjects), max(subjects)
        flat = by[("anyms", hi)]["step_s"] / by[("anyms", lo)]["step_s"]
        flat_d = by[("anyms", hi)]["double_s"] / by[("anyms", lo)]["double_s"]
        lines.append(f"{head}: target flat in S: AnyMS S={hi} / S={lo} = {flat:.3f} (step), {flat_d:.3f} (double "
                     f"block) -> {verdict(flat <= 1.1)} (<= 1.1)")
        if ip:
            est = ip[("anyms", hi)]["est_step_ratio"] / ip[("anyms", lo)]["est_step_ratio"]
            lines.append(f"{head}: the same from the IP term timed alone: {est:.4f} -> "
                         f"{verdict(est <= 1.1)}")
        b0 = by[("masked", hi)]["step_s"] / by[("masked", lo)]["step_s"]
        lines.append(f"{head}: B0 masked sum S={hi} / S={lo} = {b0:.3f}; AnyMS / B0 at S={hi}: "
                     f"{by[('anyms', hi)]['step_s'] / by[('masked', hi)]['step_s']:.3f}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--size", type=int, default=None, help="image side (default 512 on CPU, 1024 on CUDA)")
    parser.add_argument("--double", type=int, default=1, help="double-stream blocks (default 1)")
    parser.add_argument("--single", type=int, default=2, help="single-stream blocks (default 2)")
    parser.add_argument("--subjects", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="CPU threads (default: 1 and 2)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; CUDA 20)")
    parser.add_argument("--ip-rounds", type=int, default=30, help="rounds of the IP term timed alone (default 30; 0: "
                                                                  "not measured)")
    parser.add_argument("--quick", action="store_true", help="tiny widths (256, 2 heads), 128^2: a smoke run")
    parser.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                        help="what the ratios compare: the process's CPU time (auto on CPU: other jobs on a shared "
                             "machine stretch wall time, not the CPU time a step uses) or wall time (auto on CUDA)")
    parser.add_argument("--out", default=None, help="CSV path (default benchmarks/results/flux_<machine>_<commit>.csv)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    size = args.size or (128 if args.quick else 1024 if device.type == "cuda" else 512)
    if size % 16:
        parser.error(f"--size must be a multiple of 16, got {size}")
    rounds = args.rounds or (2 if args.quick else 20 if device.type == "cuda" else 5)
    threads_list = args.threads or ([torch.get_num_threads()] if device.type == "cuda" else [1, 2])
    shape = QUICK if args.quick else FLUX_DEV
    machine, commit = machine_name(str(device)), git_commit()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", machine).strip("-")
    out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                   f"flux_{'quick_' if args.quick else ''}{slug}_{commit}.csv")
    env = dict(machine=machine, device=device.type, dtype=str(dtype).replace("torch.", ""), image_size=size,
               grid=f"{size // 16}x{size // 16}", text_tokens=TEXT_TOKENS, width=shape["dim"], heads=shape["heads"],
               head_dim=shape["head_dim"], double_blocks=args.double, single_blocks=args.single, **versions(),
               commit=commit, date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    print(f"FLUX blocks: {machine}, {env['dtype']}, {size}^2 ({env['grid']} tokens + {TEXT_TOKENS} text), width "
          f"{shape['dim']} ({shape['heads']}x{shape['head_dim']}), {args.double} double + {args.single} single, "
          f"S = {args.subjects}, commit {commit}")
    t0 = time.perf_counter()
    bench = Bench(shape, size, args.double, args.single, args.subjects, device, dtype)
    print(f"  built in {time.perf_counter() - t0:.1f} s; weights and inputs {bench.weight_bytes() / GIB:.2f} GiB")
    rows = []
    for threads in threads_list:
        if device.type == "cpu":
            torch.set_num_threads(threads)
        print(f"  threads={torch.get_num_threads()}")
        clock = args.clock if args.clock != "auto" else ("cpu" if device.type == "cpu" else "wall")
        steps = measure(bench, rounds, clock)
        if args.ip_rounds:
            steps += measure_ip(bench, args.ip_rounds, clock, steps)
        for row in steps:
            rows.append(dict(env, threads=torch.get_num_threads(), **row))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    lines = summary(rows, args.subjects, judge=not args.quick)
    with open(os.path.splitext(out)[0] + "_summary.txt", "w") as f:
        f.write(f"{machine}, {env['dtype']}, {size}^2, width {shape['dim']}, {args.double} double + {args.single} "
                f"single blocks, rounds {rounds}, torch {env['torch']}, diffusers {env['diffusers']}, commit "
                f"{commit}, {env['date']}\n")
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"rows: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
