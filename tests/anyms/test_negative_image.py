"""A negative image per subject (``Subject(negative_image=...)``): what the subject's branch sees in
classifier-free guidance's unconditional pass, on the pipelines, the layout file, --jobs, the
PNG record and --from; the timing field of ``--subject``; what a subject's end and negative
image do on the trained toy world.

Equalities are exact where both sides run the same operations (the same encoder calls on the
same images, batch 1), and within test_pipeline.py's / test_flux.py's tolerances against
diffusers' own IP-Adapter path (AnyMS's fused op against diffusers' SDPA calls).
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from anyms import Subject, cli, loading
from anyms.errors import UsageError
from anyms.job import Job, check_job
from anyms.pipeline import AnyMSStableDiffusionXLPipeline, prepare_subjects
from anyms.tiny import tiny_pipeline

from .cli_checks import assert_refused_in_one_line, job_source, no_loading

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 2
FULL = (0.0, 0.0, 1.0, 1.0)
LEFT, RIGHT, MIDDLE = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0), (0.25, 0.25, 0.75, 0.75)
# float32 CPU, 2 steps: AnyMS's fused op against diffusers' SDPA calls, the embeddings reaching the
# U-Net being equal bit for bit (checked). Measured max |diff| 1.5e-5 (SDXL 4 tokens), 8.8e-6 (16
# tokens), 7.2e-6 (SD 1.5) on latents of size ~8: test_pipeline.py's bound (1e-5) with room for
# the other rounding of another CPU, and no more.
TOL = dict(rtol=1e-5, atol=5e-5)
FLUX_TOL = dict(rtol=1e-5, atol=2e-5)       # test_flux.py's
TINY = ["--model", "tiny", "--height", "64", "--width", "64", "--steps", "2", "--device", "cpu", "--no-pictures"]


def run(pipe, prompt="a cat and a dog", seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "latent")
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images


# ------------------------------------------------------------------ the U-Net pipelines
@pytest.mark.parametrize("kind,plus", [("sdxl", False), ("sdxl", True), ("sd15", False)],
                         ids=["sdxl-4tok", "sdxl-16tok", "sd15"])
def test_full_box_negative_image_equals_diffusers_with_that_negative_embedding(anyms_and_diffusers, subject_images,
                                                                               kind, plus):
    """diffusers' own path, given ip_adapter_image_embeds whose unconditional half is the negative
    image's embedding (what its encode_image gives that image for the conditional pass)."""
    ours, theirs = anyms_and_diffusers(kind, plus)
    image, negative = subject_images[:2]
    cond, _ = theirs.encode_image([image], "cpu", 1, plus)
    uncond, _ = theirs.encode_image([negative], "cpu", 1, plus)
    expected = run(theirs, ip_adapter_image_embeds=[torch.cat([uncond[None], cond[None]])])
    embeds, got = unet_image_embeds(ours, [Subject(image, FULL, negative_image=negative)])
    assert torch.equal(embeds, torch.cat([uncond[None], cond[None]]))      # what diffusers was given
    torch.testing.assert_close(got, expected, **TOL)
    # the negative image acts: without it the result is diffusers' default (zeros), another one
    default = run(ours, subjects=[Subject(image, FULL)])
    torch.testing.assert_close(default, run(theirs, ip_adapter_image=image), **TOL)
    assert (got - default).abs().max() > 1e-2


def unet_image_embeds(pipe, subjects, **kwargs):
    """The image embeddings the U-Net receives at its first call (``[2, S, ...]``: unconditional first)."""
    seen = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["added_cond_kwargs"]["image_embeds"][0].clone()), with_kwargs=True)
    try:
        latents = run(pipe, subjects=subjects, **kwargs)
    finally:
        handle.remove()
    return seen[0], latents


@pytest.mark.parametrize("plus", [False, True], ids=["4tok", "16tok"])
def test_only_that_subjects_unconditional_row_changes(subject_images, plus):
    """Three subjects, a negative image on the middle one (given second, placed last by
    smaller_on_top): the U-Net's unconditional row of that subject is the negative image's
    embedding, bit for bit; every other row, and the conditional half, are those of the call
    without it; and without a negative image the call is the one of before."""
    pipe = tiny_pipeline(AnyMSStableDiffusionXLPipeline, kind="sdxl", plus=plus, seed=0)
    a, b, c, negative = subject_images
    plain = [Subject(a, LEFT), Subject(b, MIDDLE), Subject(c, RIGHT)]
    with_negative = [Subject(a, LEFT), Subject(b, MIDDLE, negative_image=negative), Subject(c, RIGHT)]
    call = dict(anyms_priority="smaller_on_top", num_images_per_prompt=2)
    before, _ = unet_image_embeds(pipe, plain, **call)
    after, _ = unet_image_embeds(pipe, with_negative, **call)
    assert pipe.anyms_last_plan.order == [0, 2, 1]            # the middle subject's row is the last
    assert after.shape[:2] == (4, 3)                          # 2 unconditional rows, then 2 conditional
    want, _ = pipe.encode_image([negative], "cpu", 1, plus)
    for row in (0, 1):
        assert torch.equal(after[row, 2], want[0])
        assert not torch.equal(after[row, 2], before[row, 2])
    assert torch.equal(after[:2, :2], before[:2, :2]) and torch.equal(after[2:], before[2:])
    # the parent's default unconditional embedding: zeros (4 tokens), the encoder of a zero image (plus)
    assert bool((before[:2] == 0).all()) != plus


@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
def test_the_embedding_cache_serves_negative_images_and_keeps_the_bits(anyms_and_diffusers, subject_images, kind):
    from anyms.embeddings import SubjectEmbeddingCache

    ours, _ = anyms_and_diffusers(kind)
    seen = []
    handle = ours.image_encoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    subjects = [Subject(subject_images[0], LEFT, negative_image=subject_images[2]),
                Subject(subject_images[1], RIGHT, negative_image=subject_images[3])]
    try:
        plain = run(ours, subjects=subjects)
        assert seen == [1, 1, 1, 1]                    # every image alone, the negative ones too
        cache = SubjectEmbeddingCache()
        with cache.attached(ours):
            cached = run(ours, subjects=subjects)
            again = run(ours, subjects=subjects)
        assert (cache.misses, cache.hits) == (4, 4)
    finally:
        handle.remove()
    assert torch.equal(plain, cached) and torch.equal(plain, again)


def test_a_negative_image_without_guidance_is_refused_before_model_work(subject_images):
    pipe = tiny_pipeline(AnyMSStableDiffusionXLPipeline, kind="sdxl", seed=0)
    calls = []
    handle = pipe.image_encoder.register_forward_pre_hook(lambda m, a: calls.append(1))
    subjects = [Subject(subject_images[0], LEFT), Subject(subject_images[1], RIGHT, negative_image=subject_images[2])]
    try:
        with pytest.raises(ValueError, match=r"^subjects\[1\]\.negative_image acts only in classifier-free "
                                             r"guidance's unconditional pass, and this call runs none "
                                             r"\(guidance_scale 1 <= 1\)"):
            run(pipe, subjects=subjects, guidance_scale=1.0)
    finally:
        handle.remove()
    assert calls == []
    run(pipe, subjects=subjects[:1], guidance_scale=1.0)      # without it, the same call runs


@pytest.mark.parametrize("bad,error,message", [
    (7, TypeError, r"subjects\[0\]\.negative_image must be a PIL image, a path or a numpy array, got int"),
    ("missing.png", ValueError, r"subjects\[0\]\.negative_image"),
    (np.zeros((4, 4, 2), np.uint8), ValueError, r"subjects\[0\]\.negative_image: an array image must be"),
])
def test_a_bad_negative_image_names_it(subject_images, bad, error, message):
    with pytest.raises(error, match=message):
        prepare_subjects([Subject(subject_images[0], FULL, negative_image=bad)])


# ------------------------------------------------------------------ FLUX
@pytest.fixture(scope="module")
def flux_pipes():
    from diffusers import FluxPipeline

    from anyms.flux import AnyMSFluxPipeline
    from anyms.tiny_flux import tiny_flux_pipeline

    return tiny_flux_pipeline(AnyMSFluxPipeline, seed=0), tiny_flux_pipeline(FluxPipeline, seed=0)


TRUE_CFG = dict(negative_prompt="a blurry photo", true_cfg_scale=3.0, height=128, width=128)


def test_flux_a_subjects_negative_image_under_true_cfg(flux_pipes, subject_images):
    """Full box: diffusers' FluxPipeline with that negative_ip_adapter_image. Two subjects: the
    same operations as the call-level list of their negative images."""
    ours, theirs = flux_pipes
    image, negative = subject_images[:2]
    expected = run(theirs, ip_adapter_image=image, negative_ip_adapter_image=negative, **TRUE_CFG)
    got = run(ours, subjects=[Subject(image, FULL, negative_image=negative)], **TRUE_CFG)
    torch.testing.assert_close(got, expected, **FLUX_TOL)
    assert (got - run(ours, subjects=[Subject(image, FULL)], **TRUE_CFG)).abs().max() > 1e-3
    two = run(ours, subjects=[Subject(image, LEFT, negative_image=subject_images[3]),
                              Subject(subject_images[2], RIGHT, negative_image=negative)], **TRUE_CFG)
    listed = run(ours, subjects=[Subject(image, LEFT), Subject(subject_images[2], RIGHT)],
                 negative_ip_adapter_image=[subject_images[3], negative], **TRUE_CFG)
    assert torch.equal(two, listed)
    # one subject without: it keeps diffusers' default (a black image), the other takes its own
    one = run(ours, subjects=[Subject(image, LEFT), Subject(subject_images[2], RIGHT, negative_image=negative)],
              **TRUE_CFG)
    assert (one - two).abs().max() > 1e-4 and (one - listed).abs().max() > 1e-4


def test_flux_refuses_a_negative_image_without_true_cfg_or_with_the_call_level_one(flux_pipes, subject_images):
    ours, _ = flux_pipes
    subjects = [Subject(subject_images[0], FULL, negative_image=subject_images[1])]
    with pytest.raises(ValueError, match=r"^subjects\[0\]\.negative_image acts only in classifier-free guidance's "
                                         r"unconditional pass, and this call runs none \(FLUX runs it only with "
                                         r"true CFG"):
        run(ours, subjects=subjects, negative_prompt="a blurry photo", height=128, width=128)   # true_cfg_scale 1
    with pytest.raises(ValueError, match=r"^subjects\[0\]\.negative_image was given, and negative_ip_adapter_image "
                                         r"too"):
        run(ours, subjects=subjects, negative_ip_adapter_image=subject_images[2], **TRUE_CFG)


# ------------------------------------------------------------------ layout file, record, --from, --jobs
def write_layout(tmp_path, subject_images, negative="n.png", **extra):
    for name, image in zip(("a.png", "b.png", "n.png"), subject_images):
        image.save(tmp_path / name)
    layout = {"prompt": "a cat and a dog", "subjects": [
        {"image": "a.png", "box": list(LEFT)}, {"image": "b.png", "box": list(RIGHT), **extra}]}
    if negative is not None:
        layout["subjects"][1]["negative_image"] = negative
    (tmp_path / "layout.json").write_text(json.dumps(layout))
    return tmp_path / "layout.json"


def png(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=int)


def test_a_layout_files_negative_image_is_recorded_hashed_and_made_again_by_from(tmp_path, subject_images, capsys):
    from anyms.metadata import file_sha256

    layout = write_layout(tmp_path, subject_images)
    out, again, plain = tmp_path / "neg.png", tmp_path / "again.png", tmp_path / "plain.png"
    assert cli.main(["generate", "--layout", str(layout), *TINY, "--out", str(out)]) == 0
    entry = json.loads(Image.open(out).text["anyms"])["layout"]["subjects"][1]
    assert entry["negative_image"] == "n.png"
    assert entry["negative_image_sha256"] == file_sha256(str(tmp_path / "n.png"))
    assert "negative_image" not in json.loads(Image.open(out).text["anyms"])["layout"]["subjects"][0]
    assert cli.main(["generate", "--from", str(out), "--device", "cpu", "--no-pictures", "--out", str(again)]) == 0
    np.testing.assert_array_equal(png(again), png(out))
    # the same image from Python (the file paths, default guidance 5.0, 2 steps)
    pipe = tiny_pipeline(AnyMSStableDiffusionXLPipeline, kind="sdxl", seed=0)
    image = pipe("a cat and a dog", subjects=[
        Subject(str(tmp_path / "a.png"), LEFT),
        Subject(str(tmp_path / "b.png"), RIGHT, negative_image=str(tmp_path / "n.png"))],
        height=64, width=64, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    np.testing.assert_array_equal(np.asarray(image, dtype=int), png(out))
    # without the negative image: another image; a changed negative file: --from says so
    write_layout(tmp_path, subject_images, negative=None)
    assert cli.main(["generate", "--layout", str(layout), *TINY, "--out", str(plain)]) == 0
    assert np.abs(png(plain) - png(out)).max() > 0
    subject_images[3].save(tmp_path / "n.png")
    capsys.readouterr()
    assert cli.main(["generate", "--from", str(out), "--device", "cpu", "--no-pictures", "--out",
                     str(tmp_path / "changed.png")]) == 0
    assert re.search(r"subjects\[1\]\.negative_image .*n\.png' has changed since the image was made",
                     capsys.readouterr().err)


def test_a_job_with_a_negative_image_resumes_and_a_changed_one_is_not_done(tmp_path, subject_images, capsys):
    for name, image in zip(("a.png", "n.png", "m.png"), subject_images):
        image.save(tmp_path / name)
    job = {"prompt": "two", "out": "x.png", "subjects": [
        {"image": "a.png", "box": list(LEFT), "negative_image": "n.png"}, {"image": "a.png", "box": list(RIGHT)}]}
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps(job) + "\n")
    argv = ["generate", "--jobs", str(jobs), *TINY[:-1], "--out-dir", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    made = png(tmp_path / "out" / "x.png")
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "out" / "manifest.jsonl").read_text().splitlines()[-1])["status"] == "skipped"
    # the job's image equals the one anyms generate makes of the same layout (the cache keeps the bits)
    (tmp_path / "layout.json").write_text(json.dumps({k: v for k, v in job.items() if k != "out"}))
    assert cli.main(["generate", "--layout", str(tmp_path / "layout.json"), *TINY, "--out",
                     str(tmp_path / "one.png")]) == 0
    np.testing.assert_array_equal(png(tmp_path / "one.png"), made)
    job["subjects"][0]["negative_image"] = "m.png"
    jobs.write_text(json.dumps(job) + "\n")
    capsys.readouterr()
    assert cli.main(argv) == 2                      # the image records n.png: refused without --overwrite
    assert re.search(r"x\.png' exists but was made from something else \(layout\.subjects differs\)",
                     capsys.readouterr().err)


BAD_FILE = [({"negative_image": 3}, r"subjects\[1\]\.negative_image must be a path string"),
            ({"negative_image": "nowhere.png"}, r"subjects\[1\]\.negative_image"),
            ({"negative_image": "junk.png"}, r"subjects\[1\]\.negative_image"),
            ({"negative_image": "n.png", "guidance": 1.0},
             r"subjects\[1\]\.negative_image acts only in classifier-free guidance's unconditional pass, and this "
             r"call runs none \(guidance 1 <= 1\)")]


@pytest.mark.parametrize("bad,message", BAD_FILE, ids=["type", "missing", "not-an-image", "no-guidance"])
@pytest.mark.parametrize("source", ["--layout", "--jobs"])
def test_a_bad_negative_image_in_a_file_is_one_line_exit_2_before_loading(tmp_path, subject_images, capsys,
                                                                         monkeypatch, bad, message, source):
    monkeypatch.setattr(loading, "_load_pipeline", no_loading)
    for name, image in zip(("s.png", "n.png"), subject_images):
        image.save(tmp_path / name)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    bad = dict(bad)
    guidance = bad.pop("guidance", None)
    good = {"image": "s.png", "box": list(LEFT)}
    job = {"prompt": "a", "subjects": [good, {**good, "box": list(RIGHT), **bad}]}
    if source == "--jobs" and guidance is not None:
        job["guidance"] = guidance
    argv, where = job_source(tmp_path, source, job, {"prompt": "a", "subjects": [good]})
    if source == "--layout":
        argv += [] if guidance is None else ["--guidance", str(guidance)]
        # the file's own checks name the file; reading the images (as for "image") and the
        # guidance are the job's checks, which name the key
        where = where if "path string" in message else ""
    assert_refused_in_one_line(tmp_path, argv, where + message, capsys)


def test_the_cli_refuses_a_negative_image_with_flux_before_loading(tmp_path, subject_images):
    subject_images[0].save(tmp_path / "s.png")
    job = Job("a", [Subject(str(tmp_path / "s.png"), FULL, negative_image=str(tmp_path / "s.png"))])
    with pytest.raises(UsageError, match=r"subjects\[0\]\.negative_image .* \(FLUX runs here without "
                                         r"classifier-free guidance\)"):
        check_job(job, "flux")
    check_job(Job("a", [Subject(str(tmp_path / "s.png"), FULL, negative_image=str(tmp_path / "s.png"))]), "sdxl")


@pytest.mark.parametrize("bad,message", [
    ({"negative_image": "x.png", "negative_image_sha256": "0" * 63}, r'"layout.subjects\[0\].negative_image_sha256" '
                                                                     r"must be a SHA-256"),
    ({"negative_image_sha256": None}, r'"layout.subjects\[0\].negative_image_sha256" must be a SHA-256'),
    ({"negative_image": 5, "negative_image_sha256": "0" * 64}, r'"layout.subjects\[0\].negative_image" must be a '
                                                               r"non-empty string")])
def test_the_record_schema_checks_the_negative_image(tmp_path, subject_images, bad, message):
    from anyms.metadata import build_record, check_record, record_layout

    subject_images[0].save(tmp_path / "s.png")
    subject = Subject(str(tmp_path / "s.png"), LEFT, negative_image=str(tmp_path / "s.png"))
    record = build_record(prompt="a", negative_prompt=None, subjects=[subject], mode="overwrite", priority="order",
                          seed=0, steps=2, guidance=None, height=64, width=64,
                          model={"arch": "sdxl", "model": "tiny", "ip_adapter": None, "image_encoder": None,
                                 "dtype": "float32"}, folder=str(tmp_path), device="cpu")
    check_record(record, "--from 'x.png'")
    assert record_layout(record)["subjects"][0]["negative_image"] == "s.png"
    assert "negative_image_sha256" not in record_layout(record)["subjects"][0]
    for key, value in bad.items():      # None: the key left out
        record["layout"]["subjects"][0][key] = value
        if value is None:
            del record["layout"]["subjects"][0][key]
    with pytest.raises(ValueError, match=r"^--from 'x.png': its record's " + message):
        check_record(record, "--from 'x.png'")


# ------------------------------------------------------------------ --subject's timing field
def test_parse_subject_reads_a_timing_field():
    s = cli.parse_subject("a.png:0,0,0.5,1:0.8:end=0.6,schedule=ease_out", 0)
    assert (s.image, s.box, s.scale, s.start, s.end, s.schedule) == ("a.png", (0, 0, 0.5, 1), 0.8, 0.0, 0.6,
                                                                      "ease_out")
    s = cli.parse_subject(r"C:\p\a.png:mask=C:\p\m.png:start=0.25", 1)
    assert (s.image, s.mask, s.scale, s.start, s.end) == (r"C:\p\a.png", r"C:\p\m.png", 1.0, 0.25, 1.0)
    s = cli.parse_subject("a.png:0,0,1,1:schedule=linear_up,start=0.1,end=0.9")
    assert (s.start, s.end, s.schedule) == (0.1, 0.9, "linear_up")
    assert not cli.parse_subject("a.png:0,0,1,1:0.5").timed                # no timing field: as before


@pytest.mark.parametrize("spec,message", [
    ("a.png:0,0,1,1:end=2", r"--subject\[1\]\.end must be a number in \[0, 1\]"),
    ("a.png:0,0,1,1:start=0.8,end=0.2", r"--subject\[1\]\.start \(0\.8\) must not be after --subject\[1\]\.end"),
    ("a.png:0,0,1,1:end=x", r"--subject\[1\]\.end: 'x' is not a number"),
    ("a.png:0,0,1,1:end=nan", r"--subject\[1\]\.end: 'nan' is not a finite number"),
    ("a.png:0,0,1,1:schedule=wobble", r"--subject\[1\]\.schedule must be one of \['constant'"),
    ("a.png:0,0,1,1:stop=0.5", r"--subject\[1\] 'a.png:0,0,1,1:stop=0.5': unknown timing field 'stop=0.5'"),
    ("a.png:0,0,1,1:end=0.5,end=0.6", r"--subject\[1\] .*: end is given twice"),
    ("a.png:0,0,1,1:end=0.5,0.8", r"--subject\[1\] .*: unknown timing field '0.8'"),
])
def test_a_bad_timing_field_names_the_subject_option_exit_2_before_loading(tmp_path, subject_images, capsys,
                                                                            monkeypatch, spec, message):
    monkeypatch.setattr(loading, "_load_pipeline", no_loading)
    subject_images[0].save(tmp_path / "s.png")
    code = cli.main(["generate", "a", "--subject", f"{tmp_path / 's.png'}:0,0,1,1", "--subject", spec,
                     "--model", "tiny", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and re.search(message, err), err


def test_subject_timing_equals_the_layout_files(tmp_path, subject_images, capsys):
    layout = write_layout(tmp_path, subject_images, negative=None, start=0.5, schedule="linear_down")
    by_file, by_option = tmp_path / "file.png", tmp_path / "option.png"
    assert cli.main(["generate", "--layout", str(layout), *TINY, "--out", str(by_file)]) == 0
    assert cli.main(["generate", "a cat and a dog", "--subject", f"{tmp_path / 'a.png'}:0,0,0.5,1",
                     "--subject", f"{tmp_path / 'b.png'}:0.5,0,1,1:start=0.5,schedule=linear_down", *TINY,
                     "--out", str(by_option)]) == 0
    np.testing.assert_array_equal(png(by_option), png(by_file))
    assert json.loads(Image.open(by_option).text["anyms"])["layout"]["subjects"][1]["start"] == 0.5


# ------------------------------------------------------------------ effects on the trained toy world
# Colour fractions of subject A in its box (tests/anyms/test_toy.py's pairs and boxes, A left, B
# right, 10 steps, guidance 7.5), averaged over 3 pairs x seeds 0-3, measured on the shipped
# weights (Intel Xeon, 1 thread): no change 0.253; "end": 0.3 0.122 (scale 0: 0.053); a negative
# image of B's colour (A's shape) 0.367, higher in 9 of 12 images; a negative image equal to A's
# own reference 0.064, lower in 9 of 12 images. (The earlier weights: 0.274; 0.163 (0.131); 0.346;
# 0.202, lower in 9 of 12 only, over seeds 0-7 in 12 of 24.) The tests hold the first three, each
# with a margin under what was measured.
TOY_SEEDS = range(4)


@pytest.fixture(scope="module")
def toy_fractions():
    """``fractions(**subject_a_kwargs)``: A's colour fraction in A's box, over the pairs and seeds."""
    from anyms.toy import prompt_for, reference, toy_pipeline
    from tests.anyms.test_toy import LEFT_BOX, PAIRS, RIGHT_BOX, STEPS as TOY_STEPS, as_uint8, colour_fraction

    toy = toy_pipeline()
    toy.set_progress_bar_config(disable=True)

    def fractions(negative=None, **kwargs):
        out = []
        for a, b in PAIRS:
            extra = dict(kwargs)
            if negative == "own":
                extra["negative_image"] = reference(*a)
            elif negative == "other":
                extra["negative_image"] = reference(b[0], a[1])
            subjects = [Subject(reference(*a), box=LEFT_BOX, **extra), Subject(reference(*b), box=RIGHT_BOX)]
            for seed in TOY_SEEDS:
                image = toy(prompt_for([a, b]), subjects=subjects, num_inference_steps=TOY_STEPS, output_type="np",
                            generator=torch.Generator().manual_seed(seed)).images[0]
                out.append(colour_fraction(as_uint8(image), LEFT_BOX, a[0]))
        return np.array(out)

    fractions.baseline = fractions()
    return fractions


@pytest.mark.slow
def test_toy_end_early_weakens_the_subject_in_its_box(toy_fractions):
    early = toy_fractions(end=0.3)
    base = toy_fractions.baseline
    assert early.mean() < base.mean() - 0.05, (early.mean(), base.mean())       # measured 0.122 vs 0.253


@pytest.mark.slow
def test_toy_a_negative_image_steers_the_subjects_colour(toy_fractions):
    other, own = toy_fractions("other"), toy_fractions("own")
    base = toy_fractions.baseline
    # guidance pushes away from B's colour: more of A's own (measured 0.367 vs 0.253)
    assert other.mean() > base.mean() + 0.03, (other.mean(), base.mean())
    # and away from A's own reference: less of it than with B's (measured 0.064 vs 0.367)
    assert own.mean() < other.mean() - 0.07, (own.mean(), other.mean())
