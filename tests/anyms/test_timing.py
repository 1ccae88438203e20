"""Subjects acting in a window of the denoising steps, with a scale schedule (anyms.timing).

Equalities are exact where both sides run the same operations: a subject absent from the
routing is never computed (the op routes only the active subjects), so "end 0" and "scale 0"
run identical arithmetic, and so does "not given" on the U-Net pipelines (FLUX's image
projection then sees one row fewer: a stated tolerance); a timed call and a call whose
layout is swapped by hand at each step run the same ops with the same float32 scales.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from anyms import Layout, Subject, cli, loading, set_anyms_layout
from anyms.pipeline import AnyMSStableDiffusionXLPipeline, prepare_subjects
from anyms.timing import SCHEDULES, step_acts, step_weight
from anyms.tiny import tiny_pipeline

from .cli_checks import assert_refused_in_one_line, job_source, no_loading

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4
LOW, HIGH = (0.0, 0.0, 0.6, 1.0), (0.4, 0.0, 1.0, 1.0)      # HIGH is on top where they overlap


# ------------------------------------------------------------------ the rules
def diffusers_controlnet_keep(i, n, s, e):
    """StableDiffusionXLControlNetPipeline.__call__, "Create tensor stating which controlnets to keep"."""
    return 1.0 - float(i / n < s or (i + 1) / n > e)


@pytest.mark.parametrize("n", [1, 3, 4, 7, 10, 30])
def test_the_window_is_diffusers_controlnet_rule(n):
    bounds = [0.0, 0.1, 0.25, 1 / 3, 0.3, 0.5, 0.6, 2 / 3, 0.75, 0.9, 1.0]
    for s in bounds:
        for e in bounds:
            if s <= e:
                got = [step_acts(i, n, s, e) for i in range(n)]
                assert got == [bool(diffusers_controlnet_keep(i, n, s, e)) for i in range(n)], (n, s, e)
    assert [step_acts(i, 4, 0.0, 1.0) for i in range(4)] == [True] * 4
    assert [step_acts(i, 4, 0.0, 0.0) for i in range(4)] == [False] * 4
    assert [step_acts(i, 4, 0.25, 0.75) for i in range(4)] == [False, True, True, False]


def test_schedules_give_the_documented_weights():
    # N = 4, window [0, 1): progress at the steps' middles is 1/8, 3/8, 5/8, 7/8
    p = [0.125, 0.375, 0.625, 0.875]
    want = {"constant": [1, 1, 1, 1], "linear_up": p, "linear_down": [0.875, 0.625, 0.375, 0.125],
            "ease_in": [0.015625, 0.140625, 0.390625, 0.765625],
            "ease_out": [0.234375, 0.609375, 0.859375, 0.984375]}
    assert set(want) == set(SCHEDULES)
    for name, weights in want.items():
        assert [step_weight(i, 4, 0.0, 1.0, name) for i in range(4)] == weights, name
    # N = 10, window [0.2, 0.6): steps 2..5 act, progress (0.25, 0.35, 0.45, 0.55 - 0.2) / 0.4
    got = [step_weight(i, 10, 0.2, 0.6, "linear_up") for i in range(10)]
    assert got[:2] == [0, 0] and got[6:] == [0] * 4
    np.testing.assert_allclose(got[2:6], [0.125, 0.375, 0.625, 0.875], rtol=1e-12)


def test_set_step_rewrites_one_scale_tensor_and_routes_each_active_set_once():
    layout = Layout([list(LOW), list(HIGH)], (9, 13), scales=[1.0, 0.8], windows=[(0, 1), (0.25, 0.75)],
                    schedules=["constant", "linear_down"])
    assert layout.timed
    layout.prepare("cpu", levels=3)
    assert layout._routing == {}                                   # a timed layout waits for its first step
    with pytest.raises(ValueError, match=r"no step was set: call layout.set_step"):
        layout.routing_at((9, 13), "cpu")
    scale = layout.subject_scale("cpu")
    seen = []
    for i in range(STEPS):
        layout.set_step(i, STEPS)
        seen.append((layout.active, layout.subject_scale("cpu").tolist(), layout.routing_at((9, 13), "cpu")))
        assert layout.subject_scale("cpu") is scale                # the same tensor, new values
    assert [s[0] for s in seen] == [(True, False), (True, True), (True, True), (True, False)]
    assert [s[1] for s in seen] == [[1.0, 0.0], [1.0, np.float32(0.8) * np.float32(0.75)],
                                    [1.0, np.float32(0.8) * np.float32(0.25)], [1.0, 0.0]]
    assert seen[0][2] is seen[3][2] and seen[1][2] is seen[2][2] and seen[0][2] is not seen[1][2]
    assert {a for _, _, a in layout._routing} == {(True, False), (True, True)}
    assert len(layout._routing) == 6                               # 3 levels x 2 active sets
    # an inactive subject covers no token: its routing is the one-subject layout's
    alone = Layout([list(LOW)], (9, 13)).routing_at((9, 13), "cpu")
    layout.set_step(0, STEPS)
    routing = layout.routing_at((9, 13), "cpu")
    assert torch.equal(routing.cover[:, 0], alone.cover[:, 0]) and not routing.cover[:, 1].any()


def test_an_untimed_layout_is_as_before_and_scale_zero_leaves_the_routing():
    layout = Layout([list(LOW), list(HIGH)], (9, 13), scales=[1.0, 0.0])
    assert not layout.timed and layout.active == (True, False)
    layout.routing_at((9, 13), "cpu")                              # no set_step needed
    plain = Layout([list(LOW), list(HIGH)], (9, 13), scales=[1.0, 0.5])
    assert plain.active == (True, True) and plain.subject_scale("cpu").tolist() == [1.0, 0.5]


# ------------------------------------------------------------------ bad input
BAD = [({"start": 0.8, "end": 0.2}, r"subjects\[1\]\.start \(0\.8\) must not be after subjects\[1\]\.end \(0\.2\)"),
       ({"start": -0.1}, r"subjects\[1\]\.start must be a number in \[0, 1\]"),
       ({"end": 1.5}, r"subjects\[1\]\.end must be a number in \[0, 1\]"),
       ({"end": float("nan")}, r"subjects\[1\]\.end must be a number in \[0, 1\]"),
       ({"start": "0.5"}, r"subjects\[1\]\.start must be a number"),
       ({"end": True}, r"subjects\[1\]\.end must be a number"),
       ({"start": None}, r"subjects\[1\]\.start must be a number"),
       ({"schedule": "linear"}, r"subjects\[1\]\.schedule must be one of \['constant', 'linear_up'"),
       ({"schedule": 3}, r"subjects\[1\]\.schedule must be one of")]


@pytest.mark.parametrize("bad,message", BAD, ids=[str(b) for b, _ in BAD])
def test_bad_timing_names_the_subject_and_key(subject_images, bad, message):
    subjects = [Subject(subject_images[0], LOW), Subject(subject_images[1], HIGH, **bad)]
    with pytest.raises(ValueError, match=message):
        prepare_subjects(subjects)


@pytest.mark.parametrize("bad,message", BAD, ids=[str(b) for b, _ in BAD])
@pytest.mark.parametrize("source", ["--layout", "--jobs"])
def test_bad_timing_in_a_file_is_one_line_exit_2_before_loading(tmp_path, subject_images, capsys, monkeypatch,
                                                                 bad, message, source):
    monkeypatch.setattr(loading, "_load_pipeline", no_loading)
    subject_images[0].save(tmp_path / "s.png")
    good = {"image": "s.png", "box": list(LOW)}
    job = {"prompt": "a", "subjects": [good, {**good, "box": list(HIGH), **bad}]}
    argv, where = job_source(tmp_path, source, job, {"prompt": "a", "subjects": [good]})
    assert_refused_in_one_line(tmp_path, argv, where + message, capsys)


BAD_RECORD = [({"start": 2}, r'"layout.subjects\[0\].start" must be a number in \[0, 1\]'),
              ({"start": "0"}, r'"layout.subjects\[0\].start" must be a number in \[0, 1\]'),
              ({"start": 0.9, "end": 0.1}, r'"layout.subjects\[0\].start" \(0.9\) must not be after'),
              ({"schedule": "wobble"}, r'"layout.subjects\[0\].schedule" must be one of')]


@pytest.mark.parametrize("bad,message", BAD_RECORD, ids=[str(b) for b, _ in BAD_RECORD])
def test_the_record_schema_checks_the_timing(tmp_path, subject_images, bad, message):
    from anyms.metadata import build_record, check_record

    subject_images[0].save(tmp_path / "s.png")
    record = build_record(prompt="a", negative_prompt=None, subjects=[Subject(str(tmp_path / "s.png"), LOW)],
                          mode="overwrite", priority="order", seed=0, steps=2, guidance=None, height=64, width=64,
                          model={"arch": "sdxl", "model": "tiny", "ip_adapter": None, "image_encoder": None,
                                 "dtype": "float32"}, folder=str(tmp_path), device="cpu")
    check_record(record, "--from 'x.png'")
    assert not {"start", "end", "schedule"} & set(record["layout"]["subjects"][0])   # defaults are not written
    record["layout"]["subjects"][0].update(bad)
    with pytest.raises(ValueError, match=r"^--from 'x.png': its record's " + message):
        check_record(record, "--from 'x.png'")


# ------------------------------------------------------------------ the pipeline
@pytest.fixture
def pipe():
    return tiny_pipeline(AnyMSStableDiffusionXLPipeline, kind="sdxl", seed=0)


def run(pipe, subjects, seed=0, **kwargs):
    return pipe("a cat and a dog", subjects=subjects, num_inference_steps=STEPS, height=64, width=64,
                output_type="latent", generator=torch.Generator().manual_seed(seed), **kwargs).images


def by_hand(pipe, images, boxes, scales_per_step, mode="overwrite"):
    """An untimed call whose layout is replaced, after each step, by a layout with the next
    step's scales: what a timed call must equal."""
    def swap(p, i, t, tensors):
        if i + 1 < p.num_timesteps:
            made = p.anyms_last_plan.layout
            layout = Layout([list(b) for b in boxes], made.latent_hw, scales=scales_per_step[i + 1], mode=mode)
            set_anyms_layout(p, layout.prepare("cpu", levels=len(p.unet.config.block_out_channels)))
        return tensors

    subjects = [Subject(im, box, scale=s) for im, box, s in zip(images, boxes, scales_per_step[0])]
    return run(pipe, subjects, anyms_mode=mode, callback_on_step_end=swap)


def test_default_timing_is_the_untimed_call(pipe, subject_images):
    a, b = subject_images[:2]
    plain = run(pipe, [Subject(a, LOW), Subject(b, HIGH, scale=0.8)])
    explicit = run(pipe, [Subject(a, LOW, start=0.0, end=1.0, schedule="constant"),
                          Subject(b, HIGH, scale=0.8, start=0, end=1, schedule="constant")])
    assert torch.equal(plain, explicit)
    assert pipe.anyms_last_plan.layout.step is None                 # untimed: no step machinery ran


@pytest.mark.parametrize("mode", ["overwrite", "sum"])
def test_end_zero_equals_scale_zero_equals_the_subject_not_given(pipe, subject_images, mode):
    """Exact: the subject on top is never routed, so the one under it takes its tokens and
    every other number is computed by the same operations (its image is still encoded, alone)."""
    a, b = subject_images[:2]
    full = run(pipe, [Subject(a, LOW), Subject(b, HIGH, scale=0.8)], anyms_mode=mode)
    end0 = run(pipe, [Subject(a, LOW), Subject(b, HIGH, scale=0.8, end=0.0)], anyms_mode=mode)
    scale0 = run(pipe, [Subject(a, LOW), Subject(b, HIGH, scale=0.0)], anyms_mode=mode)
    absent = run(pipe, [Subject(a, LOW)], anyms_mode=mode)
    assert torch.equal(end0, scale0) and torch.equal(end0, absent)
    assert (full - absent).abs().max() > 1e-3                       # the subject did something when it acted


@pytest.mark.parametrize("window,on", [((0.0, 0.5), [1, 1, 0, 0]), ((0.5, 1.0), [0, 0, 1, 1]),
                                       ((0.25, 0.75), [0, 1, 1, 0]), ((0.3, 1.0), [0, 0, 1, 1])])
def test_a_window_equals_the_subject_on_those_steps_only(pipe, subject_images, window, on):
    a, b = subject_images[:2]
    seen = []

    def watch(p, i, t, tensors):
        layout = p.anyms_last_plan.layout
        seen.append((layout.step, layout.active, layout.subject_scale("cpu").tolist()))
        return tensors

    timed = run(pipe, [Subject(a, LOW), Subject(b, HIGH, scale=0.8, start=window[0], end=window[1])],
                callback_on_step_end=watch)
    s = float(np.float32(0.8))
    assert seen == [((i, STEPS), (True, bool(k)), [1.0, s * k]) for i, k in enumerate(on)]
    want = by_hand(pipe, [a, b], [LOW, HIGH], [[1.0, 0.8 * k] for k in on])
    assert torch.equal(timed, want)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_a_schedule_gives_its_scale_at_each_step(pipe, subject_images, schedule):
    a, b = subject_images[:2]
    scales = []

    def watch(p, i, t, tensors):
        scales.append(p.anyms_last_plan.layout.subject_scale("cpu").tolist())
        return tensors

    timed = run(pipe, [Subject(a, LOW, scale=0.5, schedule=schedule), Subject(b, HIGH, scale=0.8, start=0.25)],
                callback_on_step_end=watch)
    p = [0.125, 0.375, 0.625, 0.875]
    w = {"constant": [1.0] * 4, "linear_up": p, "linear_down": [1 - x for x in p],
         "ease_in": [x * x for x in p], "ease_out": [1 - (1 - x) ** 2 for x in p]}[schedule]
    want = [[float(np.float32(0.5) * np.float32(w[i])), 0.0 if i == 0 else float(np.float32(0.8))]
            for i in range(STEPS)]
    assert scales == want
    assert torch.equal(timed, by_hand(pipe, [a, b], [LOW, HIGH], want))


def test_sd15_a_window_and_end_zero(subject_images):
    """SD 1.5's tiny pipeline runs PNDM, whose loop has num_inference_steps + 1 timesteps: N is
    the loop's length (pipe.num_timesteps), as in diffusers' ControlNet pipelines."""
    from anyms.pipeline import AnyMSStableDiffusionPipeline

    pipe = tiny_pipeline(AnyMSStableDiffusionPipeline, kind="sd15", seed=0)
    a, b = subject_images[:2]
    seen = []

    def watch(p, i, t, tensors):
        seen.append((i, p.num_timesteps, p.anyms_last_plan.layout.active))
        return tensors

    timed = run(pipe, [Subject(a, LOW), Subject(b, HIGH, scale=0.8, start=0.2, end=0.8)], callback_on_step_end=watch)
    n = seen[0][1]
    assert n == STEPS + 1 and [(i, act) for i, _, act in seen] == [(i, (True, 1 <= i <= 3)) for i in range(n)]
    on = [int(step_acts(i, n, 0.2, 0.8)) for i in range(n)]
    assert torch.equal(timed, by_hand(pipe, [a, b], [LOW, HIGH], [[1.0, 0.8 * k] for k in on]))
    assert torch.equal(run(pipe, [Subject(a, LOW), Subject(b, HIGH, end=0.0)]), run(pipe, [Subject(a, LOW)]))


def test_a_pipeline_callback_object_keeps_its_tensor_inputs(pipe, subject_images):
    """A user's PipelineCallback keeps working under a timed call (its tensor_inputs are passed on)."""
    from diffusers.callbacks import PipelineCallback

    class Record(PipelineCallback):
        tensor_inputs = ["latents", "prompt_embeds"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            got.append((step_index, sorted(callback_kwargs)))
            return callback_kwargs

    got = []
    a, b = subject_images[:2]
    run(pipe, [Subject(a, LOW), Subject(b, HIGH, end=0.5)], callback_on_step_end=Record())
    assert got == [(i, ["latents", "prompt_embeds"]) for i in range(STEPS)]


def test_scales_changing_per_step_do_not_recompile(subject_images):
    """The op compiled (fullgraph) around a timed layout: a new schedule value each step reuses
    the graph (the scale tensor is the same object, rewritten in place); the result is the eager one."""
    import anyms_kernels as ak

    layout = Layout([list(LOW), list(HIGH)], (6, 10), scales=[0.7, 0.8], schedules=["linear_up", "ease_out"])
    layout.prepare("cpu", levels=1)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 60, 32, generator=g)
    kt, vt = torch.randn(1, 2, 7, 32, generator=g), torch.randn(1, 2, 7, 32, generator=g)
    ks, vs = torch.randn(1, 2, 2, 4, 32, generator=g), torch.randn(1, 2, 2, 4, 32, generator=g)

    def attend(q, kt, vt, ks, vs):
        return ak.region_cross_attention(q, kt, vt, ks, vs, layout.routing_at((6, 10), q.device), (6, 10),
                                         mode=layout.mode, subject_scale=layout.subject_scale(q.device),
                                         backend="torch")

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    outs = []
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for i in range(STEPS):
                layout.set_step(i, STEPS)
                got = compiled(q, kt, vt, ks, vs)
                torch.testing.assert_close(got, attend(q, kt, vt, ks, vs), rtol=1e-6, atol=1e-6)
                outs.append(got)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs == 1
    assert all((outs[i] - outs[i + 1]).abs().max() > 1e-4 for i in range(STEPS - 1))


# ------------------------------------------------------------------ FLUX
@pytest.mark.parametrize("true_cfg", [False, True])
def test_flux_a_window_equals_the_subject_on_those_steps_only(subject_images, true_cfg):
    """FLUX (two transformer calls a step with true CFG): the timed call sets each step once,
    and equals the call whose layout is swapped by hand; end 0 equals the subject not given."""
    from anyms.flux import AnyMSFluxPipeline, flux_layout
    from anyms.tiny_flux import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(AnyMSFluxPipeline, seed=0)
    a, b = subject_images[:2]
    extra = dict(negative_prompt="blurry", true_cfg_scale=3.0) if true_cfg else {}

    def call(subjects, callback=None):
        return pipe("a cat and a dog", subjects=subjects, num_inference_steps=STEPS, height=64, width=64,
                    output_type="latent", generator=torch.Generator().manual_seed(0),
                    callback_on_step_end=callback, **extra).images

    seen = []

    def watch(p, i, t, tensors):
        seen.append((p.anyms_last_plan.layout.step, p.anyms_last_plan.layout.active))
        return tensors

    timed = call([Subject(a, LOW), Subject(b, HIGH, scale=0.8, start=0.5)], watch)
    assert seen == [((i, STEPS), (True, i >= 2)) for i in range(STEPS)]

    def swap(p, i, t, tensors):
        if i == 1:              # steps 2 and 3: the subject acts
            layout = flux_layout([list(LOW), list(HIGH)], 64, 64, scales=[1.0, 0.8])
            set_anyms_layout(p, layout.prepare("cpu"))
        return tensors

    assert torch.equal(timed, call([Subject(a, LOW), Subject(b, HIGH, scale=0.0)], swap))
    end0 = call([Subject(a, LOW), Subject(b, HIGH, end=0.0)])
    assert torch.equal(end0, call([Subject(a, LOW), Subject(b, HIGH, scale=0.0)]))
    # Not given, one image fewer goes through FLUX's image projection (a Linear over B*S rows):
    # another row count may round the other rows' last bits differently (7e-7 seen here).
    torch.testing.assert_close(end0, call([Subject(a, LOW)]), rtol=0, atol=1e-5)


# ------------------------------------------------------------------ the command line
def test_a_timed_layout_file_is_recorded_and_from_makes_the_same_image(tmp_path, subject_images, capsys):
    subject_images[0].save(tmp_path / "a.png")
    subject_images[1].save(tmp_path / "b.png")
    layout = {"prompt": "a cat and a dog", "subjects": [
        {"image": "a.png", "box": list(LOW), "schedule": "ease_out"},
        {"image": "b.png", "box": list(HIGH), "scale": 0.8, "start": 0.25, "end": 0.75, "schedule": "linear_up"}]}
    (tmp_path / "layout.json").write_text(json.dumps(layout))
    tiny = ["--model", "tiny", "--height", "64", "--width", "64", "--steps", "4", "--device", "cpu", "--no-pictures"]
    out, untimed = tmp_path / "timed.png", tmp_path / "untimed.png"
    assert cli.main(["generate", "--layout", str(tmp_path / "layout.json"), *tiny, "--out", str(out)]) == 0
    record = json.loads(Image.open(out).text["anyms"])
    entries = record["layout"]["subjects"]
    assert (entries[0]["schedule"], "start" in entries[0], "end" in entries[0]) == ("ease_out", False, False)
    assert (entries[1]["start"], entries[1]["end"], entries[1]["schedule"]) == (0.25, 0.75, "linear_up")
    again = tmp_path / "again.png"
    assert cli.main(["generate", "--from", str(out), "--device", "cpu", "--no-pictures", "--out", str(again)]) == 0
    assert json.loads(Image.open(again).text["anyms"])["layout"]["subjects"][1]["start"] == 0.25
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))
    for entry in layout["subjects"]:
        for key in ("start", "end", "schedule"):
            entry.pop(key, None)
    (tmp_path / "layout.json").write_text(json.dumps(layout))
    assert cli.main(["generate", "--layout", str(tmp_path / "layout.json"), *tiny, "--out", str(untimed)]) == 0
    capsys.readouterr()
    assert np.abs(np.asarray(Image.open(untimed), dtype=int) - np.asarray(Image.open(out))).max() > 0


@pytest.mark.slow
def test_a_compiled_unet_compiles_once_per_active_set_not_per_step(pipe, subject_images):
    """torch.compile(pipe.unet, fullgraph=True) over a timed call: a schedule that changes every
    step reuses the graph; the step where the second subject joins is the one more graph. The
    result is the eager one (aot_eager: the same ops, traced)."""
    a, b = subject_images[:2]
    subjects = [Subject(a, LOW, schedule="linear_down"), Subject(b, HIGH, scale=0.8, start=0.5, schedule="ease_in")]
    want = run(pipe, subjects)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager_unet = pipe.unet
    pipe.unet = torch.compile(eager_unet, fullgraph=True, backend="aot_eager")
    try:
        got = run(pipe, subjects)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        pipe.unet = eager_unet
        torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert graphs == 2          # active sets (True, False) at steps 0-1, (True, True) at steps 2-3


def test_the_first_step_builds_the_routing_even_when_its_scales_are_the_untimed_ones():
    """A timed layout whose step 0 has every weight 1 still has its routing built by set_step
    (not inside the first forward)."""
    layout = Layout([list(LOW), list(HIGH)], (9, 13), windows=[(0, 1), (0, 0.5)])
    layout.prepare("cpu", levels=3)
    assert layout._routing == {}
    layout.set_step(0, STEPS)
    assert {(g, a) for g, _, a in layout._routing} == {(g, (True, True)) for g in ((9, 13), (5, 7), (3, 4))}


def test_a_timed_job_resumes_and_a_changed_window_is_not_done(tmp_path, subject_images, capsys):
    subject_images[0].save(tmp_path / "a.png")
    subject_images[1].save(tmp_path / "b.png")
    job = {"prompt": "two", "out": "x.png", "subjects": [
        {"image": "a.png", "box": list(LOW)}, {"image": "b.png", "box": list(HIGH), "end": 0.5}]}
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps(job) + "\n")
    argv = ["generate", "--jobs", str(jobs), "--model", "tiny", "--height", "64", "--width", "64", "--steps", "2",
            "--device", "cpu", "--out-dir", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 0
    lines = (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["status"] == "skipped"
    job["subjects"][1]["end"] = 0.75
    jobs.write_text(json.dumps(job) + "\n")
    capsys.readouterr()
    assert cli.main(argv) == 2                      # the image records end 0.5: refused without --overwrite
    assert re.search(r"x\.png' exists but was made from something else \(layout\.subjects differs\)",
                     capsys.readouterr().err)
    assert cli.main(argv + ["--overwrite"]) == 0
    assert json.loads(Image.open(tmp_path / "out" / "x.png").text["anyms"])["layout"]["subjects"][1]["end"] == 0.75


def test_a_timed_layout_in_your_own_pipeline(subject_images):
    """With the processor in a plain diffusers pipeline: set step 0, pass step_callback; without
    a step the first forward refuses (never a silent untimed run)."""
    from diffusers import StableDiffusionXLPipeline

    from anyms import anyms_attention

    plain = tiny_pipeline(StableDiffusionXLPipeline, kind="sdxl", seed=0)
    layout = Layout([list(LOW), list(HIGH)], (8, 8), scales=[1.0, 0.8], windows=[(0, 1), (0.5, 1)])
    call = dict(ip_adapter_image=[subject_images[:2]], num_inference_steps=STEPS, height=64, width=64,
                output_type="latent")
    with anyms_attention(plain, layout):
        with pytest.raises(ValueError, match="no step was set"):
            plain("a cat", **call)
        seen = []
        layout.set_step(0, STEPS)
        plain("a cat", callback_on_step_end=layout.step_callback(
            lambda p, i, t, tensors: (seen.append((i, layout.active)), tensors)[1]), **call)
    assert seen == [(i, (True, i >= 2)) for i in range(STEPS)]
