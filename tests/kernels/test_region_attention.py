"""Every backend of region_cross_attention against the float64 reference, and the
reference against the literal crop-and-merge loop of METHOD.md."""
from __future__ import annotations

import math

import pytest
import torch

import anyms_kernels as ak
from anyms_kernels.ops import _layout
from anyms_kernels.ops import region_attention as ra
from tests.conftest import DEVICES
from tests.kernels.helpers import LAYOUTS, assert_matches_reference, make_inputs, reference

BACKENDS = ["torch", "triton", "reference"]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every output buffer the op allocates starts as NaN, so unwritten rows fail."""
    real = _layout.empty_like_layout

    def poisoned(q):
        return real(q).fill_(float("nan"))

    monkeypatch.setattr(_layout, "empty_like_layout", poisoned)


def _device_ok(backend, device):
    if backend == "triton" and ra.triton_runnable(torch.empty(0, device=device)) is not None:
        pytest.skip(f"triton cannot run on {device} here: {ra.triton_runnable(torch.empty(0, device=device))}")


def assert_same_layout(out, q):
    """Same memory layout as q (strides of size-1 dims carry no layout and are ignored)."""
    keep = [i for i in range(q.dim()) if q.shape[i] > 1]
    assert [out.stride(i) for i in keep] == [q.stride(i) for i in keep], \
        f"output strides {out.stride()} do not keep q's layout {q.stride()}"


def _run_and_check(backend, device, dtype, layout_boxes, grid, mode, *, S=None, T=4, D=64, B=2, H=2, L=77,
                   subject_scale=1.0, text_mask=None, per_batch=False, seed=0):
    _device_ok(backend, device)
    boxes_n = torch.tensor(layout_boxes, dtype=torch.float64).reshape(-1, 4)
    S = boxes_n.shape[0] if S is None else S
    q, kt, vt, ks, vs = make_inputs(B, H, grid, D, L, S, T, dtype, device, seed)
    if per_batch:
        # Each batch row gets its own layout: the second one mirrored left-right.
        mirrored = boxes_n[:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1.0]) + torch.tensor([1, 0, 1, 0.0])
        boxes_n = torch.stack([boxes_n, mirrored] + [boxes_n] * (B - 2))
    tok = ak.rasterize_boxes(boxes_n, grid) if S else torch.zeros((0, 4), dtype=torch.int32)
    if isinstance(subject_scale, torch.Tensor):
        subject_scale = subject_scale.to(device)
    tm = None if text_mask is None else text_mask.to(device)
    out = ak.region_cross_attention(q, kt, vt, ks, vs, tok, grid, mode=mode, subject_scale=subject_scale,
                                    text_mask=tm, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert_same_layout(out, q)
    scale_ref = subject_scale.cpu() if isinstance(subject_scale, torch.Tensor) else subject_scale
    args = (q.cpu(), kt.cpu(), vt.cpu(), ks.cpu(), vs.cpu(), tok, grid)
    kw = dict(mode=mode, subject_scale=scale_ref, text_mask=text_mask)
    ref64 = reference(*args, **kw)
    same = None if dtype in (torch.float32, torch.float64) else reference(*args, **kw, dtype=dtype)
    assert_matches_reference(out, args, ref64, dtype=dtype, ref_same_dtype=same)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("mode", ["overwrite", "sum"])
def test_layouts_against_reference(device, backend, dtype, layout, mode):
    _run_and_check(backend, device, dtype, LAYOUTS[layout], (13, 21), mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["overwrite", "sum"])
def test_per_batch_boxes_scales_and_text_mask(device, backend, mode):
    B, L = 3, 77
    text_mask = torch.rand(B, L, generator=torch.Generator().manual_seed(1)) > 0.3
    text_mask[:, 0] = True
    text_mask[1, 40:] = False   # a whole 32-key block masked for one row
    scale = torch.tensor([[1.0, 0.5, 2.0], [0.3, 1.2, 0.0], [-0.5, 1.0, 0.7]])
    _run_and_check(backend, device, torch.float32, LAYOUTS["partial_overlap"], (9, 16), mode, B=B,
                   subject_scale=scale, text_mask=text_mask, per_batch=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_subject_scale_vector(device, backend):
    scale = torch.tensor([0.25, 1.5, 0.75])
    _run_and_check(backend, device, torch.float32, LAYOUTS["nested"], (7, 11), "overwrite", subject_scale=scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["overwrite", "sum"])
def test_many_subjects(device, backend, mode):
    """S = 64 random boxes, many overlapping: routing and skipping stay exact."""
    g = torch.Generator().manual_seed(3)
    xy0 = torch.rand(64, 2, generator=g) * 0.8
    wh = torch.rand(64, 2, generator=g) * 0.4 + 0.02
    boxes = torch.cat([xy0, (xy0 + wh).clamp(max=1.0)], 1)
    _run_and_check(backend, device, torch.float32, boxes.tolist(), (12, 10), mode, H=1, B=1, L=20)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("T", [16, 257])
def test_subject_token_counts(device, backend, T):
    """16 tokens (IP-Adapter plus) and 257 (a full ViT-H sequence: several key blocks)."""
    _run_and_check(backend, device, torch.float32, LAYOUTS["partial_overlap"], (8, 9), "overwrite", T=T, H=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("D", [40, 80, 128, 160])
def test_head_dims(device, backend, D):
    """SD 1.5 (40, 80, 160) and FLUX (128) head dims; 40/80/160 are not powers of two."""
    _run_and_check(backend, device, torch.float16, LAYOUTS["disjoint"], (6, 10), "overwrite", D=D, H=1, T=16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_scale(device, backend):
    _device_ok(backend, device)
    grid = (5, 7)
    q, kt, vt, ks, vs = make_inputs(1, 2, grid, 64, 10, 2, 4, torch.float32, device)
    tok = ak.rasterize_boxes([[0, 0, 0.6, 0.6], [0.4, 0.4, 1, 1]], grid)
    out = ak.region_cross_attention(q, kt, vt, ks, vs, tok, grid, softmax_scale=0.05, backend=backend)
    ref = reference(q.cpu(), kt.cpu(), vt.cpu(), ks.cpu(), vs.cpu(), tok, grid, softmax_scale=0.05)
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------- the method's equations
def literal_crop_and_merge(q, k_text, v_text, k_subj, v_subj, boxes, grid, scales):
    """METHOD.md, Level 2, written with grid slicing: Z_image[box_s] = lambda_s * attn(Q[box_s], K_s, V_s)."""
    B, H, N, D = q.shape
    h, w = grid

    def attn(qq, k, v):
        return torch.softmax(qq @ k.transpose(-1, -2) / math.sqrt(D), -1) @ v

    z_image = torch.zeros(B, H, h, w, D, dtype=q.dtype)
    q_grid = q.reshape(B, H, h, w, D)
    for s, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        q_s = q_grid[:, :, y0:y1, x0:x1].reshape(B, H, -1, D)
        z_s = attn(q_s, k_subj[:, :, s], v_subj[:, :, s])
        z_image[:, :, y0:y1, x0:x1] = scales[s] * z_s.reshape(B, H, y1 - y0, x1 - x0, D)
    return attn(q, k_text, v_text) + z_image.reshape(B, H, N, D)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["five", "nested", "partial_overlap", "border"])
def test_overwrite_is_literal_crop_and_merge(backend, layout):
    _device_ok(backend, "cpu")
    grid = (11, 14)
    boxes_n = LAYOUTS[layout]
    q, kt, vt, ks, vs = make_inputs(2, 2, grid, 64, 77, len(boxes_n), 16, torch.float64)
    tok = ak.rasterize_boxes(boxes_n, grid)
    scales = torch.linspace(0.5, 1.5, len(boxes_n), dtype=torch.float64)
    expected = literal_crop_and_merge(q, kt, vt, ks, vs, tok, grid, scales)
    if backend == "triton":  # no float64 in the kernel: run it in float32
        q, kt, vt, ks, vs = (t.float() for t in (q, kt, vt, ks, vs))
    out = ak.region_cross_attention(q, kt, vt, ks, vs, tok, grid, mode="overwrite", subject_scale=scales.to(q.dtype),
                                    backend=backend)
    tol = 1e-10 if out.dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_sum_is_masked_sum_and_differs_only_on_overlaps():
    """Eq. 7 with dense masks; overwrite and sum agree exactly where at most one box covers a token."""
    grid = (10, 12)
    boxes_n = LAYOUTS["partial_overlap"]
    q, kt, vt, ks, vs = make_inputs(1, 2, grid, 64, 77, 3, 4, torch.float64)
    tok = ak.rasterize_boxes(boxes_n, grid)
    out_sum = ak.region_cross_attention(q, kt, vt, ks, vs, tok, grid, mode="sum", backend="torch")
    out_ow = ak.region_cross_attention(q, kt, vt, ks, vs, tok, grid, mode="overwrite", backend="torch")

    def attn(k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / 8.0, -1) @ v

    masks = [torch.zeros(grid, dtype=torch.float64) for _ in boxes_n]
    for m, (x0, y0, x1, y1) in zip(masks, tok.tolist()):
        m[y0:y1, x0:x1] = 1
    expected = attn(kt, vt) + sum(m.reshape(1, 1, -1, 1) * attn(ks[:, :, s], vs[:, :, s]) for s, m in enumerate(masks))
    torch.testing.assert_close(out_sum, expected, atol=1e-10, rtol=1e-10)
    count = ak.coverage_count(tok, grid)
    single = count <= 1
    torch.testing.assert_close(out_sum[:, :, single], out_ow[:, :, single], atol=1e-12, rtol=1e-12)
    assert (out_sum[:, :, ~single] - out_ow[:, :, ~single]).abs().amin(dim=-1).gt(0).all(), \
        "overlapping tokens must differ between the modes"


# ---------------------------------------------------------------- layouts and memory
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_subjects_is_text_attention(backend):
    _device_ok(backend, "cpu")
    grid = (4, 6)
    q, kt, vt, ks, vs = make_inputs(2, 3, grid, 64, 77, 0, 4, torch.float32)
    out = ak.region_cross_attention(q, kt, vt, ks, vs, torch.zeros(0, 4, dtype=torch.int32), grid, backend=backend)
    expected = torch.nn.functional.scaled_dot_product_attention(q, kt, vt)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_keeps_layout_of_fused_projection_slice(backend):
    """q sliced out of a fused [B, N, 3, H, D] projection (not dense): the output is laid
    out as [B, N, H, D], so reshaping back to [B, N, H*D] is a view."""
    _device_ok(backend, "cpu")
    B, H, D, grid = 2, 2, 64, (6, 7)
    N = grid[0] * grid[1]
    qkv = torch.randn(B, N, 3, H, D)
    q = qkv[:, :, 0].transpose(1, 2)
    _, kt, vt, ks, vs = make_inputs(B, H, grid, D, 77, 2, 4, torch.float32)
    tok = ak.rasterize_boxes(LAYOUTS["disjoint"][:2], grid)
    out = ak.region_cross_attention(q, kt, vt, ks, vs, tok, grid, backend=backend)
    flat = out.transpose(1, 2).view(B, N, H * D)   # .view raises if a copy were needed
    torch.testing.assert_close(flat, out.transpose(1, 2).reshape(B, N, H * D))
    ref = reference(q, kt, vt, ks, vs, tok, grid)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_auto_picks_torch_on_cpu():
    assert ra.resolve_backend("auto", torch.empty(1, 1, 1, 64)) == "torch"


def test_torch_backend_routing_cache_is_per_layout():
    """The routing cache must key on the boxes: two layouts on one grid give different outputs."""
    grid = (6, 6)
    q, kt, vt, ks, vs = make_inputs(1, 1, grid, 64, 8, 1, 4, torch.float64)
    a = ak.rasterize_boxes([[0, 0, 0.5, 0.5]], grid)
    b = ak.rasterize_boxes([[0.5, 0.5, 1, 1]], grid)
    for tok in (a, b, a):
        out = ak.region_cross_attention(q, kt, vt, ks, vs, tok, grid, backend="torch")
        torch.testing.assert_close(out, reference(q, kt, vt, ks, vs, tok, grid), atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------- NaN queries
# An 8x8 grid: A covers the left half, B the top right, C overlaps both; 20 tokens (x 4..7,
# y 3..7) are covered by none. Sorted by owner, the uncovered tokens fill the first tile of
# 16 (no subject acts on it) and share the second with covered ones.
NAN_GRID = (8, 8)
NAN_BOXES = [[0, 0, 4, 8], [4, 0, 8, 3], [2, 1, 6, 2]]
NAN_TOKENS = {"uncovered, alone in its tile": 3 * 8 + 4, "uncovered, beside covered tokens": 63,
              "covered by one": 5 * 8 + 1, "covered by two": 1 * 8 + 3}


def _op_call(*args, **kwargs):
    return ak.region_cross_attention(*args, **kwargs)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("text", [7, 77, 0], ids=["text of 7", "text of 77", "no-text"])
@pytest.mark.parametrize("mode", ["overwrite", "sum"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_query_row_gives_a_nan_output_row_on_every_backend(backend, mode, text, compiled):
    """As plain attention: a query row holding a NaN gives a NaN output row, wherever the token
    lies (covered or not, text branch or not), and no other row is touched. CPU SDPA wrote 0 for
    such a row with 7 text keys; a NaN anywhere in the row or the whole row, both are tried."""
    _device_ok(backend, "cpu")
    q, kt, vt, ks, vs = make_inputs(1, 2, NAN_GRID, 64, text or 7, 3, 4)
    tok = torch.tensor(NAN_BOXES)
    clean = q.clone()
    q = q.clone()
    for i, t in enumerate(NAN_TOKENS.values()):
        q[0, i % 2, t, 7 * i] = float("nan")       # one element of one head's row
        q[0, 1 - i % 2, t] = float("nan") if i >= 2 else q[0, 1 - i % 2, t]   # and, for two, the other's whole row
    kt, vt = (kt, vt) if text else (None, None)
    run = _op_call
    if compiled:
        torch._dynamo.reset()
        run = torch.compile(_op_call, fullgraph=True, backend="aot_eager")
    out = run(q, kt, vt, ks, vs, tok, NAN_GRID, mode=mode, subject_scale=0.7, backend=backend)
    nan_rows = torch.isnan(q).any(-1, keepdim=True).expand_as(out)
    assert torch.equal(torch.isnan(out), nan_rows), \
        {name: torch.isnan(out[0, :, t]).any(-1).tolist() for name, t in NAN_TOKENS.items()}
    kt_ref, vt_ref = (kt, vt) if text else (torch.zeros(1, 2, 1, 64), torch.zeros(1, 2, 1, 64))
    ref = reference(clean, kt_ref, vt_ref, ks, vs, tok, NAN_GRID, mode=mode, subject_scale=0.7)
    torch.testing.assert_close(out[~nan_rows].double(), ref[~nan_rows], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mode", ["overwrite", "sum"])
@pytest.mark.parametrize("q_layout", ["diffusers", "contiguous"])
@pytest.mark.parametrize("layouts", ["shared Routing", "shared boxes", "per row"])
@pytest.mark.parametrize("slab", [1, 7, 10_000])
def test_torch_backend_slabs_split_regions_anywhere(monkeypatch, mode, q_layout, layouts, slab):
    """The torch backend runs a subject's tokens in slabs, per batch row for diffusers' q: slabs
    of 1 token, of 7 (cutting every region mid-row) and larger than any region all give the
    reference's output, with one layout for the batch (as a Routing, whose batch rows share one
    work list, or as boxes) or one per row, both text kinds and their own key counts."""
    from anyms_kernels.ops import region_attention_torch as rat

    monkeypatch.setattr(rat, "_chunk_tokens", lambda num_tokens: slab)
    B, H, grid, S, T = 3, 2, (9, 11), 4, 6
    q, kt, vt, ks, vs = make_inputs(B, H, grid, 64, 77, S, T, torch.float32, seed=5)
    if q_layout == "contiguous":
        q = q.contiguous()
    boxes = torch.tensor([[[0, 0, 6, 5], [3, 2, 11, 9], [1, 4, 5, 9], [5, 0, 11, 3]],
                          [[2, 1, 9, 8], [0, 0, 4, 9], [6, 3, 11, 6], [0, 6, 11, 9]],
                          [[0, 0, 11, 9], [4, 4, 7, 7], [0, 0, 2, 2], [8, 6, 11, 9]]], dtype=torch.int32)
    if layouts != "per row":
        boxes = boxes[0]
    kinds = torch.tensor([False, True, False, True])
    counts = torch.tensor([6, 3, 1, 5], dtype=torch.int32)
    scales = torch.tensor([[1.0, 0.5, 2.0, 1.5]]).expand(B, S).contiguous()
    if layouts == "shared Routing":
        routing = ak.build_routing(boxes, grid, mode, replaces_text=kinds, subject_tokens=counts)
        assert routing.batch == 1
        out = ak.region_cross_attention(q, kt, vt, ks, vs, routing, grid, mode=mode, subject_scale=scales,
                                        backend="torch")
    else:
        out = ak.region_cross_attention(q, kt, vt, ks, vs, boxes, grid, mode=mode, subject_scale=scales,
                                        replaces_text=kinds, subject_tokens=counts, backend="torch")
    ref = reference(q, kt, vt, ks, vs, boxes, grid, mode=mode, subject_scale=scales, replaces_text=kinds,
                    subject_tokens=counts)
    assert_same_layout(out, q)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
