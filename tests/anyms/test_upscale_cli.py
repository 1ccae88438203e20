"""``anyms generate --upscale``: the tiled upscale from the command line, a layout file, ``--jobs``,
the PNG record and ``--from``; its bad input refused before any model loads. CPU, the tiny
random model (and the toy world's folder for its geometry), no network."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from anyms import cli, loading

from .cli_checks import no_loading

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model", "tiny", "--height", "64", "--width", "64", "--steps", "4", "--device", "cpu"]
UPSCALE = {"scale": 2, "tile": 64, "overlap": 32, "strength": 0.5}
OPTIONS = ["--upscale", "2", "--upscale-tile", "64", "--upscale-overlap", "32", "--upscale-strength", "0.5"]
BOXES = [[0.05, 0.1, 0.55, 0.6], [0.5, 0.4, 0.95, 0.95]]


@pytest.fixture
def folder(tmp_path, subject_images):
    for i, img in enumerate(subject_images[:2]):
        img.save(tmp_path / f"s{i}.png")
    return tmp_path


def layout(upscale=None, **extra):
    data = {"prompt": "a cat and a dog",
            "subjects": [{"image": f"s{i}.png", "box": box} for i, box in enumerate(BOXES)], **extra}
    if upscale is not None:
        data["upscale"] = upscale
    return data


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def record(path):
    return json.loads(Image.open(path).text["anyms"])


def run(argv, capsys):
    try:
        code = cli.main(["generate", *argv])
    except SystemExit as e:            # argparse's own errors (one line, status 2)
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------ the image, its record, --from
def test_upscale_makes_an_image_twice_the_size_and_from_makes_it_again_bit_for_bit(folder, capsys):
    subjects = [f"--subject={folder / f's{i}.png'}:{','.join(map(str, box))}" for i, box in enumerate(BOXES)]
    out, native = folder / "up.png", folder / "native.png"
    code, stdout, err = run(["a cat and a dog", *subjects, *TINY, *OPTIONS, "--out", str(out)], capsys)
    assert code == 0, err
    assert Image.open(out).size == (128, 128) and "upscaled 2x" in stdout
    made = record(out)
    # the record: the options as they ran, and the size generated (not the image's)
    assert made["upscale"] == UPSCALE and (made["height"], made["width"]) == (64, 64)
    # the pictures are of the output's size (the layout and routing drawn over the upscaled image)
    for picture in ("up.layout.png", "up.routing.png"):
        assert (folder / picture).exists()
    assert Image.open(folder / "up.layout.png").size == (128, 128)

    again = folder / "again.png"
    code, _, err = run(["--from", str(out), "--device", "cpu", "--no-pictures", "--out", str(again)], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(pixels(again), pixels(out))
    assert record(again)["upscale"] == UPSCALE

    # the upscale pass does change the image: it is not the native one resized
    assert run(["a cat and a dog", *subjects, *TINY, "--no-pictures", "--out", str(native)], capsys)[0] == 0
    resized = np.asarray(Image.open(native).convert("RGB").resize((128, 128), Image.LANCZOS))
    assert np.abs(resized.astype(int) - pixels(out)).max() > 0
    # an option given with --from overrides the record's
    other = folder / "other.png"
    assert run(["--from", str(out), "--device", "cpu", "--no-pictures", "--upscale-strength", "1",
                "--out", str(other)], capsys)[0] == 0
    assert record(other)["upscale"] == {**UPSCALE, "strength": 1.0}
    assert np.abs(pixels(other).astype(int) - pixels(out)).max() > 0


def test_the_commands_upscale_is_tiled_upscale_of_its_native_image(folder, capsys):
    """The command's image is ``anyms.tiled_upscale`` of the image it generated, with the job's prompt,
    subjects, steps and seed. With one tile over the output (as here) that is diffusers' img2img
    pass with the image's layout, bit for bit (test_upscale.py's
    test_one_tile_over_the_image_equals_the_untiled_img2img_pass)."""
    import anyms
    from anyms.tiny import tiny_pipeline

    (folder / "plain.json").write_text(json.dumps(layout()))
    native, up = folder / "native.png", folder / "up.png"
    argv = ["--layout", str(folder / "plain.json"), *TINY, "--no-pictures"]
    assert run([*argv, "--out", str(native)], capsys)[0] == 0
    one_tile = ["--upscale", "2", "--upscale-tile", "128", "--upscale-overlap", "0", "--upscale-strength", "0.5"]
    assert run([*argv, *one_tile, "--out", str(up)], capsys)[0] == 0
    pipe = tiny_pipeline(anyms.AnyMSStableDiffusionXLPipeline, kind="sdxl", seed=0)
    subjects = [anyms.Subject(str(folder / f"s{i}.png"), tuple(box)) for i, box in enumerate(BOXES)]
    want = anyms.tiled_upscale(pipe, Image.open(native).convert("RGB"), "a cat and a dog", subjects=subjects,
                               scale=2, tile=128, overlap=0, strength=0.5, num_inference_steps=4, seed=0).images[0]
    assert len(pipe.anyms_last_upscale.tiles) == 1
    np.testing.assert_array_equal(pixels(up), np.asarray(want))


def test_the_defaults_of_the_model_are_recorded(folder, capsys):
    """Without --upscale-tile / -overlap / -strength the record holds what ran: the tiny SDXL's
    native side (128 px), a quarter of it, 0.3."""
    (folder / "layout.json").write_text(json.dumps(layout({"scale": 2})))
    out = folder / "d.png"
    code, _, err = run(["--layout", str(folder / "layout.json"), *TINY, "--no-pictures", "--out", str(out)], capsys)
    assert code == 0, err
    assert record(out)["upscale"] == {"scale": 2, "tile": 128, "overlap": 32, "strength": 0.3}
    assert Image.open(out).size == (128, 128)


def test_a_layout_file_and_a_jobs_line_make_the_image_the_options_make(folder, capsys):
    (folder / "plain.json").write_text(json.dumps(layout()))
    (folder / "up.json").write_text(json.dumps(layout(UPSCALE)))
    by_options, by_file = folder / "o.png", folder / "f.png"
    assert run(["--layout", str(folder / "plain.json"), *TINY, *OPTIONS, "--no-pictures", "--out",
                str(by_options)], capsys)[0] == 0
    assert run(["--layout", str(folder / "up.json"), *TINY, "--no-pictures", "--out", str(by_file)], capsys)[0] == 0
    np.testing.assert_array_equal(pixels(by_file), pixels(by_options))

    # --jobs: the line's "upscale"; a line without it takes the options'; "upscale": null, none
    jobs = folder / "jobs.jsonl"
    lines = [layout(UPSCALE, out="a.png", seed=0), layout(out="b.png", seed=0), layout(None, out="c.png", seed=0)]
    lines[2]["upscale"] = None
    jobs.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    argv = ["--jobs", str(jobs), *TINY, "--out-dir", str(folder / "out"), "--upscale", "2", "--upscale-tile", "64",
            "--upscale-overlap", "32", "--upscale-strength", "0.5"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    out = folder / "out"
    np.testing.assert_array_equal(pixels(out / "a.png"), pixels(by_options))
    np.testing.assert_array_equal(pixels(out / "b.png"), pixels(by_options))
    assert Image.open(out / "c.png").size == (64, 64) and "upscale" not in record(out / "c.png")

    # resumable: the same run skips them all
    assert run(argv, capsys)[0] == 0
    statuses = [json.loads(line)["status"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert statuses == ["skipped"] * 3
    # another strength, or no upscale, is another image: refused without --overwrite
    lines[0]["upscale"] = {**UPSCALE, "strength": 0.75}
    jobs.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    code, _, err = run(argv, capsys)
    assert code == 2 and re.search(r"jobs\.jsonl:1: .*a\.png' exists but was made from something else \(upscale",
                                   err), err
    lines[0].pop("upscale")
    jobs.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    code, _, err = run(argv[:-8] + ["--out-dir", str(out)], capsys)      # no --upscale options: none upscaled
    assert code == 2 and "made from something else (upscale differs)" in err, err


def test_an_unset_tile_means_the_models_default_on_resume(folder, capsys):
    """A job that leaves the tile to the model is not done by an image made with another tile."""
    jobs = folder / "jobs.jsonl"
    jobs.write_text(json.dumps(layout({"scale": 2, "tile": 64, "overlap": 0}, out="a.png")) + "\n")
    argv = ["--jobs", str(jobs), *TINY, "--out-dir", str(folder / "out")]
    assert run(argv, capsys)[0] == 0
    jobs.write_text(json.dumps(layout({"scale": 2, "overlap": 0}, out="a.png")) + "\n")
    code, _, err = run(argv, capsys)
    assert code == 2 and "made from something else (upscale differs)" in err, err


# ------------------------------------------------------------------ bad input, before loading
# (the upscale object, what the error says after the argument's name); each also given as options
BAD = [
    ({"scale": 3}, r"must be 2 or 4, got 3"),
    ({"scale": 1}, r"must be 2 or 4, got 1"),
    ({"scale": 2, "tile": 16}, r"must be a multiple of 32 pixels, at least 32 \(one cell of the U-Net's coarsest"),
    ({"scale": 2, "tile": 48}, r"must be a multiple of 32 pixels"),
    ({"scale": 2, "tile": 64, "overlap": 64}, r"must be smaller than the tile \(64 pixels\), got 64"),
    ({"scale": 2, "tile": 64, "overlap": 96}, r"must be smaller than the tile"),
    ({"scale": 2, "overlap": 128}, r"must be smaller than the tile \(128 pixels\), got 128"),   # the default tile
    ({"scale": 2, "overlap": -32}, r"must be (a multiple of 32 pixels, )?at least 0, got -32"),
    ({"scale": 2, "overlap": 16}, r"must be a multiple of 32 pixels"),
    ({"scale": 2, "strength": 0}, r"must be a number in \(0, 1\]"),
    ({"scale": 2, "strength": 1.5}, r"must be a number in \(0, 1\]"),
    ({"scale": 2, "strength": 0.1}, r"0\.1 x .*steps.* 4 runs no step"),
]
KEY = {"scale": "scale", "tile": "tile", "overlap": "overlap", "strength": "strength"}


def _named(bad):
    """The key the error names: the last one given (the one that is wrong in BAD)."""
    return list(bad)[-1]


def _sources(folder, bad):
    """The same bad upscale as options, in a layout file and in a jobs line: (argv, name pattern)."""
    key = _named(bad)
    (folder / "layout.json").write_text(json.dumps(layout()))
    options = [f"--upscale{'' if k == 'scale' else '-' + k}={v}" for k, v in bad.items()]
    yield (["--layout", str(folder / "layout.json"), "--out", str(folder / "x.png"), *options],
           f"--upscale{'' if key == 'scale' else '-' + key}")
    (folder / "bad.json").write_text(json.dumps(layout(bad)))
    yield ["--layout", str(folder / "bad.json"), "--out", str(folder / "x.png")], rf"--layout '.*bad\.json': upscale\.{key}"
    (folder / "jobs.jsonl").write_text(json.dumps(layout()) + "\n" + json.dumps(layout(bad)) + "\n")
    yield ["--jobs", str(folder / "jobs.jsonl"), "--out-dir", str(folder / "out")], rf"--jobs .*jobs\.jsonl:2: upscale\.{key}"


@pytest.mark.parametrize("bad,message", BAD, ids=[json.dumps(b) for b, _ in BAD])
def test_bad_upscale_options_are_one_line_exit_2_before_loading(folder, capsys, monkeypatch, bad, message):
    monkeypatch.setattr(loading, "_load_pipeline", no_loading)
    for argv, name in _sources(folder, bad):
        code, out, err = run([*argv, *TINY], capsys)
        assert code == 2 and err.count("\n") == 1, (argv, err)
        assert re.search(r"^anyms generate: error: " + name + " " + message, err), (argv, err)
        assert not (folder / "x.png").exists() and not (folder / "out").exists()


@pytest.mark.parametrize("argv,message", [
    (["--upscale", "2.5"], r"argument --upscale: invalid int value: '2\.5'"),
    (["--upscale", "2", "--upscale-tile", "64.5"], r"argument --upscale-tile: invalid int value"),
    (["--upscale", "2", "--upscale-overlap", "x"], r"argument --upscale-overlap: invalid int value"),
    (["--upscale", "2", "--upscale-strength", "nan"], r"--upscale-strength must be a number in \(0, 1\]"),
    (["--upscale-tile", "64"], r"--upscale-tile goes with --upscale 2\|4"),
    (["--upscale", "2", "--height", "72", "--width", "64"],
     r"--upscale 2: the output's height must be a positive multiple of 32, got 144 \(the height 72 times 2"),
    (["--upscale", "4", "--height", "4104", "--width", "64"], r"--upscale 4: the output's height 16416 is above"),
    (["--upscale", "2", "--arch", "flux"], r"--upscale: tiled upscaling runs a U-Net .*FLUX is not supported"),
    (["--upscale", "2", "--model", "toy", "--upscale-tile", "4"],
     r"--upscale-tile must be a multiple of 8 pixels, at least 8"),
])
def test_bad_upscale_options_on_the_command_line(folder, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(loading, "_load_pipeline", no_loading)
    base = ["--layout", str(folder / "layout.json"), "--device", "cpu", "--steps", "4", "--out", str(folder / "x.png")]
    (folder / "layout.json").write_text(json.dumps(layout()))
    if "--model" not in argv:
        base += ["--model", "tiny"]
    if "--height" not in argv:
        base += ["--height", "64", "--width", "64"]
    code, _, err = run([*base, *argv], capsys)
    assert code == 2 and err.count("\n") == 1 and re.search(message, err), err
    assert not (folder / "x.png").exists()


@pytest.mark.parametrize("upscale,message", [
    ({"tile": 64}, r"upscale\.scale is required \(2 or 4\)"),
    ({"scale": 2, "tiles": 64}, r"upscale: unknown key\(s\) \['tiles'\]"),
    ({"scale": True}, r"upscale\.scale must be 2 or 4, got True"),
    ({"scale": 2, "tile": 64.0}, r"upscale\.tile must be an int \(pixels of the output\), got 64\.0"),
    ({"scale": 2, "strength": "0.5"}, r"upscale\.strength must be a number in \(0, 1\]"),
    ([2], r"upscale must be an object"),
])
def test_a_malformed_upscale_object_is_named(folder, capsys, monkeypatch, upscale, message):
    monkeypatch.setattr(loading, "_load_pipeline", no_loading)
    (folder / "bad.json").write_text(json.dumps(layout(upscale)))
    code, _, err = run(["--layout", str(folder / "bad.json"), *TINY, "--out", str(folder / "x.png")], capsys)
    assert code == 2 and err.count("\n") == 1 and re.search(r"--layout '.*bad\.json': " + message, err), err


@pytest.mark.parametrize("change,message", [
    ({"tile": None}, r'its record\'s "upscale\.tile" must be an integer'),
    ({"scale": 3}, r'its record\'s "upscale\.scale" must be 2 or 4'),
    ({"overlap": 64}, r'its record\'s "upscale\.overlap" must be smaller than the tile'),
    ({"strength": 2}, r'its record\'s "upscale\.strength" must be a number in \(0, 1\]'),
    ({"extra": 1}, r'its record\'s "upscale" holds unknown key'),
])
def test_a_record_with_a_bad_upscale_is_refused_before_loading(folder, capsys, monkeypatch, change, message):
    from anyms.metadata import build_record, check_record, png_info
    from anyms.pipeline import Subject

    made = build_record(prompt="a", negative_prompt=None, subjects=[Subject(str(folder / "s0.png"), BOXES[0])],
                        mode="overwrite", priority="order", seed=0, steps=4, guidance=None, height=64, width=64,
                        model={"arch": "sdxl", "model": "tiny", "ip_adapter": None, "image_encoder": None,
                               "dtype": "float32"}, folder=str(folder), device="cpu", upscale=dict(UPSCALE))
    check_record(made, "--from 'x.png'")
    made["upscale"].update(change)
    bad = folder / "bad.png"
    Image.new("RGB", (128, 128)).save(bad, pnginfo=png_info(made))
    monkeypatch.setattr(loading, "_load_pipeline", no_loading)
    code, _, err = run(["--from", str(bad), "--device", "cpu", "--out", str(folder / "y.png")], capsys)
    assert code == 2 and err.count("\n") == 1 and re.search(r"--from '.*bad\.png': " + message, err), err
    assert not (folder / "y.png").exists()


def test_the_upscale_pass_runs_the_blocks_option_the_generation_ran(folder, capsys, monkeypatch):
    """``--blocks style`` holds in the tiled pass too: every tile's layout selects the style block."""
    import anyms.upscale

    seen = []
    original = anyms.upscale.tiled_upscale

    def recording(pipe, *args, **kwargs):
        out = original(pipe, *args, **kwargs)
        plan = pipe.anyms_last_upscale
        seen.append((kwargs.get("anyms_blocks"), [lay.blocks for a, lay in zip(plan.active, plan.tile_layouts) if a]))
        return out

    monkeypatch.setattr(anyms.upscale, "tiled_upscale", recording)
    subjects = [f"--subject={folder / f's{i}.png'}:{','.join(map(str, box))}" for i, box in enumerate(BOXES)]
    code, _, err = run(["a cat and a dog", *subjects, *TINY, *OPTIONS, "--blocks", "style",
                        "--out", str(folder / "style.png")], capsys)
    assert code == 0, err
    (blocks, tiles), = seen
    assert blocks == "style"
    style = (("up_blocks.0.attentions.1", 1.0),)          # the tiny SDXL U-Net's style block
    assert tiles and all(all(b == style for b in layout_blocks) for layout_blocks in tiles)


# ------------------------------------------------------------------ --max-memory
def test_max_memory_plans_for_the_upscale_pass_and_refuses_a_budget_it_cannot_fit(folder, capsys, monkeypatch):
    """--max-memory with --upscale: the plan fits the upscale pass too; a budget the pass cannot fit
    (in any plan the CPU allows) is one line, exit 2, naming --upscale and the smallest budget that
    fits, before any weights load and with nothing written; that budget then makes the image, and
    the estimate line names the pass."""
    import torch

    from anyms.budget import skeleton_pipeline
    from anyms.preflight import estimate_peak_memory
    from tests.anyms.test_budget import loads_nothing

    skeleton = skeleton_pipeline({"model": "tiny", "arch": "sdxl"}, torch.float32)
    least = estimate_peak_memory(skeleton, 64, 64, upscale=(2, 64, 32), dtype=torch.bfloat16, vae_tiling=True)
    assert least.upscale.total > least.generation
    capsys.readouterr()                        # the library's lines while building the skeleton above
    subjects = [f"--subject={folder / f's{i}.png'}:{','.join(map(str, box))}" for i, box in enumerate(BOXES)]
    out = folder / "up.png"
    argv = ["a cat and a dog", *subjects, *TINY, *OPTIONS, "--out", str(out)]
    with monkeypatch.context() as m:
        loads_nothing(m)
        code, _, err = run([*argv, "--max-memory", f"{least.total - 1}B"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    match = re.search(r"a 64x64 generation whose --upscale 2 pass to 128x128 sets the peak on cpu needs an estimated "
                      r".* \(bfloat16, no offload, VAE tiling o(?:n|ff)\); give --max-memory (\S+) or more, or a smaller "
                      r"size, --upscale or --upscale-tile$", err.strip())
    assert match, err
    assert not out.exists() and not list(folder.glob("*.tmp*"))
    code, stdout, err = run([*argv, "--max-memory", match.group(1)], capsys)
    assert code == 0, err
    assert re.search(rf"--max-memory {match.group(1)}: bfloat16, no offload, VAE tiling o(n|ff) \(estimated peak "
                     r".* for 64x64 with its --upscale 2 pass to 128x128\)", stdout), stdout
    assert "the 2x upscale pass's" in stdout + err and "to 128x128" in stdout + err, stdout + err
    assert Image.open(out).size == (128, 128)
