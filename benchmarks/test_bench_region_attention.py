"""pytest-benchmark suite: region cross-attention and its peers on small CPU shapes.

    pytest benchmarks/ --benchmark-only                       # all
    pytest benchmarks/ --benchmark-only -k "S8"               # one group
    pytest benchmarks/ --benchmark-only --benchmark-group-by=param:case

Same peers and inputs as ``bench_region_attention.py`` (see its docstring), at
shapes small enough for a laptop: fp32, B=2, H=2, D=64, L=77, T=16, a 32x32 grid,
S = 2 and 8, disjoint and overlapping layouts. For the full sweep, the ratios and
the memory figures, run the script. This file measures; tests/ checks behaviour.
"""
import pytest
import torch

import bench_region_attention as br

PEERS = ("B0", "B2", "B3", "crop", "ours", "ours_sum")
CASES = {
    f"32x32-S{S}-T16-{layout}": br.Case((32, 32), S, 16, layout, torch.float32, "cpu", B=2, H=2)
    for S in (2, 8) for layout in ("disjoint", "overlap")
}
_INPUTS = {}


def _inputs(name):
    if name not in _INPUTS:
        _INPUTS[name] = br.make_inputs(CASES[name])
    return _INPUTS[name]


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_region_attention(benchmark, case, peer):
    if peer == "B0":
        pytest.importorskip("diffusers")
    fn = br.MAKERS[peer](CASES[case], _inputs(case))
    benchmark.group = case
    benchmark.extra_info.update(peer=peer, torch=torch.__version__, threads=torch.get_num_threads())
    out = benchmark(fn)
    assert out.numel() == CASES[case].B * CASES[case].H * CASES[case].N * CASES[case].D
