"""Per-block selection of a subject's image branch (anyms.blocks, the InstantStyle idea).

Exact equalities where both sides run the same operations: "all" and every block at weight 1
are the layout without blocks (one layer group, the same scale tensor and routing), and a
subject at weight 0 everywhere is absent from every routing, as a subject of scale 0. Against
plain diffusers with per-layer scales set by ``set_ip_adapter_scale`` (a dict), the fused op
and diffusers' SDPA calls are compared with test_pipeline.py's tolerance.
"""
from __future__ import annotations

import pytest
import torch

import anyms_kernels
from anyms import Layout, Subject
from anyms.blocks import PRESETS, check_blocks, layer_weight, model_blocks, preset_blocks, resolve_blocks
from anyms.branches import adapter_layers
from anyms.pipeline import AnyMSStableDiffusionXLPipeline, prepare_subjects
from anyms.tiny import tiny_pipeline

from .cli_checks import assert_refused_in_one_line, job_source, no_loading

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 2
FULL = (0.0, 0.0, 1.0, 1.0)
LOW, HIGH = (0.0, 0.0, 0.6, 1.0), (0.4, 0.0, 1.0, 1.0)
# float32 CPU: AnyMS's fused op against diffusers' SDPA calls (test_pipeline.py's bound)
TOL = dict(rtol=1e-6, atol=1e-5)
NOWHERE = {"down_blocks": 0.0, "mid_block": 0.0, "up_blocks": 0.0}


def run(pipe, prompt="a cat and a dog", seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "latent")
    kwargs.setdefault("height", 64)
    kwargs.setdefault("width", 64)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.fixture
def pipe():
    return tiny_pipeline(AnyMSStableDiffusionXLPipeline, kind="sdxl", seed=0)


# ------------------------------------------------------------------ presets
def _cross_attention_layers(config: dict):
    """The cross-attention layer names of a U-Net of ``config``, built on the meta device (no weights)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return [name for name, _ in unet.named_modules() if name.endswith("attn2")]


SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0's unet/config.json, the keys that shape the blocks
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)
SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5: diffusers' UNet2DConditionModel defaults are its U-Net
    sample_size=64, cross_attention_dim=768)


def test_presets_are_instantstyle_blocks_on_sdxl_and_the_same_rule_on_sd15():
    sdxl = _cross_attention_layers(SDXL_UNET)
    assert len(sdxl) == 70
    # diffusers' InstantStyle recipe: style {"up": {"block_0": [0.0, 1.0, 0.0]}},
    # layout {"down": {"block_2": [0.0, 1.0]}}
    assert preset_blocks("style", sdxl) == ["up_blocks.0.attentions.1"]
    assert preset_blocks("layout", sdxl) == ["down_blocks.2.attentions.1"]
    assert preset_blocks("style_and_layout", sdxl) == ["up_blocks.0.attentions.1", "down_blocks.2.attentions.1"]
    sd15 = _cross_attention_layers(SD15_UNET)
    assert len(sd15) == 16
    assert preset_blocks("style", sd15) == ["up_blocks.1.attentions.1"]
    assert preset_blocks("layout", sd15) == ["down_blocks.2.attentions.1"]
    assert preset_blocks("all", sdxl) == []
    # a preset's block holds 10 transformer layers on SDXL: all of them are selected
    weights = resolve_blocks("style", sdxl, "blocks")
    assert sum(layer_weight(weights, layer) for layer in sdxl) == 10


def test_presets_of_the_toy_world_and_flux(pipe):
    from anyms.flux import AnyMSFluxPipeline
    from anyms.tiny_flux import tiny_flux_pipeline
    from anyms.toy import toy_pipeline

    toy = adapter_layers(toy_pipeline())
    assert preset_blocks("style", toy) == ["up_blocks.0.attentions.1"]
    assert preset_blocks("layout", toy) == ["down_blocks.1.attentions.0"]
    flux = adapter_layers(tiny_flux_pipeline(AnyMSFluxPipeline))
    assert model_blocks(flux) == ["transformer_blocks.0", "transformer_blocks.1"]     # double-stream only
    for preset in ("style", "layout"):
        with pytest.raises(ValueError, match=r"^subjects\[0\]\.blocks: the preset .* and this model has none: "
                                             r"give block names \(its blocks: transformer_blocks\.0 \.\.\. "
                                             r"transformer_blocks\.1\)"):
            resolve_blocks(preset, flux, "subjects[0].blocks")
    assert resolve_blocks("all", flux, "x") is None


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("value,message", [
    ("styel", r"^subjects\[0\]\.blocks must be a preset .* 'styel' is not a preset"),
    ([], r"^subjects\[0\]\.blocks is empty"),
    ({}, r"^subjects\[0\]\.blocks is empty"),
    (["up blocks"], r"^subjects\[0\]\.blocks: 'up blocks' is not a block name"),
    (["up_blocks.0", "up_blocks.0"], r"^subjects\[0\]\.blocks: 'up_blocks.0' is given twice"),
    ({"up_blocks.0": float("nan")}, r"^subjects\[0\]\.blocks\['up_blocks.0'\] must be a finite number"),
    ({"up_blocks.0": "1"}, r"^subjects\[0\]\.blocks\['up_blocks.0'\] must be a finite number"),
    (3, r"^subjects\[0\]\.blocks must be a preset"),
])
def test_bad_blocks_are_refused_before_any_model_work(pipe, subject_images, value, message):
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=message):
        prepare_subjects([Subject(subject_images[0], FULL, blocks=value)])
    with pytest.raises(ValueError, match=message):
        run(pipe, subjects=[Subject(subject_images[0], FULL, blocks=value)])
    with pytest.raises(ValueError, match=message.replace(r"subjects\[0\]\.blocks", "anyms_blocks")):
        run(pipe, subjects=[Subject(subject_images[0], FULL)], anyms_blocks=value)
    assert calls == []


def test_a_block_the_model_lacks_names_the_subject_before_any_model_work(pipe, subject_images):
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    a, b = subject_images[:2]
    with pytest.raises(ValueError, match=r"^subjects\[1\]\.blocks: the model has no IP-Adapter layer in block "
                                         r"'up_blocks\.7'; its blocks are down_blocks\.1\.attentions\.0, "):
        run(pipe, subjects=[Subject(a, LOW), Subject(b, HIGH, blocks=["up_blocks.0", "up_blocks.7"])])
    # down_blocks.0 of the tiny SDXL U-Net has no attentions (as SDXL's)
    with pytest.raises(ValueError, match=r"^anyms_blocks: the model has no IP-Adapter layer in block 'down_blocks.0'"):
        run(pipe, subjects=[Subject(a, LOW)], anyms_blocks={"down_blocks.0": 1.0})
    with pytest.raises(ValueError, match="anyms_blocks was given without subjects"):
        run(pipe, anyms_blocks="style")
    assert calls == []


def test_layout_takes_names_not_model_presets():
    with pytest.raises(ValueError, match=r"^blocks\[1\] is the preset 'style', which depends on the model"):
        Layout([list(LOW), list(HIGH)], (8, 8), blocks=[None, "style"])
    with pytest.raises(ValueError, match=r"^blocks must be None or 2 entries"):
        Layout([list(LOW), list(HIGH)], (8, 8), blocks=[None])
    layout = Layout([list(LOW), list(HIGH)], (8, 8), blocks=[None, ["up_blocks.9"]])
    with pytest.raises(ValueError, match=r"^blocks\[1\]: the model has no AnyMS layer in block 'up_blocks.9'"):
        layout.bind_layers(["up_blocks.0.attentions.0.transformer_blocks.0.attn2"])


def test_check_blocks_forms():
    assert check_blocks(None, "b") is None and check_blocks("all", "b") is None
    assert check_blocks("style", "b") == "style" and set(PRESETS) == {"all", "style", "layout", "style_and_layout"}
    assert check_blocks(["up_blocks.0", "mid_block"], "b") == (("mid_block", 1.0), ("up_blocks.0", 1.0))
    assert check_blocks({"up_blocks.0": 0.5}, "b") == (("up_blocks.0", 0.5),)
    # the longest covering name wins; a name covers at dot boundaries only
    weights = check_blocks({"up_blocks": 0.5, "up_blocks.0.attentions.1": 2.0}, "b")
    assert layer_weight(weights, "up_blocks.0.attentions.1.transformer_blocks.0.attn2") == 2.0
    assert layer_weight(weights, "up_blocks.0.attentions.0.transformer_blocks.0.attn2") == 0.5
    assert layer_weight(weights, "mid_block.attentions.0.transformer_blocks.0.attn2") == 0.0
    assert layer_weight(check_blocks(["up_blocks.1"], "b"), "up_blocks.10.attentions.0.attn2") == 0.0


# ------------------------------------------------------------------ equivalences
def test_all_is_todays_call_exactly(pipe, subject_images):
    a, b = subject_images[:2]
    today = run(pipe, subjects=[Subject(a, LOW), Subject(b, HIGH, scale=0.8)])
    assert not pipe.anyms_last_plan.layout.has_blocks
    for subjects, call in (
            ([Subject(a, LOW, blocks="all"), Subject(b, HIGH, scale=0.8, blocks="all")], None),
            ([Subject(a, LOW), Subject(b, HIGH, scale=0.8)], "all"),
            ([Subject(a, LOW), Subject(b, HIGH, scale=0.8)], ["down_blocks", "mid_block", "up_blocks"]),
            ([Subject(a, LOW, blocks={"down_blocks": 1, "mid_block": 1, "up_blocks": 1.0}),
              Subject(b, HIGH, scale=0.8)], None)):
        assert torch.equal(run(pipe, subjects=subjects, anyms_blocks=call), today)
        assert pipe.anyms_last_plan.layout._group_weights == [(1.0, 1.0)]      # one group: today's tensors


def test_no_block_selected_is_the_subject_absent(pipe, subject_images):
    a, b = subject_images[:2]
    for mode in ("overwrite", "sum"):
        absent = run(pipe, subjects=[Subject(a, LOW), Subject(b, HIGH, scale=0.0)], anyms_mode=mode)
        got = run(pipe, subjects=[Subject(a, LOW), Subject(b, HIGH, blocks=NOWHERE)], anyms_mode=mode)
        assert torch.equal(got, absent), mode
        assert not torch.equal(run(pipe, subjects=[Subject(a, LOW), Subject(b, HIGH)], anyms_mode=mode), absent)


@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
def test_selected_blocks_equal_diffusers_per_layer_scales(anyms_and_diffusers, subject_images, kind):
    """One full-image subject acting at some blocks only == plain diffusers with the IP-Adapter's
    scale set per layer by set_ip_adapter_scale's dict (0 elsewhere): an independent check."""
    ours, theirs = anyms_and_diffusers(kind)
    img = subject_images[0]
    if kind == "sdxl":   # tiny SDXL: up_blocks.0 has 2 attentions, down_blocks.2 one
        cases = [("style", {"up": {"block_0": [0.0, 1.0]}}),
                 ("layout", {"down": {"block_2": [1.0]}}),
                 ({"up_blocks.0.attentions.1": 0.5, "down_blocks.2": 1.5, "mid_block": 0.7},
                  {"down": {"block_2": [1.5]}, "mid": 0.7, "up": {"block_0": [0.0, 0.5]}})]
    else:                # tiny SD 1.5: down_blocks.0 (1 attention), mid, up_blocks.1 (2 attentions)
        cases = [("style", {"up": {"block_1": [0.0, 1.0]}}), ("layout", {"down": {"block_0": [1.0]}})]
    everywhere = run(theirs, ip_adapter_image=img)
    for blocks, scales in cases:
        theirs.set_ip_adapter_scale(scales)
        try:
            want = run(theirs, ip_adapter_image=img)
        finally:
            theirs.set_ip_adapter_scale(1.0)
        for mode in ("overwrite", "sum"):
            got = run(ours, subjects=[Subject(img, FULL, blocks=blocks)], anyms_mode=mode)
            torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{blocks} {mode}: {m}")
        assert (want - everywhere).abs().max() > 1e-3       # the selection changes the image


def test_an_unselected_subject_is_absent_from_that_layers_routing(pipe, subject_images, monkeypatch):
    """The op is handed, at each layer, a routing without the subjects not selected there (never
    computed, then multiplied by 0); the routings are built before the loop, not per step."""
    import anyms.layout as layout_module

    seen, built = [], []
    op = anyms_kernels.region_cross_attention
    build = layout_module.build_routing

    def spy(q, k_text, v_text, k_subj, v_subj, regions, grid, **kw):
        seen.append((tuple(regions.cover[0].any(-1).tolist()), tuple(kw["subject_scale"].tolist())))
        return op(q, k_text, v_text, k_subj, v_subj, regions, grid, **kw)

    def count(*args, **kw):
        built.append(steps[0])
        return build(*args, **kw)

    steps = [None]

    def at_step(p, i, t, tensors):
        steps[0] = i
        return tensors

    monkeypatch.setattr(anyms_kernels, "region_cross_attention", spy)
    monkeypatch.setattr(layout_module, "build_routing", count)
    a, b = subject_images[:2]
    run(pipe, subjects=[Subject(a, LOW, scale=0.5), Subject(b, HIGH, scale=0.8, blocks={"up_blocks.0": 2.0})],
        callback_on_step_end=at_step)
    layers = adapter_layers(pipe)
    assert len(seen) == STEPS * len(layers)          # one op call per layer (both CFG halves in it)
    selected = sum(layer.startswith("up_blocks.0.") for layer in layers)
    assert 0 < selected < len(layers)
    # the op runs in forward order, not in named_modules' order: count the calls of each kind
    with_b = [scale for cover, scale in seen if cover == (True, True)]
    without_b = [scale for cover, scale in seen if cover == (True, False)]
    assert len(with_b) == STEPS * selected and len(without_b) == STEPS * (len(layers) - selected)
    assert all(scale == pytest.approx((0.5, 1.6)) for scale in with_b)
    assert all(scale == (0.5, 0.0) for scale in without_b)
    assert built and set(built) == {None}     # every routing built before the first step
    assert len(built) == 3 * 2            # the tiny U-Net's 3 grids x 2 active sets


def test_changing_scales_do_not_recompile_with_blocks(subject_images):
    """The op compiled (fullgraph) for two layers of different groups over a timed layout: the
    schedules' new values each step reuse the graph (the group's scale tensors are rewritten in place)."""
    layers = ["up_blocks.0.attentions.0.transformer_blocks.0.attn2",
              "down_blocks.1.attentions.0.transformer_blocks.0.attn2"]
    layout = Layout([list(LOW), list(HIGH)], (6, 10), scales=[0.7, 0.8], schedules=["linear_up", "ease_out"],
                    blocks=[None, {"up_blocks": 0.5}])
    layout.prepare("cpu", levels=1).bind_layers(layers)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 60, 32, generator=g)
    kt, vt = torch.randn(1, 2, 7, 32, generator=g), torch.randn(1, 2, 7, 32, generator=g)
    ks, vs = torch.randn(1, 2, 2, 4, 32, generator=g), torch.randn(1, 2, 2, 4, 32, generator=g)

    def attend(q, kt, vt, ks, vs):
        outs = []
        for layer in layers:
            grid, routing = layout.routing(60, q.device, layer)
            outs.append(anyms_kernels.region_cross_attention(
                q, kt, vt, ks, vs, routing, grid, mode=layout.mode, subject_scale=layout.subject_scale(q.device, layer),
                backend="torch"))
        return torch.stack(outs)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    outs = []
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for i in range(4):
                layout.set_step(i, 4)
                got = compiled(q, kt, vt, ks, vs)
                torch.testing.assert_close(got, attend(q, kt, vt, ks, vs), rtol=1e-6, atol=1e-6)
                outs.append(got)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs == 1
    assert all((outs[i] - outs[i + 1]).abs().max() > 1e-4 for i in range(3))
    # the second layer sees subject 1 absent; the first sees it at half its scale
    assert layout.subject_scale("cpu", layers[1]).tolist()[1] == 0.0
    assert layout.subject_scale("cpu", layers[0]).tolist()[1] == pytest.approx(
        layout.subject_scale("cpu").tolist()[1] * 0.5)


# ------------------------------------------------------------------ layout file, CLI, jobs, record
TINY = ["--model", "tiny", "--height", "64", "--width", "64", "--steps", "2", "--device", "cpu", "--no-pictures"]


BAD_FILE = [({"blocks": "styel"}, r"subjects\[1\]\.blocks must be a preset"),
            ({"blocks": []}, r"subjects\[1\]\.blocks is empty"),
            ({"blocks": {"up_blocks.0": True}}, r"subjects\[1\]\.blocks\['up_blocks.0'\] must be a finite number")]


@pytest.mark.parametrize("bad,message", BAD_FILE, ids=[str(b) for b, _ in BAD_FILE])
@pytest.mark.parametrize("source", ["--layout", "--jobs"])
def test_bad_blocks_in_a_file_are_one_line_exit_2_before_loading(tmp_path, subject_images, capsys, monkeypatch,
                                                                 bad, message, source):
    from anyms import loading

    monkeypatch.setattr(loading, "_load_pipeline", no_loading)
    subject_images[0].save(tmp_path / "s.png")
    good = {"image": "s.png", "box": list(LOW)}
    job = {"prompt": "a", "subjects": [good, {**good, "box": list(HIGH), **bad}]}
    argv, where = job_source(tmp_path, source, job, {"prompt": "a", "subjects": [good]})
    assert_refused_in_one_line(tmp_path, argv, where + message, capsys)


@pytest.mark.parametrize("option,message", [
    ("styel", r"--blocks must be a preset .* 'styel' is not a preset"),
    ("up blocks.0", r"--blocks: 'up blocks.0' is not a block name"),
    ("up_blocks.0,", r"--blocks: '' is not a block name")])
def test_bad_blocks_option_is_one_line_exit_2_before_loading(tmp_path, subject_images, capsys, monkeypatch,
                                                             option, message):
    import re

    from anyms import cli, loading

    monkeypatch.setattr(loading, "_load_pipeline", no_loading)
    subject_images[0].save(tmp_path / "s.png")
    code = cli.main(["generate", "a", "--subject", f"{tmp_path / 's.png'}:0,0,1,1", "--blocks", option,
                     *TINY, "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "x.png").exists()


def test_a_block_the_model_lacks_is_exit_2_after_loading_with_nothing_written(tmp_path, subject_images, capsys):
    import json

    from anyms import cli

    subject_images[0].save(tmp_path / "s.png")
    good = {"image": "s.png", "box": list(LOW)}
    (tmp_path / "layout.json").write_text(json.dumps({"prompt": "a", "subjects": [
        good, {**good, "blocks": ["up_blocks.0", "up_blocks.7"]}]}))
    code = cli.main(["generate", "--layout", str(tmp_path / "layout.json"), *TINY, "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "subjects[1].blocks: the model has no IP-Adapter layer in block 'up_blocks.7'" in err, err
    assert not (tmp_path / "x.png").exists()
    code = cli.main(["generate", "--layout", str(tmp_path / "layout.json"), *TINY, "--blocks", "down_blocks.0",
                     "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "--blocks: the model has no IP-Adapter layer in block 'down_blocks.0'" in err, err
    # --jobs: every job's blocks are checked once the model is loaded, before any image is made
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"prompt": "a", "subjects": [good]}) + "\n"
                                         + json.dumps({"prompt": "a", "subjects": [good], "blocks": ["mid_block.x"]}))
    code = cli.main(["generate", "--jobs", str(tmp_path / "jobs.jsonl"), *TINY, "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "jobs.jsonl:2: \"blocks\": the model has no IP-Adapter layer in block 'mid_block.x'" in err, \
        err
    assert not list((tmp_path / "out").glob("*.png"))


def test_blocks_are_recorded_and_from_makes_the_same_image(tmp_path, subject_images, capsys):
    import json

    import numpy as np
    from PIL import Image

    from anyms import cli

    subject_images[0].save(tmp_path / "a.png")
    subject_images[1].save(tmp_path / "b.png")
    layout = {"prompt": "a cat and a dog", "blocks": "style", "subjects": [
        {"image": "a.png", "box": list(LOW)},
        {"image": "b.png", "box": list(HIGH), "blocks": {"up_blocks.0": 0.5, "down_blocks.2": 1.0}},
        {"image": "a.png", "box": [0.2, 0.2, 0.5, 0.5], "scale": 0.5, "blocks": "all"}]}   # "all" wins over "style"
    (tmp_path / "layout.json").write_text(json.dumps(layout))
    out, again, plain = tmp_path / "blocks.png", tmp_path / "again.png", tmp_path / "plain.png"
    assert cli.main(["generate", "--layout", str(tmp_path / "layout.json"), *TINY, "--out", str(out)]) == 0
    record = json.loads(Image.open(out).text["anyms"])
    assert record["layout"]["blocks"] == "style"
    assert "blocks" not in record["layout"]["subjects"][0]
    assert record["layout"]["subjects"][1]["blocks"] == {"up_blocks.0": 0.5, "down_blocks.2": 1.0}
    assert record["layout"]["subjects"][2]["blocks"] == "all"
    assert cli.main(["generate", "--from", str(out), "--device", "cpu", "--no-pictures", "--out", str(again)]) == 0
    assert json.loads(Image.open(again).text["anyms"])["layout"] == record["layout"]
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))
    # --blocks wins over the file's top level ("all": the first subject acts everywhere)
    assert cli.main(["generate", "--layout", str(tmp_path / "layout.json"), *TINY, "--blocks", "all",
                     "--out", str(plain)]) == 0
    capsys.readouterr()
    assert "blocks" not in json.loads(Image.open(plain).text["anyms"])["layout"]
    assert np.abs(np.asarray(Image.open(plain), dtype=int) - np.asarray(Image.open(out))).max() > 0


def test_a_jobs_line_with_blocks_resumes_and_a_changed_selection_is_not_done(tmp_path, subject_images, capsys):
    import json

    from anyms import cli

    subject_images[0].save(tmp_path / "a.png")
    job = {"prompt": "two", "out": "x.png", "subjects": [{"image": "a.png", "box": list(LOW), "blocks": "layout"}]}
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps(job) + "\n")
    argv = ["generate", "--jobs", str(jobs), *TINY, "--out-dir", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 0
    lines = (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["status"] == "skipped"
    job["subjects"][0]["blocks"] = "style"
    jobs.write_text(json.dumps(job) + "\n")
    assert cli.main(argv) == 2
    assert "made from something else (layout" in capsys.readouterr().err


@pytest.mark.parametrize("bad,message", [
    ({"blocks": "wobble"}, r'"layout.subjects\[0\].blocks" must be a preset'),
    ({"blocks": []}, r'"layout.subjects\[0\].blocks" is empty')])
def test_the_record_schema_checks_the_blocks(tmp_path, subject_images, bad, message):
    from anyms.metadata import build_record, check_record

    subject_images[0].save(tmp_path / "s.png")
    record = build_record(prompt="a", negative_prompt=None, subjects=[Subject(str(tmp_path / "s.png"), LOW)],
                          mode="overwrite", priority="order", seed=0, steps=2, guidance=None, height=64, width=64,
                          model={"arch": "sdxl", "model": "tiny", "ip_adapter": None, "image_encoder": None,
                                 "dtype": "float32"}, folder=str(tmp_path), device="cpu", blocks="all")
    check_record(record, "--from 'x.png'")
    assert "blocks" not in record["layout"] and "blocks" not in record["layout"]["subjects"][0]
    record["layout"]["subjects"][0].update(bad)
    with pytest.raises(ValueError, match=r"^--from 'x.png': its record's " + message):
        check_record(record, "--from 'x.png'")
    record["layout"]["subjects"][0].pop("blocks")
    record["layout"]["blocks"] = 7
    with pytest.raises(ValueError, match=r'^--from \'x.png\': its record\'s "layout.blocks" must be a preset'):
        check_record(record, "--from 'x.png'")


# ------------------------------------------------------------------ FLUX
def test_flux_blocks_equal_diffusers_with_per_block_scales(subject_images):
    """FLUX: a full-image subject on transformer_blocks.0 only == FluxPipeline with the IP-Adapter's
    scale 0 at transformer_blocks.1 (set by hand: FLUX's set_ip_adapter_scale takes no dict);
    every block at weight 0 == scale 0, exactly."""
    from diffusers import FluxPipeline

    from anyms.flux import AnyMSFluxPipeline
    from anyms.tiny_flux import tiny_flux_pipeline

    ours, theirs = tiny_flux_pipeline(AnyMSFluxPipeline, seed=0), tiny_flux_pipeline(FluxPipeline, seed=0)
    size = dict(height=128, width=128)
    img = subject_images[0]
    everywhere = run(theirs, ip_adapter_image=img, **size)
    theirs.transformer.attn_processors["transformer_blocks.1.attn.processor"].scale = [0.0]
    try:
        want = run(theirs, ip_adapter_image=img, **size)
    finally:
        theirs.set_ip_adapter_scale(1.0)
    got = run(ours, subjects=[Subject(img, FULL, blocks=["transformer_blocks.0"])], **size)
    # float32 CPU, the fused op against diffusers' SDPA (test_flux.py's bound)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    assert (want - everywhere).abs().max() > 1e-3
    a, b = subject_images[:2]
    absent = run(ours, subjects=[Subject(a, LOW), Subject(b, HIGH, scale=0.0)], **size)
    nowhere = run(ours, subjects=[Subject(a, LOW), Subject(b, HIGH, blocks={"transformer_blocks": 0.0})], **size)
    assert torch.equal(nowhere, absent)
    with pytest.raises(ValueError, match=r"^anyms_blocks: the preset 'layout' needs a U-Net encoder block"):
        run(ours, subjects=[Subject(a, LOW)], anyms_blocks="layout", **size)


def test_a_plan_with_blocks_makes_no_layout_before_they_are_resolved(pipe, subject_images):
    """A caller that builds the layout without resolving the names (e.g. tiled upscaling, which
    does not take blocks) gets an error naming the subject, not a layout acting on every block."""
    a, b = subject_images[:2]
    plan = prepare_subjects([Subject(a, LOW), Subject(b, HIGH, blocks="style")])
    with pytest.raises(ValueError, match=r"^subjects\[1\]\.blocks selects blocks, which need the model's layer"):
        plan.make_layout((8, 8))
    with pytest.raises(ValueError, match=r"^anyms_blocks selects blocks"):
        prepare_subjects([Subject(a, LOW)], blocks=["up_blocks"]).make_layout((8, 8))
    assert prepare_subjects([Subject(a, LOW, blocks="all")]).make_layout((8, 8)).has_blocks is False
    layout = plan.resolve_blocks(pipe).make_layout((8, 8))
    assert layout.blocks == (None, (("up_blocks.0.attentions.1", 1.0),))


@pytest.mark.slow
def test_a_compiled_unet_with_blocks_is_the_eager_call_and_compiles_once_per_active_set(pipe, subject_images):
    """torch.compile(pipe.unet, fullgraph=True): the processors are named as in the eager U-Net (the
    wrapper's "_orig_mod." prefix is not part of a layer's name), a schedule changing every step with
    a subject on some blocks reuses the graph, and the result is the eager one (aot_eager)."""
    a, b = subject_images[:2]
    subjects = [Subject(a, LOW, schedule="linear_down"), Subject(b, HIGH, scale=0.8, blocks={"up_blocks.0": 0.5})]
    want = run(pipe, subjects=subjects, num_inference_steps=4)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager_unet = pipe.unet
    pipe.unet = torch.compile(eager_unet, fullgraph=True, backend="aot_eager")
    try:
        assert adapter_layers(pipe) == adapter_layers(eager_unet)
        got = run(pipe, subjects=subjects, num_inference_steps=4)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        pipe.unet = eager_unet
        torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert graphs == 1          # one active set per group at every step: one graph
