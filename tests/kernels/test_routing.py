"""Regions as masks, and the routing every backend reads: properties over random layouts,
the op with masks against the float64 reference, and the contracts around them
(inference mode, empty batches, grad, guards)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import anyms_kernels as ak
from anyms_kernels.ops import region_attention as ra
from anyms_kernels.regions import box_cover, coverage_count, token_owner
from tests.conftest import DEVICES
from tests.kernels.helpers import LAYOUTS, assert_matches_reference, make_inputs, reference

BACKENDS = ["torch", "triton", "reference"]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def _skip_unless_runnable(backend, device):
    if backend == "triton" and ra.triton_runnable(torch.empty(0, device=device)) is not None:
        pytest.skip(f"triton cannot run on {device} here")


@st.composite
def pixel_rects(draw):
    """An image size, a grid no larger than it, and S pixel rectangles [x0, x1) x [y0, y1)."""
    H = draw(st.integers(4, 70))
    W = draw(st.integers(4, 70))
    h = draw(st.integers(1, H))
    w = draw(st.integers(1, W))
    rects = []
    for _ in range(draw(st.integers(1, 5))):
        x0 = draw(st.integers(0, W - 1))
        y0 = draw(st.integers(0, H - 1))
        rects.append((x0, y0, draw(st.integers(x0 + 1, W)), draw(st.integers(y0 + 1, H))))
    return (H, W), (h, w), rects


def _rect_masks(size, rects):
    H, W = size
    masks = torch.zeros(len(rects), H, W, dtype=torch.bool)
    for m, (x0, y0, x1, y1) in zip(masks, rects):
        m[y0:y1, x0:x1] = True
    return masks


# ------------------------------------------------------------------------- masks
@settings(max_examples=300, **SETTINGS)
@given(pixel_rects())
def test_rectangular_mask_covers_exactly_its_box(case):
    """The mask rule and the box rule agree on every rectangle, image size and grid
    (including grids that do not divide the image)."""
    size, grid, rects = case
    H, W = size
    boxes = [[x0 / W, y0 / H, x1 / W, y1 / H] for x0, y0, x1, y1 in rects]
    from_masks = ak.rasterize_masks(_rect_masks(size, rects), grid).flatten(1)
    from_boxes = torch.stack([box_cover(b, grid) for b in ak.rasterize_boxes(boxes, grid).tolist()])
    assert torch.equal(from_masks, from_boxes)


@settings(max_examples=100, **SETTINGS)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 5), st.integers(1, 5), st.data())
def test_mask_cell_rule_against_brute_force(h, w, fy, fx, data):
    """A token is covered iff some mask pixel lies in its cell (brute force on exact fractions)."""
    H, W = h * fy + data.draw(st.integers(0, 3)), w * fx + data.draw(st.integers(0, 3))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    mask = torch.rand(H, W, generator=g) < data.draw(st.sampled_from([0.01, 0.1, 0.5]))
    got = ak.rasterize_masks(mask[None], (h, w))[0]
    for i in range(h):
        for j in range(w):
            # pixel p meets cell j when p < (j + 1) W / w and p + 1 > j W / w (cross-multiplied: exact).
            rows = [p for p in range(H) if p * h < (i + 1) * H and (p + 1) * h > i * H]
            cols = [p for p in range(W) if p * w < (j + 1) * W and (p + 1) * w > j * W]
            assert bool(got[i, j]) == bool(mask[rows][:, cols].any()), (i, j)


def test_mask_inputs_and_errors():
    grid = (4, 4)
    m = torch.zeros(1, 8, 8)
    m[0, 2:4, 2:4] = 1.0
    import numpy as np
    assert torch.equal(ak.rasterize_masks(m.numpy(), grid), ak.rasterize_masks(m > 0, grid))
    assert torch.equal(ak.rasterize_masks(np.asarray(m.tolist()), grid), ak.rasterize_masks(m > 0, grid))
    assert ak.mask_bbox(m[0]) == (0.25, 0.25, 0.5, 0.5)
    with pytest.raises(ValueError, match="masks must have shape"):
        ak.rasterize_masks(torch.ones(8, 8), grid)
    with pytest.raises(ValueError, match="smaller than the 4x4 token grid"):
        ak.rasterize_masks(torch.ones(1, 2, 8), grid)
    with pytest.raises(ValueError, match="NaN"):
        ak.rasterize_masks(torch.full((1, 8, 8), float("nan")), grid)
    with pytest.raises(TypeError, match="masks must hold bools or real numbers"):
        ak.rasterize_masks(torch.ones(1, 8, 8, dtype=torch.complex64), grid)
    with pytest.raises(ValueError, match="mask is empty"):
        ak.mask_bbox(torch.zeros(8, 8))


# ----------------------------------------------------------------------- routing
@st.composite
def token_layouts(draw):
    h, w = draw(st.integers(1, 17)), draw(st.integers(1, 17))
    S = draw(st.integers(0, 9))
    boxes = []
    for _ in range(S):
        x0, y0 = draw(st.integers(0, w - 1)), draw(st.integers(0, h - 1))
        boxes.append([x0, y0, draw(st.integers(x0 + 1, w)), draw(st.integers(y0 + 1, h))])
    return (h, w), torch.tensor(boxes, dtype=torch.int32).reshape(S, 4)


@settings(max_examples=200, **SETTINGS)
@given(token_layouts(), st.sampled_from(["overwrite", "sum"]), st.sampled_from([16, 32, 64]))
def test_routing_invariants(layout, mode, block_m):
    """The sorted order is a permutation; owners are the priority rule; every tile lists
    exactly the subjects acting on its tokens, ascending, each once."""
    grid, boxes = layout
    S, N = boxes.shape[0], grid[0] * grid[1]
    r = ak.build_routing(boxes, grid, mode)
    order = r.order[0].long()
    assert torch.equal(order.sort().values, torch.arange(N))
    cover = torch.stack([box_cover(b, grid) for b in boxes.tolist()]) if S else torch.zeros(0, N, dtype=torch.bool)
    assert torch.equal(r.cover[0], cover)
    if mode == "overwrite":
        assert torch.equal(r.owner[0].long(), token_owner(boxes, grid)[order])
        assert torch.equal(r.owner[0], r.owner[0].sort().values), "tokens are grouped by owner"
    else:
        assert torch.equal(r.cover_sorted[0].bool(), cover[:, order])
    count, subjects = r.tiles(block_m)
    for t in range(count.shape[1]):
        tok = order[t * block_m:(t + 1) * block_m]
        if mode == "overwrite":
            acting = sorted(set(token_owner(boxes, grid)[tok].tolist()) - {-1})
        else:
            acting = [s for s in range(S) if cover[s, tok].any()]
        listed = subjects[0, t, :count[0, t]].tolist()
        assert listed == acting, (t, listed, acting)


@pytest.mark.parametrize("layout", ["disjoint", "overlap"])
@pytest.mark.parametrize("mode", ["overwrite", "sum"])
@pytest.mark.parametrize("S", [2, 5, 32])
def test_routing_lists_each_group_on_the_fewest_tiles(layout, mode, S):
    """The point of sorting: the tokens sharing an acting set ("group") are consecutive, so a
    group of g tokens is listed on at most ceil(g / block_m) + 1 tiles; the work per tile then
    depends on how many groups there are per tile, not on S (the cost model prices it)."""
    from benchmarks.bench_region_attention import LAYOUTS as BENCH_LAYOUTS
    grid, block_m = (64, 64), 64
    tok = torch.tensor(BENCH_LAYOUTS[layout](S, grid), dtype=torch.int32)
    r = ak.build_routing(tok, grid, mode)
    count, _ = r.tiles(block_m)
    if mode == "overwrite":
        sizes = torch.bincount(r.owner[0].long() + 1)[1:]
        members = torch.ones_like(sizes)
    else:
        keys, sizes = torch.unique(r.cover[0].T, dim=0, return_counts=True)
        members = keys.sum(1)
    bound = sum(int(m) * (-(-int(g) // block_m) + 1) for m, g in zip(members, sizes) if g > 0 and m > 0)
    assert int(count.sum()) <= bound


def test_routing_built_under_inference_mode_serves_grad_mode():
    """A Layout's routing is often first built inside inference_mode; its tensors must be
    ordinary ones, usable (and not stale) in later no-grad and grad-mode calls."""
    grid = (6, 7)
    boxes = ak.rasterize_boxes(LAYOUTS["partial_overlap"], grid)
    with torch.inference_mode():
        routing = ak.build_routing(boxes, grid)
        routing.tiles(64)
        routing.work_list()
    for t in (routing.cover, routing.order, routing.owner, *routing.tiles(64)):
        assert not t.is_inference()
    q, kt, vt, ks, vs = make_inputs(1, 2, grid, 64, 77, 3, 4)
    expected = reference(q, kt, vt, ks, vs, boxes, grid)
    for backend in ("torch", "reference"):
        with torch.no_grad():
            out = ak.region_cross_attention(q, kt, vt, ks, vs, routing, grid, backend=backend)
        torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)
        with torch.inference_mode():
            out = ak.region_cross_attention(q, kt, vt, ks, vs, routing, grid, backend=backend)
        torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------ the op on masks
def _blob_masks(S, size, seed):
    """S irregular masks: discs and rings at random places, some overlapping."""
    g = torch.Generator().manual_seed(seed)
    H, W = size
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    masks = []
    for _ in range(S):
        cy, cx = torch.rand(2, generator=g) * torch.tensor([H, W])
        r = (0.15 + 0.3 * torch.rand(1, generator=g)) * min(H, W)
        d = ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt()
        ring = torch.rand(1, generator=g) < 0.5
        masks.append((d < r) & ~(ring & (d < r / 2)))
    return torch.stack(masks)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["overwrite", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_masks_against_reference(device, backend, mode, dtype):
    _skip_unless_runnable(backend, device)
    grid = (11, 13)
    cover = ak.rasterize_masks(_blob_masks(4, (88, 104), seed=5), grid)
    q, kt, vt, ks, vs = make_inputs(2, 2, grid, 64, 77, 4, 16, dtype, device)
    out = ak.region_cross_attention(q, kt, vt, ks, vs, cover.to(device), grid, mode=mode, subject_scale=0.7,
                                    backend=backend)
    args = (q.cpu(), kt.cpu(), vt.cpu(), ks.cpu(), vs.cpu())
    ref64 = _reference_cover(*args, cover, grid, mode, 0.7, torch.float64)
    same = None if dtype == torch.float32 else _reference_cover(*args, cover, grid, mode, 0.7, dtype)
    assert_matches_reference(out, args, ref64, dtype=dtype, ref_same_dtype=same)


def _reference_cover(q, kt, vt, ks, vs, cover, grid, mode, scale, dtype):
    from anyms_kernels.reference import region_cross_attention_reference
    B, S = q.shape[0], ks.shape[2]
    c = lambda t: t.to(dtype)  # noqa: E731
    return region_cross_attention_reference(c(q), c(kt), c(vt), c(ks), c(vs), cover.expand(B, *cover.shape), grid,
                                            mode=mode, subject_scale=torch.full((B, S), scale, dtype=dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["overwrite", "sum"])
def test_rectangular_mask_gives_its_box_bit_for_bit(device, backend, mode):
    """Boxes, their rectangular masks' coverage maps and a prebuilt Routing: identical outputs."""
    _skip_unless_runnable(backend, device)
    grid, size = (9, 12), (72, 96)
    rects = [(0, 0, 40, 30), (30, 20, 96, 60), (10, 50, 70, 72)]
    boxes = [[x0 / size[1], y0 / size[0], x1 / size[1], y1 / size[0]] for x0, y0, x1, y1 in rects]
    q, kt, vt, ks, vs = make_inputs(2, 2, grid, 64, 77, 3, 4, torch.float32, device)
    tok = ak.rasterize_boxes(boxes, grid)
    cover = ak.rasterize_masks(_rect_masks(size, rects), grid)
    outs = [ak.region_cross_attention(q, kt, vt, ks, vs, regions, grid, mode=mode, backend=backend)
            for regions in (tok, cover.to(device), ak.build_routing(tok.to(device), grid, mode))]
    for other in outs[1:]:
        assert torch.equal(outs[0], other)


def test_routing_must_match_the_call():
    grid = (4, 5)
    q, kt, vt, ks, vs = make_inputs(1, 1, grid, 64, 8, 2, 4)
    tok = ak.rasterize_boxes(LAYOUTS["disjoint"][:2], grid)
    with pytest.raises(ValueError, match="mode='sum'"):
        ak.region_cross_attention(q, kt, vt, ks, vs, ak.build_routing(tok, grid, "overwrite"), grid, mode="sum")
    with pytest.raises(ValueError, match="grid"):
        ak.region_cross_attention(q, kt, vt, ks, vs, ak.build_routing(tok, (5, 4)), grid)
    with pytest.raises(ValueError, match="S=2"):
        ak.region_cross_attention(q, kt, vt, ks, vs, ak.build_routing(tok[:1], grid), grid)
    with pytest.raises(ValueError, match="coverage map"):
        ak.region_cross_attention(q, kt, vt, ks, vs, torch.ones(2, 5, 4, dtype=torch.bool), grid)


# --------------------------------------------------------------------- contracts
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["overwrite", "sum"])
def test_empty_batch(backend, mode):
    _skip_unless_runnable(backend, "cpu")
    grid = (3, 4)
    q, kt, vt, ks, vs = make_inputs(0, 2, grid, 64, 77, 2, 4)
    out = ak.region_cross_attention(q, kt, vt, ks, vs, ak.rasterize_boxes(LAYOUTS["disjoint"][:2], grid), grid,
                                    mode=mode, backend=backend)
    assert out.shape == q.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_that_require_grad_are_refused(backend):
    grid = (3, 4)
    q, kt, vt, ks, vs = make_inputs(1, 1, grid, 64, 8, 1, 4)
    tok = ak.rasterize_boxes([[0, 0, 1, 1]], grid)
    with pytest.raises(RuntimeError, match="forward only"):
        ak.region_cross_attention(q.requires_grad_(), kt, vt, ks, vs, tok, grid, backend=backend)
    with torch.no_grad():   # inference use of the same tensors is fine
        ak.region_cross_attention(q, kt, vt, ks, vs, tok, grid, backend=backend)


@pytest.mark.parametrize("backend", ["triton"])   # the torch path is never captured: the host checks always run
def test_fully_masked_text_row_gives_zero_text_not_nan(backend):
    """The host refuses a fully masked text row, but skips its value checks during CUDA-graph
    capture; the kernel must then write the subjects' part and zero text, never NaN."""
    _skip_unless_runnable(backend, "cpu")
    grid = (4, 4)
    q, kt, vt, ks, vs = make_inputs(2, 1, grid, 64, 20, 1, 4)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1] = False
    routing = ak.build_routing(ak.rasterize_boxes([[0, 0, 0.5, 1]], grid), grid)
    scales = torch.ones(2, 1)
    out = ra._run(q, kt, vt, ks, vs, routing, scales, mask, None, "overwrite", 0.125, backend)
    assert not torch.isnan(out).any()
    full = ak.region_cross_attention(q[:1], kt[:1], vt[:1], ks[:1], vs[:1], routing, grid, backend=backend)
    torch.testing.assert_close(out[:1], full, atol=2e-5, rtol=2e-5)
    text_free = out[1, :, routing.cover[0, 0]]
    assert text_free.abs().sum() > 0 and torch.isfinite(text_free).all()
    assert torch.equal(out[1, :, ~routing.cover[0, 0]], torch.zeros_like(out[1, :, ~routing.cover[0, 0]]))


def test_triton_refuses_bf16_under_the_interpreter():
    if ra.triton_runnable(torch.empty(0)) is not None:
        pytest.skip("triton cannot run CPU tensors here")
    grid = (2, 2)
    q, kt, vt, ks, vs = make_inputs(1, 1, grid, 64, 8, 1, 4, torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        ak.region_cross_attention(q, kt, vt, ks, vs, [[0, 0, 1, 1]], grid, backend="triton")


def test_coverage_count_and_owner_of_cover_agree():
    grid = (8, 8)
    tok = ak.rasterize_boxes(LAYOUTS["five"], grid)
    r = ak.build_routing(tok, grid, "sum")
    assert torch.equal(r.cover[0].sum(0), coverage_count(tok, grid))


# ------------------------------------------------------------- no text branch (FLUX)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["overwrite", "sum"])
@pytest.mark.parametrize("D", [64, 128])
def test_no_text_branch_is_the_routed_subjects_only(device, backend, mode, D):
    """k_text=None: FLUX's IP path. Tokens outside every region get exactly 0."""
    _skip_unless_runnable(backend, device)
    grid = (7, 9)
    q, kt, vt, ks, vs = make_inputs(2, 2, grid, D, 77, 3, 16, torch.float32, device)
    tok = ak.rasterize_boxes(LAYOUTS["partial_overlap"], grid)
    out = ak.region_cross_attention(q, None, None, ks, vs, tok, grid, mode=mode, subject_scale=0.6, backend=backend)
    with_text = reference(q.cpu(), kt.cpu(), vt.cpu(), ks.cpu(), vs.cpu(), tok, grid, mode=mode, subject_scale=0.6)
    text = reference(q.cpu(), kt.cpu(), vt.cpu(), ks[:, :, :0].cpu(), vs[:, :, :0].cpu(), tok[:0], grid)
    torch.testing.assert_close(out.cpu().double(), with_text - text, atol=2e-5, rtol=2e-5)
    outside = coverage_count(tok, grid) == 0
    assert torch.equal(out[:, :, outside.to(device)], torch.zeros_like(out[:, :, outside.to(device)]))


def test_no_text_branch_errors():
    grid = (2, 2)
    q, kt, vt, ks, vs = make_inputs(1, 1, grid, 64, 8, 1, 4)
    with pytest.raises(ValueError, match="both be tensors, or both None"):
        ak.region_cross_attention(q, kt, None, ks, vs, [[0, 0, 1, 1]], grid)
    with pytest.raises(ValueError, match="no text branch to mask"):
        ak.region_cross_attention(q, None, None, ks, vs, [[0, 0, 1, 1]], grid,
                                  text_mask=torch.ones(1, 8, dtype=torch.bool))


# ------------------------------------------------------------- numbers at the edges
@pytest.mark.parametrize("scale", [float("inf"), -float("inf"), 1e39, float("nan")])
def test_subject_scales_that_are_not_finite_in_float32_are_refused(scale):
    grid = (2, 2)
    q, kt, vt, ks, vs = make_inputs(1, 1, grid, 64, 8, 1, 4)
    with pytest.raises(ValueError, match="subject_scale"):
        ak.region_cross_attention(q, kt, vt, ks, vs, [[0, 0, 1, 1]], grid, subject_scale=scale)
    with pytest.raises(ValueError, match="subject_scale"):
        ak.region_cross_attention(q, kt, vt, ks, vs, [[0, 0, 1, 1]], grid,
                                  subject_scale=torch.tensor([scale], dtype=torch.float64))


def test_float64_scales_stay_float64_for_a_float64_call():
    grid = (2, 2)
    q, kt, vt, ks, vs = make_inputs(1, 1, grid, 64, 8, 1, 4, torch.float64)
    ak.region_cross_attention(q, kt, vt, ks, vs, [[0, 0, 1, 1]], grid, subject_scale=1e39, backend="reference")


def test_softmax_scale_overflowing_float32_is_refused():
    grid = (2, 2)
    q, kt, vt, ks, vs = make_inputs(1, 1, grid, 64, 8, 1, 4)
    with pytest.raises(ValueError, match="softmax_scale"):
        ak.region_cross_attention(q, kt, vt, ks, vs, [[0, 0, 1, 1]], grid, softmax_scale=1e39)


@pytest.mark.parametrize("bad", [[[0, 0, 0.5, 1.0]], [[None, 0, 1, 1]], [[True, 0, 1, 1]], [[1j, 0, 1, 1]]])
def test_box_lists_of_floats_none_bool_complex_are_refused(bad):
    grid = (2, 2)
    q, kt, vt, ks, vs = make_inputs(1, 1, grid, 64, 8, 1, 4)
    with pytest.raises(TypeError, match="boxes|regions"):
        ak.region_cross_attention(q, kt, vt, ks, vs, bad, grid)


@pytest.mark.parametrize("bad", [[[None, 0, 1, 1]], [[True, 0, 1, 1]], [[1j, 0, 1, 1]]])
def test_rasterize_boxes_refuses_none_bool_complex(bad):
    with pytest.raises(TypeError, match="boxes"):
        ak.rasterize_boxes(bad, (4, 4))


def test_masks_of_every_integer_dtype_and_expanded_subjects():
    import numpy as np
    grid = (4, 4)
    m = np.zeros((1, 8, 8), dtype=np.uint16)
    m[0, 2:4, 2:4] = 40000
    expected = ak.rasterize_masks(m > 0, grid)
    for dtype in (np.uint16, np.uint32, np.uint64, np.int8, np.float32):
        assert torch.equal(ak.rasterize_masks(m.astype(dtype), grid), expected)
    assert torch.equal(ak.rasterize_masks(torch.from_numpy(m.astype(np.int32)), grid), expected)
    with pytest.raises(ValueError, match="subjects\\[2\\].mask is empty"):
        ak.mask_bbox(np.zeros((8, 8)), "subjects[2].mask")
    # A stride-0 subject dimension is S subjects, not a shared batch.
    cover = expected[0].expand(3, 4, 4)
    assert ak.build_routing(cover, grid).num_subjects == 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_text_and_subject_kv_as_views_of_fused_projections(device, backend):
    """k and v sliced out of one fused projection (text [B, L, 2, H, D], subjects [B, S, T, 2, H, D]):
    non-dense strided views, read in place."""
    _skip_unless_runnable(backend, device)
    B, H, D, L, S, T, grid = 2, 2, 40, 77, 3, 4, (5, 6)
    g = torch.Generator().manual_seed(7)
    q, _, _, _, _ = make_inputs(B, H, grid, D, L, S, T, torch.float16, device)
    kv_text = torch.randn(B, L, 2, H, D, generator=g).to(device, torch.float16)
    kv_subj = torch.randn(B, S, T, 2, H, D, generator=g).to(device, torch.float16)
    kt, vt = kv_text[:, :, 0].transpose(1, 2), kv_text[:, :, 1].transpose(1, 2)
    ks, vs = (kv_subj[:, :, :, i].permute(0, 3, 1, 2, 4) for i in (0, 1))
    tok = ak.rasterize_boxes(LAYOUTS["partial_overlap"], grid)
    out = ak.region_cross_attention(q, kt, vt, ks, vs, tok, grid, backend=backend)
    args = (q.cpu(), kt.cpu(), vt.cpu(), ks.cpu(), vs.cpu(), tok, grid)
    assert_matches_reference(out, args, reference(*args), dtype=torch.float16,
                             ref_same_dtype=reference(*args, dtype=torch.float16))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launch_follows_the_tensors_device():
    grid = (4, 4)
    q, kt, vt, ks, vs = make_inputs(1, 1, grid, 64, 8, 1, 4, torch.float16, "cuda:1")
    tok = ak.rasterize_boxes([[0, 0, 1, 1]], grid)
    with torch.cuda.device(0):
        out = ak.region_cross_attention(q, kt, vt, ks, vs, tok, grid, backend="triton")
    expected = ak.region_cross_attention(q, kt, vt, ks, vs, tok, grid, backend="torch")
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)


def test_routing_has_the_tiles_of_every_kernel_block_size_built():
    """A compiled call takes a Routing's tile lists as they are: every BLOCK_M of the Triton
    launch table must be one the Routing builds with the rest, never inside a graph."""
    from anyms_kernels.ops.region_attention import CONFIGS
    from anyms_kernels.routing import TILE_SIZES

    assert {c.block_m for candidates in CONFIGS.values() for c in candidates} <= set(TILE_SIZES)


@pytest.mark.parametrize("mode", ["overwrite", "sum"])
def test_routing_from_its_parts_is_the_same_routing(mode):
    grid = (6, 7)
    r = ak.build_routing(ak.rasterize_boxes(LAYOUTS["partial_overlap"], grid), grid, mode)
    again = ak.Routing.from_parts(r.cover, r.parts(), grid, mode)
    assert (again.grid, again.mode, again.batch, again.num_subjects) == (r.grid, r.mode, r.batch, r.num_subjects)
    for a, b in zip(again.parts(), r.parts()):
        assert a is b
    for block_m in (16, 24, 128):
        assert all(torch.equal(x, y) for x, y in zip(again.tiles(block_m), r.tiles(block_m)))
    work = [[(s, idx.tolist()) for s, idx in routing.work_list()[0]] for routing in (again, r)]
    assert work[0] == work[1]
