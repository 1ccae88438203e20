"""The toy world: its generator, its tokenizer, the shipped weights (loaded through the real
diffusers path) and what they do with AnyMS, and the training command on a few steps.

Image checks are tolerance-based: colours are read per pixel (anyms.toy.evaluate.colour_map),
and rates over a handful of layouts are compared with a margin under what was measured, never
exact pixels (hosts differ).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from anyms.pipeline import AnyMSStableDiffusionPipeline, Subject
from anyms.toy import WEIGHTS_DIR, prompt_for, reference, toy_pipeline
from anyms.toy import evaluate as ev
from anyms.toy import models, world

FULL = (0.0, 0.0, 1.0, 1.0)
STEPS = 10
# float32 CPU, same pipeline object: AnyMS's fused op vs diffusers' SDPA over 3 DPM-Solver
# steps of trained weights (measured max |diff| 1.7e-5 on latents of size ~2; the random tiny
# models of test_pipeline.py stay under 1e-5).
TOL = dict(rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def toy():
    return toy_pipeline()


def dominant(image, box):
    """The palette colour with most pixels in ``box`` (None if no palette pixel)."""
    labels = ev.colour_map(image)[ev._box_mask(box)]
    labels = labels[labels >= 1]
    return None if labels.size == 0 else world.COLOURS[np.bincount(labels).argmax() - 1]


def colour_fraction(image, box, colour):
    labels = ev.colour_map(image)[ev._box_mask(box)]
    return float((labels == world.COLOURS.index(colour) + 1).mean())


# --------------------------------------------------------------------- generator
def test_generator_is_seeded_and_has_the_promised_palette_and_shapes():
    for c, rgb in {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
                   "magenta": (255, 0, 255), "cyan": (0, 255, 255)}.items():
        assert world.PALETTE[c] == rgb
    assert {"circle", "square", "triangle", "cross"} <= set(world.SHAPES)
    a = world.render_scene(world.sample_scene(np.random.default_rng(5), 3))
    b = world.render_scene(world.sample_scene(np.random.default_rng(5), 3))
    assert np.array_equal(a, b)
    scene = world.sample_scene(np.random.default_rng(1), 4)
    assert len({o.colour for o in scene}) == 4
    # a reference: its object centred on mid-grey, corners grey
    ref = np.asarray(reference("blue", "cross"))
    assert ref.shape == (64, 64, 3) and tuple(ref[0, 0]) == world.BACKGROUND
    assert tuple(ref[32, 32]) == world.PALETTE["blue"]
    with pytest.raises(ValueError, match="colour"):
        reference("purple", "circle")
    with pytest.raises(ValueError, match="shape"):
        reference("red", "star")


def test_every_word_is_one_token_of_a_real_clip_tokenizer():
    from transformers import CLIPTokenizer

    tok = models.build_tokenizer()
    assert isinstance(tok, CLIPTokenizer)
    for word in models.VOCABULARY:
        assert len(tok(word).input_ids) == 3, word        # start, the word, end
    ids = tok(prompt_for([("red", "circle"), ("blue", "cross")])).input_ids
    assert tok.convert_ids_to_tokens(ids)[1:-1] == ["red</w>", "circle</w>", "and</w>", "blue</w>", "cross</w>"]


# ----------------------------------------------------------------- shipped weights
def test_shipped_world_loads_through_from_pretrained_and_load_ip_adapter():
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from safetensors import safe_open
    from transformers import CLIPVisionModelWithProjection

    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(WEIGHTS_DIR) for f in fs)
    assert total <= 10 * 2 ** 20, f"shipped weights are {total / 2 ** 20:.1f} MiB"
    weights = [os.path.join(d, f) for d, _, fs in os.walk(WEIGHTS_DIR) for f in fs if f.endswith(".safetensors")]
    assert len(weights) == 5
    for path in weights:
        with safe_open(path, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, path
    with open(os.path.join(WEIGHTS_DIR, models.IP_SUBFOLDER, models.IP_WEIGHT_NAME), "rb"):
        pass
    with safe_open(os.path.join(WEIGHTS_DIR, models.IP_SUBFOLDER, models.IP_WEIGHT_NAME), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"image_proj", "ip_adapter"}
    # the path a user takes for SD 1.5 + IP-Adapter from the Hub
    pipe = AnyMSStableDiffusionPipeline.from_pretrained(WEIGHTS_DIR)
    pipe.load_ip_adapter(WEIGHTS_DIR, subfolder=models.IP_SUBFOLDER, weight_name=models.IP_WEIGHT_NAME)
    assert isinstance(pipe.image_encoder, CLIPVisionModelWithProjection)
    assert {p.dtype for p in pipe.unet.parameters()} | {p.dtype for p in pipe.text_encoder.parameters()} \
        == {torch.float32}
    cross = [p for n, p in pipe.unet.attn_processors.items() if not n.endswith("attn1.processor")]
    assert cross and all(isinstance(p, IPAdapterAttnProcessor2_0) for p in cross)
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size * 4 == world.IMAGE_SIZE


def test_toy_pipeline_names_a_folder_without_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        toy_pipeline(str(tmp_path))


def test_full_box_equals_plain_ip_adapter_on_the_trained_world(toy):
    ref = reference("magenta", "triangle")
    kwargs = dict(num_inference_steps=3, output_type="latent")
    expected = toy("magenta triangle", ip_adapter_image=ref, generator=torch.Generator().manual_seed(0), **kwargs)
    for mode in ("overwrite", "sum"):
        got = toy("magenta triangle", subjects=[Subject(ref, FULL)], anyms_mode=mode,
                  generator=torch.Generator().manual_seed(0), **kwargs)
        torch.testing.assert_close(got.images, expected.images, **TOL)


# ---------------------------------------------------------------- layout control
# Owner accuracy of AnyMS overwrite on FIXED_LAYOUTS at STEPS steps, seed 0, measured on the
# shipped weights: MEASURED_OWNER. The test allows MARGIN under it (another CPU's rounding can
# flip a borderline box or two of the ~30).
MEASURED_OWNER = 0.615     # 16 of 26 boxes, shipped weights, Intel Xeon, 1 thread (earlier weights: 9 of 26)
MARGIN = 0.1


def fixed_layouts():
    rng = np.random.default_rng([7, 7])
    return ev.sample_layouts(rng, 5, "disjoint") + ev.sample_layouts(rng, 5, "partial")


def test_owner_accuracy_on_fixed_layouts(toy):
    hits = []
    for layout in fixed_layouts():
        image = ev.generate(toy, layout, "overwrite", seeds=[0], steps=STEPS)[0]
        hits += [r["owner"] for r in ev.box_metrics(image, layout)]
    assert np.mean(hits) >= MEASURED_OWNER - MARGIN, f"owner accuracy {np.mean(hits):.3f} over {len(hits)} boxes"


LEFT_BOX, RIGHT_BOX = (0.03, 0.25, 0.47, 0.75), (0.53, 0.25, 0.97, 0.75)
PAIRS = [(("red", "circle"), ("blue", "square")), (("yellow", "cross"), ("cyan", "triangle")),
         (("green", "square"), ("magenta", "circle"))]


def two_subjects(toy, a, b, box_a, box_b, scale_a=1.0, seed=0):
    subjects = [Subject(reference(*a), box=box_a, scale=scale_a), Subject(reference(*b), box=box_b)]
    return toy(prompt_for([a, b]), subjects=subjects, num_inference_steps=STEPS, output_type="np",
               generator=torch.Generator().manual_seed(seed)).images[0]


def as_uint8(image):
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


# The shipped world follows the boxes for the first pair only (measured: the red circle /
# blue square pair swaps; in the second only the yellow cross follows its box, the cyan triangle
# does not show; the third does not swap, at 10 steps): the tests hold that much.
def test_swapping_two_subjects_boxes_swaps_their_colours(toy):
    a, b = PAIRS[0]
    one = as_uint8(two_subjects(toy, a, b, LEFT_BOX, RIGHT_BOX))
    two = as_uint8(two_subjects(toy, a, b, RIGHT_BOX, LEFT_BOX))
    assert dominant(one, LEFT_BOX) == a[0] and dominant(two, RIGHT_BOX) == a[0]
    assert dominant(one, RIGHT_BOX) != a[0] and dominant(two, LEFT_BOX) != a[0]


def test_scale_zero_takes_colour_out_of_the_box(toy):
    a, b = PAIRS[0]
    on = as_uint8(two_subjects(toy, a, b, LEFT_BOX, RIGHT_BOX))
    off = as_uint8(two_subjects(toy, a, b, LEFT_BOX, RIGHT_BOX, scale_a=0.0))
    # measured 0.62 -> 0.00 (earlier weights: 0.63 -> 0.38, the prompt alone drew the colour there)
    assert colour_fraction(off, LEFT_BOX, a[0]) < colour_fraction(on, LEFT_BOX, a[0]) - 0.15


# --------------------------------------------------------------------- commands
def test_train_command_runs_a_few_steps_resumes_and_exports_a_loadable_world(tmp_path, capsys):
    from anyms import cli

    out = tmp_path / "run"
    small = ["--out", str(out), "--steps", "2", "--batch", "2", "--vae-steps", "1", "--vae-batch", "2",
             "--checkpoint-every", "1", "--no-progress", "--multi-steps", "0"]
    assert cli.main(["toy", "train", *small]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2
    pipe = toy_pipeline(str(out / "world"))
    assert pipe("red circle", ip_adapter_image=reference("red", "circle"), num_inference_steps=1,
                output_type="np").images.shape == (1, 64, 64, 3)
    # resume with more steps continues from the checkpoint; other options are refused
    assert cli.main(["toy", "train", *small[:3], "3", *small[4:]]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3
    # the world a resumed run exports decodes with the VAE scaling its U-Net was trained on
    with open(out / "world" / "vae" / "config.json") as f:
        assert json.load(f)["scaling_factor"] == pytest.approx(state["scaling_factor"])
    assert state["scaling_factor"] != pytest.approx(0.18215)
    capsys.readouterr()
    assert cli.main(["toy", "train", *small, "--lr", "0.5"]) == 2
    assert "--lr 0.001 (now 0.5)" in capsys.readouterr().err
    # extended by a multi-reference stage: it starts from the averaged weights, with a fresh optimiser
    assert cli.main(["toy", "train", *small[:3], "3", *small[4:-1], "1"]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["step"] == 4 and state["opt"]["state"][0]["step"] == 1


def test_multi_reference_batches_give_every_referenced_sample_the_references_of_all_its_objects():
    from anyms.toy.train import multi_batch

    counts = set()
    for step in range(12):
        images, captions, references = multi_batch(np.random.default_rng([0, 3, step]), 32)
        with_refs = [r for r in references if r is not None]
        assert with_refs and len({len(r) for r in with_refs}) == 1       # one count per batch
        counts.add(len(with_refs[0]))
        for image, refs in zip(images, references):
            if refs is None:
                continue
            # each reference's colour is in the image, and the image holds no other palette colour
            labels = ev.colour_map(np.asarray(((image.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255),
                                              dtype=np.uint8))
            ref_colours = {int(np.bincount(ev.colour_map(r)[ev.colour_map(r) >= 1]).argmax()) for r in refs}
            assert len(ref_colours) == len(refs)
            present = {c for c in range(1, len(world.COLOURS) + 1) if (labels == c).sum() >= 6}
            assert present == ref_colours
    assert counts == {1, 2, 3}


def test_train_init_from_a_world_runs_the_multi_reference_stage_from_its_weights(tmp_path, capsys):
    from safetensors.torch import load_file

    from anyms import cli

    out = tmp_path / "run"
    args = ["--out", str(out), "--steps", "1300", "--multi-steps", "1", "--batch", "2", "--no-progress"]
    assert cli.main(["toy", "train", *args, "--init-from", WEIGHTS_DIR, "--lr", "1e-12", "--multi-lr", "1e-12"]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["step"] == 1301
    # a step at a negligible learning rate: the exported world is the one it started from (fp16 rounding)
    for sub, name in (("unet", "diffusion_pytorch_model.safetensors"), ("ip_adapter", models.IP_WEIGHT_NAME),
                      ("text_encoder", "model.safetensors")):
        a, b = load_file(os.path.join(WEIGHTS_DIR, sub, name)), load_file(out / "world" / sub / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key].float(), a[key].float(), rtol=2e-3, atol=1e-4, msg=key)
    capsys.readouterr()
    # a run in the second stage keeps its first stage's length; a second --init-from is refused
    assert cli.main(["toy", "train", *args[:3], "1200", *args[4:], "--lr", "1e-12", "--multi-lr", "1e-12"]) == 2
    assert "--steps must stay 1300" in capsys.readouterr().err
    assert cli.main(["toy", "train", *args, "--init-from", WEIGHTS_DIR]) == 2
    assert "already holds a checkpoint.pt" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["train", "--out", "x", "--steps", "0"], "--steps must be at least 1"),
    (["train", "--out", "x", "--init-from", "nowhere"], "--init-from: no model_index.json"),
    (["train", "--out", "x", "--multi-steps", "-1"], "--multi-steps and --multi-warmup must be at least 0"),
    (["train", "--out", "x", "--lr", "-1"], "--lr must be positive"),
    (["export", "--checkpoint", "missing.pt", "--out", "y"], "--checkpoint: no file"),
    (["evaluate", "--world", "nowhere"], "--world: no model_index.json"),
])
def test_toy_command_bad_input_exits_2(argv, message, capsys, tmp_path, monkeypatch):
    from anyms import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(["toy", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_generate_model_toy_and_demo_use_the_shipped_world(tmp_path, capsys):
    from PIL import Image

    from anyms import cli

    ref = tmp_path / "red.png"
    reference("red", "circle").save(ref)
    out = tmp_path / "toy.png"
    assert cli.main(["generate", "red circle", "--model", "toy", "--subject", f"{ref}:0.1,0.1,0.6,0.6",
                     "--steps", "2", "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 64)
    demo = tmp_path / "demo"
    assert cli.main(["demo", "--out-dir", str(demo), "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "toy world" in printed and "RANDOM" not in printed
    assert Image.open(demo / "image.png").size == (64, 64)
    assert cli.main(["demo", "--model", "toy", "--arch", "flux", "--out-dir", str(demo)]) == 2


# --------------------------------------------------------------------- block presets
def own_colour_share(image, colour):
    """(fraction of the LEFT box in ``colour``, fraction of the RIGHT box in it)."""
    return colour_fraction(image, LEFT_BOX, colour), colour_fraction(image, RIGHT_BOX, colour)


# Each pair's subjects in LEFT_BOX / RIGHT_BOX under a prompt naming only the shapes (a box's
# colour then comes from its reference image alone), seeds 0 and 1: 12 boxes. Measured on the
# shipped weights (Intel Xeon, 1 thread, 10 steps), mean share of a subject's colour in (its box,
# the other box):
#   every block                                     0.211  0.002
#   "layout" (down_blocks.1.attentions.0, 8x8)      0.014  0.060
#   the 8x8 path (down_blocks.1, mid, up_blocks.0)  0.157  0.012
#   scale 0                                         0.000  0.031
# On this small U-Net the one "layout" block alone hardly draws the subject, and what it draws
# reaches the other box more than its own; the whole low-resolution path holds both. (The earlier
# weights: 0.131/0.001, 0.105/0.092, 0.150/0.020, 0.036/0.100.) The margins are under half of each
# measured gap.
@pytest.mark.slow
def test_block_selection_on_the_toy_world(toy):
    shares = {}
    for name, blocks, scale in (("all", None, 1.0), ("layout", "layout", 1.0),
                                ("low", ["down_blocks.1", "mid_block", "up_blocks.0"], 1.0), ("none", None, 0.0)):
        rows = []
        for a, b in PAIRS:
            for seed in (0, 1):
                subjects = [Subject(reference(*a), box=LEFT_BOX, blocks=blocks, scale=scale),
                            Subject(reference(*b), box=RIGHT_BOX, blocks=blocks, scale=scale)]
                image = as_uint8(toy(f"{a[1]} and {b[1]}", subjects=subjects, num_inference_steps=STEPS,
                                     output_type="np", generator=torch.Generator().manual_seed(seed)).images[0])
                mine_a, other_a = own_colour_share(image, a[0])
                other_b, mine_b = own_colour_share(image, b[0])
                rows += [(mine_a, other_a), (mine_b, other_b)]
        shares[name] = np.mean(rows, axis=0)
    report = {k: v.round(3).tolist() for k, v in shares.items()}
    (all_in, all_out), (layout_in, layout_out) = shares["all"], shares["layout"]
    (low_in, low_out), (none_in, _) = shares["low"], shares["none"]
    assert layout_in < all_in - 0.1, report               # much weaker identity (measured gap 0.197)
    assert layout_out > all_out + 0.025, report           # placement not held (0.058)
    assert low_out < all_out + 0.04 and low_in > none_in + 0.07, report   # the 8x8 path holds both (0.157)


def test_the_toy_worlds_guidance_is_one_value_for_the_command_the_demo_and_the_benchmark(tmp_path, capsys):
    """``anyms generate --model toy`` without --guidance runs the toy world's own default (the demo's
    and the quality benchmark's), not diffusers' SD default of 7.5; --guidance still wins."""
    import inspect
    import sys

    from PIL import Image

    from anyms import cli
    from anyms.toy import DEFAULT_GUIDANCE

    reference("red", "circle").save(tmp_path / "red.png")
    base = ["generate", "red circle", "--model", "toy", "--subject", f"{tmp_path / 'red.png'}:0.1,0.1,0.6,0.6",
            "--steps", "1", "--no-pictures"]
    for extra, expected in (([], DEFAULT_GUIDANCE), (["--guidance", "3"], 3.0)):
        out = tmp_path / f"g{len(extra)}.png"
        assert cli.main([*base, *extra, "--out", str(out)]) == 0, capsys.readouterr().err
        assert json.loads(Image.open(out).text["anyms"])["guidance"] == expected
    assert inspect.signature(ev.generate).parameters["guidance"].default == DEFAULT_GUIDANCE
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    try:
        from benchmarks.bench_quality import parse_args
    finally:
        sys.path.pop(0)
    assert parse_args([]).guidance == DEFAULT_GUIDANCE
    assert DEFAULT_GUIDANCE != 7.5        # what diffusers' SD 1.5 pipeline would run
