"""Routing of a layout on one token grid, built once and read by every call.

FlexAttention's BlockMask, for our op: a layout (boxes or masks) on a grid becomes,
once, the few small tensors the kernels read, instead of every query tile testing
every subject on every call:

- ``cover``: bool ``[Br, S, N]``, which tokens each subject's region covers (row-major);
- ``order``: int32 ``[Br, N]``, the tokens sorted by what acts on them (their owner in
  ``overwrite`` mode, their set of covering subjects in ``sum`` mode), stable, so a
  query tile of consecutive sorted tokens is nearly always acted on by one subject
  whatever the number of subjects, and tiles outside every region by none;
- ``owner``: int32 ``[Br, N]``, in sorted position, the image-kind subject that acts on
  the token (``overwrite``; -1 for none); ``cover_sorted``: uint8 ``[Br, S, N]`` in sorted
  position (``sum``);
- with text-kind subjects (``replaces_text``), ``text_owner``: int32 ``[Br, N]``, in sorted
  position, the last text-kind subject whose region covers the token, -1 where none does
  (there the global text branch acts); in ``overwrite`` mode it is the text branch that acts,
  in ``sum`` mode every covering text-kind subject adds (``cover_sorted``);
- ``replaces_text`` (bool ``[S]``) and ``subject_tokens`` (int32 ``[S]``, each subject's key
  count), as given to :func:`build_routing`, or None (every subject an image branch with all
  T keys);
- per tile size ``block_m`` (:meth:`Routing.tiles`): the number of subjects acting on
  each tile and their indices, ascending; built with the rest for every size in
  ``TILE_SIZES`` (the Triton kernel's), on demand for any other.

Under torch.compile the op takes these tensors as graph inputs (:meth:`Routing.parts`,
:meth:`Routing.from_parts`): a compiled call builds nothing, and another layout with the
same shapes runs the same graph.

``Br`` is 1 when the batch shares the layout. Everything is built with tensor ops on the
regions' device and no host reads, so it can be built inside a CUDA-graph capture or a
torch.compile'd region, and under ``torch.inference_mode()`` it still makes ordinary
tensors (usable later in grad mode). There is no process-global cache: the object that
owns the layout (``anyms.Layout``, or the caller) keeps its Routing.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .regions import MODES, Grid, boxes_cover, check_grid, check_mode, check_replaces_text, check_subject_tokens

# Subjects per int64 sort key in sum mode: 62 bits keep the key positive.
_KEY_BITS = 62

# The query tile sizes (BLOCK_M) of the Triton kernel's launch table: their tile lists are
# built with the routing, so a compiled call finds them ready (tests keep the two in step).
TILE_SIZES = (16, 32, 64, 128)


class Routing:
    """The routing of one layout on one grid, in one mode (see the module docstring).

    Make it with :func:`build_routing`; pass it to ``region_cross_attention`` in place
    of the boxes to skip rebuilding it on every call.
    """

    def __init__(self, cover: torch.Tensor, grid: Grid, mode: str, replaces_text: Optional[torch.Tensor] = None,
                 subject_tokens: Optional[torch.Tensor] = None, max_subject_tokens: Optional[int] = None,
                 _parts: Optional[Sequence[torch.Tensor]] = None):
        self.grid = grid
        self.mode = mode
        self.cover = cover                              # bool [Br, S, N]
        self.batch, self.num_subjects, self.num_tokens = cover.shape
        self.replaces_text = replaces_text              # bool [S], or None: every subject an image branch
        self.subject_tokens = subject_tokens            # int32 [S], or None: every subject all T keys
        self.max_subject_tokens = max_subject_tokens    # the largest count, read when built (None: not read)
        self._tiles: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._segments: Optional[tuple] = None
        self._replaced: Optional[tuple] = None
        self._counts: Optional[List[int]] = None
        if _parts is not None:                          # from_parts: built before, nothing to build
            parts = list(_parts)
            self.order, self.owner = parts[0], parts[1]
            self.text_owner = parts[-1] if replaces_text is not None else None
            self.cover_sorted = parts[2] if mode == "sum" else None
            tiles = parts[3 if mode == "sum" else 2:]
            self._tile_lists = tuple((tiles[2 * i], tiles[2 * i + 1]) for i in range(len(TILE_SIZES)))
            return
        with torch.inference_mode(False), torch.no_grad():
            self.order, self.owner, self.text_owner, self.cover_sorted = _sort_tokens(cover, mode, replaces_text)
            self._tile_lists = tuple(_tile_subjects(self, size) for size in TILE_SIZES)

    def parts(self) -> List[torch.Tensor]:
        """Every tensor of this routing but ``cover``, ``replaces_text`` and ``subject_tokens``
        (the op takes those as arguments of their own), in the order :meth:`from_parts` takes
        them: what a traced call hands the op as graph inputs."""
        parts = [self.order, self.owner] + ([self.cover_sorted] if self.mode == "sum" else [])
        for count, subjects in self._tile_lists:
            parts += [count, subjects]
        return parts + ([self.text_owner] if self.text_owner is not None else [])

    @classmethod
    def from_parts(cls, cover: torch.Tensor, parts: Sequence[torch.Tensor], grid: Grid, mode: str,
                   replaces_text: Optional[torch.Tensor] = None,
                   subject_tokens: Optional[torch.Tensor] = None) -> "Routing":
        """The Routing whose ``cover``, :meth:`parts`, kinds and counts these are, rebuilt without
        computing anything."""
        return cls(cover, grid, mode, replaces_text, subject_tokens, _parts=parts)

    @property
    def device(self) -> torch.device:
        return self.cover.device

    def tiles(self, block_m: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(count int32 [Br, n_tiles], subjects int32 [Br, n_tiles, S])`` for tiles of
        ``block_m`` consecutive sorted tokens: tile ``i`` is acted on by subjects
        ``subjects[:, i, :count[:, i]]``, ascending. Built once per tile size."""
        if block_m in TILE_SIZES:
            return self._tile_lists[TILE_SIZES.index(block_m)]
        if block_m not in self._tiles:
            with torch.inference_mode(False), torch.no_grad():
                self._tiles[block_m] = _tile_subjects(self, block_m)
        return self._tiles[block_m]

    def work_list(self):
        """Per batch row of the routing, ``[(s, int64 token indices)]`` for every subject
        that acts on some token (the torch backend's work list). Reads the routing on the
        host once (one device sync on a GPU), then is cached."""
        if self._segments is None:
            with torch.inference_mode(False), torch.no_grad():
                self._segments = tuple(_work_list(self, r) for r in range(self.batch))
        return self._segments

    def host_token_counts(self) -> Optional[List[int]]:
        """``subject_tokens`` as a list of ints (read on the host once, then cached), or None."""
        if self.subject_tokens is None:
            return None
        if self._counts is None:
            self._counts = [int(n) for n in self.subject_tokens.tolist()]
        return self._counts

    def replaced_text_tokens(self):
        """Per batch row, int64 indices of the tokens some text-kind subject covers (where the
        global text branch does not act), or None per row without text-kind subjects."""
        if self._replaced is None:
            with torch.inference_mode(False), torch.no_grad():
                self._replaced = tuple(
                    None if self.text_owner is None else self.order[r][self.text_owner[r] >= 0].long()
                    for r in range(self.batch))
        return self._replaced

    def acting_per_tile(self, block_m: int) -> torch.Tensor:
        """float: the mean number of subjects acting on a tile of ``block_m`` tokens (cost models)."""
        return self.tiles(block_m)[0].float().mean()

    def __repr__(self) -> str:
        h, w = self.grid
        kinds = "" if self.replaces_text is None else ", with text-kind subjects"
        return f"Routing(grid={h}x{w}, mode={self.mode!r}, S={self.num_subjects}, batch={self.batch}{kinds})"


def build_routing(regions, grid: Grid, mode: str = "overwrite", *, replaces_text=None,
                  subject_tokens=None) -> Routing:
    """The :class:`Routing` of token boxes or a coverage map on ``grid``.

    Args:
        regions: int token boxes ``[S, 4]`` / ``[B, S, 4]`` (as from ``rasterize_boxes``),
            or a bool coverage map ``[S, h, w]`` / ``[B, S, h, w]`` (as from
            ``rasterize_masks``), in ascending priority.
        grid: ``(h, w)``.
        mode: ``"overwrite"`` or ``"sum"``.
        replaces_text: None, or S bools: True for a text-kind subject (its branch replaces the
            global text branch inside its region; see ``region_cross_attention``).
        subject_tokens: None, or S ints >= 1: each subject's key count (the op checks them
            against T).

    Box values are not checked here (no host reads); the op checks them. The token counts are
    read once here (a device sync for a GPU tensor; skipped while a CUDA graph is captured).
    """
    grid = check_grid(grid)
    check_mode(mode)
    with torch.inference_mode(False), torch.no_grad():
        cover = region_cover(regions, grid)
        S = cover.shape[1]
        kinds = check_replaces_text(replaces_text, S, cover.device)
        capturing = cover.is_cuda and torch.cuda.is_current_stream_capturing()
        counts, largest = check_subject_tokens(subject_tokens, S, None, cover.device, read_values=not capturing)
    return Routing(cover, grid, mode, kinds, counts, largest)


def region_cover(regions: torch.Tensor, grid: Grid) -> torch.Tensor:
    """bool ``[Br, S, N]`` from token boxes ``[S|B,S, 4]`` or a coverage map ``[S|B,S, h, w]``."""
    batched = regions.dim() == (4 if regions.dtype == torch.bool else 3)
    if batched and regions.shape[0] > 1 and regions.stride(0) == 0:
        regions = regions[:1]               # a layout the batch shares: route it once
    if regions.dtype == torch.bool:
        cover = regions.flatten(-2).clone()     # its own storage: never a view of the caller's tensor
    else:
        cover = boxes_cover(regions, grid)
    return cover if cover.dim() == 3 else cover.unsqueeze(0)


def _sort_tokens(cover: torch.Tensor, mode: str, replaces_text: Optional[torch.Tensor]):
    """(order, owner, text_owner or None, cover_sorted or None), see the module docstring."""
    Br, S, N = cover.shape
    device = cover.device
    no_text_owner = None if replaces_text is None else torch.full((Br, N), -1, dtype=torch.int32, device=device)
    if S == 0:
        order = torch.arange(N, device=device, dtype=torch.int32).expand(Br, N).contiguous()
        empty = torch.zeros(Br, 0, N, dtype=torch.uint8, device=device) if mode == "sum" else None
        return order, torch.full((Br, N), -1, dtype=torch.int32, device=device), no_text_owner, empty
    rank = torch.arange(1, S + 1, device=device, dtype=torch.int32)
    ranked = cover.to(torch.int32) * rank[:, None]                                  # [Br, S, N]
    text_owner = None
    if replaces_text is not None:
        text_kind = replaces_text[:, None]
        text_owner = torch.where(text_kind, ranked, 0).amax(1) - 1                  # last covering text subject
        ranked = torch.where(text_kind, 0, ranked)                                  # the image subjects only
    if mode == "overwrite":
        owner = ranked.amax(1) - 1                                                  # last covering image subject
        # Tokens grouped by (image owner, text owner); without text-kind subjects the key is the
        # owner itself, so the order is the one a routing without kinds has.
        key = owner if text_owner is None else (owner.long() + 1) * (S + 1) + text_owner   # int64: S**2 may pass 2**31
        order = torch.argsort(key, dim=-1, stable=True)
        return (order.to(torch.int32), torch.gather(owner, 1, order),
                None if text_owner is None else torch.gather(text_owner, 1, order).contiguous(), None)
    # sum: group tokens with the same set of covering subjects (an LSD radix sort over
    # 62-subject chunks of the set's bit pattern, so any S works).
    order = torch.arange(N, device=device, dtype=torch.int64).expand(Br, N)
    for start in range(0, S, _KEY_BITS):
        chunk = cover[:, start:start + _KEY_BITS].to(torch.int64)
        bits = torch.bitwise_left_shift(torch.ones(chunk.shape[1], 1, dtype=torch.int64, device=device),
                                        torch.arange(chunk.shape[1], device=device)[:, None])
        key = (chunk * bits).sum(1)                                                # [Br, N]
        order = torch.gather(order, 1, torch.argsort(torch.gather(key, 1, order), dim=-1, stable=True))
    cover_sorted = torch.gather(cover, 2, order[:, None, :].expand(Br, S, N)).to(torch.uint8)
    owner = torch.full((Br, N), -1, dtype=torch.int32, device=device)
    if text_owner is not None:
        text_owner = torch.gather(text_owner, 1, order).to(torch.int32).contiguous()
    return order.to(torch.int32).contiguous(), owner, text_owner, cover_sorted.contiguous()


def _tile_subjects(routing: Routing, block_m: int):
    Br, S, N = routing.batch, routing.num_subjects, routing.num_tokens
    n_tiles = -(-N // block_m)
    pad = n_tiles * block_m - N
    device = routing.device
    if S == 0:
        return (torch.zeros(Br, n_tiles, dtype=torch.int32, device=device),
                torch.zeros(Br, n_tiles, 0, dtype=torch.int32, device=device))
    if routing.mode == "overwrite":
        owner = torch.nn.functional.pad(routing.owner, (0, pad), value=-1).view(Br, n_tiles, block_m)
        hit = torch.zeros(Br, n_tiles, S + 1, dtype=torch.bool, device=device)
        hit.scatter_(2, (owner + 1).long(), True)
        if routing.text_owner is not None:
            text_owner = torch.nn.functional.pad(routing.text_owner, (0, pad), value=-1).view(Br, n_tiles, block_m)
            hit.scatter_(2, (text_owner + 1).long(), True)
        hit = hit[..., 1:]
    else:
        cov = torch.nn.functional.pad(routing.cover_sorted, (0, pad)).view(Br, S, n_tiles, block_m)
        hit = cov.amax(-1).bool().transpose(1, 2)
    count = hit.sum(-1, dtype=torch.int32)
    # Acting subjects first, in ascending order (a stable sort of "not acting").
    subjects = torch.argsort((~hit).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return count.contiguous(), subjects.contiguous()


def _work_list(routing: Routing, r: int):
    cover = routing.cover[r]
    if routing.text_owner is not None and routing.mode == "overwrite":
        # two owners per token (its image branch and its text branch): select each subject's own
        order, owner, text_owner = routing.order[r].long(), routing.owner[r], routing.text_owner[r]
        return tuple((s, idx) for s in range(routing.num_subjects)
                     if (idx := order[(owner == s) | (text_owner == s)]).numel())
    if routing.mode == "sum":
        return tuple((s, idx) for s in range(routing.num_subjects)
                     if (idx := cover[s].nonzero().flatten()).numel())
    owner = routing.owner[r]
    counts = torch.bincount(owner.long() + 1, minlength=routing.num_subjects + 1).tolist()
    pieces = torch.split(routing.order[r].long(), counts)
    return tuple((s, pieces[s + 1]) for s in range(routing.num_subjects) if counts[s + 1])


__all__ = ["Routing", "build_routing", "region_cover", "MODES", "TILE_SIZES"]
