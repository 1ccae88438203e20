"""Branches as tokens + region + scale: per-subject token counts and text-kind subjects
(regional prompts), on every backend, against the float64 reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import anyms_kernels as ak
from anyms_kernels.ops import _layout
from anyms_kernels.ops import region_attention as ra
from anyms_kernels.regions import box_cover
from tests.conftest import DEVICES
from tests.kernels.helpers import assert_matches_reference, make_inputs, reference

BACKENDS = ["torch", "triton", "reference"]
BOXES = [[0.0, 0.0, 0.6, 0.6], [0.3, 0.3, 1.0, 1.0], [0.0, 0.5, 0.5, 1.0]]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every output buffer the op allocates starts as NaN, so unwritten rows fail."""
    real = _layout.empty_like_layout
    monkeypatch.setattr(_layout, "empty_like_layout", lambda q: real(q).fill_(float("nan")))


def _skip_unrunnable(backend, device="cpu"):
    reason = ra.triton_runnable(torch.empty(0, device=device))
    if backend == "triton" and reason is not None:
        pytest.skip(f"triton cannot run on {device} here: {reason}")


def _check(out, args, dtype, **kw):
    ref64 = reference(*args, **kw)
    same = None if dtype in (torch.float32, torch.float64) else reference(*args, **kw, dtype=dtype)
    assert_matches_reference(out, args, ref64, dtype=dtype, ref_same_dtype=same)


# ------------------------------------------------------------------ against the reference
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mode", ["overwrite", "sum"])
@pytest.mark.parametrize("text", [True, False], ids=["text", "no_text"])
@pytest.mark.parametrize("T, counts", [(16, [4, 16, 1]), (77, [4, 77, 40])], ids=["T16", "T77"])
def test_kinds_and_counts_against_reference(device, backend, dtype, mode, text, T, counts):
    """Image subjects of 4 and 16 tokens beside a text-kind subject, on a grid that is not a
    power of two; T = 77 (a regional prompt's length) runs the kernel's online subject path."""
    _skip_unrunnable(backend, device)
    grid = (6, 7)
    q, kt, vt, ks, vs = make_inputs(2, 2, grid, 64, 77, 3, T, dtype, device, seed=T)
    if not text:
        kt = vt = None
    boxes = ak.rasterize_boxes(BOXES, grid)
    kinds = [False, True, False]
    scale = torch.tensor([0.7, 1.3, 1.1])
    out = ak.region_cross_attention(q, kt, vt, ks, vs, boxes, grid, mode=mode, subject_scale=scale.to(device),
                                    backend=backend, replaces_text=kinds, subject_tokens=counts)
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    _check(out, (q.cpu(), cpu(kt), cpu(vt), ks.cpu(), vs.cpu(), boxes, grid), dtype, mode=mode,
           subject_scale=scale, replaces_text=kinds, subject_tokens=counts)


@st.composite
def _cases(draw):
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    S, T = draw(st.integers(0, 4)), draw(st.integers(1, 20))
    boxes = []
    for _ in range(S):
        y0, x0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        boxes.append([x0, y0, draw(st.integers(x0 + 1, w)), draw(st.integers(y0 + 1, h))])
    return dict(
        grid=(h, w), B=draw(st.integers(1, 2)), S=S, T=T, L=draw(st.integers(1, 9)),
        boxes=boxes, mode=draw(st.sampled_from(["overwrite", "sum"])),
        text=draw(st.booleans()),
        kinds=draw(st.none() | st.lists(st.booleans(), min_size=S, max_size=S)),
        counts=draw(st.none() | st.lists(st.integers(1, T), min_size=S, max_size=S)),
        scales=draw(st.lists(st.floats(-2, 2, allow_nan=False, width=32), min_size=S, max_size=S)),
        seed=draw(st.integers(0, 2**16)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(case=_cases())
def test_any_branches_against_reference(backend, dtype, case):
    """Random grids, subject counts, token counts, kinds, modes, scales and text or none
    (fp16 runs the kernel's prefetching path, fp32 its plain one)."""
    _skip_unrunnable(backend)
    grid, S = case["grid"], case["S"]
    q, kt, vt, ks, vs = make_inputs(case["B"], 1, grid, 32, case["L"], S, case["T"], dtype, seed=case["seed"])
    if not case["text"]:
        kt = vt = None
    boxes = torch.tensor(case["boxes"], dtype=torch.int64).reshape(S, 4)
    scale = torch.tensor(case["scales"], dtype=torch.float32).reshape(S)
    kw = dict(mode=case["mode"], subject_scale=scale, replaces_text=case["kinds"], subject_tokens=case["counts"])
    out = ak.region_cross_attention(q, kt, vt, ks, vs, boxes, grid, backend=backend, **kw)
    _check(out, (q, kt, vt, ks, vs, boxes, grid), dtype, **kw)


# ----------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["overwrite", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_defaults_are_bit_identical(backend, mode, dtype):
    """Counts of T for every subject and kinds all image run the same arithmetic as giving neither."""
    _skip_unrunnable(backend)
    grid = (5, 9)
    q, kt, vt, ks, vs = make_inputs(2, 2, grid, 64, 77, 3, 16, dtype)
    boxes = ak.rasterize_boxes(BOXES, grid)
    run = lambda **kw: ak.region_cross_attention(q, kt, vt, ks, vs, boxes, grid, mode=mode,  # noqa: E731
                                                 subject_scale=0.8, backend=backend, **kw)
    plain = run()
    torch.testing.assert_close(run(subject_tokens=[16, 16, 16]), plain, atol=0, rtol=0)
    torch.testing.assert_close(run(replaces_text=[False] * 3), plain, atol=0, rtol=0)
    torch.testing.assert_close(run(replaces_text=torch.zeros(3, dtype=torch.bool),
                                   subject_tokens=torch.full((3,), 16)), plain, atol=0, rtol=0)


# The global text run as a subject goes through the subject path's operations, not the text
# branch's (another softmax and matmul order): equal to rounding, exactly so in the reference.
EQUIVALENCE_TOL = {"reference": 0.0, "torch": 1e-5, "triton": 1e-5}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["overwrite", "sum"])
def test_full_grid_text_subject_with_the_global_prompt_is_no_text_subject(backend, mode):
    """A text-kind subject over the whole grid holding the global prompt's own K/V (scale 1)
    gives the output of the call without it, image subjects included."""
    _skip_unrunnable(backend)
    grid, L = (6, 5), 7
    q, kt, vt, ks, vs = make_inputs(2, 2, grid, 32, L, 2, L, seed=3)
    boxes = ak.rasterize_boxes(BOXES[:2], grid)
    counts = [4, 2]
    without = ak.region_cross_attention(q, kt, vt, ks, vs, boxes, grid, mode=mode, subject_scale=0.9,
                                        backend=backend, subject_tokens=counts)
    ks3 = torch.cat([ks, kt.unsqueeze(2)], dim=2)
    vs3 = torch.cat([vs, vt.unsqueeze(2)], dim=2)
    full = torch.tensor([[0, 0, grid[1], grid[0]]])
    for kinds, order in (([False, False, True], [0, 1, 2]), ([True, False, False], [2, 0, 1])):
        # the text subject last, and first: the kinds route apart, so its place does not matter
        boxes3 = torch.cat([boxes, full])[order]
        with_prompt = ak.region_cross_attention(
            q, kt, vt, ks3[:, :, order], vs3[:, :, order], boxes3, grid, mode=mode,
            subject_scale=torch.tensor([0.9, 0.9, 1.0])[order], backend=backend, replaces_text=kinds,
            subject_tokens=[(counts + [L])[i] for i in order])
        tol = EQUIVALENCE_TOL[backend]
        torch.testing.assert_close(with_prompt, without, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["overwrite", "sum"])
def test_a_text_subjects_scale_multiplies_its_branch_in_place_of_the_global_text(backend, mode):
    """scale s: s * attn(region prompt) inside the region, the global text outside it; scale 0
    leaves no text branch inside the region (only the image subjects act there)."""
    _skip_unrunnable(backend)
    grid = (5, 6)
    q, kt, vt, ks, vs = make_inputs(1, 2, grid, 32, 9, 2, 9, seed=5)
    boxes = torch.tensor([[0, 0, 4, 3], [2, 1, 6, 5]])                # image subject, then the text one
    inside = box_cover([2, 1, 6, 5], grid)

    def run(s, k_text=kt, v_text=vt):
        return ak.region_cross_attention(q, k_text, v_text, ks, vs, boxes, grid, mode=mode, backend=backend,
                                         subject_scale=torch.tensor([1.0, s]), replaces_text=[False, True],
                                         subject_tokens=[3, 9])
    zero, one, half = run(0.0), run(1.0), run(0.5)
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(half, zero + 0.5 * (one - zero), **tol)
    # outside the text region: the scale changes nothing, exactly
    torch.testing.assert_close(zero[:, :, ~inside], one[:, :, ~inside], atol=0, rtol=0)
    # inside it, scale 0: no text branch at all, as without a global text there
    no_text = run(0.0, None, None)
    torch.testing.assert_close(zero[:, :, inside], no_text[:, :, inside], **tol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padding_keys_are_never_read(backend):
    """Keys and values past a subject's count may hold anything (NaN, inf): they are not read."""
    _skip_unrunnable(backend)
    grid = (4, 5)
    q, kt, vt, ks, vs = make_inputs(1, 2, grid, 32, 7, 2, 16, seed=9)
    boxes = torch.tensor([[0, 0, 3, 3], [1, 1, 5, 4]])
    clean = ak.region_cross_attention(q, kt, vt, ks, vs, boxes, grid, backend=backend, subject_tokens=[4, 11])
    ks, vs = ks.clone(), vs.clone()
    ks[:, :, 0, 4:], vs[:, :, 0, 4:] = float("nan"), float("inf")
    ks[:, :, 1, 11:], vs[:, :, 1, 11:] = float("inf"), float("nan")
    dirty = ak.region_cross_attention(q, kt, vt, ks, vs, boxes, grid, backend=backend, subject_tokens=[4, 11])
    torch.testing.assert_close(dirty, clean, atol=0, rtol=0)


# ---------------------------------------------------------------------------- routing
@pytest.mark.parametrize("mode", ["overwrite", "sum"])
def test_routing_carries_kinds_and_counts_and_lists_both_owners(mode):
    grid = (6, 7)
    boxes = ak.rasterize_boxes(BOXES, grid)
    kinds = [False, True, False]
    r = ak.build_routing(boxes, grid, mode, replaces_text=kinds, subject_tokens=[4, 77, 16])
    assert r.replaces_text.tolist() == kinds and r.subject_tokens.tolist() == [4, 77, 16]
    assert r.max_subject_tokens == 77
    cover = r.cover[0]
    tokens = r.order[0].long()
    text_owner = r.text_owner[0]
    # the text owner is the text-kind subject covering the token, -1 where none does
    expect = torch.where(cover[1][tokens], 1, -1)
    assert torch.equal(text_owner, expect.to(torch.int32))
    if mode == "overwrite":
        # image owner: the last covering image-kind subject; the text subject never owns the image branch
        ranks = torch.stack([cover[0] * 1, cover[2] * 3]).amax(0) - 1
        assert torch.equal(r.owner[0], ranks[tokens].to(torch.int32))
    count, subjects = r.tiles(16)
    for i in range(count.shape[1]):
        listed = set(subjects[0, i, :count[0, i]].tolist())
        rows = tokens[i * 16:(i + 1) * 16]
        acting = set(torch.nonzero(cover[:, rows].any(1)).flatten().tolist()) if mode == "sum" else \
            set(r.owner[0, i * 16:(i + 1) * 16].tolist() + text_owner[i * 16:(i + 1) * 16].tolist()) - {-1}
        assert listed == acting, (i, listed, acting)


def test_routing_without_text_kinds_sorts_as_before():
    grid = (6, 7)
    boxes = ak.rasterize_boxes(BOXES, grid)
    plain, kinds = ak.build_routing(boxes, grid), ak.build_routing(boxes, grid, replaces_text=[False] * 3)
    assert torch.equal(plain.order, kinds.order) and torch.equal(plain.owner, kinds.owner)
    assert (kinds.text_owner == -1).all()


@pytest.mark.parametrize("mode", ["overwrite", "sum"])
@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_compiled_calls_take_kinds_and_counts_as_tensors(backend, mode, monkeypatch):
    """A Routing with kinds and counts enters the compiled graph as tensors: another layout
    with other kinds and counts (same shapes) runs the same graph, building nothing."""
    from anyms_kernels import routing as routing_module

    _skip_unrunnable(backend)
    grid = (6, 7)
    q, kt, vt, ks, vs = make_inputs(2, 2, grid, 64, 7, 3, 9)
    routings = [ak.build_routing(ak.rasterize_boxes(BOXES, grid), grid, mode, replaces_text=[False, True, False],
                                 subject_tokens=[4, 9, 2]),
                ak.build_routing(ak.rasterize_boxes(BOXES[::-1], grid), grid, mode,
                                 replaces_text=[True, False, True], subject_tokens=[9, 3, 5])]
    builds = []
    for name in ("region_cover", "_sort_tokens", "_tile_subjects"):
        real = getattr(routing_module, name)
        monkeypatch.setattr(routing_module, name, lambda *a, _real=real, _name=name: (builds.append(_name),
                                                                                      _real(*a))[1])

    def op(q, routing):
        return ak.region_cross_attention(q, kt, vt, ks, vs, routing, grid, mode=mode, subject_scale=0.7,
                                         backend=backend)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(op, fullgraph=True, backend="aot_eager")
    first = compiled(q, routings[0])
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = compiled(q, routings[1])
    assert builds == []
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for out, routing in ((first, routings[0]), (second, routings[1])):
        torch.testing.assert_close(out, op(q, routing), atol=0, rtol=0)
    ref = reference(q, kt, vt, ks, vs, ak.rasterize_boxes(BOXES[::-1], grid), grid, mode=mode, subject_scale=0.7,
                    replaces_text=[True, False, True], subject_tokens=[9, 3, 5])
    torch.testing.assert_close(second.double(), ref, atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------- errors
def _bad_calls():
    grid = (4, 5)
    boxes = torch.tensor([[0, 0, 2, 2], [1, 1, 5, 4], [0, 2, 3, 4]])
    return grid, boxes, [
        (dict(subject_tokens=[4, 0, 2]), ValueError, r"^subject_tokens\[1\] is 0: each subject's token count must "
                                                     r"be in 1\.\.T=8$"),
        (dict(subject_tokens=[4, 2, 9]), ValueError, r"^subject_tokens\[2\] is 9"),
        (dict(subject_tokens=torch.tensor([4, 2, 2**32 + 2])), ValueError, r"^subject_tokens\[2\] is 4294967298"),
        (dict(subject_tokens=[4, 2.0, 2]), TypeError, r"^subject_tokens\[1\] must be an int in 1\.\.T=8"),
        (dict(subject_tokens=[4, 2]), ValueError, r"^subject_tokens must hold one count per subject \(S=3\)"),
        (dict(subject_tokens=torch.tensor([1.0, 2.0, 3.0])), TypeError, r"^subject_tokens must be integers"),
        (dict(subject_tokens="448"), TypeError, r"^subject_tokens must be a sequence"),
        (dict(replaces_text=[True, 1, False]), TypeError, r"^replaces_text\[1\] must be a bool, got 1$"),
        (dict(replaces_text=[True]), ValueError, r"^replaces_text must hold one bool per subject \(S=3\)"),
        (dict(replaces_text=torch.tensor([1, 0, 0])), TypeError, r"^replaces_text must be bools"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls()[2])))
def test_bad_kinds_and_counts_raise_naming_the_argument(case):
    grid, boxes, cases = _bad_calls()
    kw, exc, msg = cases[case]
    q, kt, vt, ks, vs = make_inputs(1, 1, grid, 32, 5, 3, 8)
    with pytest.raises(exc, match=msg):
        ak.region_cross_attention(q, kt, vt, ks, vs, boxes, grid, backend="torch", **kw)


def test_routing_kinds_and_counts_are_checked():
    grid = (4, 5)
    boxes = torch.tensor([[0, 0, 2, 2], [1, 1, 5, 4]])
    q, kt, vt, ks, vs = make_inputs(1, 1, grid, 32, 5, 2, 8)
    with pytest.raises(ValueError, match=r"^subject_tokens\[0\] is 0: each subject's token count must be in 1\.\.T$"):
        ak.build_routing(boxes, grid, subject_tokens=[0, 3])
    with pytest.raises(TypeError, match=r"^replaces_text\[0\] must be a bool"):
        ak.build_routing(boxes, grid, replaces_text=["yes", False])
    long = ak.build_routing(boxes, grid, subject_tokens=[3, 9])
    with pytest.raises(ValueError, match=r"^regions is a Routing with subject_tokens up to 9 but k_subj has T=8"):
        ak.region_cross_attention(q, kt, vt, ks, vs, long, grid)
    routing = ak.build_routing(boxes, grid, subject_tokens=[3, 8])
    for name, value in (("subject_tokens", [3, 8]), ("replaces_text", [False, True])):
        with pytest.raises(ValueError, match=rf"^{name} is given with a Routing: pass it to build_routing"):
            ak.region_cross_attention(q, kt, vt, ks, vs, routing, grid, **{name: value})
