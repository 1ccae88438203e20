"""Reference region cross-attention, written as METHOD.md states it.

Nothing here is fast: loops over batches and subjects, explicit softmax, dense
per-subject masks in ``sum`` mode. It computes in the inputs' dtype, so pass
float64 tensors for an oracle.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..regions import Grid, box_cover


def attention(q, k, v, scale: float, key_mask: Optional[torch.Tensor] = None):
    """softmax(q k^T * scale) v over the last two dims; ``key_mask`` [..., Lk] True = attend."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[..., None, :], float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _region_tokens(region, grid: Grid, device) -> torch.Tensor:
    """A token box (4 ints) or a bool coverage map ([h, w] or [N]) -> bool [N]."""
    region = torch.as_tensor(region)
    if region.dtype == torch.bool:
        return region.reshape(-1).to(device)
    return box_cover(region.tolist(), grid, device)


def crop_and_merge(q_b, k_subj_b, v_subj_b, regions_b, scales_b, grid: Grid, scale: float):
    """Level 2 of AnyMS for one batch element, literally: crop, attend, overwrite.

    q_b [H, N, D]; k_subj_b, v_subj_b [H, S, T, D]; regions_b [S, 4] token boxes or
    [S, h, w] bool coverage maps, in ascending priority; scales_b [S]. Returns Z_image [H, N, D].
    """
    z_image = torch.zeros_like(q_b)
    for s in range(len(regions_b)):
        rows = _region_tokens(regions_b[s], grid, q_b.device).nonzero().flatten()   # Q_s = Q[region_s]
        z_s = attention(q_b[:, rows], k_subj_b[:, s], v_subj_b[:, s], scale)
        z_image[:, rows] = scales_b[s].to(q_b.dtype) * z_s           # overwrite, not add
    return z_image


def masked_sum(q_b, k_subj_b, v_subj_b, regions_b, scales_b, grid: Grid, scale: float):
    """The paper's Eq. 7 for one batch element: sum_s lambda_s * M_s * attn(Q, K_s, V_s)."""
    z_image = torch.zeros_like(q_b)
    for s in range(len(regions_b)):
        m_s = _region_tokens(regions_b[s], grid, q_b.device).to(q_b.dtype)[None, :, None]
        z_image += scales_b[s].to(q_b.dtype) * m_s * attention(q_b, k_subj_b[:, s], v_subj_b[:, s], scale)
    return z_image


def region_cross_attention_reference(
    q, k_text, v_text, k_subj, v_subj, regions, grid: Grid, *,
    mode: str = "overwrite", subject_scale=1.0, text_mask=None, softmax_scale=None,
):
    """Z_out = attn(Q, Kt, Vt) + Z_image, with Z_image from crop-and-merge or the masked sum.

    Same arguments as :func:`anyms_kernels.region_cross_attention`, already checked;
    ``regions`` is int token boxes [B, S, 4] or a bool coverage map [B, S, h, w],
    ``subject_scale`` a [B, S] tensor.
    """
    B, H, N, D = q.shape
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    key_mask = None if text_mask is None else text_mask[:, None, :]     # [B, 1, L]
    if k_text is None:                                                  # no text branch (FLUX's IP path)
        # nothing acts but the subjects; still, as in plain attention, a query holding NaN gives NaN
        z_text = torch.zeros_like(q).masked_fill(torch.isnan(q).any(-1, keepdim=True), float("nan"))
    else:
        z_text = attention(q, k_text, v_text, scale, key_mask)          # global decoupling
    level2 = crop_and_merge if mode == "overwrite" else masked_sum
    if B == 0:
        return z_text
    z_image = torch.stack([
        level2(q[b], k_subj[b], v_subj[b], regions[b], subject_scale[b], grid, scale) for b in range(B)
    ])
    return z_text + z_image
