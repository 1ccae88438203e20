"""Shared helpers of the kernel tests: inputs, layouts, tolerances, a mismatch report."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from anyms_kernels.reference import region_cross_attention_reference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_python(code: str, *args: str, env=None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run python ``code`` (with ``args``) in a fresh process from the repository root, with the
    repository on its path; ``env`` sets variables, and a value of None removes one (e.g.
    TRITON_INTERPRET, read when a kernel is defined)."""
    full = dict(os.environ)
    for name, value in (env or {}).items():
        if value is None:
            full.pop(name, None)
        else:
            full[name] = value
    full["PYTHONPATH"] = ROOT + os.pathsep + full.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=full, cwd=ROOT,
                          timeout=timeout)


# One tolerance table, keyed by dtype: fp32 is compared directly against the
# float64 reference; 16-bit dtypes by the self-calibrating rule (at most
# RATIO x the error of plain PyTorch computing the reference in that dtype,
# plus a floor for when that error is tiny).
TOLERANCE = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(ratio=2.0, floor=2e-3),
    torch.bfloat16: dict(ratio=2.0, floor=1.6e-2),
}

# Named layouts of normalised boxes (x0, y0, x1, y1), ascending priority.
LAYOUTS = {
    "none": [],
    "single_full": [[0.0, 0.0, 1.0, 1.0]],
    "disjoint": [[0.0, 0.0, 0.4, 0.5], [0.5, 0.0, 1.0, 0.45], [0.1, 0.6, 0.9, 1.0]],
    "nested": [[0.1, 0.1, 0.9, 0.9], [0.3, 0.3, 0.6, 0.7], [0.4, 0.4, 0.5, 0.5]],
    "partial_overlap": [[0.0, 0.0, 0.6, 0.6], [0.4, 0.3, 1.0, 0.9], [0.2, 0.5, 0.7, 1.0]],
    "border": [[0.0, 0.0, 1.0, 0.2], [0.8, 0.0, 1.0, 1.0], [0.0, 0.85, 1.0, 1.0], [0.0, 0.0, 0.1, 1.0]],
    "one_token": [[0.5, 0.5, 0.5001, 0.5001], [0.0, 0.0, 0.001, 0.001], [0.999, 0.999, 1.0, 1.0]],
    "five": [[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.75, 1.0], [0.9, 0.9, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0],
             [0.3, 0.1, 0.31, 0.12]],
}


def make_inputs(B=2, H=2, grid=(13, 21), D=64, L=77, S=3, T=4, dtype=torch.float32, device="cpu", seed=0):
    """Fresh random inputs shaped as diffusers makes them: q (and the subject k/v) are
    transposed views of [B, N, H, D] / [B, S, T, H, D] projections, not contiguous."""
    g = torch.Generator().manual_seed(seed)
    N = grid[0] * grid[1]

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q = rnd(B, N, H, D).transpose(1, 2)
    k_text = rnd(B, L, H, D).transpose(1, 2)
    v_text = rnd(B, L, H, D).transpose(1, 2)
    k_subj = rnd(B, S, T, H, D).permute(0, 3, 1, 2, 4)
    v_subj = rnd(B, S, T, H, D).permute(0, 3, 1, 2, 4)
    return q, k_text, v_text, k_subj, v_subj


def reference(q, k_text, v_text, k_subj, v_subj, boxes, grid, *, mode="overwrite", subject_scale=1.0,
              text_mask=None, softmax_scale=None, dtype=torch.float64, replaces_text=None, subject_tokens=None):
    """The reference in ``dtype`` (float64: the oracle), with the op's argument forms."""
    B, S = q.shape[0], k_subj.shape[2]
    boxes = torch.as_tensor(boxes)
    if boxes.dtype == torch.bool:   # a coverage map [S, h, w] / [B, S, h, w]
        boxes = boxes.expand(B, *boxes.shape[-3:])
    else:
        boxes = boxes.to(torch.int64)
        boxes = boxes.expand(B, S, 4) if boxes.dim() == 2 else boxes
    scale = torch.as_tensor(subject_scale, dtype=dtype).expand(B, S) if S else torch.zeros(B, 0, dtype=dtype)
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return region_cross_attention_reference(
        c(q), c(k_text), c(v_text), c(k_subj), c(v_subj), boxes, grid, mode=mode, subject_scale=scale.cpu(),
        text_mask=text_mask, softmax_scale=softmax_scale, replaces_text=replaces_text, subject_tokens=subject_tokens)


def mismatch_report(actual, expected, atol, rtol) -> str:
    bad = ~torch.isclose(actual.double(), expected.double(), atol=atol, rtol=rtol)
    bad |= torch.isnan(actual)
    if not bad.any():
        return ""
    idx = bad.nonzero()[:5].tolist()
    err = (actual.double() - expected.double()).abs()
    return (f"{int(bad.sum())} of {bad.numel()} elements mismatch (atol={atol}, rtol={rtol}); "
            f"max abs error {err.nan_to_num(float('inf')).max().item():.3g}; first at [b, h, n, d] = {idx}; "
            f"NaN (unwritten) elements: {int(torch.isnan(actual).sum())}")


def assert_matches_reference(out, inputs_args, ref64, *, dtype, ref_same_dtype=None):
    """fp32/fp64: elementwise against the float64 oracle. 16-bit: the error against the
    oracle is at most ``ratio`` x the error of the reference computed in that dtype."""
    assert not torch.isnan(out).any(), f"{int(torch.isnan(out).sum())} output elements are NaN (unwritten?)"
    tol = TOLERANCE[dtype]
    if "ratio" not in tol:
        msg = mismatch_report(out.cpu(), ref64.cpu(), tol["atol"], tol["rtol"])
        assert not msg, msg
        return
    err = (out.double().cpu() - ref64.cpu()).abs().max().item()
    base = (ref_same_dtype.double().cpu() - ref64.cpu()).abs().max().item()
    bound = tol["ratio"] * base + tol["floor"]
    assert err <= bound, f"{dtype}: max error {err:.3g} vs float64 reference exceeds {bound:.3g} " \
                         f"({tol['ratio']} x plain PyTorch's {base:.3g} + {tol['floor']})"
