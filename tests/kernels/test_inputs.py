"""Box rasterisation, and every bad input raising an error that names the argument."""
from __future__ import annotations

import math
import subprocess

import pytest
import torch

import anyms_kernels as ak
from anyms_kernels.regions import coverage_count, token_owner
from tests.kernels.helpers import make_inputs, run_python



# ------------------------------------------------------------------ rasterize_boxes
def test_rasterize_floor_ceil_rule():
    grid = (64, 48)   # h, w
    boxes = torch.tensor([[0.1, 0.2, 0.55, 0.8], [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.75, 0.625]])
    tok = ak.rasterize_boxes(boxes, grid)
    assert tok.dtype == torch.int32
    h, w = grid
    for (x0, y0, x1, y1), t in zip(boxes.tolist(), tok.tolist()):
        ex0, ey0 = math.floor(x0 * w), math.floor(y0 * h)
        assert t == [ex0, ey0, min(w, max(ex0 + 1, math.ceil(x1 * w))), min(h, max(ey0 + 1, math.ceil(y1 * h)))]
    assert tok[2].tolist() == [24, 32, 36, 40]   # exact products are not nudged by float error


def test_rasterize_never_empty_and_clamped():
    tok = ak.rasterize_boxes([[0.5, 0.5, 0.5001, 0.5001], [0.999, 0.999, 1.0, 1.0], [0.0, 0.0, 1e-6, 1.0]], (4, 5))
    assert tok.tolist() == [[2, 2, 3, 3], [4, 3, 5, 4], [0, 0, 1, 4]]
    w = tok[:, 2] - tok[:, 0]
    h = tok[:, 3] - tok[:, 1]
    assert (w >= 1).all() and (h >= 1).all()


def test_rasterize_per_batch_and_lists():
    per_batch = [[[0, 0, 0.5, 0.5]], [[0.5, 0.5, 1, 1]]]
    tok = ak.rasterize_boxes(per_batch, (8, 8))
    assert tok.shape == (2, 1, 4)
    assert tok.tolist() == [[[0, 0, 4, 4]], [[4, 4, 8, 8]]]


@pytest.mark.parametrize("boxes, match", [
    ([[0.2, 0.2, 0.1, 0.5]], "inverted"),
    ([[0.2, 0.2, 0.2, 0.5]], "inverted"),
    ([[-0.1, 0.0, 0.5, 0.5]], r"\[0, 1\]"),
    ([[0.0, 0.0, 1.2, 0.5]], r"\[0, 1\]"),
    ([[0.0, float("nan"), 0.5, 0.5]], "NaN"),
    ([[0.0, 0.0, 0.5]], "shape"),
])
def test_rasterize_bad_boxes(boxes, match):
    with pytest.raises(ValueError, match=match) as e:
        ak.rasterize_boxes(boxes, (8, 8))
    assert "boxes" in str(e.value)


@pytest.mark.parametrize("grid", [(0, 8), (8,), (8.0, 8), "8x8", (8, -1)])
def test_rasterize_bad_grid(grid):
    with pytest.raises(ValueError, match="grid"):
        ak.rasterize_boxes([[0, 0, 1, 1]], grid)


def test_owner_and_coverage():
    tok = torch.tensor([[0, 0, 2, 2], [1, 1, 3, 3]])
    owner = token_owner(tok, (3, 3)).reshape(3, 3)
    assert owner.tolist() == [[0, 0, -1], [0, 1, 1], [-1, 1, 1]]
    assert coverage_count(tok, (3, 3)).reshape(3, 3).tolist() == [[1, 1, 0], [1, 2, 1], [0, 1, 1]]


# --------------------------------------------------------------- region_cross_attention
GRID = (4, 5)


def _args(S=2, dtype=torch.float32, **over):
    q, kt, vt, ks, vs = make_inputs(1, 2, GRID, 64, 7, S, 4, dtype)
    a = dict(q=q, k_text=kt, v_text=vt, k_subj=ks, v_subj=vs,
             boxes=torch.tensor([[0, 0, 2, 2], [1, 1, 5, 4]], dtype=torch.int32)[:S], grid=GRID)
    a.update(over)
    return a


def _call(backend="torch", **kw):
    args = _args(**{k: kw.pop(k) for k in list(kw) if k in ("S", "dtype")})
    kwargs = {k: kw.pop(k) for k in list(kw) if k in ("mode", "subject_scale", "text_mask", "softmax_scale")}
    args.update(kw)
    pos = [args[k] for k in ("q", "k_text", "v_text", "k_subj", "v_subj", "boxes", "grid")]
    return ak.region_cross_attention(*pos, backend=backend, **kwargs)


BAD = {
    # name: (override, exception, words the message must contain)
    "N != h*w": (dict(grid=(4, 4)), ValueError, ["grid", "N=20"]),
    "q not 4-D": (dict(q=torch.randn(2, 20, 64)), ValueError, ["q"]),
    "k_text batch": (dict(k_text=torch.randn(3, 2, 7, 64)), ValueError, ["k_text"]),
    "v_text head dim": (dict(v_text=torch.randn(1, 2, 7, 32)), ValueError, ["v_text"]),
    "k/v text differ": (dict(v_text=torch.randn(1, 2, 8, 64)), ValueError, ["v_text"]),
    "k_subj D": (dict(k_subj=torch.randn(1, 2, 2, 4, 32)), ValueError, ["k_subj"]),
    "v_subj S": (dict(v_subj=torch.randn(1, 2, 3, 4, 64)), ValueError, ["v_subj"]),
    "boxes count": (dict(boxes=torch.tensor([[0, 0, 1, 1]], dtype=torch.int32)), ValueError, ["boxes", "S=2"]),
    "boxes shape": (dict(boxes=torch.zeros(2, 3, dtype=torch.int32)), ValueError, ["boxes"]),
    "boxes float": (dict(boxes=torch.tensor([[0, 0, .5, .5], [.5, .5, 1, 1]])), TypeError, ["boxes", "rasterize_boxes"]),
    "boxes outside": (dict(boxes=torch.tensor([[0, 0, 2, 2], [1, 1, 6, 4]])), ValueError, ["boxes", "grid"]),
    "boxes negative": (dict(boxes=torch.tensor([[-1, 0, 2, 2], [1, 1, 5, 4]])), ValueError, ["boxes"]),
    "boxes inverted": (dict(boxes=torch.tensor([[0, 0, 2, 2], [3, 1, 1, 4]])), ValueError, ["boxes", "inverted"]),
    "boxes empty": (dict(boxes=torch.tensor([[0, 0, 2, 2], [1, 1, 1, 4]])), ValueError, ["boxes", "empty"]),
    "mode": (dict(mode="replace"), ValueError, ["mode"]),
    "backend": (dict(backend="cuda"), ValueError, ["backend"]),
    "scale NaN": (dict(subject_scale=float("nan")), ValueError, ["subject_scale", "NaN"]),
    "scale NaN tensor": (dict(subject_scale=torch.tensor([1.0, float("nan")])), ValueError, ["subject_scale"]),
    "scale shape": (dict(subject_scale=torch.ones(3)), ValueError, ["subject_scale"]),
    "scale int": (dict(subject_scale=torch.ones(2, dtype=torch.int64)), TypeError, ["subject_scale"]),
    "text mask dtype": (dict(text_mask=torch.ones(1, 7)), TypeError, ["text_mask"]),
    "text mask shape": (dict(text_mask=torch.ones(1, 8, dtype=torch.bool)), ValueError, ["text_mask"]),
    "text mask all False": (dict(text_mask=torch.zeros(1, 7, dtype=torch.bool)), ValueError, ["text_mask"]),
    "softmax_scale": (dict(softmax_scale=-1.0), ValueError, ["softmax_scale"]),
    "softmax_scale nan": (dict(softmax_scale=float("nan")), ValueError, ["softmax_scale"]),
    "mixed dtype": (dict(k_text=torch.randn(1, 2, 7, 64, dtype=torch.float16)), TypeError, ["k_text", "dtype"]),
    "int q": (dict(q=torch.ones(1, 2, 20, 64, dtype=torch.int32)), TypeError, ["q"]),
    "meta device": (dict(v_subj=torch.randn(1, 2, 2, 4, 64, device="meta")), ValueError, ["v_subj", "device"]),
    "grid": (dict(grid=(20,)), ValueError, ["grid"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_naming_argument(case):
    override, exc, words = BAD[case]
    with pytest.raises(exc) as e:
        _call(**dict(override))
    for word in words:
        assert word in str(e.value), f"{case}: {word!r} not in message {str(e.value)!r}"


def test_bad_input_checks_run_for_every_backend():
    for backend in ("torch", "reference", "triton"):
        with pytest.raises(ValueError, match="boxes"):
            _call(backend=backend, boxes=torch.tensor([[0, 0, 2, 2], [1, 1, 6, 4]]))


def test_triton_rejects_unsupported_head_dim_and_dtype():
    from anyms_kernels.ops.region_attention import triton_runnable
    q = make_inputs(1, 1, GRID, 72, 7, 1, 4)[0]
    if triton_runnable(q) is not None:
        pytest.skip("triton cannot run here")
    q, kt, vt, ks, vs = make_inputs(1, 1, GRID, 72, 7, 1, 4)
    box = torch.tensor([[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="head dim"):
        ak.region_cross_attention(q, kt, vt, ks, vs, box, GRID, backend="triton")
    q, kt, vt, ks, vs = make_inputs(1, 1, GRID, 64, 7, 1, 4, torch.float64)
    with pytest.raises(TypeError, match="float64"):
        ak.region_cross_attention(q, kt, vt, ks, vs, box, GRID, backend="triton")
    # the torch backend takes both
    ak.region_cross_attention(q, kt, vt, ks, vs, box, GRID, backend="torch")


def _run_clean(code: str) -> subprocess.CompletedProcess:
    """Run python code in a fresh process with no GPU visible and no TRITON_INTERPRET."""
    return run_python(code, env={"TRITON_INTERPRET": None, "CUDA_VISIBLE_DEVICES": ""}, timeout=300)


def test_import_touches_no_gpu_and_needs_no_interpreter():
    r = _run_clean("import torch, anyms_kernels as ak; "
                   "assert not torch.cuda.is_initialized(), 'import initialised CUDA'; print(ak.__version__)")
    assert r.returncode == 0, r.stderr


def test_triton_backend_on_cpu_without_interpreter_says_why():
    r = _run_clean(
        "import torch, anyms_kernels as ak\n"
        "q = torch.randn(1, 1, 4, 64); k = torch.randn(1, 1, 3, 64); s = torch.randn(1, 1, 1, 2, 64)\n"
        "try:\n"
        "    ak.region_cross_attention(q, k, k, s, s, [[0, 0, 1, 1]], (2, 2), backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('RAISED', e)\n")
    assert r.returncode == 0, r.stderr
    assert "RAISED backend='triton' cannot run" in r.stdout and "TRITON_INTERPRET" in r.stdout, r.stdout


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("On", True), ("y", True), ("2", False),
                                       (" 1", False), ("0", False), ("", False), ("off", False)])
def test_interpreter_requested_reads_triton_interpret_as_triton_does(monkeypatch, value, on):
    """Triton compiles the kernel for "2" or " 1" (its reading: off), so the op must not then say the
    variable was set after import: it names the CPU tensor instead."""
    from anyms_kernels import _triton
    from anyms_kernels.ops import region_attention_triton as rt

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _triton.interpreter_requested() is on
    if _triton.triton is not None:
        from triton._C.libtriton import getenv_bool
        assert getenv_bool("TRITON_INTERPRET", False) is on
    monkeypatch.setattr(rt, "KERNEL_INTERPRETED", False)     # as if triton had compiled the kernel at import
    reason = rt.triton_runnable(torch.empty(1, 1, 4, 64))
    assert ("set after anyms_kernels was imported" in reason) is on, reason


def test_device_tensors_are_checked_once_per_version():
    """A GPU tensor's values are read once (one device sync), again only after an in-place
    change or for another grid; a dead tensor leaves no entry. Meta tensors stand in for
    device tensors here: the check function counts calls instead of reading values."""
    import gc

    from anyms_kernels import _checks

    calls = []

    def check(t, what):
        calls.append(what)

    t = torch.empty(2, 4, device="meta")
    _checks._check_once(t, (4, 5), check)
    _checks._check_once(t, (4, 5), check)
    assert calls == [(4, 5)]
    _checks._check_once(t, (8, 8), check)          # another grid: check again
    assert len(calls) == 2
    t.add_(1)                                       # in-place change bumps the version
    _checks._check_once(t, (8, 8), check)
    assert len(calls) == 3
    key = id(t)
    del t
    gc.collect()
    assert key not in _checks._CHECKED_ON_DEVICE
    cpu = torch.zeros(2, 4)
    _checks._check_once(cpu, (), check)
    _checks._check_once(cpu, (), check)             # CPU tensors: always checked (free)
    assert len(calls) == 5


# ------------------------------------------------------------------ boxes as tensors and as lists
def test_a_float32_tensor_and_a_list_of_the_same_boxes_give_the_same_token_boxes():
    assert ak.rasterize_boxes(torch.tensor([[0, 0, .3, 1]]), (10, 10)).tolist() == [[0, 0, 3, 10]]
    assert ak.rasterize_boxes([[0, 0, .3, 1]], (10, 10)).tolist() == [[0, 0, 3, 10]]


def _decimal_boxes():
    from hypothesis import strategies as st

    coord = st.integers(0, 1000).map(lambda n: n / 1000)     # what a user types: up to 3 decimals
    return st.lists(st.tuples(coord, coord, coord, coord).filter(lambda b: b[2] > b[0] and b[3] > b[1]),
                    min_size=1, max_size=4)


def test_tensor_and_list_boxes_agree_for_every_dtype_and_grid():
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=200, deadline=None)
    @given(_decimal_boxes(), st.integers(1, 160), st.integers(1, 160),
           st.sampled_from([torch.float32, torch.float16, torch.float64]))
    def check(boxes, h, w, dtype):
        as_list = ak.rasterize_boxes(boxes, (h, w))
        tensor = torch.tensor(boxes, dtype=dtype)
        if dtype == torch.float16:
            # float16 cannot hold every 3-decimal value: the list to agree with is the decimals it holds
            import numpy as np

            boxes = [[float(np.format_float_positional(np.float16(v), unique=True, trim="-")) for v in row]
                     for row in boxes]
            if any(r[2] <= r[0] or r[3] <= r[1] or max(r) > 1 for r in boxes):
                return
            as_list = ak.rasterize_boxes(boxes, (h, w))
        assert torch.equal(ak.rasterize_boxes(tensor, (h, w)), as_list), (boxes, dtype)

    check()


def test_a_subject_box_tensor_is_read_as_its_list():
    import anyms
    from PIL import Image

    subject = anyms.Subject(Image.new("RGB", (8, 8), (200, 10, 10)), box=torch.tensor([0, 0, .3, 1]))
    from anyms.pipeline import prepare_subjects

    plan = prepare_subjects([subject])
    layout = plan.make_layout((10, 10))
    assert layout.token_boxes(100, "cpu")[1].tolist() == [[0, 0, 3, 10]]


def test_boxes_on_the_meta_device_are_refused_clearly():
    with pytest.raises(ValueError, match="meta device"):
        ak.rasterize_boxes(torch.zeros(1, 4, device="meta"), (4, 4))
