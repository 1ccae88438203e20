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


def crop_and_merge(q_b, k_subj_b, v_subj_b, regions_b, scales_b, grid: Grid, scale: float, subjects=None,
                   counts=None):
    """Level 2 of AnyMS for one batch element, literally: crop, attend, overwrite.

    q_b [H, N, D]; k_subj_b, v_subj_b [H, S, T, D]; regions_b [S, 4] token boxes or
    [S, h, w] bool coverage maps, in ascending priority; scales_b [S]. ``subjects``: the
    subjects taking part (default all), ``counts``: each subject's token count (default T).
    Returns (Z [H, N, D], bool [N] the tokens some taking subject covers).
    """
    z = torch.zeros_like(q_b)
    covered = torch.zeros(q_b.shape[1], dtype=torch.bool, device=q_b.device)
    for s in range(len(regions_b)) if subjects is None else subjects:
        n = k_subj_b.shape[2] if counts is None else int(counts[s])
        region = _region_tokens(regions_b[s], grid, q_b.device)
        rows = region.nonzero().flatten()                               # Q_s = Q[region_s]
        z_s = attention(q_b[:, rows], k_subj_b[:, s, :n], v_subj_b[:, s, :n], scale)
        z[:, rows] = scales_b[s].to(q_b.dtype) * z_s                    # overwrite, not add
        covered |= region
    return z, covered


def masked_sum(q_b, k_subj_b, v_subj_b, regions_b, scales_b, grid: Grid, scale: float, subjects=None,
               counts=None):
    """The paper's Eq. 7 for one batch element: sum_s lambda_s * M_s * attn(Q, K_s, V_s).
    Arguments and result as :func:`crop_and_merge`."""
    z = torch.zeros_like(q_b)
    covered = torch.zeros(q_b.shape[1], dtype=torch.bool, device=q_b.device)
    for s in range(len(regions_b)) if subjects is None else subjects:
        n = k_subj_b.shape[2] if counts is None else int(counts[s])
        region = _region_tokens(regions_b[s], grid, q_b.device)
        m_s = region.to(q_b.dtype)[None, :, None]
        z += scales_b[s].to(q_b.dtype) * m_s * attention(q_b, k_subj_b[:, s, :n], v_subj_b[:, s, :n], scale)
        covered |= region
    return z, covered


def region_cross_attention_reference(
    q, k_text, v_text, k_subj, v_subj, regions, grid: Grid, *,
    mode: str = "overwrite", subject_scale=1.0, text_mask=None, softmax_scale=None,
    replaces_text=None, subject_tokens=None,
):
    """Z_out = Z_text + Z_image: the text level and the image level, each routed by its own branches.

    With ``n_s`` = ``subject_tokens[s]`` (default T: every key) and ``attn_s(q)`` =
    ``attn(q, K_s[:n_s], V_s[:n_s])``, split the subjects by kind (``replaces_text[s]``):

        Z_image = level2(image-kind subjects)        crop and merge (overwrite) or masked sum (sum)
        Z_sub   = level2(text-kind subjects)         the same rule, among the text-kind subjects only
        Z_text[t] = Z_sub[t]                 where some text-kind subject's region covers t
                  = attn(q_t, Kt, Vt)        elsewhere (the global text branch; 0 without one)

    so a text-kind subject of scale lambda gives lambda * attn_s inside its region in place of the
    global text (lambda = 1: replace), and with no text-kind subject this is AnyMS's
    Z_out = attn(Q, Kt, Vt) + Z_image.

    Same arguments as :func:`anyms_kernels.region_cross_attention`, already checked;
    ``regions`` is int token boxes [B, S, 4] or a bool coverage map [B, S, h, w],
    ``subject_scale`` a [B, S] tensor, ``replaces_text`` bool [S] or None (no text-kind
    subject), ``subject_tokens`` ints [S] or None (all T).
    """
    B, H, N, D = q.shape
    S = k_subj.shape[2]
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
    kinds = [False] * S if replaces_text is None else [bool(x) for x in replaces_text]
    counts = None if subject_tokens is None else [int(n) for n in subject_tokens]
    image = [s for s in range(S) if not kinds[s]]
    text = [s for s in range(S) if kinds[s]]
    out = []
    for b in range(B):
        args = (q[b], k_subj[b], v_subj[b], regions[b], subject_scale[b], grid, scale)
        z_image, _ = level2(*args, subjects=image, counts=counts)
        z_text_b = z_text[b]
        if text:
            z_sub, covered = level2(*args, subjects=text, counts=counts)
            z_text_b = torch.where(covered[None, :, None], z_sub, z_text_b)
        out.append(z_text_b + z_image)
    return torch.stack(out)
