"""Region rules as small named ideas.

The reference, the PyTorch backend, the Triton kernel's metadata and the
visualisations all use these functions, so that the way a box becomes tokens,
and the way overlapping boxes are settled, is written once.

Conventions (METHOD.md):
- a normalised box is ``(x0, y0, x1, y1)`` in ``[0, 1]`` of the image;
- a token box is half-open integer ``(x0, y0, x1, y1)`` on an ``h x w`` grid;
- tokens are row-major: token ``t`` sits at row ``t // w``, column ``t % w``;
- subjects are in ascending priority: where boxes overlap, the later one wins
  (``overwrite``) or all of them add (``sum``).
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

Grid = Tuple[int, int]

MODES = ("overwrite", "sum")


def check_grid(grid, name: str = "grid") -> Grid:
    """Return ``grid`` as a ``(h, w)`` tuple of positive ints, or raise naming ``name``."""
    if isinstance(grid, torch.Size):
        grid = tuple(grid)
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise ValueError(f"{name} must be a pair (h, w) of positive ints, got {grid!r}")
    h, w = grid
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a pair (h, w) of positive ints, got {grid!r}")
    return int(h), int(w)


def check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def rasterize_boxes(boxes, grid: Grid) -> torch.Tensor:
    """Normalised boxes -> half-open int32 token boxes on ``grid``.

    Args:
        boxes: ``[S, 4]`` or ``[B, S, 4]`` floats ``(x0, y0, x1, y1)`` in ``[0, 1]``
            with ``x1 > x0`` and ``y1 > y0`` (a tensor, or nested sequences).
        grid: ``(h, w)`` of the attention layer's token grid.

    Returns:
        int32 tensor of the same leading shape, on the boxes' device:
        ``y0 = floor(y0 * h)``, ``y1 = max(y0 + 1, ceil(y1 * h))`` clamped to ``h``,
        likewise for x with ``w``. A box never vanishes on a coarse grid.

    Raises:
        ValueError: ``boxes`` has the wrong shape, holds NaN, lies outside
            ``[0, 1]`` or is inverted or empty; ``grid`` is not two positive ints.
    """
    h, w = check_grid(grid)
    boxes = as_box_tensor(boxes)
    if boxes.dim() not in (2, 3) or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [S, 4] or [B, S, 4], got {tuple(boxes.shape)}")
    if boxes.numel():
        # A handful of numbers: checking them costs one tiny sync, worth it here,
        # where boxes arrive from users once per generation.
        check_normalized_boxes(boxes)
    b = boxes.to(torch.float64)
    # floor/ceil on float64, of products snapped to an integer when they are one up to
    # rounding: 0.3 * 10 is 3.0000000000000004, and a box ending at 0.3 must end at
    # token 3 of 10, not 4 (this is also what makes a rectangular mask equal its box).
    x0 = torch.floor(_snap(b[..., 0] * w)).clamp_(0, w - 1)
    y0 = torch.floor(_snap(b[..., 1] * h)).clamp_(0, h - 1)
    x1 = torch.maximum(x0 + 1, torch.ceil(_snap(b[..., 2] * w))).clamp_(max=w)
    y1 = torch.maximum(y0 + 1, torch.ceil(_snap(b[..., 3] * h))).clamp_(max=h)
    return torch.stack([x0, y0, x1, y1], dim=-1).to(torch.int32)


def as_box_tensor(boxes, name: str = "boxes") -> torch.Tensor:
    """Normalised boxes as a float64 tensor. Python numbers are parsed at float64 (a float32
    parse moves 0.2 * 5 past 1.0); None, bools and complex numbers are refused."""
    if isinstance(boxes, torch.Tensor):
        if boxes.dtype == torch.bool or boxes.is_complex():
            raise TypeError(f"{name} must hold real numbers, got {boxes.dtype}")
        if boxes.device.type == "meta":
            raise ValueError(f"{name} is on the meta device: boxes need their values (give them on the CPU)")
        if boxes.dtype in _SHORTEST:
            return decimal_values(boxes)
        return boxes.to(torch.float64)
    try:
        t = torch.as_tensor(boxes, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be [S, 4] numbers (x0, y0, x1, y1) in [0, 1], got {boxes!r}: {exc}") from None
    refuse_non_real(boxes, name)
    return t


def refuse_non_real(x, name: str) -> None:
    """TypeError if nested Python sequences ``x`` hold a bool, None or a complex number
    (torch.as_tensor would silently turn True into 1)."""
    if isinstance(x, (list, tuple)):
        for v in x:
            refuse_non_real(v, name)
    elif isinstance(x, (bool, complex)) or x is None:
        raise TypeError(f"{name} must hold real numbers, not bools, None or complex numbers; got {x!r}")


# dtypes whose values are read as the shortest decimal that gives them back (numpy's own printing)
_SHORTEST = {torch.float32: "float32", torch.float16: "float16"}


def decimal_values(t: torch.Tensor) -> torch.Tensor:
    """A float32 / float16 tensor of a few coordinates as float64, each value read as the shortest
    decimal that rounds to it: float32(0.3) is 0.300000012, whose product with 10 would end a box
    at token 4, where the list ``[0.3]`` (parsed at float64) ends it at token 3. So a tensor and a
    list of the same boxes give the same token boxes."""
    import numpy as np

    kind = getattr(np, _SHORTEST[t.dtype])
    flat = t.detach().to("cpu").numpy().ravel()
    values = [float(np.format_float_positional(kind(v), unique=True, trim="-")) if np.isfinite(v) else float(v)
              for v in flat]
    return torch.tensor(values, dtype=torch.float64).view(t.shape).to(t.device)


def _snap(v: torch.Tensor) -> torch.Tensor:
    """Products of a normalised coordinate and a grid size, snapped to the nearest integer
    when within float64 rounding of it (inputs are at most a few thousand)."""
    r = torch.round(v)
    return torch.where((v - r).abs() <= 1e-9, r, v)


def rasterize_masks(masks, grid: Grid) -> torch.Tensor:
    """Masks at image resolution -> bool token coverage on ``grid``.

    A token is covered when its cell meets the mask: cell ``(i, j)`` spans the image
    rectangle ``[j W / w, (j + 1) W / w) x [i H / h, (i + 1) H / h)`` and is covered when a
    nonzero pixel lies in it. This is the rule of :func:`rasterize_boxes` (a box covers
    every cell it meets), so a rectangular mask gives exactly its box's tokens. Integer
    arithmetic throughout: no rounding.

    Args:
        masks: ``[S, H, W]`` or ``[B, S, H, W]``, bool or numbers (nonzero = inside), any
            device; H and W need not be multiples of the grid.
        grid: ``(h, w)`` of the attention layer's token grid.

    Returns:
        bool ``[S, h, w]`` or ``[B, S, h, w]`` on the masks' device.

    Raises:
        ValueError: wrong shape, an image smaller than the grid, NaN values.
        TypeError: not a tensor-like of numbers or bools.
    """
    h, w = check_grid(grid)
    masks = as_mask_tensor(masks, "masks")
    if masks.dim() not in (3, 4):
        raise ValueError(f"masks must have shape [S, H, W] or [B, S, H, W], got {tuple(masks.shape)}")
    H, W = masks.shape[-2:]
    if H < h or W < w:
        raise ValueError(f"masks are {H}x{W} pixels, smaller than the {h}x{w} token grid: pass them at image size")
    r0, r1 = _cell_edges(h, H, masks.device)
    c0, c1 = _cell_edges(w, W, masks.device)
    # int32 counts are exact below 2^31 pixels; one mask at a time bounds the memory to
    # one summed-area table (16 MB at 2048^2), whatever the number of masks.
    count_dtype = torch.int32 if (H + 1) * (W + 1) < 2**31 else torch.int64
    flat = masks.reshape(-1, H, W)
    out = torch.empty(flat.shape[0], h, w, dtype=torch.bool, device=masks.device)
    for i, mask in enumerate(flat):
        # Summed-area table: the number of mask pixels in any rectangle in four look-ups.
        sat = torch.zeros(H + 1, W + 1, dtype=count_dtype, device=masks.device)
        sat[1:, 1:] = mask.to(count_dtype).cumsum(-1, dtype=count_dtype).cumsum(-2, dtype=count_dtype)
        count = (sat[r1[:, None], c1[None, :]] - sat[r0[:, None], c1[None, :]]
                 - sat[r1[:, None], c0[None, :]] + sat[r0[:, None], c0[None, :]])
        out[i] = count > 0
    return out.reshape(*masks.shape[:-2], h, w)


def _cell_edges(cells: int, pixels: int, device):
    """Per cell, the first pixel it meets and one past the last: floor(i P / n), ceil((i + 1) P / n)."""
    i = torch.arange(cells, device=device, dtype=torch.int64)
    return (i * pixels) // cells, -((-(i + 1) * pixels) // cells)


def as_mask_tensor(masks, name: str = "masks") -> torch.Tensor:
    """A bool tensor of a mask-like (tensor, numpy array of any integer, float or bool dtype,
    nested lists): nonzero = inside. Raises TypeError for other types, ValueError for NaN."""
    import numpy as np

    if not isinstance(masks, torch.Tensor):
        try:
            arr = np.asarray(masks)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be a bool or numeric array/tensor: {exc}") from None
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{name} must hold bools or real numbers, got an array of {arr.dtype}")
        if arr.dtype.kind == "f" and np.isnan(arr).any():
            raise ValueError(f"{name} holds NaN")
        return torch.from_numpy(np.ascontiguousarray(arr != 0))
    if masks.dtype == torch.bool:
        return masks
    if masks.is_complex() or not (masks.is_floating_point() or not masks.is_signed() or masks.dtype in
                                  (torch.int8, torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"{name} must hold bools or real numbers, got {masks.dtype}")
    if masks.is_floating_point():
        if torch.isnan(masks).any():
            raise ValueError(f"{name} holds NaN")
        return masks != 0
    if masks.dtype in (torch.uint16, torch.uint32, torch.uint64):   # few ops support these: compare via int64
        return masks.view(torch.int16 if masks.dtype == torch.uint16 else
                          torch.int32 if masks.dtype == torch.uint32 else torch.int64) != 0
    return masks != 0


def mask_bbox(mask, name: str = "mask") -> Tuple[float, float, float, float]:
    """The normalised bounding box ``(x0, y0, x1, y1)`` of a 2-D mask's nonzero pixels
    (for drawing and for the box-based fallbacks); raises ValueError for an empty mask,
    naming ``name``."""
    m = as_mask_tensor(mask, name)
    if m.dim() != 2:
        raise ValueError(f"{name} must be 2-D [H, W], got shape {tuple(m.shape)}")
    H, W = m.shape
    rows = m.any(1).nonzero()
    cols = m.any(0).nonzero()
    if rows.numel() == 0:
        raise ValueError(f"{name} is empty: it must cover at least one pixel")
    return (int(cols[0]) / W, int(rows[0]) / H, (int(cols[-1]) + 1) / W, (int(rows[-1]) + 1) / H)


def check_normalized_boxes(boxes: torch.Tensor, name: str = "boxes") -> None:
    """Raise ValueError unless every box is finite, inside [0, 1] and not inverted."""
    b = boxes.detach().to("cpu", torch.float64).reshape(-1, 4)
    if torch.isnan(b).any():
        raise ValueError(f"{name} holds NaN: {_first_bad(b, torch.isnan(b).any(1))}")
    outside = ((b < 0) | (b > 1)).any(1)
    if outside.any():
        raise ValueError(f"{name} must lie inside [0, 1]; box {_first_bad(b, outside)} does not")
    inverted = (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
    if inverted.any():
        raise ValueError(
            f"{name} must have x1 > x0 and y1 > y0; box {_first_bad(b, inverted)} is inverted or empty"
        )


def check_token_boxes(boxes: torch.Tensor, grid: Grid, name: str = "boxes") -> None:
    """Raise ValueError unless every token box is inside ``grid`` and non-empty.

    Reads the values, so it synchronises with the boxes' device: callers skip it
    while a CUDA graph is being captured.
    """
    h, w = grid
    b = boxes.detach().to("cpu", torch.int64).reshape(-1, 4)
    if b.numel() == 0:
        return
    outside = (b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > w) | (b[:, 3] > h)
    if outside.any():
        raise ValueError(
            f"{name} must lie inside the {h}x{w} grid (0 <= x <= {w}, 0 <= y <= {h}); "
            f"box {_first_bad(b, outside)} does not"
        )
    empty = (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
    if empty.any():
        raise ValueError(
            f"{name} must be half-open (x0, y0, x1, y1) with x1 > x0 and y1 > y0; "
            f"box {_first_bad(b, empty)} is inverted or empty"
        )


def _first_bad(b: torch.Tensor, bad: torch.Tensor) -> str:
    i = int(bad.nonzero()[0, 0])
    return f"#{i} {tuple(b[i].tolist())}"


def box_cover(box: Sequence[int], grid: Grid, device=None) -> torch.Tensor:
    """Bool ``[h * w]``: which tokens the token box ``(x0, y0, x1, y1)`` covers."""
    h, w = grid
    x0, y0, x1, y1 = (int(v) for v in box)
    ys = torch.arange(h, device=device)
    xs = torch.arange(w, device=device)
    rows = (ys >= y0) & (ys < y1)
    cols = (xs >= x0) & (xs < x1)
    return (rows[:, None] & cols[None, :]).reshape(h * w)


def box_token_indices(box: Sequence[int], grid: Grid, device=None) -> torch.Tensor:
    """int64 indices of the tokens inside a token box, in row-major order."""
    h, w = grid
    x0, y0, x1, y1 = (int(v) for v in box)
    ys = torch.arange(y0, y1, device=device)
    xs = torch.arange(x0, x1, device=device)
    return (ys[:, None] * w + xs[None, :]).reshape(-1)


def token_owner(boxes: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Priority routing: for each token, the index of the last subject covering it.

    Args:
        boxes: int token boxes ``[S, 4]`` in ascending priority.
        grid: ``(h, w)``.

    Returns:
        int64 ``[h * w]`` holding a subject index, or -1 where no box covers the token.
    """
    h, w = grid
    owner = torch.full((h * w,), -1, dtype=torch.int64, device=boxes.device)
    for s, box in enumerate(boxes.tolist()):
        owner.masked_fill_(box_cover(box, grid, boxes.device), s)
    return owner


def coverage_count(boxes: torch.Tensor, grid: Grid) -> torch.Tensor:
    """int64 ``[h * w]``: how many boxes cover each token (what ``sum`` mode adds up)."""
    h, w = grid
    count = torch.zeros(h * w, dtype=torch.int64, device=boxes.device)
    for box in boxes.tolist():
        count += box_cover(box, grid, boxes.device)
    return count


def layer_grid(latent_hw: Grid, num_tokens: int, max_downsample: int = 6) -> Grid:
    """The grid of a layer with ``num_tokens`` tokens under a latent of ``latent_hw``.

    A U-Net halves its feature map per level with stride-2 convolutions, rounding
    odd sizes up; this finds the level whose ``h * w`` equals ``num_tokens``.
    """
    h, w = check_grid(latent_hw, "latent_hw")
    for _ in range(max_downsample + 1):
        if h * w == num_tokens:
            return h, w
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    raise ValueError(
        f"no U-Net level of a {latent_hw[0]}x{latent_hw[1]} latent has {num_tokens} tokens"
    )


def boxes_cover(boxes: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Bool ``[..., S, h * w]``: which tokens each int token box ``[..., S, 4]`` covers.

    Vectorised on the boxes' device: no values are read on the host, so it is safe
    inside a CUDA-graph capture and traceable by torch.compile.
    """
    h, w = grid
    ys = torch.arange(h, device=boxes.device, dtype=torch.int64)
    xs = torch.arange(w, device=boxes.device, dtype=torch.int64)
    b = boxes.to(torch.int64)[..., None]       # [..., S, 4, 1]; int64: no box wraps into the grid
    rows = (ys >= b[..., 1, :]) & (ys < b[..., 3, :])                      # [..., S, h]
    cols = (xs >= b[..., 0, :]) & (xs < b[..., 2, :])                      # [..., S, w]
    return (rows[..., :, None] & cols[..., None, :]).flatten(-2)


# ------------------------------------------------------------------ branch kinds and token counts
def check_replaces_text(replaces_text, num_subjects: int, device=None):
    """``replaces_text``: None (every subject is an image branch) or S bools (a sequence or a bool
    tensor [S]), True where the subject is a text branch that replaces the global text in its
    region. Returns None or a bool tensor [S] on ``device``; raises naming the argument."""
    if replaces_text is None:
        return None
    if isinstance(replaces_text, torch.Tensor):
        if replaces_text.dtype != torch.bool:
            raise TypeError(f"replaces_text must be bools (a sequence or a bool tensor [S]), got {replaces_text.dtype}")
        flags = replaces_text
    else:
        if isinstance(replaces_text, (str, bytes)) or not isinstance(replaces_text, Sequence):
            raise TypeError(f"replaces_text must be a sequence of S bools or a bool tensor [S], "
                            f"got {type(replaces_text).__name__}")
        for i, x in enumerate(replaces_text):
            if not isinstance(x, bool):
                raise TypeError(f"replaces_text[{i}] must be a bool, got {x!r}")
        flags = torch.tensor(list(replaces_text), dtype=torch.bool).reshape(-1)
    if flags.dim() != 1 or flags.shape[0] != num_subjects:
        raise ValueError(f"replaces_text must hold one bool per subject (S={int(num_subjects)}), "
                         f"got shape {tuple(int(d) for d in flags.shape)}")
    return flags.to(device) if device is not None else flags


def check_subject_tokens(subject_tokens, num_subjects: int, max_tokens=None, device=None, read_values=True):
    """``subject_tokens``: None (every subject has all T keys) or S ints (a sequence or an integer
    tensor [S]), the keys of each subject that count; keys past a subject's count are padding,
    never attended. Each must be in ``1..max_tokens`` (T; unchecked above when None). Returns
    ``(None or int32 tensor [S] on device, the largest count or None)``; ``read_values=False``
    (a CUDA-graph capture) skips reading a tensor's values. Raises naming the argument."""
    if subject_tokens is None:
        return None, None
    limit = "1..T" if max_tokens is None else f"1..T={int(max_tokens)}"
    if isinstance(subject_tokens, torch.Tensor):
        if subject_tokens.is_floating_point() or subject_tokens.dtype in (torch.bool, torch.complex64,
                                                                          torch.complex128):
            raise TypeError(f"subject_tokens must be integers (a sequence or an integer tensor [S]), "
                            f"got {subject_tokens.dtype}")
        counts = subject_tokens
        values = counts.reshape(-1).tolist() if read_values and counts.dim() == 1 else None
    else:
        if isinstance(subject_tokens, (str, bytes)) or not isinstance(subject_tokens, Sequence):
            raise TypeError(f"subject_tokens must be a sequence of S ints or an integer tensor [S], "
                            f"got {type(subject_tokens).__name__}")
        for i, n in enumerate(subject_tokens):
            if isinstance(n, bool) or not isinstance(n, int):
                raise TypeError(f"subject_tokens[{i}] must be an int in {limit}, got {n!r}")
        values = list(subject_tokens)
        counts = torch.tensor(values, dtype=torch.int64).reshape(-1)
    if counts.dim() != 1 or counts.shape[0] != num_subjects:
        raise ValueError(f"subject_tokens must hold one count per subject (S={int(num_subjects)}), "
                         f"got shape {tuple(int(d) for d in counts.shape)}")
    if values is not None:
        for i, n in enumerate(values):
            if n < 1 or (max_tokens is not None and n > max_tokens):
                raise ValueError(f"subject_tokens[{i}] is {n}: each subject's token count must be in {limit}")
    # int32 once the values are known to fit; int64 until then, so that no value wraps before it is read
    counts = counts.to(device=device if device is not None else counts.device,
                       dtype=torch.int32 if values is not None else torch.int64)
    return counts, (max(values) if values else None)
