"""benchmarks/bench_pipeline.py --quick: the smoke run CI uses (tiny U-Net, all four variants)."""
from __future__ import annotations

import csv
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_pipeline", os.path.join(ROOT, "benchmarks", "bench_pipeline.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_every_variant(bench, tmp_path):
    out = tmp_path / "pipeline.csv"
    rows = bench.main(["--quick", "--device", "cpu", "--out", str(out)])
    assert [r["variant"] for r in rows] == ["none", "plain", "b0", "anyms"]
    with open(out) as f:
        written = list(csv.DictReader(f))
    assert len(written) == 4
    for r in written:
        assert r["machine"] and r["torch"] and r["commit"] and r["dtype"] == "float32"
        assert float(r["step_s"]) > 0 and int(r["peak_bytes"]) > int(r["peak_extra_bytes"]) > 0
    by = {r["variant"]: r for r in written}
    # Subject weights (to_k_ip / to_v_ip) are part of every IP-Adapter variant's memory.
    assert int(by["plain"]["peak_bytes"]) > int(by["none"]["peak_bytes"])


def test_sdxl_config_is_the_published_one(bench):
    """70 cross-attention layers of head dim 64: 10 on the 1/2 grid, 60 on the 1/4 grid (METHOD.md)."""
    from diffusers import UNet2DConditionModel
    import torch

    with torch.device("meta"):
        unet = UNet2DConditionModel(**bench.SDXL_UNET_CONFIG)
    cross = [unet.get_submodule(n[: -len(".processor")]) for n in unet.attn_processors if n.endswith("attn2.processor")]
    assert len(cross) == 70
    assert {a.inner_dim // a.heads for a in cross} == {64}
    assert sorted({a.heads for a in cross}) == [10, 20]
    assert sum(p.numel() for p in unet.parameters()) == pytest.approx(2.567e9, rel=1e-3)


def test_bad_arguments_are_refused(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--sizes", "100"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--gpu-max-size", "--device", "cpu"])
