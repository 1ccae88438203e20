"""Regional prompts: a subject's own text in its region, in the same op call as the images.

Tiny random pipelines (anyms.tiny) for the equivalences, single diffusers Attention layers for the
processor, the float64 reference op for the routing, and the trained toy world for the effect."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from anyms import Subject
from anyms.layout import Layout
from anyms.pipeline import AnyMSStableDiffusionPipeline, AnyMSStableDiffusionXLPipeline, prepare_subjects
from anyms.processor import AnyMSAttnProcessor
from anyms.timing import step_weight
from anyms.tiny import tiny_pipeline
from anyms_kernels.reference import region_cross_attention_reference
from anyms_kernels.regions import box_cover, rasterize_boxes

from .cli_checks import no_loading
from .test_processor import make_inputs, make_layer

pytestmark = pytest.mark.usefixtures("one_thread")

FULL = (0.0, 0.0, 1.0, 1.0)
LEFT = (0.0, 0.0, 0.6, 1.0)
RIGHT = (0.4, 0.0, 1.0, 1.0)
GRID = (13, 21)
# The regional prompt's text branch runs the op's subject path (its own softmax and matmul order),
# the global prompt's the text path: the same attention to rounding. Measured on the tiny SD 1.5
# pipeline, 3 steps, fp32, Intel Xeon, 1 thread: at most 1.4e-5 on the latents with guidance (1.4e-6
# without); the tolerance leaves room for other CPUs.
PIPELINE_TOL = dict(atol=1e-4, rtol=1e-4)
LAYER_TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture
def sd15():
    pipe = tiny_pipeline(AnyMSStableDiffusionPipeline, kind="sd15", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe, prompt, subjects=None, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 3, "output_type": "latent", "generator": torch.Generator().manual_seed(seed),
              **kwargs}
    if subjects is None:
        return pipe(prompt, **kwargs).images
    return pipe(prompt, subjects=subjects, **kwargs).images


def plain_diffusers(pipe, prompt, **kwargs):
    """The parent pipeline's own call without any adapter: the global prompt alone."""
    pipe.unload_ip_adapter()
    return latents(pipe, prompt, **kwargs)


# ------------------------------------------------------------------------ equivalences
@pytest.mark.parametrize("guidance", [7.5, 1.0], ids=["cfg", "no_cfg"])
def test_full_image_region_with_prompt_b_equals_global_prompt_b(sd15, guidance):
    """SD 1.5: a region over the whole image with prompt "b" under the global prompt "a" is the
    global prompt "b" (plain diffusers, no adapter), to rounding (PIPELINE_TOL)."""
    got = latents(sd15, "a cat", [Subject(prompt="a dog", box=FULL)], guidance_scale=guidance)
    other = latents(sd15, "a cat", [Subject(prompt="a cat", box=FULL)], guidance_scale=guidance)
    expected = plain_diffusers(sd15, "a dog", guidance_scale=guidance)
    torch.testing.assert_close(got, expected, **PIPELINE_TOL)
    assert (other - expected).abs().max() > 1e-2        # the prompts differ enough to tell them apart


@pytest.mark.parametrize("mode", ["overwrite", "sum"])
def test_regional_prompts_equal_to_the_global_one_change_nothing(sd15, subject_images, mode):
    """Non-overlapping regions (sum mode adds where text regions overlap) whose prompts are the
    global prompt, beside image subjects, give the layout without them (PIPELINE_TOL)."""
    a, b = subject_images[:2]
    images = [Subject(a, (0.0, 0.0, 0.5, 0.5)), Subject(b, (0.5, 0.5, 1.0, 1.0))]
    prompts = [Subject(prompt="a cat and a dog", box=(0.0, 0.0, 0.5, 1.0)),
               Subject(b, (0.5, 0.0, 1.0, 0.5), prompt="a cat and a dog")]
    without = latents(sd15, "a cat and a dog", images + [Subject(b, (0.5, 0.0, 1.0, 0.5))], anyms_mode=mode)
    with_prompts = latents(sd15, "a cat and a dog", images[:1] + prompts[:1] + images[1:] + prompts[1:],
                           anyms_mode=mode)
    torch.testing.assert_close(with_prompts, without, **PIPELINE_TOL)


def test_a_text_only_region_outside_its_window_is_no_region(sd15):
    """start = end = 0: the prompt never acts, bit for bit the global prompt alone (the placeholder
    image the U-Net needs is never read)."""
    never = latents(sd15, "a cat", [Subject(prompt="a dog", box=LEFT, start=0.0, end=0.0)])
    torch.testing.assert_close(never, plain_diffusers(sd15, "a cat"), **PIPELINE_TOL)


def test_sdxl_regional_prompt_changes_only_cross_attention():
    """SDXL: the pooled embedding and the time ids stay the global prompt's, so a full-image region
    with prompt "b" under "a" is not the global prompt "b"; with "a" in the region it is "a"."""
    pipe = tiny_pipeline(AnyMSStableDiffusionXLPipeline, kind="sdxl", seed=0)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    real = pipe.unet.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["added_cond_kwargs"]["text_embeds"].clone())
        return real(*args, **kwargs)

    pipe.unet.forward = spy
    same = latents(pipe, "a cat", [Subject(prompt="a cat", box=FULL)])
    pooled_a = seen[-1]
    other = latents(pipe, "a cat", [Subject(prompt="a dog", box=FULL)])
    assert torch.equal(seen[-1], pooled_a)                      # the global prompt's pooled embedding
    del pipe.unet.forward
    plain_a = plain_diffusers(pipe, "a cat")
    torch.testing.assert_close(same, plain_a, **PIPELINE_TOL)
    assert (other - plain_a).abs().max() > 1e-2


# ------------------------------------------------------------------------ one layer
def _prompt_layer(boxes, kinds, mode="overwrite", L=77, S_img=2, seed=0):
    attn, proc = make_layer(seed=seed)
    x, text, images = make_inputs(attn, S=S_img, L=L, seed=seed + 1)
    P = sum(k != "image" for k in kinds)
    g = torch.Generator().manual_seed(seed + 2)
    states = torch.randn(x.shape[0], P, 77, attn.cross_attention_dim, generator=g)
    layout = Layout(boxes, (26, 42), mode=mode, kinds=kinds).set_prompt_states(states)
    return attn, proc, x, text, images, states, layout


def _run(attn, proc, layout, x, text, images):
    anyms = AnyMSAttnProcessor.from_ip_adapter_processor(proc, layout)
    attn.set_processor(anyms)
    with torch.no_grad():
        return attn(x, encoder_hidden_states=(text, [images]))


def test_outside_every_text_region_a_layer_is_its_output_without_prompts():
    """Per token at one layer: where no region with a prompt is, the output is the one of the layout
    without prompts (the same image branches, the global text); inside, it differs."""
    boxes = [[0.0, 0.0, 0.5, 0.6], [0.3, 0.2, 0.9, 0.9], [0.6, 0.5, 1.0, 1.0]]
    attn, proc, x, text, images, _, layout = _prompt_layer(boxes, ["image", "prompt", "both"])
    without = Layout(boxes, (26, 42), kinds=["image", "image", "image"])
    out = _run(attn, proc, layout, x, text, images)
    # the layout without prompts: the same image subjects, 0 and 2 (subject 1 has no image)
    ref = _run(attn, proc, Layout([boxes[0], boxes[2]], (26, 42)), x, text, images)
    text_cover = rasterize_boxes(torch.tensor([boxes[1], boxes[2]], dtype=torch.float64), GRID)
    inside = torch.stack([box_cover(b, GRID) for b in text_cover.tolist()]).any(0)
    # the same text branch and image branches; the images' 4 keys are read out of keys padded to 77
    # (another stride): equal bit for bit on the machine measured, 1e-6 for other CPUs' kernels
    torch.testing.assert_close(out[:, ~inside], ref[:, ~inside], atol=1e-6, rtol=1e-6)
    assert (out[:, inside] - ref[:, inside]).abs().amax(-1).min() > 1e-4      # every token inside changes
    assert without.num_branches == 3 and layout.num_branches == 4


@pytest.mark.parametrize("mode", ["overwrite", "sum"])
def test_overlapping_text_regions_route_as_the_float64_reference(mode):
    """Two overlapping regions with prompts and an image subject under both, against the float64
    reference op (the kinds route apart: overwrite takes the last covering prompt, sum adds both)."""
    boxes = [[0.0, 0.0, 0.7, 0.7], [0.2, 0.1, 0.6, 0.9], [0.4, 0.3, 1.0, 1.0]]
    attn, proc, x, text, images, states, layout = _prompt_layer(boxes, ["image", "prompt", "prompt"], mode,
                                                                S_img=1)
    out = _run(attn, proc, layout, x, text, images)
    d = torch.float64
    with torch.no_grad():
        to = lambda m, t: F.linear(t.to(d), m.weight.to(d), None if m.bias is None else m.bias.to(d))  # noqa: E731
        H = attn.heads
        q = rearrange(to(attn.to_q, x), "b n (h d) -> b h n d", h=H)
        kt = rearrange(to(attn.to_k, text), "b l (h d) -> b h l d", h=H)
        vt = rearrange(to(attn.to_v, text), "b l (h d) -> b h l d", h=H)
        ki = rearrange(to(proc.to_k_ip[0], images), "b s t (h d) -> b h s t d", h=H)
        vi = rearrange(to(proc.to_v_ip[0], images), "b s t (h d) -> b h s t d", h=H)
        kp = rearrange(to(attn.to_k, states), "b s t (h d) -> b h s t d", h=H)
        vp = rearrange(to(attn.to_v, states), "b s t (h d) -> b h s t d", h=H)
        ks = torch.cat([F.pad(ki, (0, 0, 0, 73)), kp], dim=2)
        vs = torch.cat([F.pad(vi, (0, 0, 0, 73)), vp], dim=2)
        B = x.shape[0]
        regions = rasterize_boxes(torch.tensor(boxes, dtype=d), GRID).expand(B, 3, 4)
        z = region_cross_attention_reference(q, kt, vt, ks, vs, regions, GRID, mode=mode,
                                             subject_scale=torch.ones(B, 3, dtype=d),
                                             replaces_text=[False, True, True], subject_tokens=[4, 77, 77])
        expected = to(attn.to_out[0], rearrange(z, "b h n d -> b n (h d)"))
    torch.testing.assert_close(out.to(d), expected, **LAYER_TOL)


def test_a_prompt_branch_acts_only_within_its_window():
    """Outside its window a prompt branch leaves the routing (the global text acts there); its
    subject's scale and schedule shape the image branch only."""
    layout = Layout([FULL, FULL], (8, 8), scales=[0.5, 1.0], windows=[(0.0, 1.0), (0.0, 0.5)],
                    schedules=["linear_up", "constant"], kinds=["both", "prompt"])
    ramp = [np.float32(0.5) * np.float32(step_weight(i, 4, 0.0, 1.0, "linear_up")) for i in range(4)]
    layout.set_step(0, 4)
    assert layout.subject_scale("cpu").tolist() == [ramp[0], 1.0, 1.0]      # image 0, prompts 0 and 1
    layout.set_step(3, 4)
    assert layout.subject_scale("cpu").tolist() == [ramp[3], 1.0, 0.0]
    assert layout.active == (True, True, False)
    assert 0 < ramp[0] < ramp[3] < 0.5


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("subject, message", [
    (Subject(prompt="", box=FULL), r"subjects\[0\]\.prompt is empty"),
    (Subject(prompt="   ", box=FULL), r"subjects\[0\]\.prompt is empty"),
    (Subject(prompt=3, box=FULL), r"subjects\[0\]\.prompt must be a string"),
    (Subject(box=FULL), r"subjects\[0\] has neither an image nor a prompt"),
    (Subject(prompt="a dog", box=FULL, scale=0.5), r"subjects\[0\]\.scale is the image branch's"),
    (Subject(prompt="a dog", box=FULL, schedule="linear_up"), r"subjects\[0\]\.schedule is the image branch's"),
    (Subject(prompt="a dog", box=FULL, blocks="style"), r"subjects\[0\]\.blocks is the image branch's"),
    (Subject(prompt="a dog", box=FULL, adapter=1), r"subjects\[0\]\.adapter is the image branch's"),
])
def test_bad_prompt_subjects_are_named_before_any_model_work(subject, message):
    with pytest.raises((ValueError, TypeError), match=message):
        prepare_subjects([subject])


def test_a_prompt_longer_than_the_tokenizer_is_refused_before_denoising(sd15):
    calls = []
    sd15.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    long = " ".join(["dog"] * 80)
    with pytest.raises(ValueError, match=r"subjects\[1\]\.prompt is 82 tokens long .* above the text encoder's 77"):
        sd15("a cat", subjects=[Subject(prompt="a cat", box=LEFT), Subject(prompt=long, box=RIGHT)],
             num_inference_steps=2)
    assert not calls
    ok = " ".join(["dog"] * 75)                     # 77 with the start and end tokens: accepted
    latents(sd15, "a cat", [Subject(prompt=ok, box=RIGHT)], num_inference_steps=1)


def test_flux_refuses_regional_prompts():
    from anyms.flux import AnyMSFluxPipeline
    from anyms.tiny_flux import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(AnyMSFluxPipeline)
    with pytest.raises(ValueError, match=r"subjects\[0\]\.prompt: .*FLUX"):
        pipe("a cat", subjects=[Subject(prompt="a dog", box=FULL)], num_inference_steps=1)


# ------------------------------------------------------------------------ the command line
TINY = ["--model", "tiny", "--height", "64", "--width", "64", "--steps", "2", "--device", "cpu"]


def _cli(argv, capsys):
    from anyms import cli

    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_region_record_and_from_regenerate_bit_for_bit(images, tmp_path, capsys):
    """--region beside --subject: the PNG record holds the prompt (no image keys), and --from makes
    the same bytes of pixels from the record alone."""
    import json

    from PIL import Image

    out = tmp_path / "a.png"
    code, _, err = _cli(["generate", "a cat and a dog", "--subject", f"{images[0]}:0,0,0.6,1",
                         "--region", "a red dog@0.4,0,1,1:end=0.5", *TINY, "--out", str(out)], capsys)
    assert code == 0, err
    record = json.loads(Image.open(out).text["anyms"])
    assert record["layout"]["subjects"][1] == {"prompt": "a red dog", "box": [0.4, 0.0, 1.0, 1.0], "scale": 1.0,
                                               "end": 0.5}
    again = tmp_path / "again.png"
    code, _, err = _cli(["generate", "--from", str(out), "--device", "cpu", "--out", str(again)], capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))
    assert json.loads(Image.open(again).text["anyms"])["layout"]["subjects"][1]["prompt"] == "a red dog"
    # the region acted: without it the image differs
    plain = tmp_path / "plain.png"
    assert _cli(["generate", "a cat and a dog", "--subject", f"{images[0]}:0,0,0.6,1", *TINY,
                 "--out", str(plain)], capsys)[0] == 0
    assert np.abs(np.asarray(Image.open(plain)).astype(int) - np.asarray(Image.open(out))).max() > 0


@pytest.mark.parametrize("argv, message", [
    (["--region", "a dog"], r"--region\[0\] 'a dog': expected TEXT@x0,y0,x1,y1"),
    (["--region", "a dog@0,0,1"], r"--region\[0\] 'a dog@0,0,1': the box must be 4 numbers"),
    (["--region", "a dog@0,0,1,1:schedule=ease_in"], r"--region\[0\] .*has no schedule"),
    (["--region", "a dog@0,0,1,1:start=0.7,end=0.2"], r"--region\[0\]"),
    (["--region", "@0,0,1,1"], r"--region\[0\] '@0,0,1,1': expected"),
    (["--region", "a dog@0,0,1,1", "--layout", "x.json"], r"--region goes with --subject or alone, not with --layout"),
    (["--region", "a dog@0,0,1.5,1"], r"subjects\[0\]\.box"),
    (["--region", "a dog@0,0,1,1", "--arch", "flux", "--model", "tiny"], r"subjects\[0\]\.prompt: .*FLUX"),
    (["--region", "a dog@0,0,1,1", "--upscale", "2"], r"--upscale: subjects\[0\]\.prompt: tiled upscaling"),
])
def test_bad_regions_are_one_line_before_loading(argv, message, capsys, monkeypatch):
    from anyms import cli, loading

    monkeypatch.setattr(cli, "load_for_run", no_loading)
    monkeypatch.setattr(loading, "_load_pipeline", no_loading)
    code, _, err = _cli(["generate", "a cat", *argv, "--device", "cpu"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err


def test_a_long_region_prompt_is_refused_after_loading_before_denoising(capsys, monkeypatch, tmp_path):
    from anyms import job as job_module

    monkeypatch.setattr(job_module, "generate_image", no_loading)
    long = " ".join(["dog"] * 80)
    code, _, err = _cli(["generate", "a cat", "--region", "a cat@0,0,1,1", "--region", f"{long}@0,0,0.5,0.5",
                         *TINY, "--out", str(tmp_path / "x.png")], capsys)
    assert code == 2, err
    assert re.search(r"subjects\[1\]\.prompt is 82 tokens long", err), err


@pytest.mark.parametrize("subject, message", [
    ({"box": [0, 0, 1, 1]}, r"jobs\.jsonl:2: subjects\[0\]: missing \"image\" or \"prompt\""),
    ({"prompt": "", "box": [0, 0, 1, 1]}, r"jobs\.jsonl:2: subjects\[0\]\.prompt must be a non-empty string"),
    ({"prompt": 7, "box": [0, 0, 1, 1]}, r"jobs\.jsonl:2: subjects\[0\]\.prompt must be a non-empty string"),
    ({"prompt": "a dog", "box": [0, 0, 1, 1], "scale": 2}, r"jobs\.jsonl:2: subjects\[0\]\.scale is the image"),
    ({"prompt": "a dog", "box": [0, 0, 1, 1], "adapter": 1}, r"jobs\.jsonl:2: subjects\[0\]\.adapter is the image"),
    ({"prompt": " ".join(["dog"] * 80), "box": [0, 0, 1, 1]}, r"jobs\.jsonl:2: subjects\[0\]\.prompt is 82 tokens"),
])
def test_bad_prompt_lines_in_jobs_name_the_line_and_the_key(subject, message, tmp_path, capsys, monkeypatch):
    import json

    from anyms import jobs as jobs_module

    monkeypatch.setattr(jobs_module, "generate_image", no_loading)
    lines = [{"prompt": "a cat", "subjects": [{"prompt": "a dog", "box": [0, 0, 0.5, 1]}]},
             {"prompt": "a cat", "subjects": [subject]}]
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    code, _, err = _cli(["generate", "--jobs", str(path), *TINY, "--out-dir", str(tmp_path / "out")], capsys)
    assert code == 2, err
    assert re.search(r"--jobs .*" + message, err), err


def test_a_jobs_line_with_an_upscale_and_a_prompt_names_its_line_once(tmp_path, capsys, monkeypatch):
    import json

    from anyms import jobs as jobs_module

    monkeypatch.setattr(jobs_module, "generate_image", no_loading)
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps({"prompt": "a cat", "upscale": {"scale": 2}, "steps": 8,
                                "subjects": [{"prompt": "a dog", "box": [0, 0, 0.5, 1]}]}) + "\n")
    code, _, err = _cli(["generate", "--jobs", str(path), *TINY, "--out-dir", str(tmp_path / "out")], capsys)
    assert code == 2, err
    assert re.search(r"jobs\.jsonl:1: upscale\.scale: subjects\[0\]\.prompt: tiled upscaling", err), err
    assert err.count("jobs.jsonl:1") == 1, err


def test_a_layout_file_with_a_text_only_subject_runs(images, tmp_path, capsys):
    import json

    layout = {"prompt": "a cat", "subjects": [{"image": images[0], "box": [0, 0, 0.5, 1]},
                                              {"prompt": "a dog", "box": [0.5, 0, 1, 1], "label": "dog"}]}
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(layout))
    code, stdout, err = _cli(["generate", "--layout", str(path), *TINY, "--out", str(tmp_path / "l.png")], capsys)
    assert code == 0, err
    assert (tmp_path / "l.routing.png").is_file() and (tmp_path / "l.layout.png").is_file()


def test_tiled_upscale_refuses_regional_prompts(sd15, subject_images):
    from anyms.upscale import tiled_upscale

    image = subject_images[0].resize((64, 64))
    mask = np.zeros((64, 64), dtype=bool)
    mask[:, :32] = True
    for subject in (Subject(prompt="a dog", box=LEFT), Subject(prompt="a dog", mask=mask)):
        with pytest.raises(ValueError, match=r"subjects\[0\]\.prompt: tiled upscaling does not take regional"):
            tiled_upscale(sd15, image, "a cat", subjects=[subject], scale=2, num_inference_steps=4)


def test_a_negative_image_is_read_in_the_images_order_beside_text_only_regions(sd15, subject_images):
    """The unconditional half's negative image goes to the right image when a text-only region comes
    first: the layout equals the one without that region when the region never acts."""
    a, b = subject_images[:2]
    imaged = Subject(a, RIGHT, negative_image=b)
    never = latents(sd15, "a cat", [Subject(prompt="a dog", box=LEFT, end=0.0), imaged])
    without = latents(sd15, "a cat", [imaged])
    torch.testing.assert_close(never, without, **PIPELINE_TOL)


def test_the_routing_picture_follows_the_kinds_and_labels_prompts():
    from anyms.visualize import draw_layout, subject_maps, subject_masks
    from PIL import Image

    layout = Layout([[0.0, 0.0, 0.6, 1.0], [0.4, 0.0, 1.0, 1.0]], (8, 8), scales=[0.5, 1.0],
                    kinds=["image", "prompt"])
    masks = subject_masks(layout, (8, 8))
    # the prompt routes apart from the image: the image keeps its whole box under it (overwrite)
    assert masks[0].eq(0.5).sum() == layout.coverage((8, 8))[0].sum()
    assert masks[1].eq(1.0).sum() == layout.coverage((8, 8))[1].sum()
    plan = prepare_subjects([Subject(prompt="a red dog", box=(0.4, 0.0, 1.0, 1.0))])
    assert plan.labels == ["a red dog"]
    picture = draw_layout(Image.new("RGB", (64, 64), "grey"), plan.subjects)
    assert picture.size == (64, 64)
    pytest.importorskip("matplotlib")
    assert subject_maps(layout, [(8, 8)], labels=["dog image", "a red dog"]).size[0] > 0


def test_a_subject_whose_prompt_acts_is_not_warned_about(images, tmp_path, capsys):
    """A subject with an image at scale 0 and a prompt: its prompt acts, so no "never acts" warning;
    a region under a region of its kind is warned about as a prompt (not as an image)."""
    import json

    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"prompt": "a dog on a sofa", "subjects": [
        {"image": str(images[0]), "box": [0, 0, 0.6, 1], "prompt": "a red dog", "scale": 0.0},
        {"prompt": "a cushion", "box": [0.7, 0, 0.9, 0.5]}, {"prompt": "a sofa", "box": [0.6, 0, 1, 1]}]}))
    code, _, err = _cli(["generate", "--layout", str(layout), *TINY, "--no-pictures", "--out",
                         str(tmp_path / "a.png")], capsys)
    assert code == 0, err
    assert "never acts" not in err, err
    assert re.search(r"subject 'a cushion' \(subjects\[1\]\) gets no token .* so its prompt does not act", err), err


def test_regional_prompts_alone_say_they_need_an_ip_adapter_too():
    """AnyMS's processors are the IP-Adapter's, so a call with text-only regions needs one loaded
    as well: the error says so (not only "subjects"), before any model work."""
    pipe = tiny_pipeline(AnyMSStableDiffusionPipeline, kind="sd15", seed=0, with_ip_adapter=False)
    with pytest.raises(ValueError, match=r"subjects need a loaded IP-Adapter, regional prompts alone too .*"
                                         r"load_ip_adapter"):
        pipe("a cat", subjects=[Subject(prompt="a dog", box=FULL)], num_inference_steps=1)
