"""The Triton kernel's programs run several query tiles each (strided over the tiles of
their (batch, head)), with the next tile's query rows and indices prefetched: every split
of the tiles into programs gives bit-identical outputs (each tile runs the same operations
whichever program runs it), equal to the float64 reference within the dtype's tolerance."""
from __future__ import annotations

import pytest
import torch

import anyms_kernels as ak
from anyms_kernels.ops import region_attention_triton as rt
from anyms_kernels.routing import build_routing
from tests.kernels.helpers import LAYOUTS, assert_matches_reference, make_inputs, reference


def _skip_without_triton():
    reason = rt.triton_runnable(torch.empty(0))
    if reason:
        pytest.skip(reason)


def _run(q, kt, vt, ks, vs, tok, grid, mode, dtype, per_head):
    routing = build_routing(tok, grid, mode)
    base = rt.config_candidates(q.shape[-1], dtype)[0]
    cfg = rt.KernelConfig(base.block_m, base.num_warps, base.num_stages, programs_per_head=per_head)
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
    outs = {g: _run(q, kt, vt, ks, vs, tok, grid, mode, dtype, g) for g in sorted({1, 2, 3, n_tiles})}
    first = outs[1]
    for g, out in outs.items():
        assert torch.equal(out, first), f"{g} programs per head differ from 1"
    if has_text:        # (text-less calls against the reference: tests/kernels/test_routing.py)
        ref64 = reference(q, kt, vt, ks, vs, tok, grid, mode=mode, subject_scale=0.75)
        same = reference(q, kt, vt, ks, vs, tok, grid, mode=mode, subject_scale=0.75, dtype=dtype)
        assert_matches_reference(first, None, ref64, dtype=dtype, ref_same_dtype=same)


def test_programs_per_head_fills_the_gpu_and_covers_every_tile():
    # SDXL's 32x32 level at 20 heads, B=2, on 132 SMs: 16 tiles of 64 per (batch, head), 40 of them
    assert rt.programs_per_head(16, 40, 396) == 8           # 396 slots / 40 heads: 9 -> 2 tiles each -> 8 programs
    # the 64x64 level at 10 heads on 132 SMs x 3: 64 tiles, 20 (batch, head): 19 -> 4 tiles each -> 16
    assert rt.programs_per_head(64, 20, 396) == 16
    for n, heads, slots in ((64, 20, 396), (143, 3, 8), (5, 7, 100), (1000, 1, 216)):
        g = rt.programs_per_head(n, heads, slots)
        per = -(-n // g)
        assert 1 <= g <= n and per * g >= n and (g * heads <= slots or g == 1)
    assert rt.programs_per_head(1, 1, 132) == 1 and rt.programs_per_head(7, 1000, 132) == 1


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
