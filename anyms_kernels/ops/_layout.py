"""Memory-layout helpers shared by the backends: outputs are laid out like q."""
from __future__ import annotations

from typing import List, Tuple

import torch


def layout_order(t: torch.Tensor) -> List[int]:
    """t's dims from outermost to innermost in memory (size-1 dims carry no layout: last)."""
    return sorted(range(t.dim()), key=lambda i: (t.shape[i] == 1, -t.stride(i), i))


def empty_like_layout(q: torch.Tensor) -> torch.Tensor:
    """An empty tensor shaped like q whose dims are laid out in q's stride order.

    For q = x.view(B, N, H, D).transpose(1, 2) the result is a transposed
    [B, N, H, D] buffer too, so the caller's reshape back is free; this also holds
    when q is a non-dense slice of a fused projection. Every backend allocates its
    output here (the tests poison it with NaN, so unwritten rows fail).
    """
    order = layout_order(q)
    buf = torch.empty([q.shape[i] for i in order], dtype=q.dtype, device=q.device)
    inverse = [order.index(i) for i in range(q.dim())]
    return buf.permute(inverse)


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: its elements fill exactly numel() slots of its storage."""
    expected = 1
    for i in reversed(layout_order(t)):
        if t.shape[i] != 1 and t.stride(i) != expected:
            return False
        expected *= t.shape[i]
    return True


def token_major(t: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """A view of t [B, H, N, D] in which gathering / scattering tokens moves whole rows.

    diffusers' q is a transposed [B, N, H, D] buffer: there one token's H*D values are
    contiguous, so index along N of the [B, N, H, D] view (a row copy) rather than of
    the [B, H, N, D] view (H strided pieces per token).
    """
    if t.stride(2) >= t.stride(1) * t.shape[1] or t.shape[1] == 1:
        return t.transpose(1, 2), 1
    return t, 2
