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
    # A subject's gathered queries and their attention output are processed in slabs of
    # at most 256 tokens (a sixteenth of the grid on small grids, at least 64): they stay in
    # cache, and temporaries stay near a tenth of the output whatever the region sizes.
    # Measured on CPU, 1 thread, S=5, T=16: against N/8-token slabs, 128x128 went from 1.50x
    # to 1.27x the time of text-only SDPA and peak memory from 1.28x to 1.05x the output.
    return min(256, max(64, num_tokens // 16))


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
                q_s = q_rows.index_select(dim, idx)
                if dim == 1:
                    # [b, c, H, D] rows: one batch row at a time is [H, c, D] with a row stride, which
                    # the batched matmul reads in place; all rows at once ([b, H, c, D]) would be
                    # copied first (measured: that copy was a fifth of the subjects' time).
                    z = q_s.new_empty(q_s.shape[0], q_s.shape[2], q_s.shape[1], q_s.shape[3])
                    for i in range(q_s.shape[0]):
                        _small_attention(q_s[i].transpose(0, 1), k_s_t[i], v_s[i], softmax_scale, out=z[i])
                else:
                    z = _small_attention(q_s, k_s_t, v_s, softmax_scale)
                out_rows.index_add_(out_dim, idx, z.transpose(1, 2) if out_dim == 1 else z)
    return out
