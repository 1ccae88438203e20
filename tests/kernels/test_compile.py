"""The op under torch.compile, and the Triton kernel compiled for real GPUs without one."""
from __future__ import annotations

import json
import os

import pytest
import torch

import anyms_kernels as ak
from anyms_kernels._triton import HAS_TRITON
from tests.kernels.helpers import ROOT, make_inputs, reference, run_python



def _layer(x, w_q, kt, vt, ks, vs, boxes, grid, mode):
    """A cross-attention layer around the op: projection in, op on a strided view, reshape out."""
    B, N, C = x.shape
    H, D = kt.shape[1], kt.shape[3]
    q = (x @ w_q).view(B, N, H, D).transpose(1, 2)
    out = ak.region_cross_attention(q, kt, vt, ks, vs, boxes, grid, mode=mode, subject_scale=0.7)
    return out.transpose(1, 2).reshape(B, N, H * D) * 2.0


# aot_eager checks the graph and the fake implementation for both modes; one inductor
# case proves the real CPU compiler path (its first C++ build costs a minute or two).
@pytest.mark.parametrize("compiler, mode", [("aot_eager", "overwrite"), ("aot_eager", "sum"),
                                            ("inductor", "overwrite")])
def test_torch_compile_fullgraph(compiler, mode):
    torch._dynamo.reset()
    grid = (6, 10)
    _, kt, vt, ks, vs = make_inputs(2, 2, grid, 64, 77, 3, 4)
    x = torch.randn(2, 60, 32)
    w_q = torch.randn(32, 128) / 6
    boxes = ak.rasterize_boxes([[0, 0, 0.6, 0.6], [0.4, 0.3, 1, 1], [0.1, 0.5, 0.5, 1]], grid)
    eager = _layer(x, w_q, kt, vt, ks, vs, boxes, grid, mode)
    compiled = torch.compile(_layer, fullgraph=True, backend=compiler)
    out = compiled(x, w_q, kt, vt, ks, vs, boxes, grid, mode)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    # and against the reference, so a wrong fake layout cannot pass unnoticed
    q = (x @ w_q).view(2, 60, 2, 64).transpose(1, 2)
    ref = reference(q, kt, vt, ks, vs, boxes, grid, mode=mode, subject_scale=0.7)
    torch.testing.assert_close(out.double(), ref.transpose(1, 2).reshape(2, 60, 128) * 2, atol=1e-4, rtol=1e-4)


def test_fake_tensor_keeps_layout():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q = torch.empty(2, 16, 3, 64).transpose(1, 2)
        kt = torch.empty(2, 3, 5, 64)
        ks = torch.empty(2, 3, 1, 4, 64)
        out = torch.ops.anyms_kernels.region_cross_attention(
            q, kt, kt, ks, ks, torch.zeros(2, 1, 4, dtype=torch.int32), torch.ones(2, 1), None, None, None,
            4, 4, "overwrite", 0.125, "torch", True, [])
        assert out.shape == q.shape and out.stride() == q.stride()


def _compile_in_fresh_process(code: str, *args: str, interpret=None, cache_dir=None, timeout: int = 600):
    """Run ``code`` (python, with ``args``) in a fresh process, as the kernel must be defined: without
    TRITON_INTERPRET (or with ``interpret`` as its value), FP fusion as triton 3.9's default, the
    compiled kernels cached in ``cache_dir`` if given. Returns its stdout; fails with its stderr."""
    env = {"TRITON_INTERPRET": interpret}
    if "TRITON_DEFAULT_FP_FUSION" not in os.environ:
        env["TRITON_DEFAULT_FP_FUSION"] = "1"
    if cache_dir is not None:
        env["TRITON_CACHE_DIR"] = str(cache_dir)
    r = run_python(code, *args, env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="on a GPU machine the kernel is compiled and run for real (test_cuda.py); the offline "
                           "report leans on compiler entry points checked against the CPU machines' triton")
def test_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    """Every configuration the heuristic picks, for A100 (sm_80) and H100 (sm_90), fp16/bf16/fp32,
    every supported head dim, both modes, and the variants for text-kind subjects with per-subject
    token counts and (16-bit heads of 64) with 64-bit address math: it compiles, and ptxas reports no
    spills.
    Runs in a fresh process: the kernel must not be defined under TRITON_INTERPRET."""
    report = tmp_path / "compile_report.json"
    code = (
        "import json, sys, torch\n"
        "from dataclasses import asdict\n"
        "from anyms_kernels._compile import default_configurations, resource_usage\n"
        "rows = []\n"
        "for arch, D, dtype, cfg in default_configurations((80, 90)):\n"
        "    for overwrite in (True, False):\n"
        "        if not overwrite and D != 64: continue\n"
        "        rows.append(asdict(resource_usage(D, dtype, cfg, arch=arch, overwrite=overwrite)))\n"
        "    if D == 64 and dtype != torch.float32:  # long subject sequences (T = 257): the online path\n"
        "        rows.append(asdict(resource_usage(D, dtype, cfg, arch=arch, subject_tokens=257)))\n"
        "    if D == 64 and dtype != torch.float32:  # 64-bit address math, for offsets past int32\n"
        "        rows.append(asdict(resource_usage(D, dtype, cfg, arch=arch, int32_offsets=False)))\n"
        "    if D in (64, 128):  # text-kind subjects and per-subject token counts (SDXL's and FLUX's heads):\n"
        "        # image subjects of 4 and 16 tokens (T = 16), and beside 77-token regional prompts\n"
        "        for T, overwrite in ((16, True), (77, False)):\n"
        "            rows.append(asdict(resource_usage(D, dtype, cfg, arch=arch, overwrite=overwrite,\n"
        "                                              subject_tokens=T, text_subjects=True, subject_counts=True)))\n"
        f"json.dump(rows, open({str(report)!r}, 'w'))\n"
    )
    _compile_in_fresh_process(code, timeout=1200)
    rows = json.loads(report.read_text())
    table = "\n".join(
        f"sm_{x['arch']} {x['dtype']:>4} D={x['head_dim']:<3} {'ow ' if x['overwrite'] else 'sum'} T{x['block_t']} "
        f"{'kinds+counts ' if x['text_subjects'] else ''}{'' if x['int32_offsets'] else 'int64 '}"
        f"BLOCK_M={x['block_m']:<3} warps={x['num_warps']} regs={x['registers']:<3} stack={x['stack_bytes']} "
        f"spill={x['spill_stores']}/{x['spill_loads']} smem={x['shared_bytes']}" for x in rows)
    print("\n" + table)
    assert len(rows) == 2 * 3 * len(ak.TRITON_HEAD_DIMS) + 2 * 3 + 2 * 2 + 2 * 3 * 2 * 2 + 2 * 2
    spilled = [x for x in rows if x["stack_bytes"] > 0 or x["spill_stores"] > 0 or x["spill_loads"] > 0]
    assert not spilled, "register spills:\n" + table
    assert all(x["spill_stores"] == 0 for x in rows), "ptxas -v could not be read for some configurations"


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="compiles offline, like the test above")
def test_kernel_compiles_with_a_triton_whose_fdiv_takes_no_approx(tmp_path):
    """Triton before 3.9 has tl.fdiv(x, y, ieee_rounding) only (no ``approx``), and the package
    supports triton >= 3.0: the kernel compiles with either, and compiled, the softmax sums take
    libdevice's fast_dividef (div.approx.ftz.f32: no rescaling of tiny divisors), never div.full
    or the non-ftz div.approx. A triton whose libdevice has no fast_dividef takes tl.fdiv: the
    non-ftz div.approx with ``approx``, div.full without. Fresh processes (no TRITON_INTERPRET),
    the older fdiv's signature (and libdevice less fast_dividef) put in place before the kernel
    is defined."""
    code = (
        "import sys, torch\n"
        "import triton.language as tl\n"
        "from triton.language import core, math as tl_math\n"
        "if sys.argv[1] == 'old':\n"
        "    new_fdiv = tl_math.fdiv\n"
        "    @core.builtin\n"
        "    def fdiv(x, y, ieee_rounding=False, _semantic=None):   # triton 3.0-3.8's signature\n"
        "        return new_fdiv(x, y, ieee_rounding, _semantic=_semantic)\n"
        "    tl.fdiv = tl_math.fdiv = fdiv\n"
        "if sys.argv[2] == 'no_fast_dividef':\n"
        "    from triton.language.extra.cuda import libdevice\n"
        "    del libdevice.fast_dividef\n"
        "from anyms_kernels._compile import compile_kernel\n"
        "from anyms_kernels.ops import region_attention_triton as rt\n"
        "ptx = compile_kernel(64, torch.float16, rt.config_candidates(64, torch.float16)[0], arch=90).asm['ptx']\n"
        "print(int('div.approx.ftz.f32' in ptx), int('div.approx.f32' in ptx), int('div.full.f32' in ptx))\n"
    )
    divisions = {}
    for fdiv in ("old", "new"):
        for libdevice in ("fast_dividef", "no_fast_dividef"):
            # compiled afresh (a cache of its own): the cache key omits tl.fdiv
            out = _compile_in_fresh_process(code, fdiv, libdevice, cache_dir=tmp_path / fdiv / libdevice)
            divisions[fdiv, libdevice] = out.split()[-3:]
    assert divisions == {("old", "fast_dividef"): ["1", "0", "0"], ("new", "fast_dividef"): ["1", "0", "0"],
                         ("old", "no_fast_dividef"): ["0", "0", "1"], ("new", "no_fast_dividef"): ["0", "1", "0"]}, \
        divisions


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="compiles offline, like the test above")
def test_compiled_kernel_takes_the_fast_division_whatever_triton_interpret_holds(tmp_path):
    """The fast division goes wherever triton compiles the kernel, decided by what triton did with
    it, not by our own reading of TRITON_INTERPRET: triton reads "2" as off and compiles, and the
    sums must then take div.approx.ftz.f32, as without the variable; under "1" it interprets."""
    code = (
        "import torch\n"
        "from anyms_kernels.ops import region_attention_triton as rt\n"
        "print('interpreted' if rt.KERNEL_INTERPRETED else 'compiled', bool(rt.FAST_DIV))\n"
        "if not rt.KERNEL_INTERPRETED:\n"
        "    from anyms_kernels._compile import compile_kernel\n"
        "    ptx = compile_kernel(64, torch.float16, rt.config_candidates(64, torch.float16)[0], arch=90).asm['ptx']\n"
        "    print(int('div.approx.ftz.f32' in ptx), int('div.approx.f32' in ptx))\n"
    )
    seen = {value: _compile_in_fresh_process(code, interpret=value, cache_dir=tmp_path).split()
            for value in ("2", "1")}
    assert seen == {"2": ["compiled", "True", "1", "0"], "1": ["interpreted", "False"]}, seen


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="compiles offline, like the test above")
def test_compiled_fast_divisions_divide_one_never_a_subject_scale(tmp_path):
    """div.approx.ftz flushes a quotient below 2^-126 to 0: a float32 subject scale of 1e-38
    divided by its row sum would drop the branch (the reference gives scale x attention, 1e-4
    with values of 1e34). Compiled, every such division computes 1 / l, and the scale multiplies
    after, in plain float32: each numerator is the constant 1. Both modes, float32 (whose ieee
    dots keep subnormal weights) and float16."""
    code = (
        "import re, torch\n"
        "from anyms_kernels._compile import compile_kernel\n"
        "from anyms_kernels.ops import region_attention_triton as rt\n"
        "for dtype in (torch.float32, torch.float16):\n"
        "    for overwrite in (True, False):\n"
        "        ptx = compile_kernel(64, dtype, rt.config_candidates(64, dtype)[0], arch=90,\n"
        "                             overwrite=overwrite).asm['ptx']\n"
        "        ones = set(re.findall(r'mov\\.b32\\s+(%r\\d+), 0f3F800000;', ptx))\n"
        "        nums = re.findall(r'div\\.approx\\.ftz\\.f32\\s+%r\\d+, (\\S+), \\S+;', ptx)\n"
        "        print(len(nums), sum(n in ones or n == '0f3F800000' for n in nums))\n"
    )
    out = _compile_in_fresh_process(code, cache_dir=tmp_path)
    counts = [tuple(map(int, line.split())) for line in out.strip().splitlines()]
    assert len(counts) == 4 and all(n > 0 for n, _ in counts), counts       # the fast division is there
    assert all(ones == n for n, ones in counts), f"(divisions, of them 1 / l) per variant: {counts}"


def test_registered_op_equals_public_function_in_eager():
    """Eager calls skip the dispatcher; the registered op (what tracers see) computes the same."""
    grid = (5, 6)
    q, kt, vt, ks, vs = make_inputs(2, 2, grid, 64, 77, 2, 4)
    boxes = ak.rasterize_boxes([[0, 0, 0.6, 0.6], [0.4, 0.4, 1, 1]], grid)
    public = ak.region_cross_attention(q, kt, vt, ks, vs, boxes, grid, subject_scale=0.5, backend="torch")
    registered = torch.ops.anyms_kernels.region_cross_attention(
        q, kt, vt, ks, vs, boxes.expand(2, 2, 4), torch.full((2, 2), 0.5), None, None, None, 5, 6, "overwrite",
        0.125, "torch", False, [])
    torch.testing.assert_close(registered, public, atol=0, rtol=0)
    counts = torch.tensor([4, 0])
    with pytest.raises(ValueError, match=r"^subject_tokens\[1\] is 0"):   # likewise the token counts
        torch.ops.anyms_kernels.region_cross_attention(
            q, kt, vt, ks, vs, boxes.expand(2, 2, 4), torch.full((2, 2), 0.5), None, None, counts, 5, 6,
            "overwrite", 0.125, "torch", False, [])
    with pytest.raises(ValueError, match="boxes"):   # not checked by the caller: the op checks
        torch.ops.anyms_kernels.region_cross_attention(
            q, kt, vt, ks, vs, torch.tensor([[[0, 0, 9, 9]] * 2] * 2, dtype=torch.int32), torch.ones(2, 2),
            None, None, None, 5, 6, "overwrite", 0.125, "torch", False, [])


# ------------------------------------------------------- the same contract compiled and eager
def _op_on_boxes(q, kt, vt, ks, vs, boxes):
    return ak.region_cross_attention(q, kt, vt, ks, vs, boxes, (4, 5), backend="torch")


def _raised(fn, *args, **kwargs):
    """(exception type, message) of what ``fn`` raises; fails the test if it returns."""
    try:
        fn(*args, **kwargs)
    except Exception as exc:        # noqa: BLE001  (the type is part of what is compared)
        return type(exc), str(exc)
    pytest.fail(f"{getattr(fn, '__name__', fn)} raised nothing")


@pytest.mark.parametrize("box", [[0, 0, 2**32 + 2, 2], [-2**32, 0, 2, 2], [0, 2**33 + 1, 2, 2**33 + 3]],
                         ids=["x1 wraps to 2", "x0 wraps to 0", "y wraps to 1..3"])
@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_int64_boxes_beyond_int32_are_refused_compiled_as_eager(box, compiler):
    """Cast to int32 each of these boxes is a valid box on a 4x5 grid: the checks must see the
    caller's numbers in both modes, not what an int32 cast makes of them."""
    torch._dynamo.reset()
    q, kt, vt, ks, vs = make_inputs(1, 2, (4, 5), 64, 7, 2, 4)
    boxes = torch.tensor([box, [1, 1, 5, 4]], dtype=torch.int64)
    assert ((boxes.to(torch.int32) >= 0).all() and (boxes.to(torch.int32)[:, 2:] <= 5).all())   # wraps to valid
    eager = _raised(_op_on_boxes, q, kt, vt, ks, vs, boxes)
    assert eager[0] is ValueError and "boxes must lie inside the 4x5 grid" in eager[1], eager
    compiled = torch.compile(_op_on_boxes, fullgraph=True, backend=compiler)
    assert _raised(compiled, q, kt, vt, ks, vs, boxes) == eager


def test_routing_of_boxes_beyond_int32_does_not_wrap():
    """build_routing reads no values (it does not check them): a box past the grid's edge covers
    up to the edge, never what its int32 cast would name."""
    far = ak.build_routing(torch.tensor([[0, 0, 2**32 + 2, 2]]), (4, 5)).cover
    edge = ak.build_routing(torch.tensor([[0, 0, 5, 2]]), (4, 5)).cover
    assert torch.equal(far, edge)


def _bad_call(case):
    """(positional args, keyword args) of the op for a case of test_inputs.BAD, or of the extra
    cases here: errors that only the front door raises (grad, backend, a Routing that does not fit)."""
    from tests.kernels import test_inputs

    q, kt, vt, ks, vs = make_inputs(1, 2, (4, 5), 64, 7, 2, 4)
    boxes = torch.tensor([[0, 0, 2, 2], [1, 1, 5, 4]], dtype=torch.int32)
    extra = {
        "q requires grad": dict(q=q.detach().clone().requires_grad_()),
        "subject_scale requires grad": dict(subject_scale=torch.full((2,), 0.5, requires_grad=True)),
        "triton float64": dict(q=q.double(), k_text=kt.double(), v_text=vt.double(), k_subj=ks.double(),
                               v_subj=vs.double(), backend="triton"),
        "routing of another grid": dict(boxes=ak.build_routing(ak.rasterize_boxes([[0, 0, .5, .5]] * 2, (5, 4)),
                                                               (5, 4))),
        "box list with a bool": dict(boxes=[[0, 0, 2, 2], [True, 1, 5, 4]]),
        "token count tensor out of range": dict(subject_tokens=torch.tensor([4, 0])),
        "token count list out of range": dict(subject_tokens=[4, 5]),
        "kinds not bools": dict(replaces_text=[True, 0]),
        "kinds beside a routing": dict(boxes=ak.build_routing(boxes, (4, 5)), replaces_text=[True, False]),
    }
    override = dict(test_inputs.BAD[case][0]) if case in test_inputs.BAD else extra[case]
    args = dict(q=q, k_text=kt, v_text=vt, k_subj=ks, v_subj=vs, boxes=boxes, grid=(4, 5))
    kwargs = dict(backend="torch")
    for name, value in override.items():
        (args if name in args else kwargs)[name] = value
    return [args[k] for k in ("q", "k_text", "v_text", "k_subj", "v_subj", "boxes", "grid")], kwargs


def _bad_cases():
    from tests.kernels import test_inputs

    return sorted(test_inputs.BAD) + ["q requires grad", "subject_scale requires grad", "triton float64",
                                      "routing of another grid", "box list with a bool",
                                      "token count tensor out of range", "token count list out of range",
                                      "kinds not bools", "kinds beside a routing"]


def _op(*args, **kwargs):
    return ak.region_cross_attention(*args, **kwargs)


@pytest.mark.parametrize("case", _bad_cases())
def test_a_compiled_caller_gets_the_eager_error(case):
    """With fullgraph=True an exception raised while dynamo traces reaches the caller as dynamo's
    "Observed exception", the message lost: every argument error must instead reach a compiled
    caller with the eager call's type and message (metadata checks: raised by a refusal op in the
    graph; value checks: inside the op)."""
    args, kwargs = _bad_call(case)
    eager = _raised(_op, *args, **kwargs)
    assert eager[0] in (TypeError, ValueError, RuntimeError) and "Observed exception" not in eager[1], eager
    torch._dynamo.reset()
    compiled = torch.compile(_op, fullgraph=True, backend="aot_eager")
    assert _raised(compiled, *args, **kwargs) == eager


def test_a_compiled_refusal_raises_on_every_call_and_good_calls_still_run():
    """The refusal is part of the compiled graph: it raises each time that graph runs (not only
    while tracing), and a good call after it compiles and computes as in eager."""
    torch._dynamo.reset()
    compiled = torch.compile(_op, fullgraph=True, backend="aot_eager")
    bad_args, bad_kwargs = _bad_call("mode")
    for _ in range(2):
        with pytest.raises(ValueError, match="mode must be one of"):
            compiled(*bad_args, **bad_kwargs)
    good_args, good_kwargs = _bad_call("box list with a bool")
    good_args[5] = torch.tensor([[0, 0, 2, 2], [1, 1, 5, 4]])
    torch.testing.assert_close(compiled(*good_args, **good_kwargs), _op(*good_args, **good_kwargs), atol=0, rtol=0)


def test_an_unused_refusal_still_raises():
    """A caller that drops the op's output still gets the error: the refusal is never removed
    from the graph as dead code."""
    def drops_output(*args, **kwargs):
        ak.region_cross_attention(*args, **kwargs)
        return args[0] * 2

    torch._dynamo.reset()
    args, kwargs = _bad_call("mode")
    with pytest.raises(ValueError, match="mode must be one of"):
        torch.compile(drops_output, fullgraph=True, backend="aot_eager")(*args, **kwargs)


def test_a_compiled_caller_gets_the_eager_error_once_sizes_are_dynamic():
    """After a call with other sizes, torch.compile retraces with those sizes symbolic: the
    messages, which state sizes, must still reach the caller as the eager call writes them.
    (Each refusal is a graph of its own: more than the default 8 here.)"""
    torch._dynamo.reset()
    compiled = torch.compile(_op, fullgraph=True, backend="aot_eager")
    boxes = torch.tensor([[0, 0, 2, 2], [1, 1, 5, 4]])
    with torch._dynamo.config.patch(recompile_limit=32):
        _sizes_change_between_calls(compiled, boxes)


def _sizes_change_between_calls(compiled, boxes):
    for L in (7, 9, 11):
        q, kt, vt, ks, vs = make_inputs(1, 2, (4, 5), 64, L, 2, 4)
        torch.testing.assert_close(compiled(q, kt, vt, ks, vs, boxes, (4, 5), backend="torch"),
                                   _op(q, kt, vt, ks, vs, boxes, (4, 5), backend="torch"), atol=0, rtol=0)
        for bad in (dict(v_text=vt[:, :, :-1]), dict(text_mask=torch.ones(1, L + 1, dtype=torch.bool)),
                    dict(subject_scale=torch.ones(L))):
            args = dict(q=q, k_text=kt, v_text=vt, k_subj=ks, v_subj=vs, boxes=boxes, grid=(4, 5))
            kwargs = dict(backend="torch")
            for name, value in bad.items():
                (args if name in args else kwargs)[name] = value
            eager = _raised(_op, *args.values(), **kwargs)
            assert _raised(compiled, *args.values(), **kwargs) == eager, (L, bad.keys())


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_a_subject_scale_that_requires_grad_is_one_contract_eager_and_compiled(backend):
    """The op is forward only: a subject_scale that requires grad is refused by name, eager and
    compiled alike (eagerly the torch backend's output used to carry a gradient that the compiled
    call, whose op has no backward, could not compute); without grad mode the same tensor is
    accepted and gives the same output both ways."""
    from anyms_kernels.ops.region_attention import triton_runnable

    q, kt, vt, ks, vs = make_inputs(1, 2, (4, 5), 64, 7, 2, 4)
    if backend == "triton" and triton_runnable(q) is not None:
        pytest.skip("triton cannot run here")
    boxes = torch.tensor([[0, 0, 2, 2], [1, 1, 5, 4]])
    scale = torch.tensor([0.5, 2.0], requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(_op, fullgraph=True, backend="aot_eager")
    for run in (_op, compiled):
        kind, message = _raised(run, q, kt, vt, ks, vs, boxes, (4, 5), subject_scale=scale, backend=backend)
        assert kind is RuntimeError and "subject_scale requires grad" in message and "forward only" in message
    with torch.no_grad():
        eager = _op(q, kt, vt, ks, vs, boxes, (4, 5), subject_scale=scale, backend=backend)
        out = compiled(q, kt, vt, ks, vs, boxes, (4, 5), subject_scale=scale, backend=backend)
    assert not out.requires_grad
    torch.testing.assert_close(out, eager, atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["overwrite", "sum"])
@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_a_compiled_call_takes_the_prebuilt_routing_and_a_new_layout_does_not_recompile(backend, mode,
                                                                                       monkeypatch):
    """A Routing is built once per layout, before the compiled region: the compiled call hands
    its tensors to the op as graph inputs. So no routing is built while tracing or running, a
    second layout with the same shapes runs the same graph, and the outputs are the eager ones."""
    from anyms_kernels import routing as routing_module
    from anyms_kernels.ops.region_attention import triton_runnable

    grid = (6, 7)
    q, kt, vt, ks, vs = make_inputs(2, 2, grid, 64, 7, 3, 4)
    if backend == "triton" and triton_runnable(q) is not None:
        pytest.skip("triton cannot run here")
    layouts = ([[0, 0, .5, .5], [.3, .3, 1, 1], [0, .6, .4, 1]], [[.5, 0, 1, .5], [0, .3, .6, 1], [.2, .2, .9, .4]])
    routings = [ak.build_routing(ak.rasterize_boxes(boxes, grid), grid, mode) for boxes in layouts]
    builds = []
    for name in ("region_cover", "_sort_tokens", "_tile_subjects"):
        real = getattr(routing_module, name)
        monkeypatch.setattr(routing_module, name,
                            lambda *a, _real=real, _name=name: (builds.append(_name), _real(*a))[1])

    def op(q, routing):
        return ak.region_cross_attention(q, kt, vt, ks, vs, routing, grid, mode=mode, subject_scale=0.7,
                                         backend=backend)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(op, fullgraph=True, backend="aot_eager")
    first = compiled(q, routings[0])
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = compiled(q, routings[1])
        again = compiled(q, routings[0])
    assert builds == []
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for out, routing in ((first, routings[0]), (second, routings[1]), (again, routings[0])):
        torch.testing.assert_close(out, op(q, routing), atol=0, rtol=0)
    assert not torch.equal(first, second)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_the_committed_compile_report_has_every_column_and_the_heuristics_choices():
    """benchmarks/results/compile_report_triton<version>.csv is what benchmarks/compile_report.py
    writes now: the columns of ResourceUsage (and heuristic_choice), one heuristic row per arch,
    dtype and supported head dim, each with the configuration the heuristic picks today."""
    import csv
    from dataclasses import fields

    from anyms_kernels._compile import _TL_DTYPES as names, ResourceUsage
    from anyms_kernels._triton import TRITON_VERSION
    from anyms_kernels.ops.region_attention import TRITON_DTYPES, TRITON_HEAD_DIMS, config_candidates

    path = os.path.join(ROOT, "benchmarks", "results", f"compile_report_triton{'.'.join(map(str, TRITON_VERSION))}.csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    assert header == [f.name for f in fields(ResourceUsage)] + ["heuristic_choice"]
    chosen = {(r["arch"], r["dtype"], int(r["head_dim"])): r for r in rows if r["heuristic_choice"] == "True"}
    expected = {(arch, names[dtype], d) for arch in ("80", "90") for dtype in TRITON_DTYPES for d in TRITON_HEAD_DIMS}
    assert set(chosen) == expected
    for (arch, dtype, d), row in chosen.items():
        cfg = config_candidates(d, next(t for t, n in names.items() if n == dtype))[0]
        assert (int(row["block_m"]), int(row["num_warps"]), int(row["num_stages"])) == \
            (cfg.block_m, cfg.num_warps, cfg.num_stages), (arch, dtype, d)
        assert int(row["stack_bytes"]) == int(row["spill_stores"]) == int(row["spill_loads"]) == 0
