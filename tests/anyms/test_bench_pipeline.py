"""benchmarks/bench_pipeline.py (the --quick smoke run CI uses, the --max-size search and its CPU dry
run) and benchmarks/gpu/run.sh's fail-fast setup step."""
from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_pipeline", os.path.join(ROOT, "benchmarks", "bench_pipeline.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_every_variant(bench, tmp_path):
    out, summary = tmp_path / "pipeline.csv", tmp_path / "summary.txt"
    rows = bench.main(["--quick", "--device", "cpu", "--out", str(out), "--summary", str(summary)])
    assert [r["variant"] for r in rows] == ["none", "plain", "b0", "anyms"]
    with open(out) as f:
        written = list(csv.DictReader(f))
    assert len(written) == 4
    for r in written:
        assert r["machine"] and r["torch"] and r["commit"] and r["dtype"] == "float32"
        assert float(r["step_s"]) > 0 and int(r["peak_bytes"]) > int(r["peak_extra_bytes"]) > 0
    by = {r["variant"]: r for r in written}
    # Subject weights (to_k_ip / to_v_ip) are part of every IP-Adapter variant's memory.
    assert int(by["plain"]["peak_bytes"]) > int(by["none"]["peak_bytes"])
    lines = summary.read_text().splitlines()
    assert [line.split()[2] for line in lines[:4]] == ["none", "plain", "b0", "anyms"]   # one per row, in order
    assert any("AnyMS step / B0" in line for line in lines[4:])
    # a smoke run on a tiny U-Net judges no target: its ratios say nothing about SDXL
    targets = [line for line in lines[4:] if "target" in line]
    assert targets and all("not judged: smoke run" in line for line in targets)
    assert not any(" met)" in line or "NOT met" in line for line in lines)


def test_targets_are_judged_only_on_real_runs(bench):
    rows = [dict(image_size=512, variant=v, step_s=t, peak_bytes=100, peak_extra_bytes=10)
            for v, t in (("plain", 1.0), ("b0", 1.1), ("anyms", 2.0))]
    assert any("NOT met" in line for line in bench.targets(rows))
    quick = bench.targets(rows, judge=False)
    assert len(quick) == 4 and not any("met" in line.replace("not judged", "") for line in quick)


def test_sdxl_config_is_the_published_one(bench):
    """70 cross-attention layers of head dim 64: 10 on the 1/2 grid, 60 on the 1/4 grid (METHOD.md)."""
    from diffusers import UNet2DConditionModel
    import torch

    with torch.device("meta"):
        unet = UNet2DConditionModel(**bench.SDXL_UNET_CONFIG)
    cross = [unet.get_submodule(n[: -len(".processor")]) for n in unet.attn_processors if n.endswith("attn2.processor")]
    assert len(cross) == 70
    assert {a.inner_dim // a.heads for a in cross} == {64}
    assert sorted({a.heads for a in cross}) == [10, 20]
    assert sum(p.numel() for p in unet.parameters()) == pytest.approx(2.567e9, rel=1e-3)


def test_sdxl_vae_config_is_the_published_one(bench):
    """83.65 M parameters; tiles of 1024^2 pixels (128^2 latents); the tiny one keeps the structure."""
    from diffusers import AutoencoderKL
    import torch

    with torch.device("meta"):
        vae = AutoencoderKL(**bench.SDXL_VAE_CONFIG)
        tiny = AutoencoderKL(**bench.QUICK_VAE_CONFIG)
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert (vae.tile_sample_min_size, vae.tile_latent_min_size) == (1024, 128)
    assert len(tiny.decoder.up_blocks) == len(vae.decoder.up_blocks) == 4     # latent = image / 8 for both
    assert tiny.tile_latent_min_size == 16


def test_bad_arguments_are_refused(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--sizes", "100"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--gpu-max-size", "--device", "cpu"])          # CPU only as the --quick dry run
    with pytest.raises(SystemExit):
        bench.parse_args(["--max-size", "--quick", "--device", "cpu", "--variants", "none"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--max-size", "--quick", "--device", "cpu", "--size-limit", "500"])
    assert bench.parse_args(["--max-size", "--quick", "--device", "cpu"]).max_size


# ------------------------------------------------------------------- the search, on made-up devices
def _device(largest, tried, seconds=0.0):
    """A probe for a device on which sides up to ``largest`` fit."""
    def probe(size):
        tried.append(size)
        return {"size": size, "fits": size <= largest, "seconds": seconds}
    return probe


@pytest.mark.parametrize("largest", [64, 960, 1984, 4032, 8128])
def test_search_finds_the_largest_side_in_few_tries(bench, largest):
    tried = []
    res = bench.search_max_size(_device(largest, tried), start=1024, max_size=8192)
    assert (res["max_size"], res["first_oom"], res["status"]) == (largest, largest + 64, "exact")
    assert res["first_oom_known"] and len(tried) == len(set(tried)) <= 12      # never the same side twice


def test_search_edges(bench):
    res = bench.search_max_size(_device(0, []), start=1024)
    assert (res["max_size"], res["first_oom"], res["status"]) == (None, 64, "none fits")
    res = bench.search_max_size(_device(10**6, []), start=1024, max_size=2048)
    assert (res["max_size"], res["first_oom"], res["status"]) == (2048, None, "search limit")


def test_search_follows_a_good_prediction(bench):
    tried = []
    res = bench.search_max_size(_device(2880, tried), predict=lambda: 2900.0)
    assert tried == [2880, 2944] and res["status"] == "exact"


def test_search_checks_a_hint_and_does_not_retry_a_known_failure(bench):
    tried = []
    res = bench.search_max_size(_device(1600, tried), lo_hint=1600, hi_known=1664)
    assert tried == [1600] and (res["max_size"], res["status"], res["first_oom_known"]) == (1600, "exact", False)
    tried = []
    res = bench.search_max_size(_device(1472, tried), lo_hint=1600, hi_known=1664)   # the hint fails here
    assert res["max_size"] == 1472 and res["first_oom"] == 1536 and 1664 not in tried


def test_search_stops_at_the_time_limit(bench):
    tried = []
    res = bench.search_max_size(_device(4032, tried), start=1024, affordable=lambda s: s < 2000)
    assert res["status"] == "time limit" and res["max_size"] < 2000 and max(tried) < 2000


def test_prediction_from_a_memory_curve(bench):
    """peak = w + a * side^2 through two fitted tries; a failure below the curve lowers the usable cap."""
    w, a = 5.0, 1e-6
    history = [dict(variant="anyms", tiled=True, cap=16.0, size=s, fits=True, peak=w + a * s * s) for s in (1024, 2048)]
    predict = bench._predictor(history, "anyms", True, 9.0, weights=w)
    assert predict() == pytest.approx(2000.0)
    history.append(dict(variant="anyms", tiled=True, cap=9.0, size=1984, fits=False, peak=0.0))
    assert predict() < 1984
    assert bench._predictor(history, "b0", True, 9.0, weights=w)() == pytest.approx(2000.0)   # borrows anyms' curve


def test_max_size_dry_run(bench, tmp_path):
    """End to end on CPU: tiny U-Net and VAE, caps of a few MiB over the profiler's allocator peak."""
    out, summary = tmp_path / "maxsize.csv", tmp_path / "summary.txt"
    rows = bench.main(["--max-size", "--quick", "--device", "cpu", "--caps-mib", "66", "--variants", "anyms", "b0",
                       "--size-limit", "384", "--out", str(out), "--summary", str(summary)])
    assert [(r["cap"], r["vae_tiling"], r["variant"]) for r in rows] == [
        ("66 MiB", tiling, v) for tiling in ("on", "off") for v in ("anyms", "b0")]
    by = {(r["vae_tiling"], r["variant"]): r for r in rows}
    for r in rows:
        assert r["status"] in ("exact", "search limit") and r["max_size"] % 64 == 0
        assert r["peak_bytes"] <= r["cap_bytes"] == 66 * 2**20 and r["step_s"] > 0 and r["decode_s"] > 0
        if r["status"] == "exact":
            assert r["first_oom"] == r["max_size"] + 64
        assert r["max_size"] >= by[("off", r["variant"])]["max_size"]      # tiling never lowers the maximum
    with open(out) as f:
        written = list(csv.DictReader(f))
    assert len(written) == 4 and all(w["commit"] and w["machine"] and w["vae"] for w in written)
    lines = summary.read_text().splitlines()
    assert len(lines) == 4 + 2 and sum(" max " in line for line in lines) == 4


# ------------------------------------------------------------------------------- gpu/run.sh
def _run_sh(tmp_path, *args, **env):
    full = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, **env)
    full.setdefault("ANYMS_COMMIT", "test")          # where .git did not travel (the GPU machine)
    return subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu", "run.sh"), *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=120)


def test_gpu_script_stops_in_one_line_without_diffusers(tmp_path):
    """No wheel and no diffusers: exit 3 before any test or benchmark, saying how to get the wheel."""
    shim = tmp_path / "shim" / "diffusers"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'diffusers'\", name='diffusers')\n")
    (tmp_path / "no_wheels").mkdir()
    r = _run_sh(tmp_path, "--dry-run", WHEELS=str(tmp_path / "no_wheels"), PYTHONPATH=str(tmp_path / "shim"))
    assert r.returncode == 3, r.stdout + r.stderr
    said = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(said) == 1 and said[0].startswith("run.sh: cannot import diffusers")
    assert "pip download --no-deps -d .whl diffusers==0.42.1" in said[0]
    assert not os.listdir(tmp_path / "out")                                  # nothing ran


def test_gpu_script_prints_its_two_commands(tmp_path):
    commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    if not commit:
        pytest.skip("not a git checkout")
    r = _run_sh(tmp_path, "--print-commands")
    assert r.returncode == 0, r.stderr
    runs = [line for line in r.stdout.splitlines() if line.startswith("ANYMS_COMMIT=")]
    assert len(runs) == 2 and all(line.startswith(f"ANYMS_COMMIT={commit}") and "bash benchmarks/gpu/run.sh" in line
                                  for line in runs)
    assert "run.sh --max-size" in runs[1] and "--max-size" not in runs[0]
