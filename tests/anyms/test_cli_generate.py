"""``anyms generate`` as a user meets it: --model tiny, no lost work, the PNG record and --from,
warnings, sizes, the memory estimate, a quiet stderr, one-line errors, a base install.
CPU, tiny random models, no network."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from anyms import cli, loading, outputs

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model", "tiny", "--height", "64", "--width", "64", "--steps", "2", "--device", "cpu"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def record(path):
    return json.loads(Image.open(path).text["anyms"])


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def no_loading(*args, **kwargs):
    raise AssertionError("a model was loaded before the input and the outputs were checked")


# ------------------------------------------------------------------ --model tiny, the record, --from
def test_model_tiny_generates_offline_and_the_png_records_what_made_it(images, tmp_path, capsys):
    import anyms

    out = tmp_path / "o" / "a.png"
    code, stdout, err = run(["generate", "a cat and a dog", "--subject", f"{images[0]}:0,0,0.6,1",
                             "--subject", f"{images[1]}:0.4,0,1,1:0.7", *TINY, "--seed", "5", "--mode", "sum",
                             "--out", str(out)], capsys)
    assert code == 0, err
    assert "RANDOM weights" in stdout and "2 subjects" in stdout and "seed 5" in stdout
    for path in (out, tmp_path / "o" / "a.layout.png", tmp_path / "o" / "a.routing.png"):
        assert path.is_file() and str(path) in stdout
    assert not (tmp_path / "o" / "a.maps.png").exists()
    assert Image.open(out).size == (64, 64)
    rec = record(out)
    assert rec["format"] == 1 and rec["anyms_version"] == anyms.__version__
    assert rec["prompt"] == "a cat and a dog" and rec["negative_prompt"] is None
    assert (rec["seed"], rec["steps"], rec["height"], rec["width"]) == (5, 2, 64, 64)
    assert rec["guidance"] == 5.0                      # the SDXL pipeline's default, as it ran
    assert rec["model"] == {"arch": "sdxl", "model": "tiny", "ip_adapter": None, "image_encoder": None,
                            "dtype": "float32"}
    assert rec["layout"]["mode"] == "sum" and rec["layout"]["priority"] == "order"
    assert rec["layout"]["subjects"] == [
        {"image": "../subject0.png", "image_sha256": sha(images[0]), "box": [0.0, 0.0, 0.6, 1.0], "scale": 1.0},
        {"image": "../subject1.png", "image_sha256": sha(images[1]), "box": [0.4, 0.0, 1.0, 1.0], "scale": 0.7}]
    assert set(rec["versions"]) >= {"torch", "diffusers", "transformers"} and rec["device"] == "cpu"

    # --from makes the same image from the record alone
    again = tmp_path / "again.png"
    code, stdout, err = run(["generate", "--from", str(out), "--device", "cpu", "--out", str(again)], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(pixels(again), pixels(out))
    rec2 = record(again)
    assert rec2["layout"]["subjects"][0]["image"] == "subject0.png"      # relative to the new image's folder
    for key in ("prompt", "seed", "steps", "guidance", "height", "width", "model"):
        assert rec2[key] == rec[key], key
    # options given on the command line override the record
    other = tmp_path / "seed6.png"
    assert run(["generate", "--from", str(out), "--seed", "6", "--device", "cpu", "--out", str(other)], capsys)[0] == 0
    assert record(other)["seed"] == 6 and np.abs(pixels(other).astype(int) - pixels(out)).max() > 0


def test_from_with_masks_and_a_changed_subject_file(tmp_path, images, capsys):
    mask = np.zeros((64, 64), np.uint8)
    mask[10:50, 5:40] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    out = tmp_path / "masked.png"
    assert run(["generate", "a cat", "--subject", f"{images[0]}:mask={tmp_path / 'm.png'}:0.9",
                "--model", "tiny", "--steps", "1", "--device", "cpu", "--out", str(out)], capsys)[0] == 0
    entry = record(out)["layout"]["subjects"][0]
    assert entry["mask"] == "m.png" and entry["mask_sha256"] == sha(tmp_path / "m.png") and "box" not in entry
    assert record(out)["height"] == 64                 # the masks' size
    Image.fromarray(255 - np.asarray(Image.open(images[0]))).save(images[0])    # the subject changes
    code, _, err = run(["generate", "--from", str(out), "--device", "cpu", "--out", str(tmp_path / "b.png")], capsys)
    assert code == 0
    assert re.search(r"warning: --from .*subjects\[0\]\.image .* has changed since the image was made", err), err


@pytest.mark.parametrize("kind", ["missing", "jpeg", "plain png", "bomb", "record over 1 MB"])
def test_from_refuses_images_without_a_record(tmp_path, kind, capsys, monkeypatch, header_only_png):
    from PIL.PngImagePlugin import PngInfo

    monkeypatch.setattr(loading, "_load_pipeline", no_loading)
    path = tmp_path / ("x.jpg" if kind == "jpeg" else "x.png")
    if kind == "bomb":
        header_only_png(path, 30000, 30000)
    elif kind == "record over 1 MB":
        info = PngInfo()
        info.add_itxt("anyms", json.dumps({"format": 1, "prompt": "x" * (1 << 20), "layout": {}}), zip=True)
        Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    elif kind != "missing":
        Image.new("RGB", (8, 8)).save(path)
    code, _, err = run(["generate", "--from", str(path), "--out", str(tmp_path / "y.png")], capsys)
    expected = {"missing": "no such file", "jpeg": "is a JPEG file: only PNGs", "plain png": "holds no anyms record",
                "bomb": "is too large to decode (Image size (900000000 pixels)",
                "record over 1 MB": "a text chunk is larger than Pillow reads"}
    assert code == 2 and err.startswith(f"anyms generate: error: --from {str(path)!r}") and expected[kind] in err \
        and err.count("\n") == 1, err


def test_tiny_brings_its_own_adapter(images, capsys, tmp_path):
    code, _, err = run(["generate", "a", "--subject", f"{images[0]}:0,0,1,1", *TINY, "--ip-adapter", "x.safetensors",
                        "--out", str(tmp_path / "a.png")], capsys)
    assert code == 2 and "--ip-adapter: --model tiny brings its own random IP-Adapter" in err


# ------------------------------------------------------------------ no lost work
def test_outputs_are_checked_before_any_model_loads(tmp_path, images, capsys, monkeypatch):
    monkeypatch.setattr(loading, "_load_pipeline", no_loading)
    (tmp_path / "file").write_text("a file where a folder should be")
    (tmp_path / "taken.png").write_bytes(b"an earlier result")
    (tmp_path / "half.layout.png").write_bytes(b"an earlier picture")
    cases = [(tmp_path / "file" / "x.png", r"--out '.*file/x\.png': '.*file' is a file, not a folder"),
             (tmp_path / "file" / "deeper" / "x.png", r"is a file, not a folder"),
             (tmp_path / "taken.png", r"--out: '.*taken\.png' exists; give --overwrite to replace it"),
             (tmp_path / "half.png", r"'.*half\.layout\.png' exists; give --overwrite"),
             (tmp_path / "dir.png", r"--out '.*dir\.png' is a folder: name an image file")]
    (tmp_path / "dir.png").mkdir()
    for out, message in cases:
        code, _, err = run(["generate", "a", "--subject", f"{images[0]}:0,0,1,1", *TINY, "--out", str(out)], capsys)
        assert code == 2 and re.search(message, err) and err.count("\n") == 1, (out, err)
    assert (tmp_path / "taken.png").read_bytes() == b"an earlier result"
    assert (tmp_path / "half.layout.png").read_bytes() == b"an earlier picture"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes in read-only folders")
def test_a_read_only_folder_is_refused_before_loading(tmp_path, images, capsys, monkeypatch):
    monkeypatch.setattr(loading, "_load_pipeline", no_loading)
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        code, _, err = run(["generate", "a", "--subject", f"{images[0]}:0,0,1,1", *TINY,
                            "--out", str(folder / "x.png")], capsys)
    finally:
        folder.chmod(0o700)
    assert code == 2 and "cannot write in" in err


def test_overwrite_replaces_and_no_pictures_writes_only_the_image(tmp_path, images, capsys):
    out = tmp_path / "a.png"
    base = ["generate", "a", "--subject", f"{images[0]}:0,0,1,1", *TINY, "--out", str(out)]
    assert run(base, capsys)[0] == 0
    first = out.read_bytes()
    assert run(base + ["--seed", "1"], capsys)[0] == 2 and out.read_bytes() == first
    assert run(base + ["--seed", "1", "--overwrite"], capsys)[0] == 0 and out.read_bytes() != first
    only = tmp_path / "only.png"
    assert run(base[:-1] + [str(only), "--no-pictures"], capsys)[0] == 0
    assert only.is_file() and not (tmp_path / "only.layout.png").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_atomic_save_leaves_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    image = Image.new("RGB", (16, 16), (10, 20, 30))
    path = str(tmp_path / "x.png")
    open(path, "wb").write(b"old")

    def broken_save(self, fp, format=None, **kwargs):
        fp.write(b"half an image")
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(Image.Image, "save", broken_save)
        with pytest.raises(outputs.WriteError, match=r"cannot write '.*x\.png': disk full; nothing was written"):
            outputs.atomic_save(image, path, overwrite=True)
    assert open(path, "rb").read() == b"old" and os.listdir(tmp_path) == ["x.png"]
    outputs.atomic_save(image, path, overwrite=True)
    assert Image.open(path).getpixel((0, 0)) == (10, 20, 30)
    # without overwrite an existing name is never replaced; the new image is kept beside it
    with pytest.raises(outputs.OutputError, match=r"appeared while this ran: .*x-1\.png"):
        outputs.atomic_save(Image.new("RGB", (16, 16), (1, 2, 3)), path)
    assert Image.open(path).getpixel((0, 0)) == (10, 20, 30)
    assert Image.open(tmp_path / "x-1.png").getpixel((0, 0)) == (1, 2, 3)
    assert sorted(os.listdir(tmp_path)) == ["x-1.png", "x.png"]


def test_one_image_holds_its_folders_lock_as_jobs_do(images, tmp_path, capsys, monkeypatch):
    """Another run writing in the folder (its lock held): ``--out`` there refuses at once, one line
    naming the holder, exit 2, before the model loads, nothing written; once it is free the image is
    made, a temporary file a stopped writer of these names left is removed, and the lock is let go."""
    from anyms.lock import LOCK_NAME, FolderLock

    out = tmp_path / "o"
    out.mkdir()
    argv = ["generate", "a", "--subject", f"{images[0]}:0,0,1,1", *TINY, "--out", str(out / "a.png")]
    other = FolderLock(str(out), "launch 10.0.0.1:29500").acquire()
    try:
        monkeypatch.setattr(loading, "_load_pipeline", no_loading)
        code, _, err = run(argv, capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert re.search(r"--out: the output folder .* is in use by another run \(PID \d+ on .*, launch 10.0.0.1:29500, "
                         r"in \.anyms\.lock\); one run writes in a folder at a time: wait for it, or give another "
                         r"--out folder", err), err
        assert sorted(os.listdir(out)) == [LOCK_NAME]
    finally:
        other.release()
        monkeypatch.undo()
    (out / ".a.png.0123abcd.tmp").write_bytes(b"half an image")      # a stopped writer's leftover
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["a.layout.png", "a.png", "a.routing.png"]


# ------------------------------------------------------------------ warnings, sizes, memory
def test_subjects_that_vanish_at_a_level_are_named(tmp_path, subject_images, capsys):
    """Eight overlapping subjects: those whose every cell at a coarse grid lies under later
    subjects are named, with the grid; the brute-force owner rule says which they are."""
    from anyms.layout import Layout
    from anyms.preflight import unreached_subjects

    rng = np.random.default_rng(3)
    boxes = []
    for _ in range(8):
        x0, y0 = rng.uniform(0, 0.7, 2)
        boxes.append([round(x0, 3), round(y0, 3), round(x0 + rng.uniform(0.2, 0.3), 3),
                      round(y0 + rng.uniform(0.2, 0.3), 3)])
    specs = []
    for i, box in enumerate(boxes):
        path = tmp_path / f"s{i}.png"
        subject_images[i % 4].save(path)
        specs += ["--subject", f"{path}:{','.join(map(str, box))}"]
    # the tiny SDXL U-Net at 64 x 64: cross-attention at the 4x4 and 2x2 grids
    expected = set()
    for grid in ((4, 4), (2, 2)):
        h, w = grid
        owner = -np.ones(grid, int)
        for s, (x0, y0, x1, y1) in enumerate(boxes):       # later subjects on top
            owner[int(np.floor(y0 * h)):int(np.ceil(y1 * h)), int(np.floor(x0 * w)):int(np.ceil(x1 * w))] = s
        expected |= {(s, grid) for s in range(8) if not (owner == s).any()}
    assert expected, "the layout must lose a subject somewhere"
    assert {(s, g) for s, g, _ in unreached_subjects(Layout(boxes, (8, 8)), [(4, 4), (2, 2)])} == expected
    code, _, err = run(["generate", "eight things", *specs, *TINY, "--out", str(tmp_path / "eight.png")], capsys)
    assert code == 0
    named = re.findall(r"warning: subject 's(\d)' \(subjects\[(\d)\]\) gets no token at the ([^:]*) level", err)
    assert {int(a) for a, b, _ in named} == {s for s, _ in expected} and all(a == b for a, b, _ in named)
    for s, (h, w) in expected:
        assert any(int(a) == s and f"{h}x{w}" in where for a, _, where in named), (s, err)


def test_the_warnings_count_only_what_acts_blocks_and_windows(tmp_path, subject_images, capsys):
    """Two subjects over the whole image. On top, one whose window holds no step: it is named as
    never acting, and the one under it, which owns every token at every step, is not warned about.
    On top, one whose blocks select the 4x4 level only (the tiny U-Net's ``down_blocks.1`` and
    ``up_blocks.1``): the one under it vanishes at the 4x4 level and not at the 2x2 one, where the
    top one is absent; with ``down_blocks.1`` only, the one under it keeps the 4x4 level's other
    layers and is not warned about at all."""
    for i, name in enumerate(("under", "top")):
        subject_images[i].save(tmp_path / f"{name}.png")
    under, top = f"{tmp_path / 'under.png'}:0,0,1,1", f"{tmp_path / 'top.png'}:0,0,1,1"
    code, _, err = run(["generate", "two", "--subject", under, "--subject", top + ":end=0", *TINY,
                        "--out", str(tmp_path / "never.png")], capsys)
    assert code == 0, err
    assert "warning: subject 'top' (subjects[1]) never acts: its window [0, 0) holds none of the 2 steps" in err
    assert "gets no token" not in err
    assert (tmp_path / "never.routing.png").is_file()
    for blocks, expected in ((["down_blocks.1", "up_blocks.1"], [("under", "4x4 (3 layers)")]),
                             (["down_blocks.1"], [])):
        layout = {"prompt": "two", "subjects": [{"image": "under.png", "box": [0, 0, 1, 1]},
                                                {"image": "top.png", "box": [0, 0, 1, 1], "blocks": blocks}]}
        (tmp_path / "blocks.json").write_text(json.dumps(layout))
        out = tmp_path / f"blocks-{len(blocks)}.png"
        code, _, err = run(["generate", "--layout", str(tmp_path / "blocks.json"), *TINY, "--out", str(out)], capsys)
        assert code == 0, err
        named = re.findall(r"warning: subject '(\w+)' \(subjects\[\d\]\) gets no token at the ([^:]*) level", err)
        assert named == expected, err
        assert "never acts" not in err


def test_absurd_sizes_and_steps_are_refused_before_loading(images, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(loading, "_load_pipeline", no_loading)
    for extra, message in ((["--height", "100000"], "--height 100000 is above the largest side accepted, 16384"),
                           (["--width", "16392"], "--width 16392 is above the largest side accepted"),
                           (["--steps", "5000"], r"--steps must be in \[1, 1000\], got 5000"),
                           (["--seed", "-1"], r"--seed must be in \[0, ")):
        code, _, err = run(["generate", "a", "--subject", f"{images[0]}:0,0,1,1", "--model", "tiny", *extra,
                            "--out", str(tmp_path / "a.png")], capsys)
        assert code == 2 and re.search(message, err), (extra, err)


def test_the_memory_estimate_is_printed(images, capsys, tmp_path):
    code, stdout, _ = run(["generate", "a", "--subject", f"{images[0]}:0,0,1,1", *TINY, "--vae-tiling",
                           "--out", str(tmp_path / "a.png")], capsys)
    assert code == 0
    assert re.search(r"estimated peak memory, 64x64 on cpu: [\d.]+ GiB \(weights [\d.]+ \+ the larger of a U-Net "
                     r"step [\d.]+ and the VAE decode [\d.]+\)", stdout), stdout
    assert "1 subject," in stdout                 # not "1 subjects"
    # FLUX: the transformer's step and the text encoders counted too
    code, stdout, _ = run(["generate", "a", "--subject", f"{images[0]}:0,0,1,1", "--model", "tiny", "--arch", "flux",
                           "--height", "64", "--width", "64", "--steps", "1", "--device", "cpu",
                           "--out", str(tmp_path / "f.png")], capsys)
    assert code == 0
    assert re.search(r"estimated peak memory, 64x64 on cpu: [\d.]+ GiB \(weights [\d.]+ \+ the largest of a "
                     r"transformer step [\d.]+, the text encoders [\d.]+ and the VAE decode [\d.]+\)", stdout), stdout


def test_an_out_of_memory_generation_is_one_line(images, capsys, tmp_path, monkeypatch):
    import torch

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore details")

    monkeypatch.setattr("anyms.pipeline.AnyMSStableDiffusionXLPipeline.__call__", oom)
    code, _, err = run(["generate", "a", "--subject", f"{images[0]}:0,0,1,1", *TINY, "--out", str(tmp_path / "a.png")],
                       capsys)
    errors = [line for line in err.splitlines() if line.startswith("anyms generate: error:")]
    assert code == 1 and err.endswith("\n") and len(errors) == 1, err
    assert errors[0].endswith("out of memory on cpu making 64x64: try --vae-tiling, --offload model or a smaller size")
    assert not (tmp_path / "a.png").exists()


# ------------------------------------------------------------------ a quiet stderr, one-line errors
def test_stderr_holds_only_the_progress_bar(tiny_sdxl_on_disk, images, tmp_path):
    """A real from_pretrained and load_ip_adapter, in a fresh process: no torchvision lines, no
    torch_dtype deprecation, no "kept in float32: []", no per-file loading bars."""
    model, ip_weight = tiny_sdxl_on_disk
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}     # what a user's shell has
    result = subprocess.run(
        [sys.executable, "-m", "anyms", "generate", "a cat", "--subject", f"{images[0]}:0,0,1,1", "--model", model,
         "--ip-adapter", ip_weight, "--height", "64", "--width", "64", "--steps", "2", "--device", "cpu",
         "--out", str(tmp_path / "a.png")], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    lines = [line for line in re.split(r"[\r\n]+", result.stderr) if line.strip()]
    noise = [line for line in lines if not line.startswith("denoising:")
             and not line.startswith("loaded AnyMSStableDiffusionXLPipeline")]
    assert not noise, noise


def test_errors_are_one_line(images, capsys, monkeypatch, tmp_path):
    def multi_line(*args, **kwargs):
        raise cli.LoadError("cannot load the model 'x': OSError: first line\n  second line\n\nthird")

    monkeypatch.setattr(loading, "_load_pipeline", multi_line)
    code, _, err = run(["generate", "a", "--subject", f"{images[0]}:0,0,1,1", *TINY, "--out", str(tmp_path / "a.png")],
                       capsys)
    assert code == 1 and err == "anyms generate: error: cannot load the model 'x': OSError: first line second line third\n"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "a", "--subject", "x.png:0,0,1,1", "--bogus"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "unrecognized arguments: --bogus" in err


def test_a_base_install_says_which_extra_to_install(tmp_path):
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "from anyms import cli\n"
            f"status = cli.main(['generate', 'a', '--subject', 'x.png:0,0,1,1', '--out', {str(tmp_path / 'a.png')!r}])\n"
            "import anyms\n"
            "try:\n"
            "    anyms.Subject\n"
            "except ModuleNotFoundError as e:\n"
            "    print('IMPORT:', e)\n"
            "sys.exit(status)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 1, result.stderr
    assert result.stderr == ("anyms generate: error: this needs diffusers, which is not installed: "
                             "pip install 'anyms-kernels[diffusers]'\n")
    assert "IMPORT: anyms.Subject needs diffusers, which is not installed: pip install 'anyms-kernels[diffusers]'" \
        in result.stdout


# ------------------------------------------------------------------ a scale float32 cannot hold
def _scale_inputs(tmp_path, image, scale_text):
    """The same subject with the scale ``scale_text`` (JSON text: 1e39, NaN, Infinity), as the
    command line, a layout file and a jobs file give it."""
    subject = f'{{"image": {json.dumps(image)}, "box": [0, 0, 1, 1], "scale": {scale_text}}}'
    (tmp_path / "layout.json").write_text(f'{{"prompt": "a", "subjects": [{subject}]}}')
    (tmp_path / "jobs.jsonl").write_text('{"prompt": "a", "subjects": [{"image": "s.png", "box": [0, 0, 1, 1]}]}\n'
                                         f'{{"prompt": "a", "subjects": [{subject}]}}\n')
    return {"--subject": ["a", "--subject", f"{image}:0,0,1,1", "--subject", f"{image}:0,0,1,1:{scale_text}"],
            "--layout": ["--layout", str(tmp_path / "layout.json")],
            "--jobs": ["--jobs", str(tmp_path / "jobs.jsonl"), "--out-dir", str(tmp_path / "out")]}


@pytest.mark.parametrize("scale", ["1e39", "-1e39", "NaN", "Infinity"])
@pytest.mark.parametrize("source", ["--subject", "--layout", "--jobs"])
def test_a_scale_float32_cannot_hold_is_named_before_loading(tmp_path, images, capsys, monkeypatch, source, scale):
    monkeypatch.setattr(loading, "_load_pipeline", no_loading)
    image = str(tmp_path / "s.png")
    Image.open(images[0]).save(image)
    argv = _scale_inputs(tmp_path, image, scale)[source]
    out = [] if source == "--jobs" else ["--out", str(tmp_path / "x.png")]
    code, _, err = run(["generate", *argv, *TINY, *out], capsys)
    # the command line's second subject is subjects[1]; the others hold one subject
    name = {"--subject": r"subjects\[1\]\.scale", "--layout": r"subjects\[0\]\.scale",
            "--jobs": r"--jobs .*jobs\.jsonl:2: subjects\[0\]\.scale"}[source]
    assert code == 2 and err.count("\n") == 1 and re.search(name, err), err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "out").exists()


# ------------------------------------------------------------------ --from: the record's schema
def valid_record(folder, image):
    """A record as anyms generate writes it (built without a model), subject paths relative to ``folder``."""
    from anyms import Subject
    from anyms.metadata import build_record

    return build_record(prompt="a cat", negative_prompt=None, subjects=[Subject(image, (0.0, 0.0, 1.0, 1.0), 0.8)],
                        mode="overwrite", priority="order", seed=3, steps=2, guidance=None, height=64, width=64,
                        model={"arch": "sdxl", "model": "tiny", "ip_adapter": None, "image_encoder": None,
                               "dtype": "float32"}, folder=str(folder), device="cpu")


def save_record(path, record):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt("anyms", json.dumps(record), zip=True)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return str(path)


def _set(record, key, value):
    """``record`` with the dotted ``key`` (``layout.subjects[0].scale``) set to ``value``, or removed
    where ``value`` is DROP."""
    parts = [int(p) if p.isdigit() else p for p in re.split(r"\.|\[|\]\.?", key) if p != ""]
    target = record
    for part in parts[:-1]:
        target = target[part]
    if value is DROP:
        del target[parts[-1]]
    else:
        target[parts[-1]] = value
    return record


DROP = object()
BAD_RECORDS = [
    ("model", [1], r'"model" must be an object, got \[1\]'),
    ("model.arch", "evil", r"\"model.arch\" must be one of \['sdxl', 'sd15', 'flux'\], got 'evil'"),
    ("model.dtype", "float8", r'"model.dtype" must be one of'),
    ("model.model", 7, r'"model.model" must be a non-empty string'),
    ("model.ip_adapter", DROP, r"\"model\" lacks \['ip_adapter'\]"),
    ("layout.subjects[0].scale", 1e39, r'"layout.subjects\[0\].scale" must be a finite number'),
    ("layout.subjects[0].scale", "1", r'"layout.subjects\[0\].scale" must be a number'),
    ("layout.subjects[0].box", [0, 0, 1, 2], r'"layout.subjects\[0\].box" must lie inside \[0, 1\]'),
    ("layout.subjects[0].box", [0, 0, 1], r'"layout.subjects\[0\].box" must be a list of 4 numbers'),
    ("layout.subjects[0].image_sha256", "xyz", r'"layout.subjects\[0\].image_sha256" must be a SHA-256'),
    ("layout.subjects[0].evil", 1, r"\"layout.subjects\[0\]\" holds unknown key\(s\) \['evil'\]"),
    ("layout.subjects", [], r'"layout.subjects" must be a non-empty list'),
    ("layout.mode", "add", r'"layout.mode" must be one of'),
    ("layout.priority", None, r'"layout.priority" must be one of'),
    ("seed", -1, r'"seed" must be an integer in \[0, 18446744073709551615\], got -1'),
    ("seed", 2.5, r'"seed" must be an integer'),
    ("steps", True, r'"steps" must be an integer in \[1, 1000\], got True'),
    ("guidance", float("nan"), r'"guidance" must be a finite number or null'),
    ("height", 17000, r'"height" 17000 is above the largest side accepted'),
    ("width", "64", r'"width" must be an integer or null'),
    ("prompt", None, r'"prompt" must be a non-empty string'),
    ("versions", "x", r'"versions" must be an object'),
    ("extra", 1, r"its record holds unknown key\(s\) \['extra'\]"),
    ("seed", DROP, r"its record lacks \['seed'\]"),
]


@pytest.mark.parametrize("key,value,message", BAD_RECORDS, ids=[f"{k}={v!r}"[:40] for k, v, _ in BAD_RECORDS])
def test_a_from_record_is_checked_against_its_schema_before_loading(tmp_path, images, capsys, monkeypatch,
                                                                    key, value, message):
    monkeypatch.setattr(loading, "_load_pipeline", no_loading)
    path = save_record(tmp_path / "r.png", _set(valid_record(tmp_path, images[0]), key, value))
    capsys.readouterr()                 # what importing the pipeline module may have logged
    code, _, err = run(["generate", "--from", path, "--out", str(tmp_path / "y.png")], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"anyms generate: error: --from {path!r}: its record") and re.search(message, err), err


def test_a_written_record_passes_its_schema_and_a_huge_value_is_cut_in_the_message(tmp_path, images):
    from anyms.metadata import check_record, read_record

    record = valid_record(tmp_path, images[0])
    check_record(record, "x")
    assert read_record(save_record(tmp_path / "r.png", record)) == record
    path = save_record(tmp_path / "big.png", _set(record, "model.arch", "x" * 100_000))
    with pytest.raises(ValueError) as error:
        read_record(path)
    assert len(str(error.value)) < 300 and "'xxxx" in str(error.value)


# ------------------------------------------------------------------ files that change during a run
def test_a_subject_file_moved_during_the_run_costs_nothing_and_the_record_names_what_was_read(
        tmp_path, images, capsys, monkeypatch):
    """The subject files are hashed when they are read and checked, before the model loads: a
    file moved or rewritten while the model loads or generates no longer loses the image."""
    real = cli.generate_image
    read = sha(images[0])

    def then_move(pipe, job, run):
        image = real(pipe, job, run)
        os.replace(images[0], tmp_path / "moved.png")
        return image

    monkeypatch.setattr(cli, "generate_image", then_move)
    out = tmp_path / "a.png"
    code, _, err = run(["generate", "a", "--subject", f"{images[0]}:0,0,1,1", *TINY, "--out", str(out)], capsys)
    assert code == 0 and "Traceback" not in err, err
    assert record(out)["layout"]["subjects"][0]["image_sha256"] == read
    # a file rewritten after it was read: the record holds the hash of the bytes that were read
    Image.open(tmp_path / "moved.png").save(images[0])
    Image.fromarray(255 - pixels(images[0])).save(tmp_path / "other.png")

    def then_rewrite(pipe, job, run):
        image = real(pipe, job, run)
        os.replace(tmp_path / "other.png", images[0])
        return image

    monkeypatch.setattr(cli, "generate_image", then_rewrite)
    code, _, err = run(["generate", "a", "--subject", f"{images[0]}:0,0,1,1", *TINY, "--out", str(tmp_path / "b.png")],
                       capsys)
    assert code == 0 and record(tmp_path / "b.png")["layout"]["subjects"][0]["image_sha256"] == read != sha(images[0])


# ------------------------------------------------------------------ a full disk
def _disk_full_for(monkeypatch, *names):
    """os.fsync fails with ENOSPC for the temporary files of ``names`` (what a full disk does to
    the last write of a file); every other file is written."""
    import errno

    real = os.fsync

    def fsync(fd):
        target = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if any(target.startswith(f".{name}.") for name in names):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads the file names of descriptors in /proc")
def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, images, capsys, monkeypatch):
    _disk_full_for(monkeypatch, "a.png")
    code, _, err = run(["generate", "a", "--subject", f"{images[0]}:0,0,1,1", *TINY, "--out", str(tmp_path / "a.png")],
                       capsys)
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 1 and "Traceback" not in err and len(errors) == 1, err
    assert re.search(r"^anyms generate: error: cannot write '.*a\.png': No space left on device; nothing was "
                     r"written under that name$", errors[0]), err
    # the pictures went first and are whole; no image, no temporary file
    assert sorted(os.listdir(tmp_path)) == ["a.layout.png", "a.routing.png", "subject0.png", "subject1.png"]


@pytest.mark.parametrize("text,message", [("9" * 5000, "Exceeds the limit"), ("[" * 100_000 + "]" * 100_000,
                                                                          "maximum recursion depth")],
                         ids=["5000 digits", "nested 100000 deep"])
def test_json_that_python_refuses_otherwise_is_one_line(tmp_path, capsys, monkeypatch, text, message):
    from PIL.PngImagePlugin import PngInfo

    monkeypatch.setattr(loading, "_load_pipeline", no_loading)
    (tmp_path / "layout.json").write_text(text)
    info = PngInfo()
    info.add_itxt("anyms", text, zip=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "r.png", pnginfo=info)
    for argv, what in ((["a", "--layout", str(tmp_path / "layout.json")], "--layout"),
                       (["--from", str(tmp_path / "r.png")], "--from")):
        code, _, err = run(["generate", *argv, "--out", str(tmp_path / "y.png")], capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith(f"anyms generate: error: {what} ") \
            and "not valid JSON (" in err and message in err, err


def test_a_from_record_whose_files_or_sources_are_refused_names_the_file(tmp_path, images, capsys, monkeypatch):
    monkeypatch.setattr(loading, "_load_pipeline", no_loading)
    cases = [(_set(valid_record(tmp_path, images[0]), "layout.subjects[0].image", "gone.png"),
              r"subjects\[0\]\.image: no image file at '.*gone\.png'"),
             (_set(valid_record(tmp_path, images[0]), "model.ip_adapter", "a/b/c.safetensors"),
              r'its record\'s "model\.ip_adapter" must be null with the tiny model')]
    capsys.readouterr()
    for record_, message in cases:
        path = save_record(tmp_path / "r.png", record_)
        code, _, err = run(["generate", "--from", path, "--out", str(tmp_path / "y.png"), "--overwrite"], capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith(f"anyms generate: error: --from {path!r}: ") \
            and re.search(message, err), err
