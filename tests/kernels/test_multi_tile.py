"""The Triton kernel's programs run several query tiles each (a run of all (batch, head)s'
tiles in a row, which may cross from one (batch, head) into the next), with the next tile's
query rows and indices prefetched: every split of the tiles into programs gives bit-identical
outputs (each tile runs the same operations whichever program runs it), equal to the float64
reference within the dtype's tolerance."""
from __future__ import annotations

import pytest
import torch

import anyms_kernels as ak
from anyms_kernels.ops import region_attention_triton as rt
from anyms_kernels.routing import build_routing
from tests.kernels.helpers import LAYOUTS, assert_matches_reference, make_inputs, reference, run_python


def _skip_without_triton():
    reason = rt.triton_runnable(torch.empty(0))
    if reason:
        pytest.skip(reason)


def _run(q, kt, vt, ks, vs, tok, grid, mode, dtype, per, per_head=0):
    routing = build_routing(tok, grid, mode)
    base = rt.config_candidates(q.shape[-1], dtype)[0]
    cfg = rt.KernelConfig(base.block_m, base.num_warps, base.num_stages, tiles_per_program=per,
                          programs_per_head=per_head)
    scales = torch.full((q.shape[0], ks.shape[2]), 0.75, dtype=torch.float32)
    return rt.region_attention_triton(q, kt, vt, ks, vs, routing, scales, None, q.shape[-1] ** -0.5, config=cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["overwrite", "sum"])
@pytest.mark.parametrize("has_text", [True, False])
def test_every_split_of_tiles_into_programs_gives_the_same_output(dtype, mode, has_text):
    _skip_without_triton()
    grid = (13, 11)                       # 143 tokens: a partial last tile, tile counts that are not powers of 2
    q, kt, vt, ks, vs = make_inputs(B=2, H=3, grid=grid, D=32, L=20, S=3, T=4, dtype=dtype)
    if not has_text:
        kt = vt = None
    tok = ak.rasterize_boxes(torch.tensor(LAYOUTS["partial_overlap"], dtype=torch.float64), grid)
    n_tiles = -(-grid[0] * grid[1] // rt.config_candidates(32, dtype)[0].block_m)
    # Runs within one (batch, head): 2 tiles each (the last one shorter), or all of them. Runs of
    # all tiles in a row (16-bit heads up to 64 wide): 2 and 4 tiles a program start inside a
    # (batch, head) and end in the next one (n_tiles is 3 or 5, by the dtype's tile); 6 * n_tiles:
    # one program for every tile. float32 heads refuse runs that cross.
    assert n_tiles % 2 and n_tiles % 4
    splits = [(1, 0), (2, -(-n_tiles // 2)), (n_tiles, 1)]
    if rt.prefetch_text(q.shape[-1], dtype):
        splits += [(2, 0), (4, 0), (2 * 3 * n_tiles, 0)]
    else:
        with pytest.raises(ValueError, match=r"^tiles_per_program=2 with programs_per_head=0 makes runs that cross"):
            _run(q, kt, vt, ks, vs, tok, grid, mode, dtype, 2, 0)
    outs = {split: _run(q, kt, vt, ks, vs, tok, grid, mode, dtype, *split) for split in splits}
    first = outs[(1, 0)]
    for split, out in outs.items():
        assert torch.equal(out, first), f"(tiles a program, programs per head) = {split} differ from one tile each"
    if has_text:        # (text-less calls against the reference: tests/kernels/test_routing.py)
        ref64 = reference(q, kt, vt, ks, vs, tok, grid, mode=mode, subject_scale=0.75)
        same = reference(q, kt, vt, ks, vs, tok, grid, mode=mode, subject_scale=0.75, dtype=dtype)
        assert_matches_reference(first, None, ref64, dtype=dtype, ref_same_dtype=same)


@pytest.mark.parametrize("mode", ["overwrite", "sum"])
def test_runs_across_heads_with_text_kinds_token_counts_and_a_text_mask(mode):
    """The prefetch of the next tile's routing, text owners, first subject's weights, token count
    and keys follows a run into the next (batch, head) with text-kind subjects, per-subject token
    counts, a text mask and a routing per batch too: every split is bit-identical, and matches the
    reference."""
    _skip_without_triton()
    grid, dtype = (13, 11), torch.float16
    q, kt, vt, ks, vs = make_inputs(B=2, H=3, grid=grid, D=32, L=20, S=3, T=8, dtype=dtype)
    layouts = torch.tensor([LAYOUTS["partial_overlap"], LAYOUTS["nested"]], dtype=torch.float64)
    tok = ak.rasterize_boxes(layouts, grid)          # [B, S, 4]: each batch its own routing
    kinds, counts = [True, False, True], [3, 8, 1]
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 7:] = False
    scales = torch.tensor([[0.75, 1.2, 0.3], [0.5, 0.9, 1.1]])
    routing = build_routing(tok, grid, mode, replaces_text=kinds, subject_tokens=counts)
    base = rt.config_candidates(32, dtype)[0]
    n_tiles = -(-grid[0] * grid[1] // base.block_m)
    outs = {}
    for split in ((1, 0), (2, 0), (4, 0), (n_tiles, 1)):    # 2 and 4 tiles a program cross (batch, head)s
        cfg = rt.KernelConfig(base.block_m, base.num_warps, base.num_stages, *split)
        outs[split] = rt.region_attention_triton(q, kt, vt, ks, vs, routing, scales, mask, 32 ** -0.5, config=cfg)
    for split, out in outs.items():
        assert torch.equal(out, outs[(1, 0)]), f"(tiles a program, programs per head) = {split} differ"
    args = dict(mode=mode, subject_scale=scales.double(), text_mask=mask, replaces_text=kinds, subject_tokens=counts)
    assert_matches_reference(outs[(1, 0)], None, reference(q, kt, vt, ks, vs, tok, grid, **args), dtype=dtype,
                             ref_same_dtype=reference(q, kt, vt, ks, vs, tok, grid, dtype=dtype, **args))


def test_tiles_per_program_fills_the_gpu_in_one_wave_and_covers_every_tile():
    # SDXL's 64x64 level at 10 heads, B=2, on 132 SMs x 1: 32 tiles of 128 per (batch, head), 640
    # in all: 5 a program, 128 programs (runs per (batch, head) alone would take 6: ceil(32 / 6))
    assert rt.tiles_per_program(640, 132) == 5
    assert rt.tiles_per_program(320, 132) == 3                # the 32x32 level at 20 heads
    for total, slots in ((640, 132), (143, 8), (5, 100), (1000, 216), (7000, 132)):
        per = rt.tiles_per_program(total, slots)
        programs = -(-total // per)
        assert per >= 1 and programs <= slots and programs * per >= total and (programs - 1) * per < total
    assert rt.tiles_per_program(1, 132) == 1 and rt.tiles_per_program(7, 0) == 7


def test_split_tiles_crosses_heads_only_for_runs_of_min_crossing_run_tiles_that_save_one():
    assert rt.MIN_CROSSING_RUN == 4
    assert rt.split_tiles(32, 20, 132) == (5, 0)          # 64x64, 10 heads, H100: 5 across, 6 within
    assert rt.split_tiles(8, 40, 132) == (3, 3)           # 32x32, 20 heads, H100: 3 within as across
    assert rt.split_tiles(8, 40, 108) == (4, 2)           # 32x32, 20 heads, A100: 3 across is too short
    assert rt.split_tiles(128, 20, 132) == (20, 0)        # 128x128, 10 heads
    assert rt.split_tiles(3, 6, 8) == (3, 1)              # the interpreter's small pretend GPU
    assert rt.split_tiles(32, 20, 132, across=False) == (6, 6)   # wide or float32 heads: within heads
    for n, heads, slots in ((32, 20, 132), (8, 40, 108), (143, 3, 8), (5, 7, 100), (1000, 1, 216), (7, 1000, 132)):
        per, g = rt.split_tiles(n, heads, slots)
        if g:       # G programs per (batch, head) cover its tiles, the last one possibly shorter
            assert per * g >= n > per * (g - 1) and (g * heads <= slots or g == 1)
        else:       # runs across heads: one wave, MIN_CROSSING_RUN tiles at least
            assert per >= rt.MIN_CROSSING_RUN and -(-n * heads // per) <= slots


def test_resident_programs_counts_registers_shared_memory_and_threads():
    # 138 registers x 128 threads: 4608 per warp (256-register units), 65536 / 4608 = 14 warps -> 3 programs
    assert rt.resident_programs(138, 32768, 4) == 3
    assert rt.resident_programs(174, 32768, 4) == 2            # 5632 per warp: 11 warps -> 2 programs
    assert rt.resident_programs(40, 100_000, 4, smem_per_sm=233472) == 2   # shared memory limits
    assert rt.resident_programs(16, 0, 8) == 8                 # 2048 threads / 256
    assert rt.resident_programs(255, 0, 8) == 1                # never 0: a program always runs


def test_compiled_resources_reads_registers_or_says_it_cannot():
    from types import SimpleNamespace

    loaded = SimpleNamespace(n_regs=168, metadata=SimpleNamespace(shared=24576))
    assert rt.compiled_resources(loaded) == (168, 24576)
    calls = []
    lazy = SimpleNamespace(n_regs=None, metadata=SimpleNamespace(shared=1024))
    lazy._init_handles = lambda: (calls.append(1), setattr(lazy, "n_regs", 96))
    assert rt.compiled_resources(lazy) == (96, 1024) and calls == [1]
    assert rt.compiled_resources(SimpleNamespace()) is None       # another triton: the launcher warns


def test_this_triton_has_the_private_hook_the_launcher_reads():
    # compiled_resources relies on CompiledKernel._init_handles / n_regs (triton 3.0 to 3.9)
    triton = pytest.importorskip("triton")
    from triton.compiler import CompiledKernel

    assert hasattr(CompiledKernel, "_init_handles"), triton.__version__


@pytest.mark.parametrize("mode", ["overwrite", "sum"])
def test_64_bit_address_math_gives_the_output_of_32_bit(mode, monkeypatch):
    """Inputs whose offsets overflow int32 take the kernel's 64-bit address math (OFFSETS_32 off),
    as float32 and wide heads always do: the same operations on the same values, so the output is
    bit for bit the 32-bit one's."""
    _skip_without_triton()
    grid = (13, 11)
    q, kt, vt, ks, vs = make_inputs(B=2, H=3, grid=grid, D=32, L=20, S=3, T=4, dtype=torch.float16)
    tok = ak.rasterize_boxes(torch.tensor(LAYOUTS["partial_overlap"], dtype=torch.float64), grid)
    assert rt.int32_offsets(32, torch.float16, q, kt, ks)
    assert not rt.int32_offsets(32, torch.float32, q.float(), kt.float(), ks.float())   # 64-bit: spills otherwise
    narrow = _run(q, kt, vt, ks, vs, tok, grid, mode, torch.float16, 2)
    monkeypatch.setattr(rt, "offsets_fit_int32", lambda *tensors: False)
    wide = _run(q, kt, vt, ks, vs, tok, grid, mode, torch.float16, 2)
    assert torch.equal(narrow, wide)


# Subject keys and values 2^30 elements apart per subject, and scales 2^30 elements apart: the
# third subject's offsets pass 2^31, so the launch takes the 64-bit math. One buffer of 8 GiB
# of address space holds them all; only the few rows written are ever touched.
_PAST_INT32 = """
import sys, torch
import anyms_kernels as ak
from anyms_kernels.ops import region_attention_triton as rt
from tests.kernels.helpers import assert_matches_reference, reference
D = int(sys.argv[1])
B, H, S, T, L, grid, dtype = 1, 1, 3, 4, 16, (4, 4), torch.float16
g = torch.Generator().manual_seed(0)
rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)
q, kt, vt = rnd(B, H, 16, D), rnd(B, H, L, D), rnd(B, H, L, D)
try:
    words = torch.empty(2 ** 31 + 2 ** 22, dtype=torch.float32)   # address space: untouched pages cost nothing
except RuntimeError as exc:
    print("SKIP", exc)
    sys.exit(0)
halves = words.view(dtype)
for s in range(S):
    halves[s * 2 ** 30: s * 2 ** 30 + 2 * T * D] = rnd(2 * T * D)
    words[2 ** 21 + s * 2 ** 30] = 0.5 + s
ks = halves.as_strided((B, H, S, T, D), (0, 0, 2 ** 30, D, 1))
vs = halves.as_strided((B, H, S, T, D), (0, 0, 2 ** 30, D, 1), T * D)
scales = words.as_strided((B, S), (0, 2 ** 30), 2 ** 21)
assert not rt.offsets_fit_int32(ks) and not rt.offsets_fit_int32(scales)
boxes = ak.rasterize_boxes([[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], [0, 0.5, 1, 1]], grid)
for mode in ("overwrite", "sum"):
    out = ak.region_cross_attention(q, kt, vt, ks, vs, boxes, grid, mode=mode, subject_scale=scales,
                                    backend="triton")
    args = dict(mode=mode, subject_scale=scales.double())
    assert_matches_reference(out, None, reference(q, kt, vt, ks, vs, boxes, grid, **args), dtype=dtype,
                             ref_same_dtype=reference(q, kt, vt, ks, vs, boxes, grid, dtype=dtype, **args))
print("OK")
"""


@pytest.mark.parametrize("head_dim", [32, 128])     # the narrow heads' prefetching path, the wide heads'
def test_64_bit_address_math_reaches_subjects_past_int32(head_dim):
    """With 64-bit offsets, a subject index times the subject stride (keys, values, scales) is
    formed in 64 bits too: in 32 bits the third subject's address wrapped, and its loads read
    2^31 elements before the keys. Runs in a fresh process, as a wrapped load may crash it."""
    _skip_without_triton()
    r = run_python(_PAST_INT32, str(head_dim), env={"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, f"exit status {r.returncode}\n{r.stderr[-3000:]}"
    if r.stdout.startswith("SKIP"):
        pytest.skip(f"no 8 GiB of address space here: {r.stdout.strip()}")
    assert r.stdout.strip().endswith("OK"), r.stdout


def test_offsets_fit_int32_reads_each_tensors_extent():
    """The extent is sum(size x stride) (one past every dimension), with a margin for masked-off
    prefetches past it; a view's extent follows its strides, not its element count."""
    small = torch.empty(2, 10, 4096, 64)
    assert rt.offsets_fit_int32(small, small[:, :, ::2])
    big = torch.empty_strided((2, 3), (2 ** 30, 1), device="meta")       # strides reaching 2^31 elements
    assert not rt.offsets_fit_int32(small, big)
    limit = 2 ** 31 - (1 << 20)                                             # the margin: 2^20 elements
    assert rt.offsets_fit_int32(torch.empty_strided((1, limit - 1), (0, 1), device="meta"))
    assert not rt.offsets_fit_int32(torch.empty_strided((1, limit), (0, 1), device="meta"))


def test_every_tensor_the_kernel_addresses_counts_for_int32_offsets(monkeypatch):
    """32-bit address math only where every tensor the launch hands the kernel fits int32, the
    subject scales too: they are addressed as b * stride + s * stride like the rest. A [B, S]
    view whose strides reach past int32 (a column of a wide table) is compacted (B x S floats),
    so it neither wraps nor takes the launch to 64-bit math. (A meta view: no storage of 2^31
    elements; the kernel is not run, its launch is recorded.)"""
    _skip_without_triton()
    grid = (4, 4)
    q, kt, vt, ks, vs = make_inputs(B=2, H=1, grid=grid, D=32, L=16, S=2, T=4, dtype=torch.float16)
    routing = build_routing(ak.rasterize_boxes([[0, 0, 0.5, 1], [0.5, 0, 1, 1]], grid), grid, "overwrite")
    names = rt._region_attention_fwd.arg_names
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **consts: launches.append((dict(zip(names, args)), consts["OFFSETS_32"]))

    monkeypatch.setattr(rt, "_region_attention_fwd", Recorder())
    small = torch.full((2, 2), 0.75)
    wide = torch.empty_strided((2, 2), (2 ** 30, 1), device="meta")
    for scales in (small, wide):
        rt.region_attention_triton(q, kt, vt, ks, vs, routing, scales, None, 32 ** -0.5)
    for args, offsets_32 in launches:
        assert offsets_32 == rt.offsets_fit_int32(*(a for a in args.values() if isinstance(a, torch.Tensor)))
    assert [offsets_32 for _, offsets_32 in launches] == [True, True]
    assert launches[1][0]["SCALES"].stride() == (2, 1)


def test_subject_scales_hold_a_value_for_every_batch_without_subjects(monkeypatch):
    """With S = 0 no tile lists a subject, but the narrow heads' prefetch still reads
    SCALES[b, 0] (unmasked, weighted by nothing) for the batch of every tile: the launcher's
    stand-in must hold that element for every b, not read past a one-element tensor."""
    _skip_without_triton()
    grid = (4, 4)
    q, kt, vt, ks, vs = make_inputs(B=3, H=1, grid=grid, D=32, L=16, S=0, T=4, dtype=torch.float16)
    routing = build_routing(torch.zeros(0, 4, dtype=torch.int64), grid, "overwrite")
    names = rt._region_attention_fwd.arg_names
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **consts: launches.append(dict(zip(names, args)))

    monkeypatch.setattr(rt, "_region_attention_fwd", Recorder())
    rt.region_attention_triton(q, kt, vt, ks, vs, routing, torch.zeros(3, 0), None, 32 ** -0.5)
    (args,) = launches
    scales = args["SCALES"]
    elements = scales.untyped_storage().nbytes() // scales.element_size() - scales.storage_offset()
    assert (q.shape[0] - 1) * args["stride_sb"] < elements, (scales.shape, scales.stride())
