"""Random JSON for every key of a jobs file's line and of a --from record: the command either
takes the input (and goes on to load the model, where these tests stop it) or refuses it
with one line, exit 2, naming the file (``--jobs FILE:LINE``, ``--from FILE``) and the key.
Never a traceback, never a file outside --out-dir. No model is loaded."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import shutil
import tempfile
from unittest import mock

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import anyms.pipeline  # noqa: F401  (imported here, so its import-time log lines fall outside the runs)
from anyms import cli, loading
from anyms.metadata import build_record

SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
TINY = ["--model", "tiny", "--device", "cpu"]


class Loaded(Exception):
    """Raised where the model would be loaded (or its config read): the input was taken."""


def _stop(*args, **kwargs):
    raise Loaded


# ------------------------------------------------------------------ values
JSON_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
                | st.text(max_size=12))
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
# values that reach the checks behind the type checks: files, names, sizes, ranges, escapes
PLAUSIBLE = st.sampled_from([
    "s0.png", "s1.png", "m.png", "missing.png", "", " ", "../s0.png", "/etc/passwd", "sum", "overwrite", "order",
    "smaller_on_top", "a.png", "a.PNG", "sub/b.png", "sub/../c.png", "../esc.png", "sub/.png", "a\u0000.png",
    "x" * 300 + ".png", "/tmp/anyms-property-escape.png", "sdxl", "sd15", "flux", "float16", "bfloat16", "tiny",
    "0" * 64, "f" * 64, [0, 0, 1, 1], [0.2, 0.2, 0.8, 0.9], [0.5, 0.5, 0.4, 0.6], [0, 0, 1, 2], [0, 0, 1],
    0, 1, -1, 2, 7, 64, 96, 100, 128, 1000, 1001, 16384, 16392, 2 ** 64, 2 ** 64 - 1, 1e39, -1e39, 0.5, 9.0,
    math.nan, math.inf, True, False, None, {}, [], [[0, 0, 1, 1]],
])
VALUES = st.one_of(JSON, PLAUSIBLE)
DROP = object()


def _mutations(template):
    """Every place of ``template`` (a dict of dicts and lists): (path, kind) where kind is
    "set" (a new value), "drop" (the key removed) or "add" (an unknown key beside it)."""
    places = []

    def walk(node, path):
        if isinstance(node, dict):
            places.append((path, "add"))
            for key, value in node.items():
                places.append((path + (key,), "set"))
                places.append((path + (key,), "drop"))
                walk(value, path + (key,))
        elif isinstance(node, list) and node and isinstance(node[0], dict):
            for i, value in enumerate(node):
                places.append((path + (i,), "set"))
                walk(value, path + (i,))

    walk(template, ())
    return places


def _apply(template, path, kind, value, new_key):
    data = copy.deepcopy(template)
    target = data
    for part in path[:-1] if kind != "add" else path:
        target = target[part]
    if kind == "add":
        target[new_key] = value
    elif kind == "drop":
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


def _names(path, kind, new_key):
    """Strings of which the error must hold one: the key as the message may name it."""
    if kind == "add":                                 # an unknown key, or a free-form one ("versions")
        return [repr(new_key), f'.{new_key}"']
    last = [p for p in path if isinstance(p, str)][-1] if any(isinstance(p, str) for p in path) else None
    indices = [p for p in path if isinstance(p, int)]
    names = []
    if indices:                                       # a subject: subjects[i] and the key
        names.append(f"subjects[{indices[-1]}]")
    if last is not None and last != "subjects":
        names.append(last)
    return names or ["subjects"]


def _tree(root):
    out = set()
    for folder, dirs, files in os.walk(root):
        out.update(os.path.join(folder, name) for name in dirs + files)
    return out


@contextlib.contextmanager
def _world():
    """A folder ``base/a/b/root`` (so that escapes land inside ``base``, where they are seen)
    holding ``in/`` (two subject images and a 64x64 mask) and the output folder ``out``."""
    base = tempfile.mkdtemp(prefix="anyms-property-")
    root = os.path.join(base, "a", "b", "root")
    inputs = os.path.join(root, "in")
    os.makedirs(inputs)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(os.path.join(inputs, f"s{i}.png"))
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 16:60] = 255
    Image.fromarray(mask).save(os.path.join(inputs, "m.png"))
    try:
        yield base, inputs, os.path.join(root, "out")
    finally:
        shutil.rmtree(base)


def _run(argv):
    """``anyms argv`` with the model's loading (and its config's reading) stopped: (exit status or
    "loaded", stderr)."""
    err = io.StringIO()
    with mock.patch.object(loading, "_load_pipeline", _stop), mock.patch.object(loading, "_model_arch", _stop), \
            contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except Loaded:
            code = "loaded"
    return code, err.getvalue()


def _check_outcome(code, err, prefix, names, before, after, out_dir):
    """Taken (loaded) or refused in one line naming the file and the key; nothing outside out_dir."""
    event(f"outcome: {code}")           # --hypothesis-show-statistics: how many were taken, refused
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    if code == "loaded":
        assert not [line for line in lines if "error" in line], err
    else:
        assert code == 2, (code, err)
        errors = [line for line in lines if line.startswith("anyms generate: error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], err
        assert all(line.startswith("anyms generate: ") for line in lines), err
        message = errors[0][len("anyms generate: error: "):]
        assert message.startswith(prefix), (prefix, message)
        assert any(name in message for name in names), (names, message)
    escaped = [p for p in after - before if not (p == out_dir or p.startswith(out_dir + os.sep))]
    assert not escaped, escaped
    assert not os.path.lexists("/tmp/anyms-property-escape.png")


# ------------------------------------------------------------------ jobs files
VALID_JOB = {"prompt": "two things", "negative_prompt": "blurry", "mode": "sum", "priority": "order",
             "subjects": [{"image": "s0.png", "box": [0, 0, 0.6, 1], "label": "a"},
                          {"image": "s1.png", "mask": "m.png", "scale": 0.8}],
             "out": "sub/x.png", "seed": 3, "steps": 2, "guidance": 5.0, "height": 64, "width": 64}
JOB_PLACES = _mutations(VALID_JOB)


def test_the_valid_job_and_record_are_taken():
    """The templates the properties start from are taken: a refusal below is the change's."""
    with _world() as (base, inputs, out):
        path = os.path.join(inputs, "jobs.jsonl")
        with open(path, "w") as f:
            f.write(json.dumps(VALID_JOB) + "\n")
        assert _run(["generate", "--jobs", path, *TINY, "--out-dir", out]) == ("loaded", "")
        png = _record_png(inputs)
        assert _run(["generate", "--from", png, "--out", os.path.join(out, "y.png"), "--device", "cpu"])[0] \
            == "loaded"


@SETTINGS
@given(place=st.sampled_from(JOB_PLACES), value=VALUES, new_key=st.text(min_size=1, max_size=8))
def test_any_value_for_any_key_of_a_job_is_taken_or_named_in_one_line(place, value, new_key):
    path_in_job, kind = place
    if kind == "add" and new_key in _follow(VALID_JOB, path_in_job):
        kind = "set"
        path_in_job = path_in_job + (new_key,)
    job = _apply(VALID_JOB, path_in_job, kind, value, new_key)
    with _world() as (base, inputs, out):
        path = os.path.join(inputs, "jobs.jsonl")
        with open(path, "w") as f:      # line 1: a job that is fine; line 2: the changed one
            f.write(json.dumps({"prompt": "fine", "subjects": [{"image": "s0.png", "box": [0, 0, 1, 1]}]}) + "\n")
            f.write(json.dumps(job) + "\n")
        before = _tree(base)
        code, err = _run(["generate", "--jobs", path, *TINY, "--out-dir", out])
        _check_outcome(code, err, f"--jobs {path}:2", _names(path_in_job, kind, new_key), before, _tree(base), out)


def _follow(node, path):
    for part in path:
        node = node[part]
    return node


# ------------------------------------------------------------------ --from records
def _template(inputs):
    from anyms import Subject

    return build_record(
        prompt="two things", negative_prompt=None, mode="overwrite", priority="smaller_on_top", seed=5, steps=2,
        guidance=4.5, height=64, width=64,
        subjects=[Subject(os.path.join(inputs, "s0.png"), (0.1, 0.1, 0.6, 0.9), 1.0, "a"),
                  Subject(os.path.join(inputs, "s1.png"), None, 0.7, mask=os.path.join(inputs, "m.png"))],
        model={"arch": "sdxl", "model": "tiny", "ip_adapter": None, "image_encoder": None, "dtype": "float32"},
        folder=inputs, device="cpu")


def _record_png(inputs, record=None):
    info = PngInfo()
    info.add_itxt("anyms", json.dumps(record if record is not None else _template(inputs)), zip=True)
    path = os.path.join(inputs, "made.png")
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


with _world() as (_base, _inputs, _out):
    RECORD_PLACES = _mutations(_template(_inputs))


@SETTINGS
@given(place=st.sampled_from(RECORD_PLACES), value=VALUES, new_key=st.text(min_size=1, max_size=8))
def test_any_value_for_any_key_of_a_from_record_is_taken_or_named_in_one_line(place, value, new_key):
    path_in_record, kind = place
    with _world() as (base, inputs, out):
        template = _template(inputs)
        if kind == "add" and new_key in _follow(template, path_in_record):
            kind = "set"
            path_in_record = path_in_record + (new_key,)
        png = _record_png(inputs, _apply(template, path_in_record, kind, value, new_key))
        before = _tree(base)
        code, err = _run(["generate", "--from", png, "--out", os.path.join(out, "y.png"), "--device", "cpu"])
        _check_outcome(code, err, f"--from {png!r}", _names(path_in_record, kind, new_key), before, _tree(base),
                       out)
