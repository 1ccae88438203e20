"""AnyMS on FLUX: the processor on one double-stream attention layer, the pipeline against
diffusers' plain FLUX IP-Adapter, the tiny XLabs-format adapter, the layout's token grid,
and the command line. CPU, tiny random models (anyms.tiny_flux), fresh random inputs.

Latents are compared (output_type="latent"): they carry the whole denoising loop without
the VAE's rounding to 8-bit images, so tolerances can be tight.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from diffusers.models.transformers.transformer_flux import (
    FluxAttention, FluxAttnProcessor, FluxIPAdapterAttnProcessor, FluxPosEmbed,
)
from einops import rearrange
from PIL import Image

import anyms_kernels as ak
from anyms import Subject
from anyms.flux import AnyMSFluxAttnProcessor, AnyMSFluxPipeline, flux_latent_hw, flux_layout
from anyms.layout import Layout
from anyms.processor import anyms_attention, apply_anyms, remove_anyms, set_anyms_layout
from anyms.tiny_flux import XLABS_WEIGHT_NAME, save_tiny_flux_ip_adapter, tiny_flux_components, tiny_flux_pipeline
from anyms_kernels.reference import region_cross_attention_reference
from tests.kernels.helpers import TOLERANCE, mismatch_report

pytestmark = pytest.mark.usefixtures("one_thread")

FULL = (0.0, 0.0, 1.0, 1.0)
LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)
BIG, SMALL = (0.0, 0.0, 0.75, 0.75), (0.25, 0.25, 1.0, 1.0)
OVERLAP3 = [[0.0, 0.0, 0.6, 0.6], [0.4, 0.3, 1.0, 0.9], [0.2, 0.5, 0.7, 1.0]]
GRID = (7, 11)            # a token grid that is neither square nor a power of two (112 x 176 pixels)
HEADS, HEAD_DIM, JOINT = 2, 128, 32
STEPS = 2
# float32, 2 steps of 2 double + 2 single blocks: the fused op against diffusers' SDPA calls
# (measured max |diff| 2e-6 on latents of size ~1).
TOL = dict(rtol=1e-5, atol=2e-5)


# ---------------------------------------------------------------- one attention layer
def make_layer(seed=0, dtype=torch.float32):
    """A FLUX double-stream FluxAttention and a random FluxIPAdapterAttnProcessor (4 tokens)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dim = HEADS * HEAD_DIM
        attn = FluxAttention(query_dim=dim, added_kv_proj_dim=dim, dim_head=HEAD_DIM, heads=HEADS, out_dim=dim,
                             context_pre_only=False, bias=True, eps=1e-6)
        proc = FluxIPAdapterAttnProcessor(hidden_size=dim, cross_attention_dim=JOINT, num_tokens=(4,), scale=1.0)
        for p in list(attn.parameters()) + list(proc.parameters()):      # no zero or unit norm weights
            torch.nn.init.normal_(p, 0.0, p.shape[-1] ** -0.5 if p.dim() > 1 else 0.3)
    attn.set_processor(proc)
    return attn.to(dtype).eval(), proc.to(dtype)


def make_inputs(S, B=2, grid=GRID, L=9, T=4, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    dim = HEADS * HEAD_DIM
    x = torch.randn(B, grid[0] * grid[1], dim, generator=g)
    text = torch.randn(B, L, dim, generator=g)
    images = torch.randn(B, S, T, JOINT, generator=g)
    ids = torch.zeros(grid[0], grid[1], 3)
    ids[..., 1] += torch.arange(grid[0])[:, None]
    ids[..., 2] += torch.arange(grid[1])[None, :]
    rope = FluxPosEmbed(10000, [16, 56, 56])(torch.cat([torch.zeros(L, 3), ids.reshape(-1, 3)]))
    return x.to(dtype), text.to(dtype), images.to(dtype), tuple(r.to(dtype) for r in rope)


def call(attn, proc, x, text, images, rope, **kwargs):
    attn.set_processor(proc)
    with torch.no_grad():
        return attn(x, encoder_hidden_states=text, image_rotary_emb=rope,
                    ip_hidden_states=None if images is None else [images], **kwargs)


def assert_close(actual, expected, atol, rtol, what=""):
    report = mismatch_report(actual, expected, atol, rtol)
    if report:
        pytest.fail(f"{what}: {report}")


def reference_ip(attn, proc, x, images, layout, grid, ip_scale=1.0):
    """The IP term in float64: the normed image queries, anyms_kernels' reference without a text branch."""
    d = torch.float64
    with torch.no_grad():
        q = attn.norm_q.double()(attn.to_q.double()(x.double()).unflatten(-1, (HEADS, -1))).transpose(1, 2)
        ks = rearrange(proc.to_k_ip[0].double()(images.double()), "b s t (h d) -> b h s t d", h=HEADS)
        vs = rearrange(proc.to_v_ip[0].double()(images.double()), "b s t (h d) -> b h s t d", h=HEADS)
        B, S = x.shape[0], images.shape[1]
        cover = layout.coverage(grid).expand(B, S, *grid)
        scale = (layout.scales.to(d) * torch.as_tensor(ip_scale, dtype=d)).expand(B, S)
        z = region_cross_attention_reference(q, None, None, ks, vs, cover, grid, mode=layout.mode,
                                             subject_scale=scale)
    return rearrange(z, "b h n d -> b n (h d)")


def test_no_layout_and_single_stream_are_bitwise_the_parent():
    attn, parent = make_layer()
    x, text, images, rope = make_inputs(S=1)
    expected = call(attn, parent, x, text, images, rope)
    ours = AnyMSFluxAttnProcessor.from_ip_adapter_processor(parent)
    for got, want in zip(call(attn, ours, x, text, images, rope), expected):
        assert torch.equal(got, want)
    # a single-stream block (no encoder_hidden_states) is the parent even with a layout
    ours.layout = Layout([list(LEFT)], (2 * GRID[0], 2 * GRID[1]), patch=2)
    joint = torch.cat([text, x], dim=1)
    with torch.no_grad():
        attn.set_processor(parent)
        want = attn(joint, image_rotary_emb=rope)
        attn.set_processor(ours)
        assert torch.equal(attn(joint, image_rotary_emb=rope), want)


@pytest.mark.parametrize("mode", ["overwrite", "sum"])
def test_joint_attention_untouched_and_uncovered_tokens_get_the_zero_scale_output(mode):
    """The joint outputs are bitwise the parent's; tokens outside every region get exactly the
    output of the same call with the adapter's scale at 0 (ours and the parent's)."""
    attn, parent = make_layer()
    x, text, images, rope = make_inputs(S=2)
    boxes = [[0.0, 0.0, 0.4, 0.5], [0.3, 0.4, 0.8, 0.9]]
    layout = flux_layout(boxes, 16 * GRID[0], 16 * GRID[1], scales=[0.7, 1.3], mode=mode)
    ours = AnyMSFluxAttnProcessor.from_ip_adapter_processor(parent, layout)
    hs, ehs, ip = call(attn, ours, x, text, images, rope)
    p_hs, p_ehs, _ = call(attn, parent, x, text, images, rope)
    assert torch.equal(hs, p_hs) and torch.equal(ehs, p_ehs)
    outside = ~layout.coverage(GRID).any(0).flatten()
    assert outside.any() and (~outside).any()
    parent.scale = [0.0]
    zero_parent = call(attn, parent, x, text, images, rope)
    zero_ours = call(attn, ours, x, text, images, rope)        # shares the scale: 0 too
    assert ours.scale == [0.0]
    for zero in (zero_parent, zero_ours):
        assert torch.equal(zero[0], hs) and torch.equal(zero[1], ehs)
        assert torch.equal(ip[:, outside], zero[2][:, outside])
    assert torch.count_nonzero(ip[:, outside]) == 0 and ip[:, ~outside].abs().amin(-1).gt(0).all()


@pytest.mark.parametrize("mode", ["overwrite", "sum"])
@pytest.mark.parametrize("regions", ["boxes", "masks"])
def test_ip_term_matches_the_reference_in_float64(mode, regions):
    attn, parent = make_layer(dtype=torch.float64)
    x, text, images, rope = make_inputs(S=3, dtype=torch.float64)
    H, W = 16 * GRID[0], 16 * GRID[1]
    masks = None
    if regions == "masks":                        # any shapes: discs and a ring
        yy, xx = np.mgrid[:H, :W]
        masks = [np.hypot(yy - 40, xx - 50) < 30, np.hypot(yy - 70, xx - 120) < 45,
                 np.abs(np.hypot(yy - 56, xx - 88) - 35) < 6]
    # lambda_s is a float32 product (as the U-Net processor makes it): binary fractions keep it exact
    layout = flux_layout(None if masks else OVERLAP3, H, W, scales=[0.75, 1.0, 1.625], mode=mode, masks=masks)
    parent.scale = [0.5]
    _, _, ip = call(attn, AnyMSFluxAttnProcessor.from_ip_adapter_processor(parent, layout), x, text, images, rope)
    expected = reference_ip(attn, parent, x, images, layout, GRID, ip_scale=0.5)
    assert_close(ip, expected, **TOLERANCE[torch.float64], what=f"{mode} {regions} vs float64 reference")


def test_full_box_equals_the_parent_and_overlaps_take_the_top_subject():
    attn, parent = make_layer()
    x, text, images, rope = make_inputs(S=2)
    expected = call(attn, parent, x, text, images[:, :1], rope)[2]
    for mode in ("overwrite", "sum"):
        full = flux_layout([list(FULL)], 16 * GRID[0], 16 * GRID[1], mode=mode)
        got = call(attn, AnyMSFluxAttnProcessor.from_ip_adapter_processor(parent, full), x, text, images[:, :1],
                   rope)[2]
        assert_close(got, expected, **TOLERANCE[torch.float32], what=f"{mode}: full box vs the parent")
    # overlap: overwrite gives the top subject's term alone, sum adds the one below
    h, w = 16 * GRID[0], 16 * GRID[1]
    two = lambda mode: AnyMSFluxAttnProcessor.from_ip_adapter_processor(  # noqa: E731
        parent, flux_layout([list(BIG), list(SMALL)], h, w, mode=mode))
    alone = lambda box, s: call(  # noqa: E731
        attn, AnyMSFluxAttnProcessor.from_ip_adapter_processor(parent, flux_layout([list(box)], h, w)),
        x, text, images[:, s:s + 1], rope)[2]
    over = call(attn, two("overwrite"), x, text, images, rope)[2]
    summed = call(attn, two("sum"), x, text, images, rope)[2]
    top, bottom = alone(SMALL, 1), alone(BIG, 0)
    cover = flux_layout([list(BIG), list(SMALL)], h, w).coverage(GRID).flatten(1)
    both = cover.all(0)
    assert both.any()
    assert_close(over[:, both], top[:, both], **TOLERANCE[torch.float32], what="overlap: the top subject wins")
    assert_close(summed[:, both], top[:, both] + bottom[:, both], **TOLERANCE[torch.float32],
                 what="overlap: sum adds both")
    assert_differs(summed[:, both], over[:, both])
    only = cover.sum(0) == 1
    assert torch.equal(over[:, only], summed[:, only])


def test_bad_calls_raise():
    attn, parent = make_layer()
    x, text, images, rope = make_inputs(S=2)
    proc = AnyMSFluxAttnProcessor.from_ip_adapter_processor(parent, flux_layout(OVERLAP3, 112, 176))
    with pytest.raises(ValueError, match=r"hold S=2 images per prompt but the layout has 3 regions"):
        call(attn, proc, x, text, images, rope)
    with pytest.raises(ValueError, match="AnyMS needs the subject images"):
        call(attn, proc, x, text, None, rope)
    with pytest.raises(ValueError, match="ip_adapter_masks cannot be combined"):
        call(attn, proc, x, text, images, rope, ip_adapter_masks=torch.ones(1))
    proc.layout = flux_layout(OVERLAP3[:2], 128, 128)               # an 8x8 grid, the layer is 7x11
    with pytest.raises(ValueError, match=r"77 image tokens but .* is a 8x8 grid of 64"):
        call(attn, proc, x, text, images, rope)
    with pytest.raises(TypeError, match="layout must be"):
        AnyMSFluxAttnProcessor.from_ip_adapter_processor(parent, layout=[[0, 0, 1, 1]])
    with pytest.raises(TypeError, match="must be a FluxIPAdapterAttnProcessor"):
        AnyMSFluxAttnProcessor.from_ip_adapter_processor(FluxAttnProcessor())


def test_the_op_without_text_branch_at_flux_head_dim_against_float64():
    """k_text=None at FLUX's head dim 128 (a few heads, a 7x11 grid): torch and Triton (interpreter)."""
    g = torch.Generator().manual_seed(5)
    B, H, S, T = 1, 3, 3, 4
    N = GRID[0] * GRID[1]
    q = torch.randn(B, N, H, HEAD_DIM, generator=g).transpose(1, 2)
    ks = torch.randn(B, S, T, H, HEAD_DIM, generator=g).permute(0, 3, 1, 2, 4)
    vs = torch.randn(B, S, T, H, HEAD_DIM, generator=g).permute(0, 3, 1, 2, 4)
    layout = flux_layout(OVERLAP3, 16 * GRID[0], 16 * GRID[1], scales=[0.5, 1.0, 2.0])
    scale = layout.scales[None]
    for mode in ("overwrite", "sum"):
        routing = ak.build_routing(layout.coverage(GRID), GRID, mode)
        expected = region_cross_attention_reference(
            q.double(), None, None, ks.double(), vs.double(), layout.coverage(GRID)[None], GRID, mode=mode,
            subject_scale=scale.double())
        backends = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" or q.is_cuda else [])
        for backend in backends:
            out = ak.region_cross_attention(q, None, None, ks, vs, routing, GRID, mode=mode, subject_scale=scale[0],
                                            backend=backend)
            assert_close(out, expected, **TOLERANCE[torch.float32], what=f"{mode} {backend}")


# ----------------------------------------------------------------------- layout grid
def test_flux_layout_token_grid_and_the_unet_path():
    assert flux_latent_hw(1024, 1024) == (128, 128) and flux_latent_hw(1000, 1032) == (124, 128)
    layout = flux_layout([list(LEFT)], 112, 176)
    assert layout.latent_hw == (14, 22) and layout.patch == 2 and layout.token_grid == GRID
    assert layout.grid_for(77) == GRID
    with pytest.raises(ValueError, match="308 image tokens"):
        layout.grid_for(308)                       # the latent's own size: not a FLUX layer
    # the U-Net path is unchanged: levels of the latent, no token grid
    unet = Layout([list(LEFT)], (14, 22))
    assert unet.token_grid is None and unet.grid_for(308) == (14, 22) and unet.grid_for(77) == GRID
    with pytest.raises(ValueError, match="not a whole number of 2x2 patches"):
        Layout([list(LEFT)], (13, 22), patch=2)
    with pytest.raises(ValueError, match="patch must be None or a positive int"):
        Layout([list(LEFT)], (14, 22), patch=0)
    # masks at the image's size: a rectangular mask covers exactly what its box covers
    mask = np.zeros((112, 176), bool)
    mask[28:84, 44:132] = True                      # the box (0.25, 0.25, 0.75, 0.75) in pixels
    boxed = flux_layout([[0.25, 0.25, 0.75, 0.75]], 112, 176)
    masked = flux_layout(None, 112, 176, masks=[mask])
    assert torch.equal(masked.coverage(GRID), boxed.coverage(GRID))
    with pytest.raises(ValueError, match="no image of the 14x22 latent"):
        flux_layout(None, 112, 176, masks=[np.ones((100, 176), bool)])


# ------------------------------------------------------------- install and remove
def test_apply_remove_and_the_shared_scale():
    pipe = tiny_flux_pipeline(FluxPipeline)
    before = dict(pipe.transformer.attn_processors)
    layout = flux_layout([list(LEFT)], 128, 128)
    with anyms_attention(pipe, layout) as model:
        assert model is pipe.transformer
        procs = pipe.transformer.attn_processors
        ip = {k: p for k, p in procs.items() if k.startswith("transformer_blocks")}
        assert all(isinstance(p, AnyMSFluxAttnProcessor) and p.layout is layout for p in ip.values())
        assert all(p.to_k_ip is before[k].to_k_ip for k, p in ip.items())       # weights shared, not copied
        assert all(procs[k] is before[k] for k in procs if k.startswith("single"))
        pipe.set_ip_adapter_scale(0.25)            # FLUX assigns a new list: the originals see it
        assert all(before[k].scale == [0.25] and p.scale == [0.25] for k, p in ip.items())
    after = pipe.transformer.attn_processors
    assert all(after[k] is before[k] for k in before)
    # apply / set / remove on the transformer itself
    apply_anyms(pipe.transformer, layout)
    set_anyms_layout(pipe.transformer, None)
    assert all(p.layout is None for p in pipe.transformer.attn_processors.values()
               if isinstance(p, AnyMSFluxAttnProcessor))
    remove_anyms(pipe.transformer)
    assert all(pipe.transformer.attn_processors[k] is before[k] for k in before)
    # a processor made directly goes back as a plain one sharing its weights
    direct = AnyMSFluxAttnProcessor(256, JOINT, num_tokens=(4,), scale=0.5, layout=layout)
    plain = direct.original_processor()
    assert type(plain) is FluxIPAdapterAttnProcessor and plain.to_k_ip is direct.to_k_ip and plain.scale == [0.5]
    pipe.unload_ip_adapter()
    with pytest.raises(ValueError, match="no IP-Adapter attention processors"):
        apply_anyms(pipe, layout)


# ------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def subject_images_flux():
    rng = np.random.default_rng(4321)
    return [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(4)]


@pytest.fixture(scope="module")
def pipes():
    """(AnyMS FLUX pipeline, plain FluxPipeline): identical random weights and adapters, no shared module."""
    return tiny_flux_pipeline(AnyMSFluxPipeline, seed=0), tiny_flux_pipeline(FluxPipeline, seed=0)


def run(pipe, prompt="a cat and a dog", seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "latent")
    kwargs.setdefault("height", 128)
    kwargs.setdefault("width", 128)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images


def assert_differs(a, b, min_diff=1e-3):
    diff = (a - b).abs().max().item()
    assert diff > min_diff, f"expected different results, max |diff| = {diff}"


@pytest.mark.parametrize("cfg", ["distilled", "true-cfg", "true-cfg-negative-image"])
def test_full_box_equals_diffusers_flux_ip_adapter(pipes, subject_images_flux, cfg):
    ours, theirs = pipes
    img = subject_images_flux[0]
    extra = {}
    if cfg != "distilled":
        extra = dict(negative_prompt="a blurry photo", true_cfg_scale=3.0)
    if cfg == "true-cfg-negative-image":
        extra["negative_ip_adapter_image"] = subject_images_flux[3]
    expected = run(theirs, ip_adapter_image=img, **extra)
    for mode in ("overwrite", "sum"):
        got = run(ours, subjects=[Subject(img, FULL)], anyms_mode=mode, **extra)
        torch.testing.assert_close(got, expected, **TOL, msg=lambda m: f"{mode}: {m}")
    assert_differs(run(ours, subjects=[Subject(subject_images_flux[1], FULL)], **extra), expected)


def test_batch_images_per_prompt_and_scale_equal_diffusers(pipes, subject_images_flux):
    ours, theirs = pipes
    img = subject_images_flux[0]
    prompts = ["a cat", "a dog"]
    expected = run(theirs, prompts, ip_adapter_image=img, num_images_per_prompt=2)
    got = run(ours, prompts, subjects=[Subject(img, FULL)], num_images_per_prompt=2)
    assert got.shape[0] == 4
    torch.testing.assert_close(got, expected, **TOL)
    try:
        ours.set_ip_adapter_scale(0.5)
        theirs.set_ip_adapter_scale(0.5 * 0.6)        # a subject's scale multiplies the adapter's
        torch.testing.assert_close(run(ours, subjects=[Subject(img, FULL, scale=0.6)]),
                                   run(theirs, ip_adapter_image=img), **TOL)
    finally:
        ours.set_ip_adapter_scale(1.0)
        theirs.set_ip_adapter_scale(1.0)


def test_layouts_route(pipes, subject_images_flux):
    ours, _ = pipes
    a, b = subject_images_flux[:2]
    # disjoint boxes: overwrite equals sum; swapping the images between the boxes changes the result
    disjoint = [Subject(a, LEFT), Subject(b, RIGHT)]
    over = run(ours, subjects=disjoint, anyms_mode="overwrite")
    torch.testing.assert_close(run(ours, subjects=disjoint, anyms_mode="sum"), over, **TOL)
    assert_differs(run(ours, subjects=[Subject(b, LEFT), Subject(a, RIGHT)]), over)
    # overlaps: the modes differ, the order matters in overwrite mode only
    ab, ba = [Subject(a, BIG), Subject(b, SMALL)], [Subject(b, SMALL), Subject(a, BIG)]
    over_ab = run(ours, subjects=ab)
    sum_ab = run(ours, subjects=ab, anyms_mode="sum")
    assert_differs(over_ab, sum_ab)
    assert_differs(over_ab, run(ours, subjects=ba))
    torch.testing.assert_close(run(ours, subjects=ba, anyms_mode="sum"), sum_ab, **TOL)
    # smaller_on_top puts the smaller region on top whatever the order given
    smaller = (0.25, 0.25, 0.9, 0.9)
    torch.testing.assert_close(run(ours, subjects=[Subject(b, smaller), Subject(a, BIG)],
                                   anyms_priority="smaller_on_top"),
                               run(ours, subjects=[Subject(a, BIG), Subject(b, smaller)]), **TOL)
    # a zero-scale subject is like no subject
    torch.testing.assert_close(run(ours, subjects=[Subject(a, LEFT, scale=0.0), Subject(b, RIGHT)]),
                               run(ours, subjects=[Subject(b, RIGHT)]), **TOL)


def test_masks_equal_boxes_and_shape_the_region(pipes, subject_images_flux):
    ours, _ = pipes
    a, b = subject_images_flux[:2]
    mask = np.zeros((128, 128), bool)
    mask[32:96, 16:80] = True                       # the box (0.125, 0.25, 0.625, 0.75)
    box = (0.125, 0.25, 0.625, 0.75)
    boxed = run(ours, subjects=[Subject(a, box), Subject(b, RIGHT)])
    masked = run(ours, subjects=[Subject(a, mask=mask), Subject(b, RIGHT)])
    assert torch.equal(masked, boxed)
    assert ours.anyms_last_plan.layout.has_masks
    yy, xx = np.mgrid[:128, :128]
    disc = run(ours, subjects=[Subject(a, mask=np.hypot(yy - 64, xx - 48) < 20), Subject(b, RIGHT)], height=None,
               width=None)                           # the image takes the masks' size
    assert disc.shape == boxed.shape
    assert_differs(disc, boxed)


def test_odd_size_many_subjects(pipes, subject_images_flux):
    ours, _ = pipes
    boxes = [(0.0, 0.0, 0.3, 0.4), (0.2, 0.1, 0.7, 0.5), (0.6, 0.0, 1.0, 0.6), (0.0, 0.5, 0.5, 1.0),
             (0.4, 0.4, 0.9, 0.95), (0.45, 0.45, 0.55, 0.55)]
    subjects = [Subject(subject_images_flux[i % 4], box, scale=0.5 + 0.1 * i) for i, box in enumerate(boxes)]
    out = run(ours, subjects=subjects, height=16 * GRID[0], width=16 * GRID[1])
    assert out.shape == (1, GRID[0] * GRID[1], 16) and torch.isfinite(out).all()
    assert ours.anyms_last_plan.layout.token_grid == GRID


def test_restored_after_calls_and_plain_call_is_diffusers(pipes, subject_images_flux):
    ours, theirs = pipes
    before = dict(ours.transformer.attn_processors)
    run(ours, subjects=[Subject(subject_images_flux[0], BIG), Subject(subject_images_flux[1], SMALL)])
    with pytest.raises(ValueError, match="masks"):
        run(ours, subjects=[Subject(subject_images_flux[0], mask=np.ones((128, 128), bool))], height=96)
    after = dict(ours.transformer.attn_processors)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    img = subject_images_flux[2]
    torch.testing.assert_close(run(ours, ip_adapter_image=img), run(theirs, ip_adapter_image=img), rtol=0, atol=0)


def _guard(pipe):
    """Record every forward of a model of the pipeline (bad input must raise before any):
    ``(calls, hook handles)``."""
    calls, handles = [], []
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "image_encoder"):
        module = getattr(pipe, name, None)
        if module is not None:
            handles.append(module.register_forward_pre_hook(lambda m, a, name=name: calls.append(name)))
    return calls, handles


def test_bad_input_raises_before_model_work(pipes, subject_images_flux):
    ours, _ = pipes
    img = subject_images_flux[0]
    ok = Subject(img, FULL)
    cases = [
        (dict(subjects=[Subject(img, (0.0, 0.0, 1.2, 1.0))]), ValueError, r"subjects\[0\]\.box must lie inside"),
        (dict(subjects=[ok, Subject(img, (0.6, 0.0, 0.4, 1.0))]), ValueError, r"subjects\[1\]\.box .*inverted"),
        (dict(subjects=[Subject(42, FULL)]), TypeError, r"subjects\[0\]\.image must be"),
        (dict(subjects=[]), ValueError, "subjects is empty"),
        (dict(subjects=[ok], anyms_mode="add"), ValueError, "anyms_mode must be one of"),
        (dict(anyms_mode="sum"), ValueError, "anyms_mode was given without subjects"),
        (dict(subjects=[ok], ip_adapter_image=img), ValueError, "either subjects or ip_adapter_image"),
        (dict(subjects=[ok], ip_adapter_image_embeds=[torch.randn(1, 1, 32)]), ValueError,
         "either subjects or ip_adapter_image_embeds"),
        (dict(subjects=[ok], negative_ip_adapter_image_embeds=[torch.randn(1, 1, 32)]), ValueError,
         "negative_ip_adapter_image_embeds cannot be given with subjects"),
        (dict(subjects=[ok, Subject(img, LEFT)], negative_ip_adapter_image=[img, img, img]), ValueError,
         "negative_ip_adapter_image holds 3 images for 2 subjects"),
        (dict(subjects=[ok], negative_ip_adapter_image=[7]), TypeError, r"negative_ip_adapter_image\[0\] must be"),
        (dict(subjects=[Subject(img, mask=np.ones((120, 128), bool))], height=None, width=None), ValueError,
         r"subjects\[0\]\.mask is 120x128 pixels.*multiples of 16"),
        (dict(subjects=[Subject(img, mask=np.ones((128, 128), bool))], height=96), ValueError,
         r"subjects\[0\]\.mask is 128x128 pixels .* height is 96"),
    ]
    calls, handles = _guard(ours)
    before = dict(ours.transformer.attn_processors)
    try:
        for kwargs, error, message in cases:
            with pytest.raises(error, match=message):
                run(ours, **kwargs)
            assert calls == [], f"{kwargs}: model work ran before the error: {calls}"
            assert all(ours.transformer.attn_processors[k] is before[k] for k in before)
        run(ours, subjects=[ok])                   # the guard does see model work
        assert "transformer" in calls and "image_encoder" in calls
    finally:
        for handle in handles:
            handle.remove()


def test_subjects_without_or_after_unloading_the_adapter(subject_images_flux):
    pipe = tiny_flux_pipeline(AnyMSFluxPipeline, with_ip_adapter=False)
    with pytest.raises(ValueError, match=r"subjects need a loaded IP-Adapter.*load_ip_adapter"):
        run(pipe, subjects=[Subject(subject_images_flux[0], FULL)])
    assert run(pipe).shape == (1, 64, 16)          # without subjects it is FluxPipeline
    pipe = tiny_flux_pipeline(AnyMSFluxPipeline)
    pipe.unload_ip_adapter()
    with pytest.raises(ValueError, match="subjects need a loaded IP-Adapter"):
        run(pipe, subjects=[Subject(subject_images_flux[0], FULL)])


def test_each_subject_image_is_encoded_once_per_call(pipes, subject_images_flux):
    ours, _ = pipes
    seen = []
    handle = ours.image_encoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    try:
        run(ours, subjects=[Subject(im, FULL) for im in subject_images_flux[:3]], num_inference_steps=3)
        assert seen == [1, 1, 1]                   # each subject alone, no black image without CFG
        seen.clear()
        run(ours, subjects=[Subject(im, FULL) for im in subject_images_flux[:3]], negative_prompt="x",
            true_cfg_scale=2.0)
        assert seen == [1, 1, 1, 1]                # and with true CFG, the black image once for all three
    finally:
        handle.remove()


def test_subject_embedding_cache_serves_flux_with_the_same_bits(pipes, subject_images_flux):
    """The --jobs cache wraps FLUX's encode_image (one tensor, no unconditional twin): each distinct
    image is encoded once, alone, and every call gives the latents of the plain call, bit for bit
    (the same operations: each image through the encoder alone, batch 1, on both sides)."""
    from anyms.embeddings import SubjectEmbeddingCache, image_key

    ours, _ = pipes
    a, b, c = subject_images_flux[:3]
    layouts = [[a, b], [b, c], [a, c], [c, a]]

    def call(images, **kwargs):
        return run(ours, subjects=[Subject(images[0], LEFT), Subject(images[1], RIGHT, 0.7)], **kwargs)

    true_cfg = dict(negative_prompt="x", true_cfg_scale=2.0)
    plain = [call(images) for images in layouts] + [call(layouts[0], **true_cfg)]
    seen = []
    handle = ours.image_encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    cache = SubjectEmbeddingCache()
    assert cache.form(ours) == "flux" and cache.form(FluxPipeline(**tiny_flux_components(0))) == "flux"
    try:
        with cache.attached(ours):
            cached = [call(images) for images in layouts] + [call(layouts[0], **true_cfg)]
    finally:
        handle.remove()
    assert "encode_image" not in vars(ours)            # the pipeline is left as it was
    # 3 distinct images, each encoded once alone; the black negative image (an array, not keyed)
    # goes to the encoder every true-CFG call
    assert seen == [1, 1, 1, 1] and (cache.misses, cache.hits, len(cache)) == (3, 7, 3)
    for p, q in zip(plain, cached):
        assert torch.equal(p, q)
    key = next(k for k in cache._entries if k[0] == image_key(b))
    assert len(cache._entries[key]) == 1
    assert torch.equal(cache._entries[key][0], ours.encode_image([b], "cpu", 1))
    # num_images_per_prompt repeats each image's row, as FLUX's encode_image does (each image alone)
    alone = torch.cat([ours.encode_image([a], "cpu", 2), ours.encode_image([b], "cpu", 2)])
    with cache.attached(ours):
        assert torch.equal(ours.encode_image([a, b], "cpu", 2), alone)


# ------------------------------------------------------------------ the tiny adapter
def test_xlabs_adapter_is_what_load_ip_adapter_installs(tmp_path):
    from safetensors import safe_open

    comps = tiny_flux_components(seed=1)
    name = save_tiny_flux_ip_adapter(tmp_path, comps["transformer"], comps["image_encoder"], seed=2)
    with safe_open(str(tmp_path / name), framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert name == XLABS_WEIGHT_NAME
    assert {k.split(".")[0] for k in saved} == {"ip_adapter_proj_model", "double_blocks"}
    pipe = FluxPipeline(**comps)
    pipe.load_ip_adapter(str(tmp_path), weight_name=name)          # the pipeline has its encoder already
    procs = pipe.transformer.attn_processors
    for i in range(pipe.transformer.config.num_layers):
        proc = procs[f"transformer_blocks.{i}.attn.processor"]
        assert type(proc) is FluxIPAdapterAttnProcessor
        for which, mod in (("k", proc.to_k_ip[0]), ("v", proc.to_v_ip[0])):
            key = f"double_blocks.{i}.processor.ip_adapter_double_stream_{which}_proj"
            assert torch.equal(mod.weight, saved[f"{key}.weight"]) and torch.equal(mod.bias, saved[f"{key}.bias"])
    proj = pipe.transformer.encoder_hid_proj.image_projection_layers[0]
    assert torch.equal(proj.image_embeds.weight, saved["ip_adapter_proj_model.proj.weight"])
    assert proj.num_image_text_embeds == 4
    # deterministic from the seed; the caller's RNG is left alone
    state = torch.random.get_rng_state()
    a, b = tiny_flux_pipeline(seed=3), tiny_flux_pipeline(seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    for x, y in zip(a.transformer.state_dict().values(), b.transformer.state_dict().values()):
        assert torch.equal(x, y)
    assert a.image_encoder is not None and a.image_encoder.dtype == torch.float32


# ----------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def tiny_flux_on_disk(tmp_path_factory):
    """A tiny FLUX pipeline saved with save_pretrained, and its XLabs-format adapter beside
    an image_encoder folder: ``(model_dir, weight_path)``."""
    from anyms.tiny import tiny_image_encoder

    root = tmp_path_factory.mktemp("tiny-flux")
    pipe = tiny_flux_pipeline(FluxPipeline, seed=0, with_ip_adapter=False)
    pipe.save_pretrained(root / "model")
    weight = save_tiny_flux_ip_adapter(root / "ip-adapter", pipe.transformer, tiny_image_encoder(4), seed=5)
    return str(root / "model"), str(root / "ip-adapter" / weight)


def test_cli_generate_picks_flux_from_the_model_config(tiny_flux_on_disk, subject_images_flux, tmp_path, capsys):
    from anyms import cli

    model, weight = tiny_flux_on_disk
    paths = []
    for i, img in enumerate(subject_images_flux[:2]):
        paths.append(str(tmp_path / f"s{i}.png"))
        img.save(paths[-1])
    out = tmp_path / "flux.png"
    argv = ["generate", "a cat and a dog", "--model", model, "--ip-adapter", weight, "--height", "64", "--width",
            "96", "--steps", "2", "--device", "cpu", "--seed", "3", "--subject", f"{paths[0]}:0,0,0.6,1",
            "--subject", f"{paths[1]}:0.4,0,1,1:0.7", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr()
    assert "AnyMSFluxPipeline" in printed.err
    for path in (out, tmp_path / "flux.layout.png", tmp_path / "flux.routing.png"):
        assert path.is_file()
    assert Image.open(out).size == (96, 64)
    # the same image from Python: the real from_pretrained and load_ip_adapter
    pipe = AnyMSFluxPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(os.path.dirname(weight), weight_name=os.path.basename(weight),
                         image_encoder_pretrained_model_name_or_path=os.path.join(os.path.dirname(weight),
                                                                                  "image_encoder"),
                         image_encoder_dtype=torch.float32)
    subjects = [Subject(paths[0], (0, 0, 0.6, 1)), Subject(paths[1], (0.4, 0, 1, 1), 0.7)]
    image = pipe("a cat and a dog", subjects=subjects, height=64, width=96, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(3)).images[0]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(out).convert("RGB")))
    # wrong --arch for the model, and FLUX's size rule, before any model is loaded
    assert cli.main(argv[:-2] + ["--out", str(out), "--arch", "sdxl"]) == 2
    assert "is a flux pipeline" in capsys.readouterr().err
    bad = list(argv)
    bad[bad.index("--width") + 1] = "88"
    assert cli.main(bad) == 2
    assert "--width must be a multiple of 16 for FLUX" in capsys.readouterr().err


def test_cli_demo_flux(tmp_path, capsys):
    from anyms import cli

    out = tmp_path / "demo"
    assert cli.main(["demo", "--arch", "flux", "--out-dir", str(out), "--steps", "2", "--size", "64"]) == 0
    printed = capsys.readouterr().out
    assert "FLUX.1-shaped" in printed and "RANDOM weights" in printed
    assert Image.open(out / "image.png").size == (64, 64)
    assert (out / "layout.png").is_file() and (out / "routing.png").is_file()
    assert cli.main(["demo", "--arch", "flux", "--out-dir", str(out), "--size", "72"]) == 2
    assert "multiple of 16 for FLUX" in capsys.readouterr().err


def test_a_second_call_while_one_runs_is_refused(pipes, subject_images_flux):
    """As on the U-Net pipelines: one call at a time, refused clearly, nothing changed."""
    import threading
    ours, _ = pipes
    subjects = [Subject(subject_images_flux[0], box=(0, 0, 0.6, 1)), Subject(subject_images_flux[1], box=(0.4, 0, 1, 1))]
    inside, go, out = threading.Event(), threading.Event(), {}

    def hold(pipe_, step, timestep, tensors):
        if step == 0:
            inside.set()
            assert go.wait(120)
        return tensors

    def first():
        try:
            out["first"] = run(ours, subjects=subjects, callback_on_step_end=hold)
        except BaseException as e:
            out["first"] = e

    thread = threading.Thread(target=first, name="paused-call", daemon=True)
    thread.start()
    assert inside.wait(120), out.get("first")
    before = dict(ours.transformer.attn_processors)
    with pytest.raises(RuntimeError, match="already running a call"):
        run(ours, subjects=subjects)
    assert all(ours.transformer.attn_processors[k] is v for k, v in before.items())
    go.set()
    thread.join(120)
    assert isinstance(out["first"], torch.Tensor), out["first"]
    torch.testing.assert_close(out["first"], run(ours, subjects=subjects), rtol=0, atol=0)
