"""benchmarks/bench_flux.py: the --quick smoke run, FLUX.1-dev's block shapes, and B0 against AnyMS."""
from __future__ import annotations

import csv
import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_flux", os.path.join(ROOT, "benchmarks", "bench_flux.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_every_variant(bench, tmp_path):
    out = tmp_path / "flux.csv"
    assert bench.main(["--quick", "--threads", "1", "--rounds", "1", "--ip-rounds", "2", "--subjects", "2", "3",
                       "--out", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    variants = [("plain", 1), ("anyms", 2), ("masked", 2), ("anyms", 3), ("masked", 3)]
    assert [(r["part"], r["variant"], int(r["subjects"])) for r in rows] == (
        [("step", "none", 0)] + [("step", *v) for v in variants] + [("ip_term", *v) for v in variants])
    for r in rows:
        assert r["machine"] and r["commit"] and r["dtype"] == "float32" and r["grid"] == "8x8" and r["clock"] == "cpu"
        assert float(r["step_s"]) > 0 and int(r["peak_bytes"]) > int(r["peak_extra_bytes"]) > 0
    assert float(rows[1]["ratio_vs_plain"]) == 1.0 and float(rows[6]["est_step_ratio"]) == 1.0
    summary = (tmp_path / "flux_summary.txt").read_text()
    assert "target AnyMS <= 1.05x plain" in summary and "target flat in S" in summary
    assert "the same from the IP term timed alone" in summary
    # a smoke run at tiny widths judges no target: its ratios say nothing about FLUX.1
    assert "not judged: smoke run" in summary and " met" not in summary.replace("NOT met", "") \
        and "NOT met" not in summary


def test_full_width_blocks_are_flux_dev(bench):
    """FLUX.1-dev's double block: 24 heads of 128, width 3072; its IP projections take 4096-d tokens."""
    with torch.device("meta"):
        from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

        shape = bench.FLUX_DEV
        d = FluxTransformerBlock(shape["dim"], shape["heads"], shape["head_dim"])
        s = FluxSingleTransformerBlock(shape["dim"], shape["heads"], shape["head_dim"])
    assert d.attn.heads == 24 and d.attn.head_dim == 128
    # 19 double + 38 single blocks of these sizes make FLUX.1-dev's 11.9 B parameters
    total = 19 * sum(p.numel() for p in d.parameters()) + 38 * sum(p.numel() for p in s.parameters())
    assert total == pytest.approx(11.9e9, rel=0.01)
    assert sum(shape["axes"]) == shape["head_dim"]
    boxes = bench.strip_boxes(10)
    assert len(boxes) == 10 and boxes[0][0] == 0.0 and boxes[-1][2] == 1.0
    assert all(b[2] > n[0] for b, n in zip(boxes, boxes[1:]))          # neighbours overlap


def test_masked_sum_baseline_is_the_masked_sum(bench):
    """B0's IP term is the sum of every subject's full attention times its (resized) mask: with
    masks made at the token grid's own size the resize is exact, so B0 equals AnyMS's sum mode."""
    from anyms.flux import AnyMSFluxAttnProcessor, flux_layout

    shape = dict(bench.QUICK)
    procs = bench.ip_processors(shape, 1, torch.device("cpu"), torch.float32)
    boxes = bench.strip_boxes(3)
    layout = flux_layout(boxes, 128, 128, scales=[0.5, 1.0, 1.5], mode="sum")
    b0 = bench.masked_sum_processor_class().from_ip_adapter_processor(procs[0], layout)
    b0.masks = bench.box_masks(boxes, 8, "cpu", torch.float32)        # 8x8: the token grid itself
    ours = AnyMSFluxAttnProcessor.from_ip_adapter_processor(procs[0], layout)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 64, shape["heads"], shape["head_dim"], generator=g)
    images = torch.randn(1, 3, bench.IP_TOKENS, shape["joint_dim"], generator=g)
    with torch.no_grad():
        expected = bench.anyms_ip_term(ours, q, images)
        got = bench.anyms_ip_term(b0, q, images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
