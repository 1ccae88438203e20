"""benchmarks/bench_region_attention.py: the targets are judged on real runs only, not on --quick smoke runs."""
from __future__ import annotations

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_region_attention", os.path.join(ROOT, "benchmarks", "bench_region_attention.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _row(peer, ms, S=5, layout="disjoint"):
    return dict(grid="64x64", S=S, T=16, dtype="float32", B=2, H=10, D=64, L=77, layout=layout, peer=peer,
                median_ms=ms, min_ms=ms, peak_over_out="2.0", check_ok="1")


def test_targets_are_judged_on_real_runs_and_not_on_smoke_runs():
    bench = _bench()
    rows = [_row("ours", 10.0), _row("B0", 11.0), _row("B3", 4.0)]      # misses every CPU target
    judged = bench.targets(rows, "cpu")
    assert sum(line.startswith("MISSED") for line in judged) == 3
    smoke = bench.targets(rows, "cpu", judge=False)
    assert smoke[0].startswith("smoke run (--quick")
    assert not any(line.startswith(("MET", "MISSED")) for line in smoke)
    assert sum(line.startswith("smoke   ") for line in smoke) == 3
