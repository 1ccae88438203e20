"""Region-masked multi-branch cross-attention: the op at the heart of AnyMS.

    out[t] = attn(q_t, K_text, V_text) + sum over the subjects s that act on t of
             lambda_s * attn(q_t, K_s, V_s)

where a subject acts on token t if its box covers t and, in ``overwrite`` mode,
no later subject's box does (METHOD.md). Every branch has its own softmax.

Top to bottom: the Triton kernel, its launch configurations, the launcher, the
PyTorch backend, the ``torch.library`` registration, and the public function.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .._checks import check_arguments, check_values
from .._triton import HAS_TRITON, interpreter_requested, tl, triton, triton_unavailable_reason
from ..reference import region_cross_attention_reference
from ..regions import Grid, box_token_indices, token_owner

# Head dims the Triton kernel is built and tested for: SD 1.5 (40, 80, 160),
# SDXL (64), FLUX (128), and the common 32 / 96 / 256.
TRITON_HEAD_DIMS = (32, 40, 64, 80, 96, 128, 160, 256)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------- kernel
if HAS_TRITON:

    @triton.jit
    def _attend(
        q,                      # [BLOCK_M, BLOCK_D] query tile, already loaded
        K, V,                   # pointers to key / value row 0 of this branch
        stride_kn, stride_kd,   # key strides (token, feature)
        stride_vn, stride_vd,   # value strides (token, feature)
        n_keys,                 # number of keys in this branch
        KEY_MASK, stride_mask,  # text key-padding mask (int8, nonzero = attend), if HAS_KEY_MASK
        qk_scale,               # softmax_scale * log2(e): the softmax runs in base 2
        offs_d, d_ok,           # feature offsets and their validity (HEAD_DIM may be < BLOCK_D)
        HAS_KEY_MASK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """softmax(q K^T) V for one query tile over one branch's keys (online softmax)."""
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, n_keys, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < n_keys
            k = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                        mask=n_ok[None, :] & d_ok[:, None], other=0.0)                  # [BLOCK_D, BLOCK_N]
            s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale                 # [BLOCK_M, BLOCK_N]
            key_ok = n_ok
            if HAS_KEY_MASK:
                key_ok = key_ok & (tl.load(KEY_MASK + offs_n * stride_mask, mask=n_ok, other=0) != 0)
            s = tl.where(key_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A block whose keys are all masked leaves m at -inf: shift by 0 instead (no NaN).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)                  # [BLOCK_N, BLOCK_D]
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        return acc / l_i[:, None]

    @triton.jit
    def _region_attention_fwd(
        Q, KT, VT, KS, VS,      # q [B,H,N,D]; text k/v [B,H,L,D]; subject k/v [B,H,S,T,D]
        BOXES,                  # int32 [B,S,4] half-open token boxes (x0, y0, x1, y1), ascending priority
        SCALES,                 # float32 [B,S] subject scales (lambda_s)
        TEXT_MASK,              # int8 [B,L] key-padding mask (nonzero = attend), read if HAS_TEXT_MASK
        OUT,                    # [B,H,N,D] output, any strides
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_ktb, stride_kth, stride_ktl, stride_ktd,
        stride_vtb, stride_vth, stride_vtl, stride_vtd,
        stride_ksb, stride_ksh, stride_kss, stride_kst, stride_ksd,
        stride_vsb, stride_vsh, stride_vss, stride_vst, stride_vsd,
        stride_bb, stride_bs, stride_bc,   # boxes (batch stride 0 when shared by the batch)
        stride_sb, stride_ss,              # scales (strides 0 when broadcast)
        stride_mb, stride_ml,              # text mask
        stride_ob, stride_oh, stride_on, stride_od,
        H, N, L, S, T,          # heads, query tokens, text tokens, subjects, tokens per subject
        GRID_W,                 # grid width: token t sits at (t // GRID_W, t % GRID_W)
        qk_scale,               # softmax_scale * log2(e)
        HEAD_DIM: tl.constexpr,      # D
        BLOCK_D: tl.constexpr,       # D rounded up to a power of two
        BLOCK_M: tl.constexpr,       # query tokens per program
        BLOCK_L: tl.constexpr,       # text keys per step
        BLOCK_T: tl.constexpr,       # subject keys per step
        OVERWRITE: tl.constexpr,     # True: a token takes its last covering subject; False: all add
        HAS_TEXT_MASK: tl.constexpr,
        DOT_PRECISION: tl.constexpr, # "ieee" for float32 inputs, "tf32" otherwise (ignored for 16-bit)
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)   # int64: batch*head offsets overflow int32 at large sizes
        h = (pid_bh % H).to(tl.int64)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < N
        d_ok = offs_d < HEAD_DIM

        # The query tile is read once and serves every branch.
        q = tl.load(Q + b * stride_qb + h * stride_qh
                    + offs_m[:, None].to(tl.int64) * stride_qn + offs_d[None, :] * stride_qd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)

        # Level 1: the text branch, never masked by the layout.
        out = _attend(q, KT + b * stride_ktb + h * stride_kth, VT + b * stride_vtb + h * stride_vth,
                      stride_ktl, stride_ktd, stride_vtl, stride_vtd, L,
                      TEXT_MASK + b * stride_mb, stride_ml, qk_scale, offs_d, d_ok,
                      HAS_TEXT_MASK, BLOCK_M, BLOCK_L, BLOCK_D, DOT_PRECISION)

        # Level 2: the subjects. Token coordinates on the layer's grid.
        ty = offs_m // GRID_W
        tx = offs_m - ty * GRID_W
        box_base = BOXES + b * stride_bb
        if OVERWRITE:
            # Priority routing: each token keeps the last subject whose box covers it.
            owner = tl.full([BLOCK_M], -1, tl.int32)
            for s in range(0, S):
                x0 = tl.load(box_base + s * stride_bs)
                y0 = tl.load(box_base + s * stride_bs + stride_bc)
                x1 = tl.load(box_base + s * stride_bs + 2 * stride_bc)
                y1 = tl.load(box_base + s * stride_bs + 3 * stride_bc)
                inside = (tx >= x0) & (tx < x1) & (ty >= y0) & (ty < y1)
                owner = tl.where(inside, s, owner)
        for s in range(0, S):
            if OVERWRITE:
                acts = (owner == s) & m_ok
            else:
                x0 = tl.load(box_base + s * stride_bs)
                y0 = tl.load(box_base + s * stride_bs + stride_bc)
                x1 = tl.load(box_base + s * stride_bs + 2 * stride_bc)
                y1 = tl.load(box_base + s * stride_bs + 3 * stride_bc)
                acts = (tx >= x0) & (tx < x1) & (ty >= y0) & (ty < y1) & m_ok
            # Skip, don't mask: a subject that acts on no token of this tile costs nothing.
            if tl.max(acts.to(tl.int32), 0) > 0:
                z = _attend(q, KS + b * stride_ksb + h * stride_ksh + s * stride_kss,
                            VS + b * stride_vsb + h * stride_vsh + s * stride_vss,
                            stride_kst, stride_ksd, stride_vst, stride_vsd, T,
                            TEXT_MASK, 0, qk_scale, offs_d, d_ok,
                            False, BLOCK_M, BLOCK_T, BLOCK_D, DOT_PRECISION)
                lam = tl.load(SCALES + b * stride_sb + s * stride_ss)
                out += tl.where(acts[:, None], lam * z, 0.0)

        tl.store(OUT + b * stride_ob + h * stride_oh
                 + offs_m[:, None].to(tl.int64) * stride_on + offs_d[None, :] * stride_od,
                 out.to(OUT.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])

    KERNEL_INTERPRETED = type(_region_attention_fwd).__name__ == "InterpretedFunction"
else:  # pragma: no cover - exercised where triton is missing
    _region_attention_fwd = None
    KERNEL_INTERPRETED = False


# --------------------------------------------------------------- launch configurations
@dataclass(frozen=True)
class KernelConfig:
    block_m: int     # query tokens per program
    block_l: int     # text keys per step (77 tokens: 32 wastes 19 lanes in the last step)
    num_warps: int
    num_stages: int


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim)) if HAS_TRITON else head_dim


# A small table keyed by padded head dim and operand width; the heuristic takes the
# first entry, and autotuning (ANYMS_KERNELS_AUTOTUNE=1, CUDA only) times all of them.
# Every entry compiles without register spills for sm_80 and sm_90 (tests/kernels/
# test_compile.py; benchmarks/compile_report.py prints registers and shared memory).
# The query tile, the output accumulator and one branch accumulator are live at once,
# so wide heads and float32 get fewer query rows per program.
CONFIGS = {
    # (BLOCK_D, 16-bit operands?) -> candidates, the heuristic's choice first
    (32, True): (KernelConfig(128, 32, 8, 2), KernelConfig(64, 32, 4, 2)),
    (64, True): (KernelConfig(128, 32, 8, 2), KernelConfig(64, 32, 4, 2), KernelConfig(128, 16, 8, 2)),
    (128, True): (KernelConfig(64, 32, 8, 2), KernelConfig(128, 32, 8, 2)),
    (256, True): (KernelConfig(64, 32, 8, 2), KernelConfig(32, 16, 4, 2)),
    (32, False): (KernelConfig(64, 16, 4, 2), KernelConfig(32, 16, 4, 2)),
    (64, False): (KernelConfig(16, 16, 4, 2),),
    (128, False): (KernelConfig(32, 16, 8, 2),),
    (256, False): (KernelConfig(32, 16, 8, 2),),
}


def config_candidates(head_dim: int, dtype: torch.dtype) -> Tuple[KernelConfig, ...]:
    return CONFIGS[(_block_d(head_dim), dtype != torch.float32)]


def _block_t(num_subject_tokens: int, dtype: torch.dtype) -> int:
    # tl.dot needs at least 16 lanes; 4-token adapters waste 12, which is cheap next to a second step.
    # Long sequences (T > 16) take 32-key steps, except in float32, where 32 spills registers.
    return 16 if num_subject_tokens <= 16 or dtype == torch.float32 else 32


_AUTOTUNED: dict = {}


def _autotune_requested() -> bool:
    return os.environ.get("ANYMS_KERNELS_AUTOTUNE", "0") not in ("", "0")


# ------------------------------------------------------------------------- launcher
def _layout_order(t: torch.Tensor) -> List[int]:
    """t's dims from outermost to innermost in memory (size-1 dims carry no layout: last)."""
    return sorted(range(t.dim()), key=lambda i: (t.shape[i] == 1, -t.stride(i), i))


def _empty_like_layout(q: torch.Tensor) -> torch.Tensor:
    """An empty tensor shaped like q whose dims are laid out in q's stride order.

    For q = x.view(B, N, H, D).transpose(1, 2) the result is a transposed
    [B, N, H, D] buffer too, so the caller's reshape back is free; this also holds
    when q is a non-dense slice of a fused projection.
    """
    order = _layout_order(q)
    buf = torch.empty([q.shape[i] for i in order], dtype=q.dtype, device=q.device)
    inverse = [order.index(i) for i in range(q.dim())]
    return buf.permute(inverse)


def triton_runnable(q: torch.Tensor) -> Optional[str]:
    """None if the Triton kernel can run on q's device, else the reason it cannot."""
    reason = triton_unavailable_reason()
    if reason:
        return reason
    if q.is_cuda or KERNEL_INTERPRETED:
        return None
    if interpreter_requested():
        return ("TRITON_INTERPRET=1 was set after anyms_kernels was imported; "
                "set it before the first import to run the kernel on CPU tensors")
    return (f"q is on {q.device}: the Triton kernel runs CUDA tensors, or CPU tensors under the "
            "Triton interpreter (TRITON_INTERPRET=1 set before importing anyms_kernels); "
            "use backend='torch' here")


def check_triton_supported(q: torch.Tensor) -> None:
    reason = triton_runnable(q)
    if reason:
        raise RuntimeError(f"backend='triton' cannot run: {reason}")
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"backend='triton' takes float16, bfloat16 or float32 inputs, got {q.dtype}; "
                        "use backend='torch' or 'reference' for float64")
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        raise ValueError(f"backend='triton' supports head dims {TRITON_HEAD_DIMS}, got D={q.shape[-1]}; "
                         "use backend='torch' for other head dims")


def _launch(q, k_text, v_text, k_subj, v_subj, boxes, scales, text_mask, out, grid_w, mode,
            softmax_scale, cfg: KernelConfig):
    B, H, N, D = q.shape
    L, S, T = k_text.shape[2], k_subj.shape[2], k_subj.shape[3]
    if S == 0:
        # Empty tensors may hold a null data pointer, which Triton's launcher can reject;
        # with S = 0 the kernel reads none of these, so hand it non-empty stand-ins.
        k_subj, v_subj = k_text.unsqueeze(2), v_text.unsqueeze(2)
        boxes = torch.zeros(1, 1, 4, dtype=torch.int32, device=q.device)
        scales = torch.zeros(1, 1, dtype=torch.float32, device=q.device)
    has_mask = text_mask is not None
    mask = text_mask.view(torch.int8) if has_mask else boxes  # any pointer will do when unused
    mask_strides = mask.stride() if has_mask else (0, 0)
    launch_grid = (triton.cdiv(N, cfg.block_m), B * H)
    _region_attention_fwd[launch_grid](
        q, k_text, v_text, k_subj, v_subj, boxes, scales, mask, out,
        *q.stride(), *k_text.stride(), *v_text.stride(), *k_subj.stride(), *v_subj.stride(),
        *boxes.stride(), *scales.stride(), *mask_strides, *out.stride(),
        H, N, L, S, T, grid_w, softmax_scale * 1.4426950408889634,
        HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=cfg.block_m, BLOCK_L=cfg.block_l, BLOCK_T=_block_t(T, q.dtype),
        OVERWRITE=(mode == "overwrite"), HAS_TEXT_MASK=has_mask,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _pick_config(q, k_text, k_subj, mode, launch) -> KernelConfig:
    candidates = config_candidates(q.shape[-1], q.dtype)
    if not (_autotune_requested() and q.is_cuda and not KERNEL_INTERPRETED):
        return candidates[0]
    key = (q.shape[-1], q.dtype, q.shape[1], q.shape[2], k_text.shape[2], tuple(k_subj.shape[2:4]), mode)
    if key not in _AUTOTUNED:
        from triton.testing import do_bench
        times = [do_bench(functools.partial(launch, c), return_mode="median") for c in candidates]
        _AUTOTUNED[key] = candidates[times.index(min(times))]
    return _AUTOTUNED[key]


def region_attention_triton(q, k_text, v_text, k_subj, v_subj, boxes, scales, text_mask, grid: Grid,
                            mode: str, softmax_scale: float, config: Optional[KernelConfig] = None):
    """Allocate the output in q's layout and launch the fused kernel once."""
    check_triton_supported(q)
    out = _empty_like_layout(q)
    launch = functools.partial(_launch, q, k_text, v_text, k_subj, v_subj, boxes, scales, text_mask,
                               out, grid[1], mode, softmax_scale)
    cfg = config or _pick_config(q, k_text, k_subj, mode, lambda c: launch(cfg=c))
    launch(cfg=cfg)
    return out


# ------------------------------------------------------------------- PyTorch backend
def _chunk_tokens(num_tokens: int) -> int:
    # A subject's gathered queries and their attention output are processed in slabs of
    # at most 256 tokens (a sixteenth of the grid on small grids, at least 64): they stay in
    # cache, and temporaries stay near a tenth of the output whatever the box sizes.
    # Measured on CPU, 1 thread, S=5, T=16: against N/8-token slabs, 128x128 went from 1.50x
    # to 1.27x the time of text-only SDPA and peak memory from 1.28x to 1.05x the output.
    return min(256, max(64, num_tokens // 16))


@functools.lru_cache(maxsize=256)
def _subject_tokens(boxes_key: Tuple[Tuple[int, ...], ...], grid: Grid, mode: str,
                    device: torch.device) -> Tuple[Tuple[int, torch.Tensor], ...]:
    """(subject, its token indices) for every subject that acts on at least one token.

    Cached: a generation calls every layer with the same few layouts.
    """
    boxes = torch.tensor(boxes_key, dtype=torch.int64).reshape(-1, 4)
    if mode == "sum":
        groups = [(s, box_token_indices(box, grid)) for s, box in enumerate(boxes.tolist())]
    else:
        owner = token_owner(boxes, grid)
        order = torch.argsort(owner, stable=True)
        counts = torch.bincount(owner + 1, minlength=len(boxes) + 1).tolist()
        pieces = torch.split(order, counts)
        groups = [(s, pieces[s + 1]) for s in range(len(boxes))]
    return tuple((s, idx.to(device)) for s, idx in groups if idx.numel() > 0)


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: its elements fill exactly numel() slots of its storage."""
    expected = 1
    for i in reversed(_layout_order(t)):
        if t.shape[i] != 1 and t.stride(i) != expected:
            return False
        expected *= t.shape[i]
    return True


def _token_major(t: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """A view of t [B, H, N, D] in which gathering / scattering tokens moves whole rows.

    diffusers' q is a transposed [B, N, H, D] buffer: there one token's H*D values are
    contiguous, so index along N of the [B, N, H, D] view (a row copy) rather than of
    the [B, H, N, D] view (H strided pieces per token).
    """
    if t.stride(2) >= t.stride(1) * t.shape[1] or t.shape[1] == 1:
        return t.transpose(1, 2), 1
    return t, 2


def region_attention_torch(q, k_text, v_text, k_subj, v_subj, boxes, scales, text_mask, grid: Grid,
                           mode: str, softmax_scale: float):
    """Exact on any device, no dense masks: one SDPA for the text branch over all tokens,
    then, per subject, SDPA over only the tokens that subject acts on, added in place."""
    B = q.shape[0]
    attn_mask = None if text_mask is None else text_mask[:, None, None, :]
    text = F.scaled_dot_product_attention(q, k_text, v_text, attn_mask=attn_mask, scale=softmax_scale)
    if _is_dense(text) and _layout_order(text) == _layout_order(q):
        out = text                      # SDPA already wrote q's layout (the diffusers case on CPU)
    else:
        out = _empty_like_layout(q).copy_(text)
        del text
    if k_subj.shape[2] == 0:
        return out
    chunk = _chunk_tokens(q.shape[2])
    boxes_cpu = boxes.cpu()
    shared = boxes.stride(0) == 0 or B == 1
    batch_slices = [slice(0, B)] if shared else [slice(b, b + 1) for b in range(B)]
    for bs in batch_slices:
        key = tuple(map(tuple, boxes_cpu[bs.start].tolist()))
        q_rows, dim = _token_major(q[bs])
        out_rows, out_dim = _token_major(out[bs])
        for s, tokens in _subject_tokens(key, grid, mode, q.device):
            # lambda_s * softmax(q K^T) V == softmax(q K^T) (lambda_s V): scale the T values, not the output.
            lam = scales[bs, s].to(q.dtype).view(-1, 1, 1, 1)
            k_s, v_s = k_subj[bs, :, s], v_subj[bs, :, s] * lam
            for idx in tokens.split(chunk):
                q_s = q_rows.index_select(dim, idx)
                q_s = q_s.transpose(1, 2) if dim == 1 else q_s
                z = F.scaled_dot_product_attention(q_s, k_s, v_s, scale=softmax_scale)
                out_rows.index_add_(out_dim, idx, z.transpose(1, 2) if out_dim == 1 else z)
    return out


# ---------------------------------------------------------------------- registration
def _region_cross_attention_impl(
    q: torch.Tensor, k_text: torch.Tensor, v_text: torch.Tensor,
    k_subj: torch.Tensor, v_subj: torch.Tensor,
    boxes: torch.Tensor, subject_scale: torch.Tensor, text_mask: Optional[torch.Tensor],
    grid_h: int, grid_w: int, mode: str, softmax_scale: float, backend: str, values_checked: bool,
) -> torch.Tensor:
    """The checked op: boxes int32 [B,S,4], subject_scale float32 [B,S], backend resolved.
    ``values_checked``: the eager public function already read the values (see _checks)."""
    if not values_checked:      # traced by torch.compile: the checks run here, eagerly
        check_values(q, (grid_h, grid_w), boxes, subject_scale, text_mask)
    args = (q, k_text, v_text, k_subj, v_subj, boxes, subject_scale, text_mask, (grid_h, grid_w), mode,
            softmax_scale)
    if backend == "triton":
        return region_attention_triton(*args)
    if backend == "torch":
        return region_attention_torch(*args)
    res = region_cross_attention_reference(
        q, k_text, v_text, k_subj, v_subj, boxes, (grid_h, grid_w), mode=mode,
        subject_scale=subject_scale, text_mask=text_mask, softmax_scale=softmax_scale)
    return _empty_like_layout(q).copy_(res)


# The registered op: what torch.compile, FakeTensor and other tracers see. Eager calls
# on plain tensors skip the dispatcher (about 20 us a call, 70 calls a U-Net step).
_region_cross_attention_op = torch.library.custom_op(
    "anyms_kernels::region_cross_attention", _region_cross_attention_impl, mutates_args=())


@_region_cross_attention_op.register_fake
def _(q, k_text, v_text, k_subj, v_subj, boxes, subject_scale, text_mask, grid_h, grid_w, mode,
      softmax_scale, backend, values_checked):
    return _empty_like_layout(q)


# --------------------------------------------------------------------- public function
def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """'auto' -> 'triton' on CUDA tensors, 'torch' elsewhere. Never falls back silently."""
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    if backend == "triton":
        check_triton_supported(q)
    return backend


def region_cross_attention(
    q: torch.Tensor,
    k_text: torch.Tensor,
    v_text: torch.Tensor,
    k_subj: torch.Tensor,
    v_subj: torch.Tensor,
    boxes,
    grid: Grid,
    *,
    mode: str = "overwrite",
    subject_scale=1.0,
    text_mask: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Text attention plus every subject's image attention confined to its box, in one op.

    Args:
        q: ``[B, H, N, D]`` queries, ``N == h * w`` tokens in row-major order. May be a
            strided view (e.g. the transpose of a ``[B, N, H, D]`` projection): it is
            not copied, and the output is laid out like it.
        k_text, v_text: ``[B, H, L, D]`` text keys and values.
        k_subj, v_subj: ``[B, H, S, T, D]`` keys and values of S subjects with T image
            tokens each (S may be 0).
        boxes: integer token boxes ``[S, 4]`` (shared by the batch) or ``[B, S, 4]``,
            half-open ``(x0, y0, x1, y1)`` on ``grid``, in ascending priority; on q's
            device or the CPU. Make them with :func:`rasterize_boxes`.
        grid: ``(h, w)`` of this layer's token grid.
        mode: ``"overwrite"`` (AnyMS crop-and-merge: a token takes the last subject whose
            box covers it) or ``"sum"`` (every covering subject adds; the paper's Eq. 7).
        subject_scale: lambda_s, a float or a float tensor ``[S]`` / ``[B, S]``.
        text_mask: optional bool ``[B, L]`` key-padding mask of the text branch, True =
            attend; every row must keep at least one token.
        softmax_scale: defaults to ``1 / sqrt(D)``.
        backend: ``"auto"`` (triton on CUDA tensors, torch elsewhere), ``"triton"``,
            ``"torch"`` or ``"reference"``.

    Returns:
        ``[B, H, N, D]`` in q's dtype and memory layout. Forward only (no autograd).

    Raises:
        ValueError: shapes that disagree, boxes outside the grid or inverted/empty,
            NaN scales, a fully masked text row, an unknown mode or backend, an
            unsupported head dim for Triton, inputs on different devices.
        TypeError: mixed or unsupported dtypes, float boxes, a non-bool text mask.
        RuntimeError: ``backend="triton"`` where the kernel cannot run (says why).

    Value checks (box ranges, NaN scales, an all-masked text row) read the tensors and
    are skipped while a CUDA graph is captured; for capture, pass boxes and scales on
    q's device.
    """
    checked = check_arguments(q, k_text, v_text, k_subj, v_subj, boxes, grid, mode, subject_scale,
                              text_mask, softmax_scale, backend)
    backend = resolve_backend(backend, q)
    h, w = checked.grid
    values_checked = not torch.compiler.is_compiling()
    if values_checked:  # on the caller's own tensors, so device tensors are read once, not per call
        check_values(q, checked.grid, boxes, subject_scale, text_mask)
    args = (q, k_text, v_text, k_subj, v_subj, checked.boxes, checked.subject_scale, text_mask,
            h, w, mode, checked.softmax_scale, backend, values_checked)
    if values_checked and type(q) is torch.Tensor:   # eager, plain tensors: no tracer to serve
        return _region_cross_attention_impl(*args)
    return torch.ops.anyms_kernels.region_cross_attention(*args)
