"""What only a GPU can show: the kernel at real sizes, bf16, CUDA graphs, autotuning.
Skipped on machines without CUDA (CI); run by benchmarks/gpu/run.sh on a GPU."""
from __future__ import annotations

import pytest
import torch

import anyms_kernels as ak
from anyms_kernels.ops import region_attention as ra
from tests.kernels.helpers import LAYOUTS, assert_matches_reference, make_inputs, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("grid, H", [((64, 64), 10), ((32, 32), 20), ((48, 80), 10)])
@pytest.mark.parametrize("mode", ["overwrite", "sum"])
def test_sdxl_sizes_against_reference(dtype, grid, H, mode):
    boxes = ak.rasterize_boxes(LAYOUTS["five"], grid)
    q, kt, vt, ks, vs = make_inputs(2, H, grid, 64, 77, 5, 16, dtype, "cuda")
    out = ak.region_cross_attention(q, kt, vt, ks, vs, boxes, grid, mode=mode)   # auto -> triton
    args = (q, kt, vt, ks, vs, boxes, grid)
    ref64 = reference(*args, mode=mode)
    same = None if dtype == torch.float32 else reference(*args, mode=mode, dtype=dtype)
    if dtype == torch.float32:
        # ieee dot products in float32: as tight as plain float32 PyTorch
        torch.testing.assert_close(out.double(), ref64, atol=1e-4, rtol=1e-4)
    else:
        assert_matches_reference(out, args, ref64, dtype=dtype, ref_same_dtype=same)


@pytest.mark.parametrize("D", [40, 80, 128, 160])
def test_head_dims_on_gpu(D):
    grid = (32, 32)
    boxes = ak.rasterize_boxes(LAYOUTS["partial_overlap"], grid)
    q, kt, vt, ks, vs = make_inputs(2, 4, grid, D, 77, 3, 4, torch.float16, "cuda")
    out = ak.region_cross_attention(q, kt, vt, ks, vs, boxes, grid, backend="triton")
    args = (q, kt, vt, ks, vs, boxes, grid)
    assert_matches_reference(out, args, reference(*args), dtype=torch.float16,
                             ref_same_dtype=reference(*args, dtype=torch.float16))


@pytest.mark.parametrize("D", [64, 128])
def test_a_tiny_subject_scale_keeps_its_branch(D):
    """The kernel's fast division flushes quotients below 2^-126: a float32 subject scale of 1e-38
    must still give scale x attention (1e-4 here, with values of 1e34), not drop the branch."""
    grid = (8, 8)
    q, kt, vt, ks, vs = make_inputs(1, 2, grid, D, 77, 1, 4, torch.float32, "cuda", seed=3)
    vs = vs * 1e34
    boxes = [[0, 0, 4, 4]]
    out = ak.region_cross_attention(q, kt, vt, ks, vs, boxes, grid, subject_scale=1e-38, backend="triton")
    args = (q, kt, vt, ks, vs, boxes, grid)
    ref64 = reference(*args, subject_scale=1e-38)
    assert (ref64 - reference(*args, subject_scale=0.0)).abs().max() > 1e-4     # the branch is no rounding
    assert_matches_reference(out, args, ref64, dtype=torch.float32)


def test_cuda_graph_capture_and_replay():
    grid = (64, 64)
    q, kt, vt, ks, vs = make_inputs(2, 10, grid, 64, 77, 5, 16, torch.float16, "cuda")
    boxes = ak.rasterize_boxes(LAYOUTS["five"], grid).cuda()
    scale = torch.linspace(0.5, 1.5, 5, device="cuda")
    run = lambda: ak.region_cross_attention(q, kt, vt, ks, vs, boxes, grid, subject_scale=scale)  # noqa: E731
    eager = run()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up (compiles) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    q.normal_()   # new inputs in place: the replay must see them
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, run(), atol=0, rtol=0)
    assert not torch.equal(captured, eager)


def test_triton_matches_torch_backend_at_2048px():
    """A 128x128 grid (2048^2 images): int64 offsets and many tiles."""
    grid = (128, 128)
    boxes = ak.rasterize_boxes(LAYOUTS["partial_overlap"], grid)
    q, kt, vt, ks, vs = make_inputs(2, 10, grid, 64, 77, 3, 16, torch.float16, "cuda")
    a = ak.region_cross_attention(q, kt, vt, ks, vs, boxes, grid, backend="triton")
    b = ak.region_cross_attention(q.float(), kt.float(), vt.float(), ks.float(), vs.float(), boxes, grid,
                                  backend="torch")
    torch.testing.assert_close(a.float(), b, atol=2e-3, rtol=2e-3)


def test_autotune_on_request(monkeypatch):
    monkeypatch.setenv("ANYMS_KERNELS_AUTOTUNE", "1")
    ra._AUTOTUNED.clear()
    grid = (32, 32)
    q, kt, vt, ks, vs = make_inputs(2, 10, grid, 64, 77, 2, 4, torch.float16, "cuda")
    boxes = ak.rasterize_boxes(LAYOUTS["disjoint"][:2], grid)
    out = ak.region_cross_attention(q, kt, vt, ks, vs, boxes, grid)
    assert len(ra._AUTOTUNED) == 1
    chosen = next(iter(ra._AUTOTUNED.values()))
    assert chosen in ra.config_candidates(64, torch.float16)
    args = (q, kt, vt, ks, vs, boxes, grid)
    assert_matches_reference(out, args, reference(*args), dtype=torch.float16,
                             ref_same_dtype=reference(*args, dtype=torch.float16))


@pytest.mark.parametrize("mode", ["overwrite", "sum"])
def test_cuda_graph_capture_with_a_routing_from_masks(mode):
    """The pipeline's path: a Routing built once (here from masks), the op captured and replayed."""
    grid = (64, 64)
    ys, xs = torch.meshgrid(torch.arange(512), torch.arange(512), indexing="ij")
    masks = torch.stack([((ys - 200) ** 2 + (xs - 180) ** 2) < 150 ** 2, (xs > 250) & (ys < 400)])
    routing = ak.build_routing(ak.rasterize_masks(masks, grid).cuda(), grid, mode)
    q, kt, vt, ks, vs = make_inputs(2, 10, grid, 64, 77, 2, 16, torch.bfloat16, "cuda")
    run = lambda: ak.region_cross_attention(q, kt, vt, ks, vs, routing, grid, mode=mode)  # noqa: E731
    eager = run()
    args = (q, kt, vt, ks, vs, routing.cover.view(1, 2, *grid).cpu(), grid)
    assert_matches_reference(eager, args, reference(*args, mode=mode), dtype=torch.bfloat16,
                             ref_same_dtype=reference(*args, mode=mode, dtype=torch.bfloat16))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    q.normal_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, run(), atol=0, rtol=0)


def test_flushed_timer_times_each_call_after_an_l2_flush():
    """The sweep's default CUDA timer: one event pair per call, the flush outside them."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "bench_region_attention.py")
    spec = importlib.util.spec_from_file_location("bench_region_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.L2_FLUSH_BYTES >= 4 * torch.cuda.get_device_properties(0).L2_cache_size
    x = torch.randn(1 << 22, device="cuda")
    y = torch.empty_like(x)
    med, mn = bench.time_flushed(lambda: y.copy_(x), reps=20)
    assert 0 < mn <= med
    med_ms, _, calls, timer = bench.time_cuda(lambda: y.copy_(x), "flush")
    assert calls == 50 and timer == "events-L2-flushed" and med_ms > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mode", ["overwrite", "sum"])
@pytest.mark.parametrize("D, H", [(64, 10), (128, 4)])
def test_regional_prompts_and_mixed_adapters_at_real_sizes(dtype, mode, D, H):
    """Image subjects of 4 and 16 tokens beside two 77-token regional prompts (text-kind), one op
    call at SDXL's 64x64 level (and FLUX's head dim), against the float64 reference."""
    grid = (64, 64)
    boxes = ak.rasterize_boxes(LAYOUTS["five"], grid)
    kinds, counts = [False, True, False, True, False], [4, 77, 16, 60, 4]
    q, kt, vt, ks, vs = make_inputs(2, H, grid, D, 77, 5, 77, dtype, "cuda")
    routing = ak.build_routing(boxes.cuda(), grid, mode, replaces_text=kinds, subject_tokens=counts)
    scale = torch.tensor([0.8, 1.0, 1.2, 0.5, 1.0])
    out = ak.region_cross_attention(q, kt, vt, ks, vs, routing, grid, mode=mode, subject_scale=scale.cuda())
    args = (q, kt, vt, ks, vs, boxes, grid)
    kw = dict(mode=mode, subject_scale=scale, replaces_text=kinds, subject_tokens=counts)
    assert_matches_reference(out, args, reference(*args, **kw), dtype=dtype,
                             ref_same_dtype=reference(*args, **kw, dtype=dtype))


def test_default_kinds_and_counts_change_nothing_on_gpu():
    """Counts of T and all-image kinds: the kernel's other variant, the same output (the text
    branch and each subject run the same operations in both)."""
    grid = (64, 64)
    boxes = ak.rasterize_boxes(LAYOUTS["five"], grid).cuda()
    q, kt, vt, ks, vs = make_inputs(2, 10, grid, 64, 77, 5, 16, torch.float16, "cuda")
    plain = ak.region_cross_attention(q, kt, vt, ks, vs, boxes, grid)
    both = ak.region_cross_attention(q, kt, vt, ks, vs, boxes, grid, replaces_text=[False] * 5,
                                     subject_tokens=[16] * 5)
    torch.testing.assert_close(both, plain, atol=1e-3, rtol=1e-3)


def test_cuda_graph_capture_with_kinds_and_counts():
    grid = (32, 32)
    q, kt, vt, ks, vs = make_inputs(2, 20, grid, 64, 77, 3, 77, torch.float16, "cuda")
    routing = ak.build_routing(ak.rasterize_boxes(LAYOUTS["partial_overlap"], grid).cuda(), grid,
                               replaces_text=[True, False, False], subject_tokens=[77, 4, 16])
    run = lambda: ak.region_cross_attention(q, kt, vt, ks, vs, routing, grid)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    q.normal_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, run(), atol=0, rtol=0)
