"""The ``anyms`` command line, end to end on tiny random models (anyms.tiny). CPU, no network."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from anyms import cli, loading

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = ["--height", "64", "--width", "64"]


def generate_args(model, ip_weight, *extra):
    return ["generate", "--model", model, "--ip-adapter", ip_weight, *SIZE, "--steps", "2",
            "--device", "cpu", "--seed", "3", *extra]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_demo_writes_its_files_and_says_the_weights_are_random(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--model", "tiny", "--out-dir", str(out), "--steps", "2", "--size", "64"]) == 0
    printed = capsys.readouterr().out
    assert "RANDOM weights" in printed
    for name in ("image.png", "layout.png", "routing.png"):
        assert (out / name).is_file() and str(out / name) in printed
        assert Image.open(out / name).size[0] > 0
    assert Image.open(out / "image.png").size == (64, 64)
    assert len(list(out.glob("subject_*.png"))) == 3


def test_generate_subjects_and_layout_file_give_the_pipeline_image(tiny_sdxl_on_disk, images, tmp_path, capsys):
    from anyms import Subject
    from anyms.pipeline import AnyMSStableDiffusionXLPipeline

    model, ip_weight = tiny_sdxl_on_disk
    out = tmp_path / "out" / "cats.png"
    argv = generate_args(model, ip_weight, "a cat and a dog", "--subject", f"{images[0]}:0,0,0.6,1",
                         "--subject", f"{images[1]}:0.4,0,1,1:0.7", "--out", str(out))
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    for path in (out, tmp_path / "out" / "cats.layout.png", tmp_path / "out" / "cats.routing.png"):
        assert path.is_file() and str(path) in printed
    assert Image.open(out).size == (64, 64)

    # the same generation from a layout file (paths relative to it; "prompt" in the file)
    layout = {"prompt": "a cat and a dog", "subjects": [
        {"image": os.path.basename(images[0]), "box": [0, 0, 0.6, 1], "label": "cat"},
        {"image": os.path.basename(images[1]), "box": [0.4, 0, 1, 1], "scale": 0.7}]}
    layout_path = tmp_path / "layout.json"
    layout_path.write_text(json.dumps(layout))
    out2 = tmp_path / "from_layout.png"
    assert cli.main(generate_args(model, ip_weight, "--layout", str(layout_path), "--out", str(out2))) == 0
    np.testing.assert_array_equal(pixels(out2), pixels(out))

    # and from Python, with the same arguments
    pipe = AnyMSStableDiffusionXLPipeline.from_pretrained(model)
    pipe.load_ip_adapter(os.path.dirname(ip_weight), subfolder="", weight_name=os.path.basename(ip_weight))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat and a dog", subjects=[Subject(images[0], (0, 0, 0.6, 1)), Subject(images[1], (0.4, 0, 1, 1), 0.7)],
                 height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(3)).images[0]
    np.testing.assert_array_equal(np.asarray(image), pixels(out))
    # and the mode reaches the pipeline: sum differs where the boxes overlap
    out3 = tmp_path / "sum.png"
    assert cli.main(argv[:-1] + [str(out3), "--mode", "sum"]) == 0
    assert np.abs(pixels(out3).astype(int) - pixels(out).astype(int)).max() > 0


def test_generate_with_vae_tiling(tiny_sdxl_on_disk, images, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    tiled = []
    enable_tiling = AutoencoderKL.enable_tiling
    monkeypatch.setattr(AutoencoderKL, "enable_tiling", lambda self, *a, **k: (tiled.append(self),
                                                                                enable_tiling(self, *a, **k)))
    model, ip_weight = tiny_sdxl_on_disk
    out = tmp_path / "tiled.png"
    argv = generate_args(model, ip_weight, "a cat", "--subject", f"{images[0]}:0,0,1,1", "--vae-tiling",
                         "--out", str(out))
    assert cli.main(argv) == 0 and out.is_file()
    assert len(tiled) == 1 and tiled[0].use_tiling


def _bad(tmp_path, images):
    (tmp_path / "broken.json").write_text("{ not json")
    (tmp_path / "nobox.json").write_text(json.dumps({"subjects": [{"image": images[0]}]}))
    (tmp_path / "extra.json").write_text(json.dumps({"subjects": [{"image": images[0], "box": [0, 0, 1, 1],
                                                                   "boxes": []}]}))
    (tmp_path / "empty.json").write_text(json.dumps({"subjects": []}))
    (tmp_path / "outside.json").write_text(json.dumps({"subjects": [{"image": images[0], "box": [0, 0, 1, 2]}]}))
    (tmp_path / "text.png").write_text("not an image")
    img = images[0]
    return [
        (["a", "--subject", img], "--subject .*expected PATH:x0,y0,x1,y1"),
        (["a", "--subject", f"{img}:0,0,1"], "the box must be 4 numbers"),
        (["a", "--subject", f"{img}:0,0,1,x"], "is not a number"),
        (["a", "--subject", f"{img}:0,0,1,1:big"], "scale: 'big' is not a number"),
        (["a", "--subject", f"{img}:0,0,1.5,1"], r"subjects\[0\]\.box must lie inside \[0, 1\]"),
        (["a", "--subject", f"{img}:0.5,0,0.2,1"], r"subjects\[0\]\.box .*inverted"),
        (["a", "--subject", f"{img}:0,0,1,1", "--subject", f"{tmp_path}/missing.png:0,0,1,1"],
         r"subjects\[1\]\.image: no image file"),
        (["a", "--subject", f"{tmp_path}/text.png:0,0,1,1"], r"subjects\[0\]\.image: cannot read"),
        (["a", "--layout", str(tmp_path / "broken.json")], "not valid JSON"),
        (["a", "--layout", str(tmp_path / "missing.json")], "no such file"),
        (["a", "--layout", str(tmp_path / "nobox.json")], r"subjects\[0\]: missing \"box\""),
        (["a", "--layout", str(tmp_path / "extra.json")], r"unknown key\(s\) \['boxes'\]"),
        (["a", "--layout", str(tmp_path / "empty.json")], "must be a non-empty list"),
        (["a", "--layout", str(tmp_path / "outside.json")], r"subjects\[0\]\.box must lie inside"),
        (["--subject", f"{img}:0,0,1,1"], "a prompt is required"),
        (["a", "--subject", f"{img}:0,0,1,1", "--height", "100"], "--height must be a positive multiple of 8"),
        (["a", "--subject", f"{img}:0,0,1,1", "--width", "0"], "--width must be a positive multiple of 8"),
        (["a", "--subject", f"{img}:0,0,1,1", "--steps", "0"], "--steps must be at least 1"),
        (["a", "--subject", f"{img}:0,0,1,1", "--out", str(tmp_path / "x.gif")], "--out must end in"),
        (["a", "--subject", f"{img}:0,0,1,1", "--device", "nonsense"], "--device"),
        (["a", "--subject", f"{img}:0,0,1,1", "--device", "cpu", "--offload", "model"],
         "--offload model moves models between the CPU and an accelerator; with --device cpu: there is nothing"),
        (["a", "--subject", f"{img}:0,0,1,1", "--ip-adapter", str(tmp_path)], "is a folder: name the weight file"),
        (["a", "--subject", f"{img}:0,0,1,1", "--ip-adapter", "h94/weights.bin"], "neither a local path nor a Hub"),
        (["a", "--subject", f"{img}:0,0,1,1", "--arch", "sd15"], "--model is required with --arch sd15"),
    ]


def test_generate_bad_input_exits_2_without_traceback_before_loading(tmp_path, images, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(loading, "_load_pipeline", no_loading)
    for argv, message in _bad(tmp_path, images):
        assert cli.main(["generate", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("anyms generate: error: ") and "Traceback" not in err, err
        assert __import__("re").search(message, err), (argv, err)


@pytest.mark.parametrize("argv", [["generate", "a", "--subject", "x.png:0,0,1,1", "--mode", "add"],
                                  ["generate", "a"],
                                  ["demo", "--mode", "add"],
                                  []])
def test_argparse_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


DEMO_FILES = {
    "tiny": ("image.png", "layout.png", "routing.png", "subject_red_ball.png", "subject_blue_box.png",
             "subject_green_cone.png", "mask_green_cone.png"),
    "toy": ("image.png", "layout.png", "routing.png", "subject_red_circle.png", "subject_blue_cross.png",
            "subject_green_triangle.png", "mask_green_triangle.png"),
}


@pytest.mark.parametrize("model", sorted(DEMO_FILES))
def test_demo_replaces_nothing_without_overwrite(tmp_path, capsys, model):
    out = tmp_path / "demo"
    demo = ["demo", "--model", model, "--out-dir", str(out), "--steps", "1", "--size", "64"]
    DEMO = DEMO_FILES[model]
    assert cli.main(demo) == 0
    assert sorted(os.listdir(out)) == sorted(DEMO)                    # every file the demo writes is checked
    capsys.readouterr()
    for name in DEMO:                          # any one of its files is enough to refuse
        before = {n: (out / n).read_bytes() for n in DEMO}
        others = [n for n in DEMO if n != name]
        for n in others:
            (out / n).unlink()
        assert cli.main(demo + ["--seed", "1"]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--out-dir: '{out / name}' exists; give --overwrite" in err[0], err
        assert (out / name).read_bytes() == before[name] and not any((out / n).exists() for n in others)
        for n in others:
            (out / n).write_bytes(before[n])
    image = (out / "image.png").read_bytes()
    assert cli.main(demo + ["--seed", "1", "--overwrite"]) == 0
    assert (out / "image.png").read_bytes() != image           # replaced, as asked


def test_demo_out_dir_that_is_a_file_or_cannot_be_written_is_one_line(tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    cases = [(a_file, "is a file, not a folder"), (a_file / "below", "is a file, not a folder")]
    if os.path.isdir("/sys"):
        try:
            os.mkdir("/sys/anyms-demo-probe")       # refused even to root on a read-only /sys
        except OSError:
            cases.append(("/sys/anyms-demo", "cannot write in"))
        else:
            os.rmdir("/sys/anyms-demo-probe")
    for out_dir, message in cases:
        assert cli.main(["demo", "--out-dir", str(out_dir), "--steps", "1", "--size", "64"]) == 2, out_dir
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("anyms demo: error: --out-dir") and message in err[0], err
    assert a_file.read_text() == "keep me"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes in a read-only folder: the /sys case above covers a folder root cannot write")
def test_demo_read_only_out_dir_is_one_line(tmp_path, capsys):
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert cli.main(["demo", "--out-dir", str(out), "--steps", "1", "--size", "64"]) == 2
    finally:
        out.chmod(0o755)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write in" in err[0] and "Permission denied" in err[0], err
    assert not os.listdir(out)


def test_demo_bad_size(tmp_path, capsys):
    assert cli.main(["demo", "--out-dir", str(tmp_path), "--size", "60"]) == 2
    assert "--size must be a positive multiple of 8" in capsys.readouterr().err


def test_unloadable_model_or_adapter_exits_1(tiny_sdxl_on_disk, tmp_path, images, capsys):
    model, _ = tiny_sdxl_on_disk
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    weight = tmp_path / "ipa.safetensors"
    weight.write_bytes(b"not safetensors")
    base = ["generate", "a", "--subject", f"{images[0]}:0,0,1,1", "--ip-adapter", str(weight), "--device", "cpu"]
    assert cli.main(base + ["--model", str(empty)]) == 1
    err = capsys.readouterr().err
    assert f"cannot load the model '{empty}'" in err and "Traceback" not in err
    assert cli.main(base + ["--model", model]) == 1
    err = capsys.readouterr().err
    assert "cannot load the IP-Adapter" in err and "SafetensorError" in err and "Traceback" not in err


# ------------------------------------------------------------------ offline
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HUB_LOG_LINES = ("Couldn't connect", "Will try to load from local cache", "Retrying", "stacktrace", "Traceback")


def _run_offline(argv, tmp_path, **env):
    """``python -m anyms ARGV`` with an empty Hugging Face cache of its own (unless given) and ``env``."""
    import subprocess
    import sys

    full = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    full.update(PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
                HF_HUB_CACHE=str(tmp_path / "hub"), **env)
    return subprocess.run([sys.executable, "-m", "anyms", *argv], capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path), env=full)


@pytest.mark.parametrize("env,extra,model,cause", [
    ({"HF_HUB_OFFLINE": "1"}, ["--model", "someone/not-cached"], "someone/not-cached", "HF_HUB_OFFLINE is set"),
    # an endpoint where nothing answers: no network
    ({"HF_ENDPOINT": "http://127.0.0.1:9"}, ["--arch", "flux"], "black-forest-labs/FLUX.1-dev",
     "the Hub (http://127.0.0.1:9) cannot be reached: no network"),
], ids=["HF_HUB_OFFLINE", "no-network-flux"])
def test_a_model_not_in_the_cache_without_the_hub_is_one_line_naming_it(images, tmp_path, env, extra, model, cause):
    result = _run_offline(["generate", "a", "--subject", f"{images[0]}:0,0,1,1", "--device", "cpu", *extra],
                          tmp_path, **env)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(err) == 1, result.stderr
    assert err[0].startswith(f"anyms generate: error: cannot load the model {model!r}: it is not in the Hugging "
                             f"Face cache ({tmp_path / 'hub'}) and {cause}"), err
    assert not any(line in result.stderr for line in HUB_LOG_LINES)


def test_a_cached_model_loads_without_the_hub_and_without_asking_it(tiny_sdxl_on_disk, images, tmp_path):
    import shutil

    model, weight = tiny_sdxl_on_disk
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-sdxl"
    shutil.copytree(model, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    result = _run_offline(["generate", "a", "--subject", f"{images[0]}:0,0,1,1", "--model", "someone/tiny-sdxl",
                           "--ip-adapter", weight, "--device", "cpu", *SIZE, "--steps", "1", "--no-pictures",
                           "--out", str(tmp_path / "x.png")], tmp_path, HF_ENDPOINT="http://127.0.0.1:9")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "x.png").is_file()
    assert not any(line in result.stderr for line in HUB_LOG_LINES), result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_offload_without_device_does_not_speak_of_a_device_option(images, capsys, monkeypatch):
    monkeypatch.setattr(loading, "_load_pipeline", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    assert cli.main(["generate", "a", "--subject", f"{images[0]}:0,0,1,1", "--offload", "model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device" not in err[0], err
    assert "this machine has no CUDA device, so the run is on the CPU: there is nothing to offload" in err[0]


def test_parse_subject_splits_from_the_right():
    s = cli.parse_subject(r"C:\pics\dog.png:0,0.1,0.5,1:0.8")
    assert s.image == r"C:\pics\dog.png" and s.box == (0.0, 0.1, 0.5, 1.0) and s.scale == 0.8
    s = cli.parse_subject("a:b.png:0,0,1,1")
    assert s.image == "a:b.png" and s.scale == 1.0


def test_python_dash_m_and_a_light_import():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "anyms", "generate", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--subject" in result.stdout and "--offload" in result.stdout
    # `import anyms` imports neither diffusers nor the kernels; the names load on first use
    code = ("import sys, anyms; assert 'diffusers' not in sys.modules and 'anyms_kernels' not in sys.modules; "
            "anyms.Layout; assert 'anyms_kernels' in sys.modules; print(sorted(anyms.__all__))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in ("AnyMSAttnProcessor", "apply_anyms", "remove_anyms", "set_anyms_layout", "anyms_attention",
                 "Layout", "Subject", "AnyMSStableDiffusionXLPipeline", "AnyMSStableDiffusionPipeline",
                 "draw_layout"):
        assert f"'{name}'" in result.stdout


def test_version(capsys):
    import anyms

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"anyms {anyms.__version__}"


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_generate", interrupted)
    assert cli.main(["generate", "x", "--model", "tiny", "--layout", "layout.json"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("anyms generate: error: interrupted"), err


@pytest.mark.parametrize("model", sorted(DEMO_FILES))
def test_demo_holds_its_folders_lock_as_generate_does(tmp_path, capsys, monkeypatch, model):
    """Another run writing in --out-dir (its lock held): the demo refuses at once, one line naming the
    holder and --out-dir, exit 2, before any model is built, nothing written; once the folder is free
    the demo writes its files, a temporary file a stopped writer of them left is removed, and the
    lock is let go."""
    from anyms.lock import LOCK_NAME, FolderLock

    out = tmp_path / "demo"
    out.mkdir()
    demo = ["demo", "--model", model, "--out-dir", str(out), "--steps", "1", "--size", "64"]
    other = FolderLock(str(out), "launch 10.0.0.1:29500").acquire()
    try:
        with monkeypatch.context() as m:
            def fail(*args, **kwargs):
                raise AssertionError("a model was built")

            m.setattr("anyms.tiny.tiny_pipeline", fail)
            m.setattr("anyms.toy.toy_pipeline", fail)
            assert cli.main(demo) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(
            r"--out-dir: the output folder .* is in use by another run \(PID \d+ on .*, launch 10.0.0.1:29500, in "
            r"\.anyms\.lock\); one run writes in a folder at a time: wait for it, or give another --out-dir$",
            err.strip()), err
        assert sorted(os.listdir(out)) == [LOCK_NAME]
    finally:
        other.release()
    (out / ".image.png.0123abcd.tmp").write_bytes(b"half an image")      # a stopped writer's leftover
    assert cli.main(demo) == 0
    assert sorted(os.listdir(out)) == sorted(DEMO_FILES[model])
