"""The fused Triton kernel of region cross-attention, its launch table and launcher.

The query tokens of each (batch, head) are cut into tiles of BLOCK_M tokens consecutive in
the routing's sorted order (``anyms_kernels.routing``), so a tile is nearly always acted on
by one subject or none, whatever the number of subjects. A program runs a run of consecutive
tiles, as many programs in all as the GPU holds at once (one wave): G programs per (batch, head)
each running ceil(tiles / G) of its tiles, or, where that would leave the wave's longest
programs a tile longer (``split_tiles``), runs of all (batch, head)s' tiles in a row, a run that
crosses into the next (batch, head) running it as a second segment. Per segment it stages that
(batch, head)'s text keys once, then per tile: prefetches the next tile's query rows, the
indices of the tile after it and (narrow 16-bit heads) the next tile's routing and first
subject's keys, across segments too; runs the text branch in one pass (no online rescale for
L <= 128); runs only the subjects its tile's list names, each in one key block, accumulating
``P @ V`` straight into the output accumulator with ``lambda_s / l`` and the token's
acts-or-not folded into ``P``; writes the tile once, in q's layout. With text-kind subjects
(HAS_TEXT_SUBJECTS) the tile's text owners zero the global text branch where a text-kind
subject acts instead; with per-subject counts (HAS_SUBJ_TOKENS) each subject reads and attends
to its own keys only. Every tile runs the same operations whichever
program runs it, so the output does not depend on the split. Nothing in it depends on S.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .._triton import HAS_TRITON, interpreter_requested, tl, triton, triton_unavailable_reason
from ..routing import Routing
from . import _layout

# Head dims the Triton kernel is built and tested for: SD 1.5 (40, 80, 160),
# SDXL (64), FLUX (128), and the common 32 / 96 / 256.
TRITON_HEAD_DIMS = (32, 40, 64, 80, 96, 128, 160, 256)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Text keys up to this count run in one pass (one block, or two static blocks).
ONE_PASS_TEXT = 128
# Subject keys up to this count run in one block; longer sequences (a full ViT
# sequence, T = 257) take an online softmax over blocks of ONLINE_T.
ONE_BLOCK_SUBJECT = 64
ONLINE_T = 32

LOG2E = 1.4426950408889634

# --------------------------------------------------------------------------- kernel
if HAS_TRITON:
    # tl.fdiv(..., approx=True) (div.approx.f32) is new in triton 3.9; older releases (3.0-3.8,
    # which the package supports) have no ``approx`` and take the plain tl.fdiv (div.full.f32).
    FDIV_APPROX = tl.constexpr("approx" in inspect.signature(tl.fdiv).parameters)
    try:
        from triton.language.extra.cuda import libdevice as _libdevice
    except ImportError:  # pragma: no cover - depends on the triton release
        _libdevice = None

    @triton.jit
    def _jit_probe():
        pass

    # Whether triton interprets the kernels defined now: its own decision (its reading of
    # TRITON_INTERPRET, which is not ours: "2" is off to it), taken when a kernel is defined.
    _JIT_INTERPRETS = type(_jit_probe).__name__ == "InterpretedFunction"
    # Compiled, libdevice's fast_dividef is div.approx.ftz.f32 (triton links libdevice with flush-to-zero):
    # without ftz, div.approx first rescales a divisor below 2^-126, a compare, two multiplies and a select
    # per row that these sums never need. The interpreter has no libdevice: tl.fdiv there.
    FAST_DIV = tl.constexpr(_libdevice is not None and hasattr(_libdevice, "fast_dividef") and not _JIT_INTERPRETS)

    @triton.jit
    def _reciprocal_of_sum(l):
        """1 / l for a softmax row sum l >= 1 (the row's largest score gives 1): div.approx (with
        ftz where compiled) where this triton has it, else div.full; all within 2 ulp there, far
        inside their range. The numerator is 1, never a subject's scale: ftz flushes quotients
        below 2^-126 to 0, and a scale below 2^-126 * l divided by l would drop its branch (the
        callers multiply by the scale after, in plain float32)."""
        if FAST_DIV:
            return _libdevice.fast_dividef(1.0, l)
        elif FDIV_APPROX:
            return tl.fdiv(1.0, l, approx=True)
        else:
            return tl.fdiv(1.0, l)

    @triton.jit
    def _load_keys(
        K, V,                   # pointers to key / value row 0 of this branch
        start, n_keys,          # first key of the block; keys in the branch
        stride_kn, stride_kd,   # key strides (token, feature)
        stride_vn, stride_vd,   # value strides (token, feature)
        offs_d, d_ok,           # feature offsets and their validity (HEAD_DIM may be < BLOCK_D)
        KEY_MASK, stride_mask,  # key-padding mask (int8, nonzero = attend), read if HAS_KEY_MASK
        HAS_KEY_MASK: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """K^T [BLOCK_D, BLOCK_N], V [BLOCK_N, BLOCK_D] and which of the BLOCK_N keys count."""
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_keys
        k = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if HAS_KEY_MASK:
            n_ok = n_ok & (tl.load(KEY_MASK + offs_n * stride_mask, mask=n_ok, other=0) != 0)
        return k, v, n_ok

    @triton.jit
    def _load_text_keys(
        KT, VT, n_keys, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, d_ok, KEY_MASK, stride_mask,
        HAS_KEY_MASK: tl.constexpr,
        TEXT_A: tl.constexpr,   # first static block of keys
        TEXT_B: tl.constexpr,   # second static block, 0 for none (block A is then returned twice, unused)
    ):
        """The text keys of the one-pass branch: blocks A and B as (K^T, V, validity) each."""
        ka, va, ok_a = _load_keys(KT, VT, 0, n_keys, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, d_ok,
                                  KEY_MASK, stride_mask, HAS_KEY_MASK, TEXT_A)
        if TEXT_B > 0:
            kb, vb, ok_b = _load_keys(KT, VT, TEXT_A, n_keys, stride_kn, stride_kd, stride_vn, stride_vd, offs_d,
                                      d_ok, KEY_MASK, stride_mask, HAS_KEY_MASK, TEXT_B)
        else:
            kb, vb, ok_b = ka, va, ok_a
        return ka, va, ok_a, kb, vb, ok_b

    @triton.jit
    def _text_branch(
        q,                      # [BLOCK_M, BLOCK_D] query tile
        ka, va, ok_a,           # first key block (TEXT_A keys): K^T, V, validity
        kb, vb, ok_b,           # second key block (TEXT_B keys), if TWO_BLOCKS
        qk_scale,               # softmax_scale * log2(e): the softmax runs in base 2
        MASK_A: tl.constexpr,   # whether block A has keys to mask (padding or a key mask)
        TWO_BLOCKS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """softmax(q K^T) V over at most two static key blocks: one max, one sum, no rescale."""
        sa = tl.dot(q, ka, input_precision=DOT_PRECISION)
        if MASK_A:
            sa = tl.where(ok_a[None, :], sa, float("-inf"))
        m = tl.max(sa, 1)
        if TWO_BLOCKS:
            sb = tl.dot(q, kb, input_precision=DOT_PRECISION)
            sb = tl.where(ok_b[None, :], sb, float("-inf"))
            m = tl.maximum(m, tl.max(sb, 1))
        # A row whose keys are all masked keeps m = -inf: shift by 0 (its p are all 0). Only a masked
        # block A can mask a whole row (block B, if any, comes with A's keys).
        m = tl.where(m == float("-inf"), 0.0, m) * qk_scale
        pa = tl.exp2(sa * qk_scale - m[:, None])          # one FFMA per score, then MUFU.EX2
        l_i = tl.sum(pa, 1)
        acc = tl.dot(pa.to(va.dtype), va, input_precision=DOT_PRECISION)
        if TWO_BLOCKS:
            pb = tl.exp2(sb * qk_scale - m[:, None])
            l_i += tl.sum(pb, 1)
            acc = tl.dot(pb.to(vb.dtype), vb, acc, input_precision=DOT_PRECISION)
        # l == 0 only for a fully masked row (the host refuses those, except while a CUDA
        # graph is captured): write zeros, never 0/0. Else l >= 1 (the row's largest score).
        if MASK_A:
            l_i = tl.where(l_i == 0.0, 1.0, l_i)
        inv_l = _reciprocal_of_sum(l_i)
        return acc * inv_l[:, None]

    @triton.jit
    def _subject_branch(
        out,                    # [BLOCK_M, BLOCK_D] float32 output accumulator
        q,                      # [BLOCK_M, BLOCK_D] query tile
        k, v, t_ok,             # the subject's keys in one block: K^T, V, validity
        weight,                 # [BLOCK_M] lambda_s where the subject acts on the token, else 0
        qk_scale,
        MASK_T: tl.constexpr,   # whether the block has padding keys (T < BLOCK_T)
        DOT_PRECISION: tl.constexpr,
    ):
        """out += weight * softmax(q K^T) V, with weight / l folded into P: no rescale, no where over the tile."""
        s = tl.dot(q, k, input_precision=DOT_PRECISION)
        if MASK_T:
            s = tl.where(t_ok[None, :], s, float("-inf"))
        m = tl.max(s, 1) * qk_scale
        p = tl.exp2(s * qk_scale - m[:, None])
        w = weight * _reciprocal_of_sum(tl.sum(p, 1))
        p = p * w[:, None]
        return tl.dot(p.to(v.dtype), v, out, input_precision=DOT_PRECISION)

    @triton.jit
    def _subject_keys_ok(t_ok, SUBJ_LEN: tl.constexpr, HAS_SUBJ_TOKENS: tl.constexpr, BLOCK_T: tl.constexpr):
        """Which keys of a subject's block its scores keep: its own count's (``t_ok``, loaded with its
        keys) with per-subject counts, else the first T, a constant computed where the scores are
        (not carried from the load through the pipelined loop)."""
        if HAS_SUBJ_TOKENS:
            return t_ok
        else:
            return tl.arange(0, BLOCK_T) < SUBJ_LEN

    @triton.jit
    def _attend_online(
        q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, n_keys,
        KEY_MASK, stride_mask, qk_scale, offs_d, d_ok,
        HAS_KEY_MASK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        LOOP_STAGES: tl.constexpr = None,   # software-pipelining stages of the loop; None: the launch's
    ):
        """softmax(q K^T) V with an online softmax over key blocks: for long branches only."""
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in tl.range(0, n_keys, BLOCK_N, num_stages=LOOP_STAGES):
            k, v, n_ok = _load_keys(K, V, start, n_keys, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, d_ok,
                                    KEY_MASK, stride_mask, HAS_KEY_MASK, BLOCK_N)
            s = tl.dot(q, k, input_precision=DOT_PRECISION)
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s * qk_scale - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        return acc * (1.0 / tl.where(l_i == 0.0, 1.0, l_i))[:, None]

    @triton.jit
    def _tile_routing(TILE_COUNT, TILE_SUBJECTS, OWNER, TEXT_OWNER, b, tile, n_tiles, pos, m_ok, route,
                      stride_tcb, stride_tsb, stride_tst, OVERWRITE: tl.constexpr, HAS_TEXT_SUBJECTS: tl.constexpr):
        """A tile's acting-subject count, the first subject on its list, (overwrite) its tokens'
        image owners and (text-kind subjects) their text owners, -1 where the global text acts;
        count 0 for a tile past the last. Every list entry is a subject index (the list is a
        permutation of 0..S-1), so the first one may be read before the count arrives."""
        live = tile < n_tiles
        count = tl.load(TILE_COUNT + b * stride_tcb + tile, mask=live, other=0)
        first = tl.load(TILE_SUBJECTS + b * stride_tsb + tile * stride_tst, mask=live, other=0)
        if OVERWRITE:
            owner = tl.load(OWNER + route + pos, mask=m_ok, other=-1)
        else:
            owner = pos * 0 - 1
        if HAS_TEXT_SUBJECTS:
            text_owner = tl.load(TEXT_OWNER + route + pos, mask=m_ok, other=-1)
        else:
            text_owner = pos * 0 - 1
        return count, first, owner, text_owner

    @triton.jit
    def _subject_cover(s, owner, text_owner, COVER, SCALES, b, pos, m_ok, stride_cb, stride_cs, stride_sb,
                       stride_ss, OVERWRITE: tl.constexpr, HAS_TEXT_SUBJECTS: tl.constexpr):
        """Subject s's weights as loaded, and its scale lambda_s: in overwrite mode the weights
        themselves ([BLOCK_M]: lambda_s where its kind's owner is s, else 0), in sum mode its
        coverage bytes, which ``_weight`` turns into weights where they are used (the pipelined
        subject loop: a step later, once they have arrived, instead of waiting for them)."""
        if OVERWRITE:
            acts = owner == s
            if HAS_TEXT_SUBJECTS:
                acts = acts | (text_owner == s)       # its kind's owner: the image or the text one
        else:
            cover = tl.load(COVER + b * stride_cb + s * stride_cs + pos, mask=m_ok, other=0)
        lam = tl.load(SCALES + b * stride_sb + s * stride_ss)     # B x S floats (the launcher compacts them)
        if OVERWRITE:
            cover = tl.where(acts, lam, 0.0)
        return cover, lam

    @triton.jit
    def _weight(cover, lam, OVERWRITE: tl.constexpr):
        """[BLOCK_M]: lambda_s where the subject acts on the token, else 0, from ``_subject_cover``."""
        if OVERWRITE:
            return cover
        else:
            return tl.where(cover != 0, lam, 0.0)

    @triton.jit
    def _subject_operands(s, j, count, owner, text_owner, COVER, SCALES, SUBJ_TOKENS, KS, VS, b, h, pos, w_ok,
                          stride_cb, stride_cs, stride_sb, stride_ss, stride_ksb, stride_ksh, stride_kss,
                          stride_kst, stride_ksd, stride_vsb, stride_vsh, stride_vss, stride_vst, stride_vsd,
                          offs_d, d_ok, TEXT_MASK, OVERWRITE: tl.constexpr, HAS_TEXT_SUBJECTS: tl.constexpr,
                          HAS_SUBJ_TOKENS: tl.constexpr, SUBJ_LEN: tl.constexpr, BLOCK_T: tl.constexpr,
                          VEC: tl.constexpr, OFFSETS_32: tl.constexpr):
        """Subject s, the tile's j-th of ``count``: its weights as loaded and its scale
        (``_subject_cover``) and its one block of keys / values (none past the last), issued in that
        order: what the pipelined subject loop loads a step ahead."""
        cover, lam = _subject_cover(s, owner, text_owner, COVER, SCALES, b, pos, w_ok, stride_cb, stride_cs,
                                   stride_sb, stride_ss, OVERWRITE, HAS_TEXT_SUBJECTS)
        n = SUBJ_LEN
        if HAS_SUBJ_TOKENS:
            n = tl.load(SUBJ_TOKENS + s)
        s_off = _offset(s, OFFSETS_32)       # int64 with 64-bit offsets: s * stride may pass int32
        k, v, ok = _load_keys(KS + tl.multiple_of(b * stride_ksb + h * stride_ksh + s_off * stride_kss, VEC),
                              VS + tl.multiple_of(b * stride_vsb + h * stride_vsh + s_off * stride_vss, VEC),
                              0, tl.where(j < count, n, 0), stride_kst, stride_ksd, stride_vst, stride_vsd, offs_d,
                              d_ok, TEXT_MASK, 0, False, BLOCK_T)
        return cover, lam, k, v, ok

    @triton.jit
    def _following(b, h, tile, n_tiles, H):
        """(batch, head, tile) of the tile after ``tile`` of (b, h) in the run of all (batch,
        head)s' tiles: the next tile, or the first of the next head, or of the next batch (past
        the last, batch B: never loaded, see ``_masked``). No division: this runs every tile."""
        wrap = tile + 1 == n_tiles
        h2 = tl.where(wrap, h + 1, h)
        next_b = wrap & (h2 == H)
        return tl.where(next_b, b + 1, b), tl.where(next_b, 0, h2), tl.where(wrap, 0, tile + 1)

    @triton.jit
    def _offset(x, OFFSETS_32: tl.constexpr):
        """An index as an element offset: int32 where every offset of the launch fits it (one
        32-bit multiply-add per address instead of a 64-bit one), else int64."""
        if OFFSETS_32:
            return x.to(tl.int32)
        else:
            return x.to(tl.int64)

    @triton.jit
    def _masked(live, b, h, tile, b_here, h_here, n_tiles):
        """The coordinates a prefetch loads from: (b, h, tile), or for a tile past the program's
        last, tile n_tiles of (b_here, h_here), whose loads are all masked off (a batch index stays
        in range: the subject scales are read unmasked)."""
        return tl.where(live, b, b_here), tl.where(live, h, h_here), tl.where(live, tile, n_tiles)

    @triton.jit
    def _load_query(Q, q_base, tok, ok, stride_qn, stride_qd, offs_d, d_ok, VEC: tl.constexpr):
        """The query rows of one tile's tokens, [BLOCK_M, BLOCK_D] (rows not ok read as 0)."""
        q_rows = tl.multiple_of(q_base + tok * stride_qn, VEC)
        return tl.load(Q + q_rows[:, None] + offs_d[None, :] * stride_qd, mask=ok[:, None] & d_ok[None, :],
                       other=0.0)

    @triton.jit
    def _region_attention_fwd(
        Q, KT, VT, KS, VS,      # q [B,H,N,D]; text k/v [B,H,L,D]; subject k/v [B,H,S,T,D]
        OUT,                    # [B,H,N,D] output, any strides
        ORDER,                  # int32 [Br,N] tokens in routing order: tile i = ORDER[i*BLOCK_M : (i+1)*BLOCK_M]
        OWNER,                  # int32 [Br,N] acting image-kind subject per sorted position (overwrite), -1 = none
        TEXT_OWNER,             # int32 [Br,N] last covering text-kind subject per sorted position, -1 = the
                                # global text acts (read if HAS_TEXT_SUBJECTS)
        COVER,                  # uint8 [Br,S,N] coverage per sorted position (sum)
        TILE_COUNT,             # int32 [Br,n_tiles] subjects acting on each tile
        TILE_SUBJECTS,          # int32 [Br,n_tiles,S] their indices, ascending
        SCALES,                 # float32 [B,S] subject scales (lambda_s)
        SUBJ_TOKENS,            # int32 [S] keys of each subject, 1..T (read if HAS_SUBJ_TOKENS)
        TEXT_MASK,              # int8 [B,L] key-padding mask (nonzero = attend), read if HAS_TEXT_MASK
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_ktb, stride_kth, stride_ktl, stride_ktd,
        stride_vtb, stride_vth, stride_vtl, stride_vtd,
        stride_ksb, stride_ksh, stride_kss, stride_kst, stride_ksd,
        stride_vsb, stride_vsh, stride_vss, stride_vst, stride_vsd,
        stride_ob, stride_oh, stride_on, stride_od,
        stride_rb,                          # ORDER / OWNER batch stride (0: shared by the batch)
        stride_cb, stride_cs,               # COVER batch, subject strides
        stride_tcb,                         # TILE_COUNT batch stride
        stride_tsb, stride_tst,             # TILE_SUBJECTS batch, tile strides
        stride_sb, stride_ss,               # SCALES (strides 0 when broadcast)
        stride_mb, stride_ml,               # TEXT_MASK
        H, N,                   # heads, query tokens
        n_tiles,                # query tiles per (batch, head)
        total_tiles,            # B * H * n_tiles
        tiles_per_program,      # program p runs tiles p * tiles_per_program ... of all (batch, head)s', in a row
        programs_per_head,      # 0; or G > 0: program p runs tiles (p % G) * tiles_per_program ... of
                                # (batch, head) p // G
        qk_scale,               # softmax_scale * log2(e)
        HEAD_DIM: tl.constexpr,      # D
        BLOCK_D: tl.constexpr,       # D rounded up to a power of two
        BLOCK_M: tl.constexpr,       # query tokens per program
        HAS_TEXT: tl.constexpr,      # False: no text branch, the output is the routed subjects only
        TEXT_LEN: tl.constexpr,      # L
        TEXT_A: tl.constexpr,        # one-pass text: first key block (a power of two)
        TEXT_B: tl.constexpr,        # one-pass text: second key block, 0 for none
        ONLINE_L: tl.constexpr,      # key block of the online text path (TEXT_A == 0)
        PREFETCH_TEXT: tl.constexpr, # registers allow prefetching: text keys first, next query tile ahead
        SUBJ_LEN: tl.constexpr,      # T
        BLOCK_T: tl.constexpr,       # subject keys per block (one block when T <= BLOCK_T)
        OVERWRITE: tl.constexpr,     # True: a token takes its owner; False: all covering subjects add
        HAS_TEXT_SUBJECTS: tl.constexpr,  # text-kind subjects replace the global text where they cover a token
        HAS_SUBJ_TOKENS: tl.constexpr,    # subjects have their own key counts (else all SUBJ_LEN)
        SUBJ_LOOP_STAGES: tl.constexpr,   # pipelining stages of the online subject loop (None: the launch's)
        HAS_TEXT_MASK: tl.constexpr,
        VEC: tl.constexpr,           # every row offset is a multiple of VEC elements (16-byte accesses)
        OFFSETS_32: tl.constexpr,    # every element offset fits int32 (``int32_offsets``): int32 address math
        DOT_PRECISION: tl.constexpr, # "ieee" for float32 inputs, "tf32" otherwise (ignored for 16-bit)
    ):
        # This program's tiles: g_first .. g_end - 1 of all (batch, head)s' tiles in a row
        # (g = (batch * H + head) * n_tiles + tile), so every program runs the same number of
        # tiles however the tiles split into heads; a run that crosses into the next (batch,
        # head) runs it as a second segment, which stages that one's text keys.
        pid = tl.program_id(0)
        g_first = pid * tiles_per_program
        g_end = tl.minimum(g_first + tiles_per_program, total_tiles)
        if programs_per_head > 0:       # runs within one (batch, head) each: G programs per (batch, head)
            run_bh = pid // programs_per_head
            g_first = run_bh * n_tiles + (pid - run_bh * programs_per_head) * tiles_per_program
            g_end = tl.minimum(g_first + tiles_per_program, run_bh * n_tiles + n_tiles)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        rows = tl.arange(0, BLOCK_M)
        MASK_T: tl.constexpr = SUBJ_LEN < BLOCK_T or HAS_SUBJ_TOKENS   # a subject's block may hold padding keys
        bh_first = g_first // n_tiles
        tile0 = g_first - bh_first * n_tiles
        bi = bh_first // H              # int32 coordinates; int64 offsets where int32 would overflow
        hi = bh_first - bi * H
        b = _offset(bi, OFFSETS_32)
        h = _offset(hi, OFFSETS_32)

        # The first tile's token indices are issued first (the query gather depends on them), then
        # the first query tile and the second tile's indices; each segment stages its text keys.
        # Narrow 16-bit heads (PREFETCH_TEXT) prefetch each next tile's query rows; wide or float32
        # heads would spill holding them beside the text keys, so they load each tile's query rows
        # when the tile starts.
        pos0 = tile0 * BLOCK_M + rows
        if PREFETCH_TEXT:
            tok = _offset(tl.load(ORDER + b * stride_rb + pos0, mask=pos0 < N, other=0), OFFSETS_32)
            q = _load_query(Q, b * stride_qb + h * stride_qh, tok, pos0 < N, stride_qn, stride_qd, offs_d, d_ok, VEC)
            b_n, h_n, tile_n = _following(bi, hi, tile0, n_tiles, H)
            b_m, h_m, tile_m = _masked(g_first + 1 < g_end, b_n, h_n, tile_n, bi, hi, n_tiles)
            b_m = _offset(b_m, OFFSETS_32)
            h_m = _offset(h_m, OFFSETS_32)
            pos_next = tile_m * BLOCK_M + rows
            tok_next = _offset(tl.load(ORDER + b_m * stride_rb + pos_next, mask=pos_next < N, other=0),
                               OFFSETS_32)
        else:       # each segment loads its first tiles' indices (below)
            q = tl.zeros([BLOCK_M, BLOCK_D], Q.dtype.element_ty)
            tok = _offset(tl.zeros([BLOCK_M], tl.int32), OFFSETS_32)
            tok_next = tok
        # Routing one tile ahead (narrow 16-bit heads, one-block subjects): the first tile's
        # count, first listed subject, its weights and keys; later tiles' arrive during the
        # tile before them, so the subject branch never waits on a dependent load chain.
        # (``pos * 0 + count``: the scalar count broadcast to the tile, which the interpreter
        # needs to combine it with a tensor mask.)
        if PREFETCH_TEXT and SUBJ_LEN <= BLOCK_T:
            count, s0, owner, text_owner = _tile_routing(TILE_COUNT, TILE_SUBJECTS, OWNER, TEXT_OWNER, b, tile0,
                                                         n_tiles, pos0, pos0 < N, b * stride_rb, stride_tcb,
                                                         stride_tsb, stride_tst, OVERWRITE, HAS_TEXT_SUBJECTS)
            cover0, lam0, k0, v0, ok0 = _subject_operands(
                s0, 0, count, owner, text_owner, COVER, SCALES, SUBJ_TOKENS, KS, VS, b, h, pos0,
                (pos0 < N) & (pos0 * 0 + count > 0), stride_cb, stride_cs, stride_sb, stride_ss, stride_ksb,
                stride_ksh, stride_kss, stride_kst, stride_ksd, stride_vsb, stride_vsh, stride_vss, stride_vst,
                stride_vsd, offs_d, d_ok, TEXT_MASK, OVERWRITE, HAS_TEXT_SUBJECTS, HAS_SUBJ_TOKENS, SUBJ_LEN,
                BLOCK_T, VEC, OFFSETS_32)
            s1 = tl.load(TILE_SUBJECTS + b * stride_tsb + tile0 * stride_tst + 1, mask=count > 1, other=0)

        # Wide or float32 heads run one segment: their runs stay within one (batch, head)
        # (``split_tiles``; the launcher refuses others), as a loop nest would make them spill.
        if PREFETCH_TEXT:
            bh_end = (g_end - 1) // n_tiles + 1
        else:
            bh_end = bh_first + 1
        for bh in tl.range(bh_first, bh_end, num_stages=1):
            # A segment: this program's tiles of one (batch, head), whose text keys are staged
            # once for them (they do not depend on the routing).
            bi = bh // H
            hi = bh - bi * H
            b = _offset(bi, OFFSETS_32)
            h = _offset(hi, OFFSETS_32)
            route = b * stride_rb
            q_base = b * stride_qb + h * stride_qh
            o_base = b * stride_ob + h * stride_oh
            kt_base = tl.multiple_of(b * stride_ktb + h * stride_kth, VEC)
            vt_base = tl.multiple_of(b * stride_vtb + h * stride_vth, VEC)
            mask_row = TEXT_MASK + b * stride_mb
            if HAS_TEXT and TEXT_A > 0:
                ka, va, ok_a, kb, vb, ok_b = _load_text_keys(KT + kt_base, VT + vt_base, TEXT_LEN, stride_ktl,
                                                             stride_ktd, stride_vtl, stride_vtd, offs_d, d_ok, mask_row,
                                                             stride_ml, HAS_TEXT_MASK, TEXT_A, TEXT_B)
            seg_lo = tl.maximum(g_first, bh * n_tiles)
            seg_hi = tl.minimum(g_end, bh * n_tiles + n_tiles)
            if not PREFETCH_TEXT:
                # Wide or float32 heads prefetch no further than their segment (the registers to
                # follow a run into the next (batch, head) would spill): its first two tiles'
                # indices, loaded here.
                pos_first = (seg_lo - bh * n_tiles) * BLOCK_M + rows
                tok = _offset(tl.load(ORDER + route + pos_first, mask=pos_first < N, other=0), OFFSETS_32)
                pos_second = tl.where(seg_lo + 1 < seg_hi, pos_first + BLOCK_M, N)
                tok_next = _offset(tl.load(ORDER + route + pos_second, mask=pos_second < N, other=0), OFFSETS_32)
            for g in tl.range(seg_lo, seg_hi, num_stages=1):
                tile = g - bh * n_tiles
                pos = tile * BLOCK_M + rows
                m_ok = pos < N
                # The next tile (its indices arrived one tile ago) and the one after it; past the
                # program's last (or, for wide or float32 heads, its segment's), masked off.
                if PREFETCH_TEXT:
                    b_n, h_n, tile_n = _following(bi, hi, tile, n_tiles, H)
                    b_m, h_m, tile_m = _masked(g + 1 < g_end, b_n, h_n, tile_n, bi, hi, n_tiles)
                    b_m = _offset(b_m, OFFSETS_32)
                    h_m = _offset(h_m, OFFSETS_32)
                    b_a, h_a, tile_a = _following(b_n, h_n, tile_n, n_tiles, H)
                    b_a, h_a, tile_a = _masked(g + 2 < g_end, b_a, h_a, tile_a, bi, hi, n_tiles)
                else:
                    b_m, h_m, tile_m = b, h, tl.where(g + 1 < seg_hi, tile + 1, n_tiles)
                    b_a, tile_a = bi, tl.where(g + 2 < seg_hi, tile + 2, n_tiles)
                pos_next = tile_m * BLOCK_M + rows
                # Prefetch, in flight while this tile computes: the next tile's query rows and the
                # indices of the tile after it.
                if PREFETCH_TEXT:
                    q_next = _load_query(Q, b_m * stride_qb + h_m * stride_qh, tok_next, pos_next < N, stride_qn,
                                         stride_qd, offs_d, d_ok, VEC)
                else:
                    q = _load_query(Q, q_base, tok, m_ok, stride_qn, stride_qd, offs_d, d_ok, VEC)
                pos_after = tile_a * BLOCK_M + rows
                tok_after = _offset(tl.load(ORDER + _offset(b_a, OFFSETS_32) * stride_rb + pos_after,
                                            mask=pos_after < N, other=0), OFFSETS_32)
                subjects = TILE_SUBJECTS + b * stride_tsb + tile * stride_tst
                if PREFETCH_TEXT and SUBJ_LEN <= BLOCK_T:
                    # The next tile's routing heads, arriving during this tile's text branch.
                    count_n, s0_n, owner_n, text_owner_n = _tile_routing(
                        TILE_COUNT, TILE_SUBJECTS, OWNER, TEXT_OWNER, b_m, tile_m, n_tiles, pos_next, pos_next < N,
                        b_m * stride_rb, stride_tcb, stride_tsb, stride_tst, OVERWRITE, HAS_TEXT_SUBJECTS)
                else:
                    # This tile's routing, issued before the text branch so it arrives during it.
                    count, s0, owner, text_owner = _tile_routing(TILE_COUNT, TILE_SUBJECTS, OWNER, TEXT_OWNER, b,
                                                                 tile, n_tiles, pos, m_ok, route, stride_tcb,
                                                                 stride_tsb, stride_tst, OVERWRITE, HAS_TEXT_SUBJECTS)

                # Level 1: the global text branch, never masked by the layout (none on FLUX's IP path).
                # With text-kind subjects it acts only on the tokens no text-kind region covers, and a
                # tile that such regions cover entirely skips it.
                out = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
                if HAS_TEXT:
                    keep = text_owner < 0
                    if TEXT_A > 0:
                        out = _text_branch(q, ka, va, ok_a, kb, vb, ok_b, qk_scale,
                                           HAS_TEXT_MASK or TEXT_LEN < TEXT_A, TEXT_B > 0, DOT_PRECISION)
                    else:
                        out = _attend_online(q, KT + kt_base, VT + vt_base, stride_ktl, stride_ktd, stride_vtl,
                                             stride_vtd, TEXT_LEN, mask_row, stride_ml, qk_scale, offs_d, d_ok,
                                             HAS_TEXT_MASK, BLOCK_M, ONLINE_L, BLOCK_D, DOT_PRECISION)
                    if HAS_TEXT_SUBJECTS:
                        out = tl.where(keep[:, None], out, 0.0)

                # Level 2: only the subjects on this tile's list (usually one, often none).
                if PREFETCH_TEXT and SUBJ_LEN <= BLOCK_T:
                    # This tile's subjects, software-pipelined: while subject j computes, the keys and
                    # weights of subject j + 1 (its index arrived one step ago) and the index of
                    # subject j + 2 are in flight. Subject 0 arrived during the tile before.
                    cover, lam, k, v, t_ok, s_next = cover0, lam0, k0, v0, ok0, s1
                    for j in tl.range(0, count, num_stages=1):
                        # Unconditional (masked off past the tile's last subject): under an ``if`` the
                        # compiler would wait for these loads where the branches merge, before subject j.
                        cover_n, lam_n, k_n, v_n, ok_n = _subject_operands(
                            s_next, j + 1, count, owner, text_owner, COVER, SCALES, SUBJ_TOKENS, KS, VS, b, h, pos,
                            m_ok & (pos * 0 + j + 1 < count), stride_cb, stride_cs, stride_sb, stride_ss, stride_ksb,
                            stride_ksh, stride_kss, stride_kst, stride_ksd, stride_vsb, stride_vsh, stride_vss,
                            stride_vst, stride_vsd, offs_d, d_ok, TEXT_MASK, OVERWRITE, HAS_TEXT_SUBJECTS,
                            HAS_SUBJ_TOKENS, SUBJ_LEN, BLOCK_T, VEC, OFFSETS_32)
                        s_after = tl.load(subjects + j + 2, mask=j + 2 < count, other=0)
                        out = _subject_branch(out, q, k, v, _subject_keys_ok(t_ok, SUBJ_LEN, HAS_SUBJ_TOKENS, BLOCK_T),
                                              _weight(cover, lam, OVERWRITE), qk_scale, MASK_T, DOT_PRECISION)
                        cover, lam, k, v, t_ok, s_next = cover_n, lam_n, k_n, v_n, ok_n, s_after
                else:
                    for j in range(0, count):
                        s = tl.load(subjects + j)
                        cover, lam = _subject_cover(s, owner, text_owner, COVER, SCALES, b, pos, m_ok, stride_cb,
                                                    stride_cs, stride_sb, stride_ss, OVERWRITE, HAS_TEXT_SUBJECTS)
                        weight = _weight(cover, lam, OVERWRITE)
                        s_off = _offset(s, OFFSETS_32)
                        ks_ptr = KS + tl.multiple_of(b * stride_ksb + h * stride_ksh + s_off * stride_kss, VEC)
                        vs_ptr = VS + tl.multiple_of(b * stride_vsb + h * stride_vsh + s_off * stride_vss, VEC)
                        # A subject runs its own n_s keys only: one block of BLOCK_T when T fits it, else
                        # an online softmax over ceil(n_s / BLOCK_T) blocks, so a subject with few keys
                        # beside a long one runs one block.
                        n_s = SUBJ_LEN
                        if HAS_SUBJ_TOKENS:
                            n_s = tl.load(SUBJ_TOKENS + s)
                        if SUBJ_LEN <= BLOCK_T:
                            k, v, t_ok = _load_keys(ks_ptr, vs_ptr, 0, n_s, stride_kst, stride_ksd, stride_vst,
                                                    stride_vsd, offs_d, d_ok, TEXT_MASK, 0, False, BLOCK_T)
                            out = _subject_branch(out, q, k, v, t_ok, weight, qk_scale, MASK_T, DOT_PRECISION)
                        else:
                            z = _attend_online(q, ks_ptr, vs_ptr, stride_kst, stride_ksd, stride_vst, stride_vsd, n_s,
                                               TEXT_MASK, 0, qk_scale, offs_d, d_ok, False, BLOCK_M, BLOCK_T, BLOCK_D,
                                               DOT_PRECISION, SUBJ_LOOP_STAGES)
                            out += weight[:, None] * z

                if PREFETCH_TEXT and SUBJ_LEN <= BLOCK_T:
                    # The next tile's first subject: its weights and keys, in flight during this
                    # tile's store and the next tile's text branch. Issued after this tile's subjects:
                    # loads issued before them would share a scoreboard with the subject keys the loop
                    # stores to shared memory first, which would then wait for these too.
                    cover0_n, lam0_n, k0_n, v0_n, ok0_n = _subject_operands(
                        s0_n, 0, count_n, owner_n, text_owner_n, COVER, SCALES, SUBJ_TOKENS, KS, VS, b_m, h_m,
                        pos_next, (pos_next < N) & (pos_next * 0 + count_n > 0), stride_cb, stride_cs, stride_sb,
                        stride_ss, stride_ksb, stride_ksh, stride_kss, stride_kst, stride_ksd, stride_vsb,
                        stride_vsh, stride_vss, stride_vst, stride_vsd, offs_d, d_ok, TEXT_MASK, OVERWRITE,
                        HAS_TEXT_SUBJECTS, HAS_SUBJ_TOKENS, SUBJ_LEN, BLOCK_T, VEC, OFFSETS_32)
                    # ... and the index of its second, which the tile's count (arrived by now) guards.
                    s1_n = tl.load(TILE_SUBJECTS + b_m * stride_tsb + tile_m * stride_tst + 1, mask=count_n > 1,
                                   other=0)

                o_rows = tl.multiple_of(o_base + tok * stride_on, VEC)
                tl.store(OUT + o_rows[:, None] + offs_d[None, :] * stride_od, out.to(OUT.dtype.element_ty),
                         mask=m_ok[:, None] & d_ok[None, :])
                if PREFETCH_TEXT:
                    q = q_next
                if PREFETCH_TEXT and SUBJ_LEN <= BLOCK_T:
                    count, owner, cover0, lam0, s1 = count_n, owner_n, cover0_n, lam0_n, s1_n
                    k0, v0, ok0 = k0_n, v0_n, ok0_n
                    text_owner = text_owner_n
                tok = tok_next
                tok_next = tok_after

    KERNEL_INTERPRETED = type(_region_attention_fwd).__name__ == "InterpretedFunction"
else:  # pragma: no cover - exercised where triton is missing
    _region_attention_fwd = None
    KERNEL_INTERPRETED = False


# --------------------------------------------------------------- launch configurations
@dataclass(frozen=True)
class KernelConfig:
    block_m: int     # query tokens per tile
    num_warps: int
    num_stages: int
    tiles_per_program: Optional[int] = None   # tiles each program runs; None: split_tiles()
    programs_per_head: int = 0                # with tiles_per_program: G > 0 programs per (batch, head), or
                                              # 0: runs of all (batch, head)s' tiles in a row


# The launcher gives each SM as many programs as can be resident on it at once (read from
# the compiled kernel's registers and shared memory), so the launch is one wave; each program
# runs a run of consecutive tiles (split_tiles), and its prefetch of the next tile hides the
# query gather (benchmarks/kernel_cost.py models this).
INTERPRETER_SLOTS = 8      # under TRITON_INTERPRET: a small pretend GPU, so programs run several tiles
_RESIDENT: dict = {}       # (device, launch constants) -> resident programs per SM


def resident_programs(registers: int, shared: int, num_warps: int, regs_per_sm: int = 65536,
                      smem_per_sm: int = 233472, max_threads: int = 2048, smem_reserved: int = 1024) -> int:
    """Programs of one kernel resident on an SM: registers are allocated 256 per warp at a time,
    the driver reserves 1 KiB of shared memory per program, at most max_threads threads."""
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = (regs_per_sm // per_warp) // num_warps if per_warp else 32
    by_smem = smem_per_sm // (shared + smem_reserved)
    return max(1, min(by_regs, by_smem, max_threads // (32 * num_warps), 32))


def compiled_resources(compiled) -> Optional[Tuple[int, int]]:
    """(registers per thread, shared memory bytes) of a compiled kernel, or None where this triton
    does not expose them. ``n_regs`` is filled when the module is loaded (``_init_handles``, a
    private method of triton's CompiledKernel since 3.0, present in 3.6 and 3.9); without them the
    launcher warns and runs one program per SM, which is correct but leaves latency unhidden."""
    try:
        if getattr(compiled, "n_regs", None) is None:
            compiled._init_handles()      # loads the module: registers are known from then on
        return int(compiled.n_regs), int(compiled.metadata.shared)
    except (AttributeError, TypeError):
        return None


def _resident_slots(device: torch.device, compiled, num_warps: int) -> int:
    """SMs x resident programs of the compiled kernel on ``device``."""
    props = torch.cuda.get_device_properties(device)
    resources = compiled_resources(compiled)
    if resources is None:
        warnings.warn(f"triton {triton.__version__} does not expose the compiled kernel's registers: "
                      f"region attention runs one program per SM (correct, possibly slower)", stacklevel=3)
        return props.multi_processor_count
    per_sm = resident_programs(*resources, num_warps,
                               getattr(props, "regs_per_multiprocessor", 65536),
                               getattr(props, "shared_memory_per_multiprocessor", 233472),
                               getattr(props, "max_threads_per_multi_processor", 2048))
    return props.multi_processor_count * per_sm


def tiles_per_program(total_tiles: int, slots: int) -> int:
    """Tiles each program runs, of all (batch, head)s' tiles in a row: as few as keep the
    programs (ceil(total_tiles / tiles each)) within ``slots``, one wave. A program's run may
    cross from one (batch, head) into the next, so every program but the last runs the same
    number of tiles whatever the number of heads."""
    return max(1, -(-total_tiles // max(1, slots)))


# A run that crosses into another (batch, head) runs a second segment, which stages that one's
# text keys with nothing in flight to hide it: the cost model (benchmarks/kernel_cost.py) finds
# it worth one tile fewer from runs of 4 tiles (SDXL's 64x64 and 128x128 levels on H100 and
# A100), not at 3 (the 32x32 level on an A100: 2.54x the floor against 2.27x within heads).
MIN_CROSSING_RUN = 4


def split_tiles(n_tiles: int, heads: int, slots: int, across: bool = True) -> Tuple[int, int]:
    """(tiles a program runs, programs per (batch, head)) for ``heads`` (batch, head)s of
    ``n_tiles`` tiles each on ``slots`` resident programs: runs of all tiles in a row (programs
    per (batch, head) 0, ``tiles_per_program``) where the kernel variant runs them (``across``:
    ``prefetch_text``) and they are at least MIN_CROSSING_RUN tiles and fewer than runs within
    one (batch, head) would be; else G > 0 programs per (batch, head), each running
    ceil(n_tiles / G) of its tiles."""
    g = max(1, min(n_tiles, slots // max(1, heads)))
    per = -(-n_tiles // g)
    run = tiles_per_program(n_tiles * heads, slots)
    if across and MIN_CROSSING_RUN <= run < per:
        return run, 0
    return per, -(-n_tiles // per)


# Offsets the kernel forms stay within each tensor's extent, plus what a masked-off prefetch
# addresses past it (a tile past the last, a padding key): this margin covers that.
_INT32_MARGIN = 1 << 20


def offsets_fit_int32(*tensors: torch.Tensor) -> bool:
    """Whether every element offset into ``tensors`` (the kernel's address math) fits int32."""
    return all(sum(n * st for n, st in zip(t.shape, t.stride())) + _INT32_MARGIN < 2 ** 31 for t in tensors)


def int32_offsets(head_dim: int, dtype: torch.dtype, *tensors: torch.Tensor) -> bool:
    """32-bit address math (OFFSETS_32) for 16-bit heads up to 64 wide (``prefetch_text``; with it
    float32 heads of 80-128 spill on sm_90) whose offsets fit int32; else 64-bit."""
    return prefetch_text(head_dim, dtype) and offsets_fit_int32(*tensors)


def block_d(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


# A small table keyed by padded head dim and operand width; the heuristic takes the
# first entry, and autotuning (ANYMS_KERNELS_AUTOTUNE=1, CUDA only) times all of them.
# Every entry compiles without register spills for sm_80 and sm_90, with at most 128
# registers a thread where the table says so (two or more programs per SM; tests/kernels/
# test_compile.py, benchmarks/compile_report.py). One table for sm_80 and sm_90: for SDXL's
# heads (64, 16-bit) the cost model (benchmarks/kernel_cost.py) picks 128-token tiles of 8
# warps on both (one program per SM, 167 / 245 registers), over 64 x 4 warps (three / two
# programs per SM), 32 x 4, 64 x 8 and 128 x 4, and over capping registers (spills).
CONFIGS = {
    # (BLOCK_D, 16-bit operands?) -> candidates, the heuristic's choice first
    (32, True): (KernelConfig(64, 4, 2), KernelConfig(128, 8, 2)),
    (64, True): (KernelConfig(128, 8, 2), KernelConfig(64, 4, 2), KernelConfig(32, 4, 2)),
    (128, True): (KernelConfig(64, 8, 2), KernelConfig(32, 4, 2)),
    (256, True): (KernelConfig(32, 8, 2), KernelConfig(16, 4, 2)),
    (32, False): (KernelConfig(32, 4, 2), KernelConfig(16, 4, 2)),
    (64, False): (KernelConfig(16, 4, 2),),
    (128, False): (KernelConfig(16, 8, 2),),
    (256, False): (KernelConfig(16, 8, 2),),
}


def config_candidates(head_dim: int, dtype: torch.dtype) -> Tuple[KernelConfig, ...]:
    return CONFIGS[(block_d(head_dim), dtype != torch.float32)]


def text_blocks(num_text: int, head_dim: int = 64) -> Tuple[int, int]:
    """(TEXT_A, TEXT_B): L keys in one or two static power-of-two blocks (77 -> 64 + 16),
    or (0, 0) for the online path: when L > ONE_PASS_TEXT, and for heads wider than 64,
    whose one-pass score and key blocks would not fit the registers without spilling."""
    if num_text > ONE_PASS_TEXT or block_d(head_dim) > 64:
        return 0, 0
    a = max(16, 1 << (num_text.bit_length() - 1))
    if a >= num_text:
        return a, 0
    rest = num_text - a
    return a, max(16, 1 << (rest - 1).bit_length())


def online_text_block(head_dim: int) -> int:
    """Text keys per step of the online path: 16 for heads wider than 128 (32 spills there)."""
    return 16 if block_d(head_dim) > 128 else 32


def prefetch_text(head_dim: int, dtype: torch.dtype) -> bool:
    """Text keys staged before the first query tile and each next query tile prefetched: for
    16-bit heads up to 64 wide (wider or float32 heads would spill)."""
    return block_d(head_dim) <= 64 and dtype != torch.float32


def subject_block(num_subject_tokens: int) -> int:
    """Keys per subject block: all T in one block when T <= ONE_BLOCK_SUBJECT (tl.dot needs 16)."""
    if num_subject_tokens <= ONE_BLOCK_SUBJECT:
        return max(16, 1 << (num_subject_tokens - 1).bit_length())
    return ONLINE_T


def subject_loop_stages(head_dim: int, counts: bool) -> Optional[int]:
    """Software-pipelining stages of the online subject loop (T > ONE_BLOCK_SUBJECT). With per-subject
    counts its trip count is known only at run time: pipelined, heads up to 64 wide spill (float32,
    sm_90); not pipelined, wider heads do. None: the launch's num_stages, as without counts."""
    return 1 if counts and block_d(head_dim) <= 64 else None


def vector_width(dtype: torch.dtype, *tensors_and_strides) -> int:
    """Elements per 16-byte access that every base pointer and row stride allows (1 if none)."""
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    while vec > 1:
        if all((t.data_ptr() if isinstance(t, torch.Tensor) else t) % (vec if not isinstance(t, torch.Tensor)
                                                                       else vec * t.element_size()) == 0
               for t in tensors_and_strides):
            return vec
        vec //= 2
    return 1


_AUTOTUNED: dict = {}


def _autotune_requested() -> bool:
    return os.environ.get("ANYMS_KERNELS_AUTOTUNE", "0") not in ("", "0")


# ------------------------------------------------------------------------- launcher
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
    if q.dtype == torch.bfloat16 and not q.is_cuda:
        raise TypeError("backend='triton' refuses bfloat16 CPU tensors: the Triton interpreter computes bfloat16 "
                        "dot products wrongly; use float16/float32 under the interpreter, or backend='torch'")
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        raise ValueError(f"backend='triton' supports head dims {TRITON_HEAD_DIMS}, got D={q.shape[-1]}; "
                         "use backend='torch' for other head dims")


def _launch(q, k_text, v_text, k_subj, v_subj, routing: Routing, scales, text_mask, out, softmax_scale,
            cfg: KernelConfig):
    B, H, N, D = q.shape
    S, T = k_subj.shape[2], k_subj.shape[3]
    has_text = k_text is not None
    if not has_text:
        k_text = v_text = q          # never read: HAS_TEXT=False
    L = k_text.shape[2] if has_text else 16
    count, subjects = routing.tiles(cfg.block_m)
    cover = routing.cover_sorted
    if S == 0:
        # Empty tensors may hold a null data pointer, which Triton's launcher can reject;
        # with S = 0 no tile lists a subject, so hand it non-empty stand-ins it never reads.
        k_subj, v_subj = q.unsqueeze(2)[:, :, :, :1], q.unsqueeze(2)[:, :, :, :1]
        scales = torch.zeros(1, 1, dtype=torch.float32, device=q.device).expand(B, 1)   # read at [b, 0]
        subjects = count.unsqueeze(-1)
    elif not offsets_fit_int32(scales):
        # B x S floats whose strides pass int32 (a view of a wide table): compacted, so s * stride_ss
        # stays in int32 and they do not take the whole launch to 64-bit math.
        scales = scales.contiguous()
    if cover is None or cover.numel() == 0:
        cover = routing.owner.unsqueeze(1)   # any pointer will do when unused (overwrite, or S = 0)
    has_mask = text_mask is not None
    mask = text_mask.view(torch.int8) if has_mask else routing.order   # likewise when unused
    mask_strides = mask.stride() if has_mask else (0, 0)
    order, owner = routing.order, routing.owner
    has_kinds = routing.text_owner is not None
    text_owner = routing.text_owner if has_kinds else owner          # any pointer will do when unused
    has_counts = routing.subject_tokens is not None and S > 0
    counts = routing.subject_tokens.to(torch.int32) if has_counts else order   # likewise
    shared = order.shape[0] == 1
    text_a, text_b = text_blocks(L, D)
    vec = vector_width(q.dtype, q, k_text, v_text, k_subj, v_subj, out,  # (k_text is q when there is no text)
                       *q.stride()[:3], *out.stride()[:3], *k_text.stride()[:3], *v_text.stride()[:3],
                       *k_subj.stride()[:4], *v_subj.stride()[:4])
    n_tiles = count.shape[1]
    args = (
        q, k_text, v_text, k_subj, v_subj, out, order, owner, text_owner, cover, count, subjects, scales, counts,
        mask,
        *q.stride(), *k_text.stride(), *v_text.stride(), *k_subj.stride(), *v_subj.stride(), *out.stride(),
        0 if shared else order.stride(0),
        0 if shared else cover.stride(0), cover.stride(1),
        0 if shared else count.stride(0),
        0 if shared else subjects.stride(0), subjects.stride(1),
        *scales.stride(), *mask_strides,
        H, N, n_tiles, B * H * n_tiles)
    qk_scale = softmax_scale * LOG2E
    consts = dict(
        HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=cfg.block_m,
        HAS_TEXT=has_text, TEXT_LEN=L, TEXT_A=text_a, TEXT_B=text_b, ONLINE_L=online_text_block(D), PREFETCH_TEXT=prefetch_text(D, q.dtype),
        SUBJ_LEN=max(T, 1), BLOCK_T=subject_block(max(T, 1)),
        OVERWRITE=(routing.mode == "overwrite"), HAS_TEXT_SUBJECTS=has_kinds, HAS_SUBJ_TOKENS=has_counts,
        SUBJ_LOOP_STAGES=subject_loop_stages(D, has_counts), HAS_TEXT_MASK=has_mask, VEC=vec,
        # every tensor the kernel addresses, the subject scales and token counts too
        OFFSETS_32=int32_offsets(D, q.dtype, *(a for a in args if isinstance(a, torch.Tensor))),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    total = B * H * n_tiles
    per, per_head = cfg.tiles_per_program, cfg.programs_per_head
    across = prefetch_text(D, q.dtype)
    if per is not None and not per_head and not across and n_tiles % per:
        raise ValueError(f"tiles_per_program={per} with programs_per_head=0 makes runs that cross from one "
                         f"(batch, head) into the next, which only 16-bit heads up to 64 wide run; give "
                         f"programs_per_head > 0")
    if per is None:
        if q.is_cuda and not KERNEL_INTERPRETED:
            key = (q.device, q.dtype, vec, tuple(sorted(consts.items())))
            if key not in _RESIDENT:
                compiled = _region_attention_fwd.warmup(*args, 2, 0, qk_scale, grid=(1,), **consts)
                _RESIDENT[key] = _resident_slots(q.device, compiled, cfg.num_warps)
            slots = _RESIDENT[key]
        else:
            slots = INTERPRETER_SLOTS
        per, per_head = split_tiles(n_tiles, B * H, slots, across)
    programs = per_head * B * H if per_head else -(-total // per)
    _region_attention_fwd[(programs,)](*args, per, per_head, qk_scale, **consts)


def pick_config(q, k_text, k_subj, mode, launch=None) -> KernelConfig:
    """The table's first candidate, or (ANYMS_KERNELS_AUTOTUNE=1, CUDA) the fastest, timed once per shape."""
    candidates = config_candidates(q.shape[-1], q.dtype)
    if launch is None or not (_autotune_requested() and q.is_cuda and not KERNEL_INTERPRETED):
        return candidates[0]
    key = (q.shape[-1], q.dtype, q.shape[1], q.shape[2], None if k_text is None else k_text.shape[2],
           tuple(k_subj.shape[2:4]), mode)
    if key not in _AUTOTUNED:
        from triton.testing import do_bench
        times = [do_bench(functools.partial(launch, cfg=c), return_mode="median") for c in candidates]
        _AUTOTUNED[key] = candidates[times.index(min(times))]
    return _AUTOTUNED[key]


def region_attention_triton(q, k_text, v_text, k_subj, v_subj, routing: Routing, scales, text_mask,
                            softmax_scale: float, config: Optional[KernelConfig] = None):
    """Allocate the output in q's layout and launch the fused kernel once."""
    check_triton_supported(q)
    out = _layout.empty_like_layout(q)
    if q.shape[0] == 0 or q.shape[1] == 0 or q.shape[2] == 0:
        return out
    launch = functools.partial(_launch, q, k_text, v_text, k_subj, v_subj, routing, scales, text_mask, out,
                               softmax_scale)
    # Launch on q's device and its current stream, whatever device is current (a tensor on
    # cuda:1 while cuda:0 is current would otherwise run on the wrong device's stream).
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        cfg = config or pick_config(q, k_text, k_subj, routing.mode, launch)
        launch(cfg=cfg)
    return out
