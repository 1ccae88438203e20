"""``anyms generate --max-memory``: the size it reads, the pipeline built from configs on the meta
device, the plan it picks or the refusal before any weights load, the record and --from, --jobs.
CPU, the tiny models and the toy world, no network."""
from __future__ import annotations

import json
import re
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from anyms import cli, loading
from anyms.budget import SIZE_UNITS, parse_size, plan_memory, skeleton_pipeline
from anyms.errors import UsageError
from anyms.preflight import GIB, estimate_peak_memory, fit_memory

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model", "tiny", "--height", "64", "--width", "64", "--steps", "1", "--device", "cpu", "--no-pictures"]


def run(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as e:          # argparse's errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def record(path):
    return json.loads(Image.open(path).text["anyms"])


def toy_sources():
    from anyms.toy import WEIGHTS_DIR
    from anyms.toy.models import IP_SUBFOLDER, IP_WEIGHT_NAME

    return {"model": WEIGHTS_DIR, "ip_adapter": (WEIGHTS_DIR, IP_SUBFOLDER, IP_WEIGHT_NAME), "image_encoder": None,
            "arch": "sd15"}


def loads_nothing(monkeypatch):
    """Any weights loading (the CLI's loader, diffusers' and transformers' from_pretrained, the tiny
    model's builder) fails the test."""
    from diffusers import DiffusionPipeline, ModelMixin
    from transformers import PreTrainedModel

    def fail(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(loading, "_load_pipeline", fail)
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(fail))
    monkeypatch.setattr(ModelMixin, "from_pretrained", classmethod(fail))
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(fail))
    monkeypatch.setattr("anyms.tiny.tiny_pipeline", fail)


# ------------------------------------------------------------------ SIZE
def test_the_documented_sizes():
    assert parse_size("8GB") == 8 * 10 ** 9
    assert parse_size("12GiB") == 12 * 2 ** 30
    assert parse_size("8000MB") == 8 * 10 ** 9
    assert parse_size("7.5GiB") == 15 * 2 ** 29
    assert parse_size("1B") == 1 and parse_size("3kB") == parse_size("3KB") == 3000


@given(st.integers(1, 10 ** 6), st.integers(0, 9), st.sampled_from(sorted(SIZE_UNITS)))
def test_a_number_and_a_unit_is_that_many_bytes(whole, tenths, unit):
    for text, size in ((f"{whole}{unit}", whole * SIZE_UNITS[unit]),
                       (f"{whole}.{tenths}{unit}", SIZE_UNITS[unit] * (10 * whole + tenths) // 10)):   # exact
        if size > 1024 ** 5:
            with pytest.raises(ValueError, match=r"^--max-memory: .* above 1 PiB"):
                parse_size(text)
        else:
            assert parse_size(text) == size, text


# the grammar, written independently of the parser's
GRAMMAR = re.compile(r"[0-9]+(\.[0-9]+)?(B|kB|KB|MB|GB|TB|KiB|MiB|GiB|TiB)")


@settings(max_examples=300)
@given(st.one_of(st.text(max_size=12), st.from_regex(r"[-+ .0-9eE]{0,6}[a-zA-Z ]{0,4}", fullmatch=True)))
def test_anything_else_is_refused_naming_the_option(text):
    assume(not GRAMMAR.fullmatch(text))
    with pytest.raises(ValueError, match=r"^--max-memory: "):
        parse_size(text)


@pytest.mark.parametrize("text", ["8", "8G", "8 GB", " 8GB", "8GB ", "-8GB", "+8GB", "0GB", "0.0GiB", "1e9B", "8gb",
                                  "8Gb", ".5GB", "5.GB", "nanGB", "infGB", "0.1B", "2000TiB", "8GBGB", "８GB", ""])
def test_bad_sizes(text):
    with pytest.raises(ValueError, match=r"^--max-memory: "):
        parse_size(text)


@pytest.mark.parametrize("value", ["8G", "0GB", "lots", "8 GB"])
def test_a_bad_max_memory_is_one_line_exit_2(value, images, tmp_path, capsys, monkeypatch):
    loads_nothing(monkeypatch)
    code, _, err = run(["generate", "a cat", "--subject", f"{images[0]}:0,0,1,1", *TINY, "--max-memory", value,
                        "--out", str(tmp_path / "a.png")], capsys)
    assert code == 2 and err.count("\n") == 1 and "--max-memory" in err and repr(value) in err, err
    assert not (tmp_path / "a.png").exists()


# ------------------------------------------------------------------ the pipeline without its weights
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_meta_pipeline_estimates_as_the_loaded_one(dtype):
    """The tiny model (built on the meta device) and the toy world (configs + the adapter's
    safetensors header): every option gives the very estimate of the loaded pipeline."""
    from anyms.pipeline import AnyMSStableDiffusionPipeline, AnyMSStableDiffusionXLPipeline
    from anyms.tiny import tiny_pipeline
    from anyms.toy import WEIGHTS_DIR
    from anyms.toy.models import IP_SUBFOLDER, IP_WEIGHT_NAME

    loaded_toy = AnyMSStableDiffusionPipeline.from_pretrained(WEIGHTS_DIR)
    loaded_toy.load_ip_adapter(WEIGHTS_DIR, subfolder=IP_SUBFOLDER, weight_name=IP_WEIGHT_NAME)
    cases = [(tiny_pipeline(AnyMSStableDiffusionXLPipeline, kind="sdxl"), {"model": "tiny", "arch": "sdxl"}),
             (tiny_pipeline(AnyMSStableDiffusionPipeline, kind="sd15"), {"model": "tiny", "arch": "sd15"}),
             (loaded_toy, toy_sources())]
    for loaded, sources in cases:
        skeleton = skeleton_pipeline(sources, torch.float32)
        assert all(p.device.type == "meta" for p in skeleton.unet.parameters())
        assert loading.default_size(skeleton) == loading.default_size(loaded)
        for offload in ("none", "model", "sequential"):
            for tiled in (False, True):
                kw = dict(cfg=True, offload=offload, vae_tiling=tiled, dtype=dtype)
                assert estimate_peak_memory(skeleton, 512, 384, **kw) == estimate_peak_memory(loaded, 512, 384, **kw), \
                    (sources, kw)


def test_fit_memory_works_on_the_meta_pipeline_within_constraints():
    skeleton = skeleton_pipeline({"model": "tiny", "arch": "sdxl"}, torch.float32)
    est = lambda **kw: estimate_peak_memory(skeleton, 1024, 1024, **kw).total  # noqa: E731
    assert fit_memory(skeleton, 1024, 1024, 10 * GIB).offload == "none"
    # no offload allowed (a CPU): the plan stops at half precision and tiling
    tiled = est(dtype=torch.bfloat16, vae_tiling=True)
    plan = fit_memory(skeleton, 1024, 1024, tiled, half_dtype=torch.bfloat16, offloads=("none",))
    assert (plan.dtype, plan.offload, plan.vae_tiling) == (torch.bfloat16, "none", True)
    with pytest.raises(ValueError, match=rf"smallest estimated peak .* {tiled / GIB:.2f} GiB .*no offload"):
        fit_memory(skeleton, 1024, 1024, tiled - 1, half_dtype=torch.bfloat16, offloads=("none",))
    # a fixed dtype stays; a fixed offload is in every step; tiling forced on from the first
    plan = fit_memory(skeleton, 1024, 1024, 10 * GIB, dtype=torch.float32, offloads=("model",), vae_tiling=True)
    assert (plan.dtype, plan.offload, plan.vae_tiling) == (torch.float32, "model", True)
    plan = fit_memory(skeleton, 1024, 1024, est(dtype=torch.float32, vae_tiling=True, offload="sequential"),
                      dtype=torch.float32)
    assert (plan.dtype, plan.offload) == (torch.float32, "sequential")


# ------------------------------------------------------------------ the plan, before loading
def _run_of(argv, device="cpu"):
    """The Run and arguments of ``anyms generate ARGV`` (nothing loaded); ``device`` as the plan sees it."""
    args = cli.build_parser().parse_args(["generate", "--subject", "x.png:0,0,1,1", *argv])
    run = loading.run_from_args(args)
    run.device = torch.device(device)
    return args, run


class _Job:
    def __init__(self, height, width, guidance=None, upscale=None, steps=4):
        self.height, self.width, self.guidance, self.upscale, self.steps = height, width, guidance, upscale, steps
        self.upscale_names, self.where = None, ""


def test_a_large_budget_keeps_the_pipeline_as_it_is(capsys):
    args, run = _run_of(["--model", "tiny", "--max-memory", "64GB"])
    planned = plan_memory(args, run, [_Job(1024, 1024)])
    assert (planned.dtype, planned.offload, planned.vae_tiling) == (torch.float32, "none", False)
    assert planned.max_memory == "64GB" and planned.model_record()["max_memory"] == "64GB"
    out = capsys.readouterr().out
    assert out.startswith("--max-memory 64GB: float32, no offload, VAE tiling off") and out.count("\n") == 1


def test_a_small_budget_on_a_gpu_picks_half_precision_tiling_then_offload(monkeypatch):
    loads_nothing(monkeypatch)
    args, run = _run_of(["--model", "tiny"], device="cuda")
    skeleton = skeleton_pipeline(run.sources, torch.float32)
    f16 = torch.float16
    est = lambda **kw: estimate_peak_memory(skeleton, 1024, 1024, **kw).total  # noqa: E731
    for budget, want in ((est(dtype=f16), (f16, "none", False)),
                         (est(dtype=f16, vae_tiling=True), (f16, "none", True)),
                         (est(dtype=f16, vae_tiling=True, offload="model"), (f16, "model", True)),
                         (est(dtype=f16, vae_tiling=True, offload="sequential"), (f16, "sequential", True))):
        args.max_memory = f"{budget}B"
        planned = plan_memory(args, run, [_Job(1024, 1024)])
        assert (planned.dtype, planned.offload, planned.vae_tiling) == want, budget


def test_the_largest_job_decides_and_cfg_counts(monkeypatch):
    args, run = _run_of(["--model", "tiny", "--max-memory", "1GB"])
    skeleton = skeleton_pipeline(run.sources, torch.float32)
    small, large = estimate_peak_memory(skeleton, 256, 256).total, estimate_peak_memory(skeleton, 1024, 1024).total
    args.max_memory = f"{(small + large) // 2}B"
    assert plan_memory(args, run, [_Job(256, 256)]).dtype == torch.float32
    assert plan_memory(args, run, [_Job(256, 256), _Job(1024, 1024)]).dtype == torch.bfloat16


def test_too_small_is_refused_before_loading_with_a_budget_that_fits(toy_or_tiny, images, tmp_path, capsys,
                                                                     monkeypatch):
    model, size = toy_or_tiny
    argv = ["generate", "a cat", "--subject", f"{images[0]}:0,0,1,1", "--model", model, "--height", str(size),
            "--width", str(size), "--steps", "1", "--device", "cpu", "--no-pictures", "--out", str(tmp_path / "a.png")]
    with monkeypatch.context() as m:
        loads_nothing(m)
        code, _, err = run([*argv, "--max-memory", "1kB"], capsys)
        assert code == 2 and err.count("\n") == 1, err
        match = re.search(r"--max-memory 1kB: a (\d+)x(\d+) generation on cpu needs an estimated .* at the least "
                          r"\(bfloat16, no offload, VAE tiling o(n|ff)\); the weights alone take .*; give --max-memory "
                          r"(\d+MiB) or more", err)
        assert match, err
        assert not (tmp_path / "a.png").exists()
    # the budget it names fits (and the generation runs with it)
    code, out, err = run([*argv, "--max-memory", match.group(4)], capsys)
    assert code == 0, err
    assert re.search(rf"--max-memory {match.group(4)}: bfloat16, no offload, VAE tiling (on|off) \(estimated peak",
                     out), out
    assert record(tmp_path / "a.png")["model"]["max_memory"] == match.group(4)


def test_fit_memory_fits_the_upscale_pass_and_every_image(monkeypatch):
    """With an upscale pass the plan must fit it too: a budget the generation alone fits as it is
    takes a later plan (or is refused naming the pass) where the pass needs more; with more
    images, the plan's estimate is the largest's."""
    loads_nothing(monkeypatch)
    skeleton = skeleton_pipeline({"model": "tiny", "arch": "sdxl"}, torch.float32)
    bf16 = dict(half_dtype=torch.bfloat16, offloads=("none",))
    up = (4, 128, 32)
    gen = estimate_peak_memory(skeleton, 256, 256).total
    assert estimate_peak_memory(skeleton, 256, 256, upscale=up).total > gen
    as_is = fit_memory(skeleton, 256, 256, gen, **bf16)
    assert (as_is.dtype, as_is.vae_tiling, as_is.estimate.upscale) == (torch.float32, False, None)
    tiled = estimate_peak_memory(skeleton, 256, 256, upscale=up, dtype=torch.bfloat16, vae_tiling=True).total
    plan = fit_memory(skeleton, 256, 256, tiled, upscale=up, **bf16)
    assert (plan.dtype, plan.vae_tiling) == (torch.bfloat16, True) and plan.estimate.total == tiled
    assert plan.image == (256, 256, True, up) and plan.estimate.upscale.size == (1024, 1024)
    with pytest.raises(ValueError, match=rf"of a 256x256 generation upscaled 4x, {tiled / GIB:.2f} GiB"):
        fit_memory(skeleton, 256, 256, tiled - 1, upscale=up, **bf16)
    # several images: the one whose estimate is the largest decides, whichever comes first
    plan = fit_memory(skeleton, 512, 512, tiled, cfg=False, images=[(256, 256, True, up)], **bf16)
    assert plan.image == (256, 256, True, up) and plan.estimate.total == tiled
    with pytest.raises(ValueError, match=r"images\[0\]: height must be a positive multiple of 8"):
        fit_memory(skeleton, 256, 256, tiled, images=[(100, 256, True, None)])


def test_a_budget_the_upscale_pass_cannot_fit_is_refused_naming_it(monkeypatch):
    loads_nothing(monkeypatch)
    args, run_ = _run_of(["--model", "tiny", "--max-memory", "1GB"])
    skeleton = skeleton_pipeline(run_.sources, torch.float32)
    job = _Job(256, 256, upscale={"scale": 4, "tile": 128, "overlap": 32})
    least = estimate_peak_memory(skeleton, 256, 256, upscale=(4, 128, 32), dtype=torch.bfloat16, vae_tiling=True)
    budget = least.total - 1
    assert least.generation <= budget
    args.max_memory = f"{budget}B"                            # the generation alone fits
    plan_memory(args, run_, [_Job(256, 256)])
    with pytest.raises(UsageError) as refused:
        plan_memory(args, run_, [job])
    message = str(refused.value)
    assert re.match(rf"--max-memory {budget}B: a 256x256 generation whose --upscale 4 pass to 1024x1024 sets the peak "
                    r"on cpu needs an estimated .* GiB at the least \(bfloat16, no offload, VAE tiling on\); give "
                    r"--max-memory \S+ or more, or a smaller size, --upscale or --upscale-tile$", message), message
    # the budget it names fits both passes
    args.max_memory = re.search(r"give --max-memory (\S+)", message).group(1)
    planned = plan_memory(args, run_, [job])
    assert (planned.dtype, planned.vae_tiling) == (torch.bfloat16, True)
    # the model's default tile (its native side) where none is given
    default = _Job(256, 256, upscale={"scale": 2})
    est = estimate_peak_memory(skeleton, 256, 256, upscale=(2, 128, 32), dtype=torch.bfloat16, vae_tiling=True)
    args.max_memory = f"{est.total}B"
    assert plan_memory(args, run_, [default]).vae_tiling


@pytest.fixture(params=[("toy", 64), ("tiny", 64)])
def toy_or_tiny(request):
    return request.param


def test_explicit_options_are_constraints(images, tmp_path, capsys, monkeypatch):
    loads_nothing(monkeypatch)
    args, run_ = _run_of(["--model", "tiny", "--dtype", "float32", "--vae-tiling", "--max-memory", "64GB"])
    planned = plan_memory(args, run_, [_Job(1024, 1024)])
    assert (planned.dtype, planned.vae_tiling) == (torch.float32, True)
    args, run_ = _run_of(["--model", "tiny", "--offload", "none", "--max-memory", "1kB"], device="cuda")
    with pytest.raises(UsageError, match=r"^--max-memory 1kB: .*\(float16, no offload, VAE tiling on within "
                                         r"--offload none\)"):
        plan_memory(args, run_, [_Job(1024, 1024)])
    code, _, err = run(["generate", "a", "--subject", f"{images[0]}:0,0,1,1", *TINY, "--dtype", "float32",
                        "--max-memory", "1kB", "--out", str(tmp_path / "a.png")], capsys)
    assert code == 2 and re.search(r"\(float32, no offload, VAE tiling o(n|ff) within --dtype float32\)", err), err


def test_flux_is_refused_naming_the_option(images, tmp_path, capsys, monkeypatch):
    loads_nothing(monkeypatch)
    code, _, err = run(["generate", "a", "--subject", f"{images[0]}:0,0,1,1", "--model", "tiny", "--arch", "flux",
                        "--height", "64", "--width", "64", "--device", "cpu", "--max-memory", "8GB",
                        "--out", str(tmp_path / "a.png")], capsys)
    assert code == 2 and err.startswith("anyms generate: error: --max-memory: the memory estimate models the U-Net "
                                        "pipelines") and err.count("\n") == 1, err


# ------------------------------------------------------------------ the record, --from, --jobs
def test_the_record_keeps_the_budget_and_from_makes_the_same_image(images, tmp_path, capsys):
    skeleton = skeleton_pipeline({"model": "tiny", "arch": "sdxl"}, torch.float32)
    budget = f"{estimate_peak_memory(skeleton, 64, 64, dtype=torch.bfloat16).total}B"   # bf16 fits, fp32 not
    first = tmp_path / "first.png"
    code, out, err = run(["generate", "a cat", "--subject", f"{images[0]}:0,0,1,1", *TINY, "--max-memory", budget,
                          "--out", str(first)], capsys)
    assert code == 0, err
    assert f"--max-memory {budget}: bfloat16, no offload, VAE tiling off" in out
    model = record(first)["model"]
    assert (model["max_memory"], model["dtype"]) == (budget, "bfloat16")
    again = tmp_path / "again.png"
    code, out, err = run(["generate", "--from", str(first), "--device", "cpu", "--no-pictures", "--out", str(again)],
                         capsys)
    assert code == 0, err
    assert f"--max-memory {budget}: bfloat16" in out
    assert record(again)["model"] == model
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    # without --max-memory the record has no such key (records of before stay valid)
    plain = tmp_path / "plain.png"
    assert run(["generate", "a cat", "--subject", f"{images[0]}:0,0,1,1", *TINY, "--out", str(plain)], capsys)[0] == 0
    assert "max_memory" not in record(plain)["model"]


def test_a_record_with_a_bad_budget_is_refused(images, tmp_path, capsys):
    from PIL.PngImagePlugin import PngInfo

    first = tmp_path / "first.png"
    assert run(["generate", "a cat", "--subject", f"{images[0]}:0,0,1,1", *TINY, "--max-memory", "1GB",
                "--out", str(first)], capsys)[0] == 0
    rec = record(first)
    rec["model"]["max_memory"] = "8G"
    info = PngInfo()
    info.add_itxt("anyms", json.dumps(rec), zip=True)
    Image.open(first).save(tmp_path / "bad.png", pnginfo=info)
    code, _, err = run(["generate", "--from", str(tmp_path / "bad.png"), "--out", str(tmp_path / "b.png")], capsys)
    assert code == 2 and "its record's \"model.max_memory\" must be a number and a unit" in err, err


def test_jobs_get_one_plan_for_the_largest_job(tmp_path, subject_images, capsys):
    subject_images[0].save(tmp_path / "s0.png")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(j) for j in [
        {"prompt": "small", "subjects": [{"image": "s0.png", "box": [0, 0, 1, 1]}]},
        {"prompt": "large", "height": 128, "width": 128, "subjects": [{"image": "s0.png", "box": [0, 0, 1, 1]}]},
    ]) + "\n")
    skeleton = skeleton_pipeline({"model": "tiny", "arch": "sdxl"}, torch.float32)
    small = estimate_peak_memory(skeleton, 64, 64).total
    large = estimate_peak_memory(skeleton, 128, 128).total
    assert small < large
    budget = f"{estimate_peak_memory(skeleton, 128, 128, dtype=torch.bfloat16).total}B"   # the large job: bf16
    code, out, err = run(["generate", "--jobs", str(jobs), *TINY, "--max-memory", budget,
                          "--out-dir", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert re.search(rf"--max-memory {budget}: bfloat16, .* for 128x128, the largest job\)", out), out
    for name in ("00000.png", "00001.png"):
        assert record(tmp_path / "out" / name)["model"]["max_memory"] == budget
        assert record(tmp_path / "out" / name)["model"]["dtype"] == "bfloat16"
    # resumed with the same budget: both done before
    code, out, err = run(["generate", "--jobs", str(jobs), *TINY, "--max-memory", budget,
                          "--out-dir", str(tmp_path / "out")], capsys)
    assert code == 0 and "0 made, 2 done before" in out, out + err


# ------------------------------------------------------------------ the table of the largest sizes
def _bench_memory():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "bench_memory.py")
    spec = importlib.util.spec_from_file_location("bench_memory_for_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_sdxl_skeleton_has_the_published_parameter_counts():
    bench = _bench_memory()
    pipe = bench.sdxl_skeleton(torch.float16)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    adapter = count(pipe.unet.ip_adapter)
    # SDXL base 1.0: U-Net 2,567,463,684, VAE 83,653,863, CLIP ViT-L/14 text 123,060,480, OpenCLIP bigG text
    # with projection 694,659,840; ip-adapter_sdxl.safetensors 703 MB and its image encoder 3.69 GB, in fp16
    assert count(pipe.unet) - adapter == 2_567_463_684
    assert (count(pipe.vae), count(pipe.text_encoder), count(pipe.text_encoder_2)) == \
        (83_653_863, 123_060_480, 694_659_840)
    assert abs(2 * adapter / 703e6 - 1) < 0.01 and abs(2 * count(pipe.image_encoder) / 3.69e9 - 1) < 0.01


def test_the_largest_size_table(tmp_path):
    from anyms.preflight import FEED_FORWARD_VALUES

    bench = _bench_memory()
    sides = list(range(512, 8193, 512))
    rows = bench.fits(str(tmp_path / "fits.csv"), step=512, sides=sides)
    assert (tmp_path / "fits.csv").read_text().count("\n") == len(rows) + 1 == 3 * 2 * 2 * 4 + 1

    def side(variant, offload, tiled, gib):
        return next(r["max_side"] for r in rows if (r["variant"], r["offload"], r["vae_tiling"], r["budget_gib"])
                    == (variant, offload, tiled, gib))
    for r in rows:      # the derivation: no cross-attention here holds more than the feed-forward
        assert r["attention_values"] < FEED_FORWARD_VALUES and r["status"].startswith("estimated")
    for variant in ("plain", "masked", "anyms"):
        for tiled in (False, True):
            for offload in ("none", "model"):
                got = [side(variant, offload, tiled, g) for g in bench.FIT_BUDGETS_GIB]
                assert got == sorted(got), (variant, offload, tiled, got)
            for g in bench.FIT_BUDGETS_GIB:
                assert side(variant, "model", tiled, g) >= side(variant, "none", tiled, g)
                assert side(variant, "none", True, g) >= side(variant, "none", False, g)
    for g in bench.FIT_BUDGETS_GIB:
        assert side("masked", "model", True, g) <= side("anyms", "model", True, g) == side("plain", "model", True, g)
    assert side("anyms", "model", True, 24) > 1024      # something fits
    table = bench.fits_table(rows, True)
    assert table.count("\n") == 7 and "| AnyMS (S=3) | model |" in table
