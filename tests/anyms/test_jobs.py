"""``anyms generate --jobs``: resumable runs with a manifest, bad lines named before loading, failed
jobs recorded, subject embeddings reused, and two processes (accelerate launch, gloo on CPU) making
the images one process makes. CPU, the built-in tiny model."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from anyms import cli, loading

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--model", "tiny", "--height", "64", "--width", "64", "--steps", "2", "--device", "cpu"]


@pytest.fixture
def folder(tmp_path, subject_images):
    for i, img in enumerate(subject_images[:3]):
        img.save(tmp_path / f"s{i}.png")
    return tmp_path


def write_jobs(path, jobs):
    path.write_text("\n".join(json.dumps(j) for j in jobs) + "\n")
    return str(path)


def three_jobs():
    return [
        {"prompt": "two things", "subjects": [{"image": "s0.png", "box": [0, 0, 0.6, 1]},
                                             {"image": "s1.png", "box": [0.4, 0, 1, 1], "scale": 0.8}]},
        {"prompt": "one thing", "seed": 42, "out": "sub/one.png", "subjects": [{"image": "s1.png", "box": [0, 0, 1, 1]}]},
        {"prompt": "again two", "steps": 1, "mode": "sum",
         "subjects": [{"image": "s0.png", "box": [0.1, 0.1, 0.9, 0.9]}, {"image": "s2.png", "box": [0, 0, 0.5, 0.5]}]},
    ]


def manifest(out_dir):
    with open(os.path.join(out_dir, "manifest.jsonl")) as f:
        return [json.loads(line) for line in f]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_jobs_run_resume_and_manifest(folder, capsys):
    jobs = write_jobs(folder / "jobs.jsonl", three_jobs())
    out = folder / "out"
    argv = ["generate", "--jobs", jobs, *TINY, "--out-dir", str(out)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    images = [out / "00000.png", out / "sub" / "one.png", out / "00002.png"]
    assert all(p.is_file() for p in images) and not list(out.glob("*.layout.png"))
    entries = manifest(out)
    assert [(e["index"], e["line"], e["out"], e["status"], e["seed"]) for e in entries] == [
        (0, 1, "00000.png", "done", 0), (1, 2, "sub/one.png", "done", 42), (2, 3, "00002.png", "done", 2)]
    assert all(e["seconds"] > 0 and e["process"] == 0 for e in entries)
    assert not list(out.glob(".manifest.rank-*"))
    # the progress bar counts images and shows each one's time
    assert re.search(r"jobs: 100%.*3/3.*image.*last [\d.]+ s", captured.err), captured.err
    assert "subject embeddings: 3 encoded, 2 reused" in captured.out
    records = [json.loads(Image.open(p).text["anyms"]) for p in images]
    assert [(r["seed"], r["steps"], r["layout"]["mode"]) for r in records] == [(0, 2, "overwrite"), (42, 2, "overwrite"),
                                                                             (2, 1, "sum")]
    assert records[1]["layout"]["subjects"][0]["image"] == "../../s1.png"     # relative to the image

    # a second run makes nothing: every job is done (the manifest keeps the first run's times)
    stamps = [p.stat().st_mtime_ns for p in images]
    assert cli.main(argv) == 0
    assert [p.stat().st_mtime_ns for p in images] == stamps
    again = manifest(out)
    assert [e["status"] for e in again] == ["skipped"] * 3
    assert [e["seconds"] for e in again] == [e["seconds"] for e in entries]
    # a lost image is made again, and only it; the same job gives the same image
    first = pixels(images[1])
    images[1].unlink()
    assert cli.main(argv) == 0
    assert [e["status"] for e in manifest(out)] == ["skipped", "done", "skipped"]
    np.testing.assert_array_equal(pixels(images[1]), first)
    assert [p.stat().st_mtime_ns for p in (images[0], images[2])] == [stamps[0], stamps[2]]


def test_a_job_image_is_the_single_generate_image(folder, capsys):
    """The same layout and seed give the same pixels through --jobs (embeddings cached, encoded
    one image at a time) and through one anyms generate."""
    jobs = write_jobs(folder / "jobs.jsonl", three_jobs()[:1])
    assert cli.main(["generate", "--jobs", jobs, *TINY, "--out-dir", str(folder / "out")]) == 0
    single = folder / "single.png"
    assert cli.main(["generate", "two things", "--subject", f"{folder / 's0.png'}:0,0,0.6,1",
                     "--subject", f"{folder / 's1.png'}:0.4,0,1,1:0.8", *TINY, "--seed", "0", "--no-pictures",
                     "--out", str(single)]) == 0
    np.testing.assert_array_equal(pixels(folder / "out" / "00000.png"), pixels(single))


def test_a_flux_job_image_is_the_single_generate_image_and_the_pipeline_call(folder, capsys):
    """FLUX through --jobs (subject embeddings cached: two jobs share an image), through one anyms
    generate and through pipe(): the same pixels (each subject image encoded alone everywhere)."""
    import torch

    from anyms import Subject
    from anyms.flux import AnyMSFluxPipeline
    from anyms.tiny_flux import tiny_flux_pipeline

    flux = ["--model", "tiny", "--arch", "flux", "--height", "64", "--width", "96", "--steps", "2", "--device", "cpu"]
    two = three_jobs()[0]
    jobs = write_jobs(folder / "jobs.jsonl", [two, dict(two, prompt="the same things", seed=5)])
    assert cli.main(["generate", "--jobs", jobs, *flux, "--out-dir", str(folder / "out")]) == 0
    assert "subject embeddings: 2 encoded, 2 reused" in capsys.readouterr().out
    single = folder / "single.png"
    assert cli.main(["generate", "two things", "--subject", f"{folder / 's0.png'}:0,0,0.6,1",
                     "--subject", f"{folder / 's1.png'}:0.4,0,1,1:0.8", *flux, "--seed", "0", "--no-pictures",
                     "--out", str(single)]) == 0
    job_image = pixels(folder / "out" / "00000.png")
    np.testing.assert_array_equal(job_image, pixels(single))
    pipe = tiny_flux_pipeline(AnyMSFluxPipeline, seed=0)
    subjects = [Subject(str(folder / "s0.png"), (0, 0, 0.6, 1)), Subject(str(folder / "s1.png"), (0.4, 0, 1, 1), 0.8)]
    image = pipe("two things", subjects=subjects, height=64, width=96, num_inference_steps=2,
                 generator=torch.Generator("cpu").manual_seed(0)).images[0]
    np.testing.assert_array_equal(job_image, np.asarray(image))


def _bad_jobs(folder):
    good = three_jobs()[0]
    return [
        (["{\"prompt\": \"x\", \"subjects\": [{\"image\": \"s0.png\", \"box\": [0, 0, 1, 1]}]}", "{ not json"],
         r"--jobs .*jobs\.jsonl:2: not valid JSON"),
        ([json.dumps(dict(good, bogus=1))], r"jobs\.jsonl:1: unknown key\(s\) \['bogus'\]"),
        ([json.dumps(dict(good, steps="ten"))], r"jobs\.jsonl:1: \"steps\" must be an integer, got 'ten'"),
        ([json.dumps(dict(good, steps=5000))], r"jobs\.jsonl:1: \"steps\" must be in \[1, 1000\]"),
        ([json.dumps(dict(good, height=100))], r"jobs\.jsonl:1: \"height\" must be a positive multiple of 8"),
        ([json.dumps(dict(good, seed=1.5))], r"jobs\.jsonl:1: \"seed\" must be an integer"),
        ([json.dumps(dict(good, mode="add"))], r"jobs\.jsonl:1: \"mode\" must be one of \['overwrite', 'sum'\]"),
        ([json.dumps(dict(good, out="a.jpg"))], r"jobs\.jsonl:1: \"out\" must be a \.png path"),
        ([json.dumps(dict(good, out="a.png")), "", json.dumps(dict(good, out="a.png"))],
         r"jobs\.jsonl:3: \"out\" 'a\.png' is also line 1's"),
        ([json.dumps(dict(good, prompt=None))], r"jobs\.jsonl:1: a prompt is required"),
        ([json.dumps({"prompt": "x", "subjects": [{"image": "missing.png", "box": [0, 0, 1, 1]}]})],
         r"jobs\.jsonl:1: subjects\[0\]\.image: no image file"),
        ([json.dumps({"prompt": "x", "subjects": [{"image": "s0.png", "box": [0, 0, 1, 2]}]})],
         r"jobs\.jsonl:1: subjects\[0\]\.box must lie inside \[0, 1\]"),
        (["", "   "], r"holds no jobs"),
        # JSON that Python's parser refuses with other errors than JSONDecodeError
        (['{"prompt": "x", "seed": ' + "9" * 5000 + "}"], r"jobs\.jsonl:1: not valid JSON \(Exceeds the limit"),
        (["[" * 100_000 + "]" * 100_000], r"jobs\.jsonl:1: not valid JSON \(maximum recursion depth"),
        # a decompression bomb (its header claims 30000x30000) and a mask above the largest side
        ([json.dumps(good), json.dumps({"prompt": "x", "subjects": [{"image": "bomb.png", "box": [0, 0, 1, 1]}]})],
         r"jobs\.jsonl:2: subjects\[0\]\.image: '.*bomb\.png' is too large to decode"),
        ([json.dumps({"prompt": "x", "subjects": [{"image": "s0.png", "mask": "bomb.png"}]})],
         r"jobs\.jsonl:1: subjects\[0\]\.mask: '.*bomb\.png' is too large to decode"),
        ([json.dumps({"prompt": "x", "subjects": [{"image": "s0.png", "mask": "wide.png"}]})],
         r"jobs\.jsonl:1: subjects\[0\]\.mask: '.*wide\.png' is 8x17000 pixels \(height x width\), above the "
         r"largest side accepted"),
    ]


def test_bad_jobs_fail_before_loading_naming_the_line(folder, capsys, monkeypatch, header_only_png):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before every job was checked")

    header_only_png(folder / "bomb.png", 30000, 30000)
    Image.new("L", (17000, 8), 255).save(folder / "wide.png")

    monkeypatch.setattr(loading, "_load_pipeline", no_loading)
    for lines, message in _bad_jobs(folder):
        (folder / "jobs.jsonl").write_text("\n".join(lines) + "\n")
        code = cli.main(["generate", "--jobs", str(folder / "jobs.jsonl"), *TINY, "--out-dir", str(folder / "o")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and re.search(message, err), (lines, err)
    assert not (folder / "o").exists() or not any((folder / "o").iterdir())
    jobs = write_jobs(folder / "jobs.jsonl", three_jobs())
    for extra, message in ((["--out", "x.png"], "--out names one image"),
                           ([], r"--jobs .*missing\.jsonl': no such file")):
        code = cli.main(["generate", "--jobs", jobs if extra else str(folder / "missing.jsonl"), *TINY, *extra])
        assert code == 2 and re.search(message, capsys.readouterr().err)


def test_an_image_made_from_something_else_is_not_replaced(folder, capsys):
    jobs = write_jobs(folder / "jobs.jsonl", three_jobs()[:2])
    out = folder / "out"
    argv = ["generate", "--jobs", jobs, *TINY, "--out-dir", str(out)]
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "one.png").write_bytes(b"someone's file")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(r"jobs\.jsonl:2: image '.*one\.png': cannot read it as an image.*give --overwrite", err), err
    assert (out / "sub" / "one.png").read_bytes() == b"someone's file" and not (out / "00000.png").exists()
    (out / "sub" / "one.png").unlink()
    assert cli.main(argv) == 0
    # the jobs change (another seed for every job): the images no longer record them
    assert cli.main(argv + ["--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"jobs\.jsonl:1: '.*00000\.png' exists but was made from something else \(seed differs\); "
                     r"give --overwrite", err), err
    before = pixels(out / "00000.png")
    assert cli.main(argv + ["--seed", "7", "--overwrite"]) == 0
    assert json.loads(Image.open(out / "00000.png").text["anyms"])["seed"] == 7
    assert np.abs(pixels(out / "00000.png").astype(int) - before).max() > 0
    assert [e["status"] for e in manifest(out)] == ["done", "skipped"]      # job 2 keeps its own seed, 42


def test_a_failed_job_is_recorded_and_the_run_goes_on(folder, capsys, monkeypatch):
    from anyms import jobs as jobs_module

    real = jobs_module.generate_image

    def flaky(pipe, job, run):
        if job.index == 1:
            raise cli.GenerationError(f"{job.where}: out of memory on cpu making 64x64: try --vae-tiling")
        return real(pipe, job, run)

    monkeypatch.setattr(jobs_module, "generate_image", flaky)
    jobs = write_jobs(folder / "jobs.jsonl", three_jobs())
    out = folder / "out"
    argv = ["generate", "--jobs", jobs, *TINY, "--out-dir", str(out), "--pictures"]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    entries = manifest(out)
    assert [e["status"] for e in entries] == ["done", "failed", "done"]
    assert "out of memory on cpu" in entries[1]["error"]
    assert re.search(r"warning: 1 job failed; the first, line 2: .*out of memory", captured.err)
    assert (out / "00000.layout.png").is_file() and (out / "00002.routing.png").is_file()
    assert not (out / "sub" / "one.png").exists()
    monkeypatch.setattr(jobs_module, "generate_image", real)
    assert cli.main(argv) == 0
    assert [e["status"] for e in manifest(out)] == ["skipped", "done", "skipped"]


def test_subject_embeddings_are_encoded_once_per_distinct_image(tiny_sdxl_pipe, subject_images):
    """Each distinct image goes through the image encoder once; the cached embeddings are the
    ones diffusers' encode_image makes for that image, and the generation is unchanged."""
    import torch

    from anyms.embeddings import SubjectEmbeddingCache, image_key
    from anyms.pipeline import AnyMSStableDiffusionXLPipeline
    from anyms.tiny import tiny_pipeline

    pipe = tiny_pipeline(AnyMSStableDiffusionXLPipeline, kind="sdxl", plus=True, seed=0)   # hidden-state path
    calls = []
    pipe.image_encoder.register_forward_pre_hook(lambda module, args, kwargs: calls.append(args[0].shape[0]),
                                                 with_kwargs=True)
    a, b, c = subject_images[:3]
    layouts = [[a, b], [b, c], [a, c], [c, a]]
    cache = SubjectEmbeddingCache()

    def run(images):
        from anyms import Subject

        subjects = [Subject(images[0], (0, 0, 0.6, 1)), Subject(images[1], (0.4, 0, 1, 1))]
        return np.asarray(pipe("x", subjects=subjects, height=64, width=64, num_inference_steps=1,
                               generator=torch.Generator().manual_seed(0)).images[0])

    plain = [run(images) for images in layouts]
    calls.clear()
    with cache.attached(pipe):
        cached = [run(images) for images in layouts]
    assert "encode_image" not in vars(pipe)             # the pipeline is left as it was
    # 3 distinct images: 3 encodes of one image (and, for the plus adapter, of its black twin)
    assert calls == [1] * 6 and (cache.misses, cache.hits, len(cache)) == (3, 5, 3)
    for p, q in zip(plain, cached):
        assert np.abs(p.astype(int) - q.astype(int)).max() <= 1
    embeds, negative = pipe.encode_image([b], "cpu", 1, True)
    key = next(k for k in cache._entries if k[0] == image_key(b))
    torch.testing.assert_close(cache._entries[key][0], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cache._entries[key][1], negative, rtol=0, atol=0)
    # a size bound: the least recently used entries go first
    small = SubjectEmbeddingCache(max_bytes=int(1.5 * sum(t.numel() * t.element_size() for t in (embeds, negative))))
    with small.attached(pipe):
        run([a, b])
    assert len(small) == 1 and small.misses == 2


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None,
                    reason="accelerate's launcher is not installed")
def test_two_processes_make_the_images_one_process_makes(folder, capsys):
    """accelerate launch, two processes on the CPU (torchrun and gloo underneath): every job is made
    once, by one of them, and its image (PNG bytes: pixels and record) is the one-process image."""
    jobs = three_jobs() + [{"prompt": "four", "subjects": [{"image": "s2.png", "box": [0, 0.2, 1, 0.8]}]}]
    path = write_jobs(folder / "jobs.jsonl", jobs)
    one = folder / "one"
    assert cli.main(["generate", "--jobs", path, *TINY, "--out-dir", str(one)]) == 0
    capsys.readouterr()
    two = folder / "two"
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    result = subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", "0", "-m", "anyms", "generate", "--jobs", path, *TINY,
         "--out-dir", str(two)], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "split across 2 processes" in result.stdout
    entries = manifest(two)
    assert [e["status"] for e in entries] == ["done"] * 4
    assert sorted({e["process"] for e in entries}) == [0, 1]
    assert not (two / ".anyms.lock").exists()       # one launch, one writer: its lock is gone with it
    for e in manifest(one):
        assert (one / e["out"]).read_bytes() == (two / e["out"]).read_bytes(), e["out"]


# ------------------------------------------------------------------ outputs stay inside --out-dir
def _one_job(folder, out, **extra):
    job = dict(three_jobs()[1], **extra)
    job["out"] = out
    return job


@pytest.mark.parametrize("out,message", [
    ("../esc.png", r"resolves to .*outside --out-dir"),
    ("sub/../../esc.png", r"resolves to .*outside --out-dir"),
    ("/tmp/anyms-esc.png", r"is an absolute path"),
    ("sub/.png", r"empty file name"),
    ("a\u0000b.png", r"NUL character"),
    ("x" * 245 + ".png", r"too long for the file system"),
])
def test_a_job_out_that_leaves_the_folder_or_cannot_be_written_is_refused_before_loading(
        folder, capsys, monkeypatch, out, message):
    monkeypatch.setattr(loading, "_load_pipeline", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    jobs = write_jobs(folder / "jobs.jsonl", [_one_job(folder, out)])
    assert cli.main(["generate", "--jobs", jobs, *TINY, "--out-dir", str(folder / "out"), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r'jobs\.jsonl:1 "out".*' + message, err[0]), err
    assert not (folder / "esc.png").exists() and not os.path.exists("/tmp/anyms-esc.png")


def test_a_linked_subfolder_leading_outside_is_refused(folder, capsys, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (folder / "out").mkdir()
    os.symlink(outside, folder / "out" / "link")
    jobs = write_jobs(folder / "jobs.jsonl", [_one_job(folder, "link/x.png")])
    assert cli.main(["generate", "--jobs", jobs, *TINY, "--out-dir", str(folder / "out")]) == 2
    assert "outside --out-dir" in capsys.readouterr().err
    assert not os.listdir(outside)


def test_one_jobs_picture_cannot_be_another_jobs_image(folder, capsys):
    jobs = write_jobs(folder / "jobs.jsonl", [_one_job(folder, "x.layout.png"), _one_job(folder, "x.png")])
    assert cli.main(["generate", "--jobs", jobs, *TINY, "--out-dir", str(folder / "out"), "--pictures"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"jobs\.jsonl:2: \"out\" 'x\.png' would write 'x\.layout\.png', which line 1's job writes", err), err
    assert not (folder / "out" / "x.layout.png").exists()


def test_a_link_planted_as_the_process_manifest_is_not_followed(folder):
    target = folder / "precious.txt"
    target.write_text("keep me")
    out = folder / "out"
    out.mkdir()
    os.symlink(target, out / ".manifest.rank-0.jsonl")
    jobs = write_jobs(folder / "jobs.jsonl", [_one_job(folder, "one.png")])
    assert cli.main(["generate", "--jobs", jobs, *TINY, "--out-dir", str(out)]) == 0
    assert target.read_text() == "keep me"
    assert not os.path.lexists(out / ".manifest.rank-0.jsonl") and (out / "one.png").is_file()


def test_outputs_follow_the_umask(folder):
    jobs = write_jobs(folder / "jobs.jsonl", [_one_job(folder, "one.png")])
    old = os.umask(0o027)
    try:
        assert cli.main(["generate", "--jobs", jobs, *TINY, "--out-dir", str(folder / "out")]) == 0
    finally:
        os.umask(old)
    for name in ("one.png", "manifest.jsonl"):
        assert (folder / "out" / name).stat().st_mode & 0o777 == 0o640, name


@pytest.mark.parametrize("first", [["--guidance", "9"], ["--negative-prompt", "blurry"]], ids=["guidance", "negative"])
def test_an_unset_option_means_its_default_not_anything_on_resume(folder, capsys, first):
    jobs = write_jobs(folder / "jobs.jsonl", [_one_job(folder, "one.png")])
    out = str(folder / "out")
    assert cli.main(["generate", "--jobs", jobs, *TINY, "--out-dir", out, *first]) == 0
    image = folder / "out" / "one.png"
    stamp = image.stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(["generate", "--jobs", jobs, *TINY, "--out-dir", out]) == 2
    err = capsys.readouterr().err
    assert re.search(r"jobs\.jsonl:1: .*one\.png' exists but was made from something else \((guidance|negative_prompt)",
                     err), err
    assert image.stat().st_mtime_ns == stamp
    # with the same options it is done, and with --overwrite it is made again
    assert cli.main(["generate", "--jobs", jobs, *TINY, "--out-dir", out, *first]) == 0
    assert "1 done before" in capsys.readouterr().out
    assert cli.main(["generate", "--jobs", jobs, *TINY, "--out-dir", out, "--overwrite"]) == 0
    assert image.stat().st_mtime_ns != stamp


def test_a_subject_turned_into_a_bomb_during_the_run_fails_its_job_only(folder, capsys, monkeypatch, header_only_png):
    """Checked before loading, then read again when its job runs: a file replaced by a
    decompression bomb in between fails that job, named, and the run goes on."""
    from anyms import jobs as jobs_module

    real = jobs_module.generate_image

    def then_swap(pipe, job, run):
        image = real(pipe, job, run)
        if job.index == 0:
            header_only_png(folder / "s1.png", 30000, 30000)     # job 1's subject
        return image

    monkeypatch.setattr(jobs_module, "generate_image", then_swap)
    jobs = write_jobs(folder / "jobs.jsonl", three_jobs())
    out = folder / "out"
    assert cli.main(["generate", "--jobs", jobs, *TINY, "--out-dir", str(out)]) == 1
    err = capsys.readouterr().err
    entries = manifest(out)
    assert [e["status"] for e in entries] == ["done", "failed", "done"]
    assert re.search(r"^--jobs .*jobs\.jsonl:2: subjects\[0\]\.image: '.*s1\.png' is too large to decode",
                     entries[1]["error"]), entries[1]
    assert "Traceback" not in err and (out / "00000.png").is_file() and (out / "00002.png").is_file()


def test_a_subject_moved_during_the_run_keeps_the_images_made_and_fails_only_the_jobs_left(folder, capsys, monkeypatch):
    """Job 0 (s0, s1) is made, then s1 moves: job 0's image is saved with the hashes taken when it
    was checked, job 1 (s1 alone) fails naming the file, job 2 (s0, s2) is made."""
    import hashlib

    from anyms import jobs as jobs_module

    real = jobs_module.generate_image
    read = hashlib.sha256((folder / "s1.png").read_bytes()).hexdigest()

    def then_move(pipe, job, run):
        image = real(pipe, job, run)
        if job.index == 0:
            os.replace(folder / "s1.png", folder / "moved.png")
        return image

    monkeypatch.setattr(jobs_module, "generate_image", then_move)
    jobs = write_jobs(folder / "jobs.jsonl", three_jobs())
    out = folder / "out"
    assert cli.main(["generate", "--jobs", jobs, *TINY, "--out-dir", str(out)]) == 1
    assert "Traceback" not in capsys.readouterr().err
    entries = manifest(out)
    assert [e["status"] for e in entries] == ["done", "failed", "done"]
    assert re.search(r"jobs\.jsonl:2: subjects\[0\]\.image: no image file at '.*s1\.png'", entries[1]["error"]), entries
    assert json.loads(Image.open(out / "00000.png").text["anyms"])["layout"]["subjects"][1]["image_sha256"] == read


# ------------------------------------------------------------------ one writer per output folder
# A run of `anyms generate --jobs` in another process, paused (holding the folder) until its stdin
# gets a line: the model's loading waits for it, and the folder is locked before the model loads.
PAUSED_RUN = """
import sys
from anyms import cli, loading

real = loading._load_pipeline

def paused(*args, **kwargs):
    print("holding", flush=True)
    sys.stdin.readline()
    return real(*args, **kwargs)

loading._load_pipeline = paused
sys.exit(cli.main(sys.argv[1:]))
"""


def _start(argv):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.Popen([sys.executable, "-c", PAUSED_RUN, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def test_a_second_run_on_the_folder_refuses_naming_the_first(folder, capsys):
    jobs = write_jobs(folder / "jobs.jsonl", three_jobs())
    out = folder / "out"
    argv = ["generate", "--jobs", jobs, *TINY, "--out-dir", str(out)]
    first = _start(argv)
    try:
        assert first.stdout.readline().strip() == "holding", first.stderr.read()
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"in use by another run (PID {first.pid} on " in err[0], err
        assert not any(out.rglob("*.png"))             # the second run made nothing
        stdout, stderr = first.communicate("go\n", timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, stderr
    assert [e["status"] for e in manifest(out)] == ["done"] * 3
    assert sorted(p.name for p in out.rglob("*.png")) == ["00000.png", "00002.png", "one.png"]
    assert not (out / ".anyms.lock").exists()           # the last holder removes it


def test_a_lock_left_by_a_killed_run_is_taken_over(folder, capsys):
    jobs = write_jobs(folder / "jobs.jsonl", three_jobs()[:1])
    out = folder / "out"
    argv = ["generate", "--jobs", jobs, *TINY, "--out-dir", str(out)]
    first = _start(argv)
    try:
        assert first.stdout.readline().strip() == "holding", first.stderr.read()
    finally:
        first.kill()
        first.communicate(timeout=60)
    lock = json.loads((out / ".anyms.lock").read_text())
    assert lock["pid"] == first.pid                     # the killed run's lock is still there
    assert cli.main(argv) == 0
    assert f"took over the folder's lock from a run that stopped (PID {first.pid} on " in capsys.readouterr().out
    assert [e["status"] for e in manifest(out)] == ["done"]
    assert not (out / ".anyms.lock").exists()


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
def test_a_link_planted_as_the_lock_is_not_followed(folder, capsys, dangling):
    target = folder / "precious.txt"
    if not dangling:
        target.write_text("keep me")
    out = folder / "out"
    out.mkdir()
    os.symlink(target, out / ".anyms.lock")
    jobs = write_jobs(folder / "jobs.jsonl", [_one_job(folder, "one.png")])
    assert cli.main(["generate", "--jobs", jobs, *TINY, "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'.anyms.lock' is a link" in err[0].replace(str(out) + os.sep, ""), err
    if dangling:
        assert not os.path.lexists(target)              # not created through the link
    else:
        assert target.read_text() == "keep me"
    assert os.path.islink(out / ".anyms.lock") and not (out / "one.png").exists()


def test_stale_temporaries_of_the_run_are_removed_and_nothing_else(folder, capsys):
    jobs = write_jobs(folder / "jobs.jsonl", three_jobs())
    out = folder / "out"
    (out / "sub").mkdir(parents=True)
    stale = [".00000.png.k3x_9q2a.tmp", ".00002.layout.png.abcdefgh.tmp", ".manifest.jsonl.q1w2e3r4.tmp",
             "sub/.one.png.a1b2c3d4.tmp"]
    kept = [".other.png.abcdefgh.tmp",                  # no job of this run writes other.png
            ".anyms-write-test-zz99zz99",               # a write probe: another run's may be alive
            ".00000.png.short.tmp", ".00000.png.abcdefghi.tmp",   # not a temporary's name
            "notes.txt", "00000.png.abcdefgh.tmp", "sub/.two.png.a1b2c3d4.tmp"]
    for name in stale + kept:
        (out / name).write_text("x")
    target = folder / "precious.txt"
    target.write_text("keep me")
    os.symlink(target, out / ".00002.png.linklink.tmp")    # a link with a temporary's name: left alone
    assert cli.main(["generate", "--jobs", jobs, *TINY, "--out-dir", str(out)]) == 0
    assert "removed 4 temporary files a stopped run left" in capsys.readouterr().out
    for name in stale:
        assert not os.path.lexists(out / name), name
    for name in kept:
        assert (out / name).read_text() == "x", name
    assert os.path.islink(out / ".00002.png.linklink.tmp") and target.read_text() == "keep me"
    assert [e["status"] for e in manifest(out)] == ["done"] * 3


def test_temporaries_are_not_removed_while_another_run_holds_the_folder(folder, capsys):
    jobs = write_jobs(folder / "jobs.jsonl", three_jobs())
    out = folder / "out"
    argv = ["generate", "--jobs", jobs, *TINY, "--out-dir", str(out)]
    first = _start(argv)
    try:
        assert first.stdout.readline().strip() == "holding", first.stderr.read()
        (out / ".00000.png.abcdefgh.tmp").write_text("being written")   # as if the first run wrote it
        assert cli.main(argv) == 2
        assert (out / ".00000.png.abcdefgh.tmp").read_text() == "being written"
    finally:
        first.kill()
        first.communicate(timeout=60)


def test_the_processes_of_one_launch_share_the_folder_and_no_other_run(tmp_path):
    from anyms.lock import FolderBusy, FolderLock

    prepared = []
    first = FolderLock(str(tmp_path), "launch 127.0.0.1:29500", shared=True, prepare=lambda: prepared.append(1))
    second = FolderLock(str(tmp_path), "launch 127.0.0.1:29500", shared=True, prepare=lambda: prepared.append(2))
    first.acquire()
    second.acquire()                     # the same launch: joins, and does not prepare again
    assert prepared == [1]
    for other in (FolderLock(str(tmp_path), "launch 127.0.0.1:29501", shared=True),
                  FolderLock(str(tmp_path), "process 1 on elsewhere")):
        with pytest.raises(FolderBusy, match=r"in use by another run \(PID \d+ on .*launch 127\.0\.0\.1:29500"):
            other.acquire()
    second.release()
    assert (tmp_path / ".anyms.lock").exists()      # the first still holds it
    first.release(wait=1.0)
    assert not (tmp_path / ".anyms.lock").exists()
    FolderLock(str(tmp_path), "process 1 on elsewhere").acquire().release()     # free again


@pytest.mark.skipif(not os.path.exists("/dev/full") or not os.path.isdir("/proc/self/fd"),
                    reason="needs /dev/full and /proc/self/fd")
def test_a_full_disk_fails_the_jobs_it_hits_and_says_the_manifest_is_not_written(folder, capsys, monkeypatch):
    """Job 1's image, this process's manifest lines (written to /dev/full) and the manifest all
    meet a full disk: job 1 fails with one line, the others are made, and the run ends with one
    line saying the manifest is not written. Nothing partial is left under a final name."""
    import errno

    from anyms import jobs as jobs_module

    real_fsync = os.fsync

    def fsync(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name.startswith((".one.png.", ".manifest.jsonl.")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", fsync)
        m.setattr(jobs_module, "_open_new", lambda path: open("/dev/full", "w", encoding="utf-8"))
        jobs = write_jobs(folder / "jobs.jsonl", three_jobs())
        out = folder / "out"
        assert cli.main(["generate", "--jobs", jobs, *TINY, "--out-dir", str(out)]) == 1
        err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert re.search(r"warning: cannot write '.*\.manifest\.rank-0\.jsonl' \(No space left on device\)", err), err
    assert re.search(r"warning: 1 job failed; the first, line 2: .*cannot write '.*one\.png': No space left", err), err
    assert re.search(r"error: the manifest is not written \(cannot write '.*manifest\.jsonl': No space left on "
                     r"device; nothing was written under that name\); every image written is complete$",
                     err.strip().splitlines()[-1]), err
    assert (out / "00000.png").is_file() and (out / "00002.png").is_file()
    assert not (out / "sub" / "one.png").exists() and not (out / "manifest.jsonl").exists()
    assert not [p for p in out.rglob("*.tmp")]
    # space again: the run resumes, makes job 1 and writes the manifest
    assert cli.main(["generate", "--jobs", jobs, *TINY, "--out-dir", str(out)]) == 0
    assert [e["status"] for e in manifest(out)] == ["skipped", "done", "skipped"]


# ------------------------------------------------------------------ launches
@pytest.mark.skipif(shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None,
                    reason="accelerate's launcher is not installed")
def test_accelerate_launch_cpu_with_several_processes_is_refused_not_run_alone(folder):
    """`accelerate launch --cpu --num_processes 2` starts one process (outside mpirun): it used to
    make every job alone, silently."""
    path = write_jobs(folder / "jobs.jsonl", three_jobs())
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [launcher, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "anyms", "generate", "--jobs", path, *TINY, "--out-dir", str(folder / "out")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    errors = [line for line in result.stderr.splitlines() if line.startswith("anyms generate: error:")]
    assert result.returncode != 0 and len(errors) == 1, result.stdout + result.stderr
    assert "started this one process although more were asked for" in errors[0]
    assert "torchrun --nproc-per-node N -m anyms generate" in errors[0]
    assert not (folder / "out").exists() or not any((folder / "out").rglob("*.png"))


def test_the_processes_of_a_launch_are_read_from_torchrun_or_mpirun(monkeypatch):
    from anyms import jobs as jobs_module

    for name in jobs_module.WORLD_VARIABLES + jobs_module.RANK_VARIABLES + jobs_module.LOCAL_RANK_VARIABLES + (
            "ACCELERATE_USE_CPU", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    assert jobs_module.processes("cpu") == jobs_module.Processes()
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")         # mpirun (accelerate launch --cpu under it)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    procs = jobs_module.processes("auto")
    assert (procs.rank, procs.world, procs.device, procs.cpu) == (1, 2, "cpu", True)
    for name in ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(name)
    with pytest.raises(cli.UsageError, match="started this one process"):
        jobs_module.processes("auto")                       # the simple launcher: one process of N
