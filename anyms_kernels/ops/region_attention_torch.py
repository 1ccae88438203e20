"""The PyTorch backend of region cross-attention: exact on any device, no dense masks.

One SDPA for the text branch over all tokens (zeroed where text-kind subjects replace
it), then, per subject that acts on some token (the routing's work list), attention over
only those tokens and only the subject's own keys, in bounded slabs, added in place. It reads the routing on the host once per Routing (one device sync on a
GPU), so it is the fast path on CPUs only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..routing import Routing
from . import _layout


def _chunk_tokens(num_tokens: int) -> int:
    # A subject's gathered queries and their attention output are processed one batch row at
    # a time, in slabs of at most 512 tokens (an eighth of the grid on small grids, at least
    # 64): they stay in cache, and temporaries stay near a tenth of the output whatever the
    # region sizes (a 512-token slab of one row holds what a 256-token slab of both CFG rows
    # did). Fewer, larger slabs matter at 2 threads, where each small op pays a parallel
    # region: measured on CPU, S=5, T=16, 64x64, against 256-token slabs, 1.53-1.56x -> 1.46-1.49x
    # the time of text-only SDPA (1024 tokens: 1.43-1.46x, for twice the temporaries).
    return min(512, max(64, num_tokens // 8))


def _small_attention(q, k_t, v, scale: float, out=None) -> torch.Tensor:
    """softmax(q k^T * scale) v for a subject's few keys, as two matmuls and a softmax.

    Not SDPA: for a slab of a few hundred queries against 4-16 keys, the CPU's fused SDPA
    kernel does not use a second thread (measured, 256 x 16 keys, B*H = 20: 0.49 ms on one
    thread, 0.41 ms on two), while batched matmuls do (0.46 -> 0.26 ms). The scores are
    only [c, T] per head. 16-bit inputs take their softmax in float32, as SDPA does.
    """
    scores = torch.matmul(q, k_t)
    if scores.dtype in (torch.float16, torch.bfloat16):
        p = torch.softmax(scores.float().mul_(scale), dim=-1).to(v.dtype)
    else:
        p = torch.softmax(scores.mul_(scale), dim=-1)
    return torch.matmul(p, v, out=out)


def region_attention_torch(q, k_text, v_text, k_subj, v_subj, routing: Routing, scales, text_mask,
                           softmax_scale: float):
    B = q.shape[0]
    if k_text is None:                  # no text branch (FLUX's IP path): the routed subjects only
        out = _layout.empty_like_layout(q).zero_()
    else:
        attn_mask = None if text_mask is None else text_mask[:, None, None, :]
        text = F.scaled_dot_product_attention(q, k_text, v_text, attn_mask=attn_mask, scale=softmax_scale)
        if _layout.is_dense(text) and _layout.layout_order(text) == _layout.layout_order(q):
            out = text                  # SDPA already wrote q's layout (the diffusers case on CPU)
        else:
            out = _layout.empty_like_layout(q).copy_(text)
            del text
    if k_subj.shape[2] == 0 or B == 0 or q.shape[2] == 0:
        return out
    chunk = _chunk_tokens(q.shape[2])
    per_row = routing.work_list()
    replaced = routing.replaced_text_tokens()
    counts = routing.host_token_counts()
    batch_slices = [slice(0, B)] if routing.batch == 1 else [slice(b, b + 1) for b in range(B)]
    for r, bs in enumerate(batch_slices):
        q_rows, dim = _layout.token_major(q[bs])
        out_rows, out_dim = _layout.token_major(out[bs])
        if replaced[r] is not None and replaced[r].numel():
            # Text-kind subjects act there in place of the global text branch.
            out_rows.index_fill_(out_dim, replaced[r].to(q.device), 0)
        for s, tokens in per_row[r]:
            n = k_subj.shape[3] if counts is None else counts[s]       # the subject's own keys only
            # lambda_s * softmax(q K^T) V == softmax(q K^T) (lambda_s V): scale the T values, not the output.
            lam = scales[bs, s].to(q.dtype).view(-1, 1, 1, 1)
            k_s_t, v_s = k_subj[bs, :, s, :n].transpose(-1, -2), v_subj[bs, :, s, :n] * lam
            tokens = tokens.to(q.device)
            for idx in tokens.split(chunk):
                if dim == 1:
                    # [b, N, H, D] rows: gather and scatter one batch row's [N, H, D] along its first
                    # dim, whose copies torch runs in parallel (along N of the 4-d view they run on one
                    # thread: at 2 threads they were a third of the subjects' time), and let the
                    # batched matmul read and write the [c, H, D] slabs as [H, c, D] in place.
                    for i in range(q_rows.shape[0]):
                        q_s = q_rows[i].index_select(0, idx)
                        z = torch.empty_like(q_s)
                        _small_attention(q_s.transpose(0, 1), k_s_t[i], v_s[i], softmax_scale, out=z.transpose(0, 1))
                        out_rows[i].index_add_(0, idx, z)
                else:
                    z = _small_attention(q_rows.index_select(dim, idx), k_s_t, v_s, softmax_scale)
                    out_rows.index_add_(out_dim, idx, z)
    return out
