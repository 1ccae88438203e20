"""anyms.upscale: tiled img2img upscaling whose every tile is routed by the regions cropped to it."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

import anyms
from anyms.layout import Layout
from anyms.upscale import TILE_EVENT, plan_tiles, tiled_upscale
from tests.anyms.memory_events import cpu_alloc_peak_of

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = {"sdxl": "AnyMSStableDiffusionXLPipeline", "sd15": "AnyMSStableDiffusionPipeline"}


def _pipe(kind, plus=False):
    from anyms.tiny import tiny_pipeline

    return tiny_pipeline(getattr(anyms, KINDS[kind]), kind=kind, plus=plus, seed=0)


def _image(side, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def _subjects(subject_images, side):
    """A box subject on the left, and a masked subject (a mask at the input's size) top right."""
    mask = np.zeros((side, side), dtype=bool)
    mask[: side // 4, side * 5 // 8: side * 7 // 8] = True
    return [anyms.Subject(subject_images[0], box=(0.05, 0.3, 0.45, 0.95)),
            anyms.Subject(subject_images[1], mask=mask, scale=0.8)]


# ------------------------------------------------------------------ one tile = the untiled pass
@pytest.mark.parametrize("kind, plus", [("sdxl", False), ("sd15", False), ("sdxl", True)])
def test_one_tile_over_the_image_equals_the_untiled_img2img_pass(kind, plus, subject_images):
    """One tile covering the output: every weight is 1, the tile is the latent and its layout
    routes as the image's, so the pass is diffusers' img2img with the layout, bit for bit."""
    from diffusers import AutoPipelineForImage2Image

    from anyms.pipeline import prepare_subjects

    pipe = _pipe(kind, plus)
    image, side = _image(64), 128
    subjects = _subjects(subject_images, 64)
    common = dict(strength=0.6, num_inference_steps=4, output_type="np")
    ours = tiled_upscale(pipe, image, "a cat", subjects=subjects, scale=2, tile=side, overlap=0, seed=3,
                         **common).images
    assert len(pipe.anyms_last_upscale.tiles) == 1

    # the reference: diffusers' img2img pipeline, the image's layout installed for the call
    plan = prepare_subjects([anyms.Subject(subjects[0].image, subjects[0].box),
                             anyms.Subject(subjects[1].image, mask=np.kron(subjects[1].mask, np.ones((2, 2))),
                                           scale=0.8)])
    layout = plan.make_layout((side // 8, side // 8))
    embeds = [pipe.encode_image([img], "cpu", 1, plus) for img in plan.images]   # each image alone
    cond, uncond = torch.cat([c for c, _ in embeds])[None], torch.cat([u for _, u in embeds])[None]
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    with anyms.anyms_attention(pipe, layout):
        theirs = img2img("a cat", image=image.resize((side, side), Image.LANCZOS),
                         ip_adapter_image_embeds=[torch.cat([uncond, cond])],
                         generator=torch.Generator().manual_seed(3), **common).images
    np.testing.assert_array_equal(ours, theirs)

    # and the tiles do run: four tiles give another image of the same size
    tiled = tiled_upscale(pipe, image, "a cat", subjects=subjects, scale=2, tile=64, overlap=32, seed=3,
                          **common).images
    assert len(pipe.anyms_last_upscale.tiles) == 9 and tiled.shape == ours.shape
    assert not np.array_equal(tiled, ours)
    # and the pipeline is as before: its U-Net's own forward, diffusers' IP-Adapter processors
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    assert "forward" not in vars(pipe.unet)
    assert {type(p) for n, p in pipe.unet.attn_processors.items() if "attn2" in n} == {IPAdapterAttnProcessor2_0}


# ------------------------------------------------------------------ routing per tile
def _record_layouts(pipe):
    """Every cross-attention call's (tokens, layout) and every image projection's subject count."""
    seen, counts = [], []
    handles = []
    for name, module in pipe.unet.named_modules():
        if name.endswith("attn2"):
            handles.append(module.register_forward_pre_hook(
                lambda m, args, kwargs: seen.append(((kwargs.get("hidden_states", args[0] if args else None)).shape[1],
                                                     m.processor.layout)), with_kwargs=True))
    handles.append(pipe.unet.encoder_hid_proj.register_forward_pre_hook(
        lambda m, args: counts.append(args[0][0].shape[1])))
    return seen, counts, handles


@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
def test_each_tile_is_routed_by_the_regions_cropped_to_it(kind, subject_images):
    pipe = _pipe(kind)
    seen, counts, handles = _record_layouts(pipe)
    subjects = _subjects(subject_images, 64)
    steps = 2
    tiled_upscale(pipe, _image(64), "a cat", subjects=subjects, scale=4, tile=128, overlap=64,
                  strength=0.5, num_inference_steps=2 * steps, seed=0, output_type="latent")
    for h in handles:
        h.remove()
    plan = pipe.anyms_last_upscale
    levels = len(pipe.unet.config.block_out_channels)
    # the image's regions, made here from the subjects (masks repeated 4x to the output's 256x256)
    mask = torch.from_numpy(np.kron(subjects[1].mask, np.ones((4, 4), dtype=bool)))
    image_layout = Layout([list(subjects[0].box), None], (32, 32), masks=[None, mask])
    assert [t.hw for t in plan.tiles] == [(16, 16)] * len(plan.tiles) and len(plan.tiles) == 9

    layouts = {id(layout): i for i, layout in enumerate(plan.tile_layouts)}
    order = [layouts[id(layout)] for _, layout in seen]
    per_eval = sum(name.endswith("attn2") for name, _ in pipe.unet.named_modules())
    evals = len(seen) // (per_eval * len(plan.tiles))      # the scheduler's U-Net evaluations (PNDM adds one)
    assert evals >= steps and len(seen) == evals * per_eval * len(plan.tiles)
    # tile after tile, in order, at every evaluation; the U-Net gets the tile's active subjects only
    assert order == [i for _ in range(evals) for i in range(len(plan.tiles)) for _ in range(per_eval)]
    assert counts == [max(1, len(a)) for _ in range(evals) for a in plan.active]

    for i, (tile, active, layout) in enumerate(zip(plan.tiles, plan.active, plan.tile_layouts)):
        for k in range(levels):       # every U-Net level: the image's coverage cropped to the tile
            f = 2 ** k
            grid = (math.ceil(16 / f), math.ceil(16 / f))
            whole = image_layout.coverage((32 // f, 32 // f))
            crop = whole[:, tile.y0 // f: tile.y0 // f + grid[0], tile.x0 // f: tile.x0 // f + grid[1]]
            expected_active = [s for s in range(2) if crop[s].any()]
            if k == 0:
                assert active == expected_active, (i, active)
            if active:
                assert torch.equal(layout.coverage(grid), crop[active]), (i, k)
                assert layout.scales.tolist() == pytest.approx([[1.0, 0.8][s] for s in active])
            else:                     # no region meets the tile: a zero-scale branch, which adds nothing
                assert layout.scales.tolist() == [0.0]
    # the box (left) and the mask (top right) both miss some tiles, and one tile meets neither
    assert any(a == [0] for a in plan.active) and any(a == [1] for a in plan.active)
    assert [] in plan.active and [0, 1] not in plan.active[-1:]


def test_the_tiles_cover_the_image_and_overlap_by_at_least_the_overlap():
    for size, tile, overlap in (((256, 384), 128, 32), ((512, 512), 128, 64), ((96, 640), 256, 32),
                                ((128, 128), 1024, 256)):
        tiles = plan_tiles(size, tile, overlap, 32, 8)
        cover = torch.zeros(size[0] // 8, size[1] // 8, dtype=torch.int32)
        for t in tiles:
            assert t.y0 % 4 == 0 and t.x0 % 4 == 0                # on the coarsest level's cells
            assert t.hw == (min(tile, size[0]) // 8, min(tile, size[1]) // 8)
            cover[t.y0:t.y1, t.x0:t.x1] += 1
        assert bool((cover > 0).all())
        ys, xs = sorted({t.y0 for t in tiles}), sorted({t.x0 for t in tiles})
        for starts, side in ((ys, tiles[0].hw[0]), (xs, tiles[0].hw[1])):
            for a, b in zip(starts, starts[1:]):
                assert a + side - b >= overlap // 8


def test_the_blended_prediction_is_the_weighted_mean_of_the_tiles():
    """Three tiles along a row whose U-Net outputs are the constants 1, 2, 3: each cell gets
    the tiles' mean weighted by linear ramps over the overlap (none at the image's border)."""
    from anyms.upscale import UpscalePlan, _TiledForward, _tile_weights, tile_layout

    layout = Layout([[0.0, 0.0, 1.0, 1.0]], (8, 16))
    tiles = plan_tiles((64, 128), 64, 32, 32, 8)
    assert [(t.y0, t.y1, t.x0, t.x1) for t in tiles] == [(0, 8, 0, 8), (0, 8, 4, 12), (0, 8, 8, 16)]
    plan = UpscalePlan((64, 128), 64, 32, tiles, layout)
    for t in tiles:
        active, tl = tile_layout(layout, t)
        plan.active.append(active)
        plan.tile_layouts.append(tl)
    values = iter([1.0, 2.0, 3.0])

    def forward(sample, *args, **kwargs):
        return (torch.full_like(sample, next(values)),)

    import anyms.upscale as up
    installed = []
    original = up.set_anyms_layout
    up.set_anyms_layout = lambda model, lay: installed.append(lay)
    try:
        out = _TiledForward(None, forward, plan, _tile_weights(tiles, (8, 16), 4, "cpu"))(
            torch.zeros(1, 4, 8, 16), return_dict=False)[0]
    finally:
        up.set_anyms_layout = original
    assert installed[:3] == plan.tile_layouts and installed[3] is layout   # the image's layout back after
    expected = []
    for x in range(16):
        num = den = 0.0
        for value, t in zip((1.0, 2.0, 3.0), tiles):
            if t.x0 <= x < t.x1:
                i = x - t.x0
                w = 1.0
                if t.x0 > 0:
                    w = min(w, (i + 0.5) / 4)
                if t.x1 < 16:
                    w = min(w, (t.x1 - t.x0 - i - 0.5) / 4)
                num, den = num + value * w, den + w
        expected.append(num / den)
    torch.testing.assert_close(out, torch.tensor(expected).expand(1, 4, 8, 16))
    assert out[0, 0, 0, 0] == 1.0 and out[0, 0, 0, 15] == 3.0 and bool((out[0, 0, 0].diff() >= 0).all())


# ------------------------------------------------------------------ memory
def _tile_peaks(fn):
    """The peak CPU bytes allocated inside each tile's U-Net forward, above what was live when it
    began, from torch.profiler's allocation events (frees are negative sizes)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peaks, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.name == TILE_EVENT:
            peaks.append(cpu_alloc_peak_of(e.children))
            continue
        stack.extend(e.children)
    return peaks


def test_the_peak_memory_of_a_tile_does_not_grow_with_the_output(subject_images):
    pipe = _pipe("sdxl")
    worst = {}
    for scale, side in ((2, 64), (2, 128), (4, 128)):        # outputs 128 (one tile), 256, 512
        def run():
            tiled_upscale(pipe, _image(side), "a cat", subjects=_subjects(subject_images, side), scale=scale,
                          tile=128, overlap=32, strength=0.5, num_inference_steps=2, seed=0, output_type="latent")
        run()                                                  # warm: lazily built state is not the peak's
        peaks = _tile_peaks(run)
        assert len(peaks) == len(pipe.anyms_last_upscale.tiles) and peaks
        worst[side * scale] = max(peaks)
    assert worst[512] <= 1.25 * worst[128] and worst[256] <= 1.25 * worst[128], worst


# ------------------------------------------------------------------ bad input
@pytest.fixture
def no_model_work(monkeypatch):
    """A tiny SDXL pipeline whose every model raises if it runs."""
    pipe = _pipe("sdxl")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "image_encoder"):
        getattr(pipe, name).register_forward_pre_hook(lambda *a: pytest.fail("a model ran"))
    monkeypatch.setattr(pipe.vae, "encode", lambda *a, **k: pytest.fail("the VAE ran"))
    return pipe


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(scale=3), ValueError, r"^scale must be 2 or 4, got 3$"),
    (dict(scale=True), ValueError, r"^scale must be 2 or 4"),
    (dict(scale=1), ValueError, r"^scale must be 2 or 4"),
    (dict(strength=0), ValueError, r"^strength must be a number in \(0, 1\]"),
    (dict(strength=1.5), ValueError, r"^strength must be a number in \(0, 1\]"),
    (dict(strength=float("nan")), ValueError, r"^strength must be"),
    (dict(strength="0.5"), ValueError, r"^strength must be"),
    (dict(num_inference_steps=0), ValueError, r"^num_inference_steps must be a positive int, got 0$"),
    (dict(num_inference_steps=2, strength=0.3), ValueError, r"^strength 0.3 x num_inference_steps 2 runs no step"),
    (dict(seed=1.5), ValueError, r"^seed must be an int or None, got 1.5$"),
    (dict(tile=16), ValueError, r"^tile must be a multiple of 32 pixels, at least 32 \(one cell of the U-Net's "
                                r"coarsest level"),
    (dict(tile=48), ValueError, r"^tile must be a multiple of 32"),
    (dict(tile=128.0), ValueError, r"^tile must be an int"),
    (dict(tile=128, overlap=128), ValueError, r"^overlap must be smaller than the tile \(128 pixels\), got 128$"),
    (dict(tile=128, overlap=160), ValueError, r"^overlap must be smaller than the tile"),
    (dict(overlap=8), ValueError, r"^overlap must be a multiple of 32 pixels"),
    (dict(overlap=-32), ValueError, r"^overlap must be a multiple of 32 pixels, at least 0"),
    (dict(image=42), TypeError, r"^image must be a PIL image, a path or a numpy array, got int$"),
    (dict(image="no-such-file.png"), ValueError, r"image"),
    (dict(image=_image(40)), ValueError, r"^image is 40x40 pixels .* multiples of 32"),
    (dict(subjects=[anyms.Subject(_image(8), box=(0.5, 0.5, 0.4, 0.9))]), ValueError, r"^subjects\[0\]\.box"),
    (dict(subjects=[anyms.Subject(_image(8), mask=np.ones((50, 50), bool))]), ValueError,
     r"^subjects\[0\]\.mask is 50x50 pixels .* input image's size 64x64 or the output's 128x128"),
    (dict(ip_adapter_image=[_image(8)]), ValueError, r"^ip_adapter_image cannot be given"),
    (dict(seed=1, generator=torch.Generator()), ValueError, r"^give seed or generator, not both$"),
    (dict(subjects=anyms.Subject(_image(8), box=(0, 0, 1, 1))), TypeError, r"^subjects must be a list"),
    (dict(subjects=[anyms.Subject(_image(8), box=(0, 0, 1, 1)), "x"]), TypeError, r"^subjects\[1\] must be"),
])
def test_bad_input_is_one_line_naming_the_argument_before_any_model_work(no_model_work, subject_images, kwargs,
                                                                          error, message):
    args = dict(image=_image(64), subjects=[anyms.Subject(subject_images[0], box=(0.1, 0.1, 0.5, 0.5))])
    args.update(kwargs)
    image = args.pop("image")
    with pytest.raises(error, match=message) as info:
        tiled_upscale(no_model_work, image, "a cat", **args)
    assert "\n" not in str(info.value)


def test_a_flux_or_plain_pipeline_is_refused(subject_images):
    from diffusers import StableDiffusionXLPipeline

    from anyms.tiny import tiny_pipeline

    plain = tiny_pipeline(StableDiffusionXLPipeline, kind="sdxl", with_ip_adapter=False)
    with pytest.raises(TypeError, match=r"^pipe must be an AnyMS SDXL or SD 1.5 pipeline .*FLUX is not supported"):
        tiled_upscale(plain, _image(64), "a cat", subjects=[anyms.Subject(subject_images[0], box=(0, 0, 1, 1))])
    flux = anyms.AnyMSFluxPipeline.__new__(anyms.AnyMSFluxPipeline)    # the class is refused, not its weights
    with pytest.raises(TypeError, match=r"^pipe must be .* got AnyMSFluxPipeline$"):
        tiled_upscale(flux, _image(64), "a cat", subjects=[anyms.Subject(subject_images[0], box=(0, 0, 1, 1))])


def test_the_function_is_anyms_tiled_upscale():
    import anyms.upscale

    assert anyms.tiled_upscale is anyms.upscale.tiled_upscale and "tiled_upscale" in anyms.__all__


# ------------------------------------------------------------------ every field of a subject holds in the tiles
def test_a_masked_subject_keeps_every_field_but_its_mask_at_the_output_size(subject_images):
    from anyms.upscale import _subjects_at_scale

    mask = np.zeros((8, 8), dtype=bool)
    mask[2:5, 1:4] = True
    given = anyms.Subject(subject_images[0], box=(0.1, 0.2, 0.5, 0.6), scale=0.7, label="x", mask=mask, start=0.25,
                          end=0.75, schedule="ease_in", negative_image=subject_images[1], blocks="style")
    (out,) = _subjects_at_scale([given], (8, 8), 2)
    for f in dataclasses.fields(anyms.Subject):          # a field added later is checked too
        if f.name != "mask":
            assert getattr(out, f.name) is getattr(given, f.name), f.name
    assert torch.equal(torch.as_tensor(out.mask), torch.from_numpy(np.kron(mask, np.ones((2, 2), dtype=bool))))


def test_one_tile_with_timing_blocks_and_a_negative_image_equals_the_untiled_pass(subject_images):
    """A masked subject acting in the first half of the pass's steps, a boxed one on the decoder's
    style block only, a negative image: one tile over the output is diffusers' img2img with the
    image's layout (set step by step) and the negative image's embedding in the unconditional half."""
    from diffusers import AutoPipelineForImage2Image

    from anyms.pipeline import prepare_subjects

    pipe = _pipe("sdxl")
    image, side = _image(64), 128
    box, masked = _subjects(subject_images, 64)
    subjects = [dataclasses.replace(box, blocks="style", negative_image=subject_images[2]),
                dataclasses.replace(masked, end=0.5, schedule="linear_down")]
    common = dict(strength=0.6, num_inference_steps=4, output_type="np", guidance_scale=5.0)
    ours = tiled_upscale(pipe, image, "a cat", subjects=subjects, scale=2, tile=side, overlap=0, seed=3,
                         **common).images
    upscale = pipe.anyms_last_upscale
    (tile_layout,) = upscale.tile_layouts
    assert tile_layout.windows == ((0.0, 1.0), (0.0, 0.5)) and tile_layout.schedules == ("constant", "linear_down")
    assert tile_layout.blocks == upscale.layout.blocks and tile_layout.blocks[0] is not None
    assert tile_layout.step == (1, 2)                   # the pass's 2 steps (4 at strength 0.6), each one set

    plan = prepare_subjects([dataclasses.replace(subjects[0]),
                             dataclasses.replace(subjects[1], mask=np.kron(masked.mask, np.ones((2, 2))))])
    plan.resolve_blocks(pipe.unet)
    layout = plan.make_layout((side // 8, side // 8))
    embeds = [pipe.encode_image([img], "cpu", 1, False) for img in plan.images]
    cond = torch.cat([c for c, _ in embeds])[None]
    negative = pipe.encode_image([plan.subjects[0].negative_image], "cpu", 1, False)[0]
    uncond = torch.cat([negative, embeds[1][1]])[None]
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    layout.set_step(0, 2)
    with anyms.anyms_attention(pipe, layout):
        theirs = img2img("a cat", image=image.resize((side, side), Image.LANCZOS),
                         ip_adapter_image_embeds=[torch.cat([uncond, cond])], callback_on_step_end=layout.step_callback(),
                         generator=torch.Generator().manual_seed(3), **common).images
    assert img2img.num_timesteps == 2
    np.testing.assert_array_equal(ours, theirs)
    # the negative image is refused where there is no unconditional pass, naming it
    with pytest.raises(ValueError, match=r"subjects\[0\]\.negative_image acts only in classifier-free guidance"):
        tiled_upscale(pipe, image, "a cat", subjects=subjects, scale=2, tile=side, overlap=0, seed=3,
                      **{**common, "guidance_scale": 1.0})
