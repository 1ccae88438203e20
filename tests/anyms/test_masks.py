"""Masks as subject regions: Layout, processor, pipeline, CLI and pictures.

The rule under test (the issue's): a token is covered when its cell meets the mask,
as boxes cover every cell they meet, so a rectangular mask routes bit for bit like
its box. Coverage is checked against a brute-force count written here from that
sentence (exact rational arithmetic, no anyms_kernels code), outputs against the
float64 reference of anyms_kernels. CPU, tiny shapes, fresh random inputs.
"""
from __future__ import annotations

import json
import os
import re
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

import anyms_kernels
from anyms import Subject, cli, loading
from anyms.layout import Layout, load_mask
from anyms.pipeline import AnyMSStableDiffusionXLPipeline, prepare_subjects
from anyms.processor import AnyMSAttnProcessor
from anyms.visualize import draw_layout, mask_outline, subject_colors, subject_maps, subject_masks
from anyms_kernels.reference import region_cross_attention_reference
from anyms_kernels.routing import Routing

from .test_processor import FP32, GRID, assert_close, make_inputs, make_layer, reference_layer, run

pytestmark = pytest.mark.usefixtures("one_thread")

F = 8                                        # the VAE's scale factor: masks are F times the latent
IMAGE_HW = (GRID[0] * F, GRID[1] * F)        # 104 x 168 pixels for the 13 x 21 latent


# ------------------------------------------------------------------------ helpers
def rect_mask(hw, x0, y0, x1, y1):
    """bool [H, W], True on the pixel rectangle [x0, x1) x [y0, y1)."""
    m = np.zeros(hw, bool)
    m[y0:y1, x0:x1] = True
    return m


def rect_box(hw, x0, y0, x1, y1):
    """The normalised box of that pixel rectangle, as a user would write it."""
    H, W = hw
    return (x0 / W, y0 / H, x1 / W, y1 / H)


# Pixel rectangles on the 104 x 168 image: edges on and off the 8-pixel cells of the
# 13 x 21 grid (e.g. 17, 93, 45), overlapping, one touching every border, one of a
# single pixel (it must still cover the one cell it lies in).
RECTS = [(0, 0, 93, 60), (17, 30, 168, 90), (40, 45, 120, 104), (100, 7, 101, 8)]


def l_mask(hw):
    """An L: a vertical bar and a foot, edges off the cell boundaries."""
    H, W = hw
    m = np.zeros(hw, bool)
    m[5:H - 9, 11:37] = True
    m[H - 40:H - 9, 11:W // 2 + 3] = True
    return m


def disc_mask(hw, cy, cx, r):
    ys, xs = np.mgrid[:hw[0], :hw[1]]
    return (ys + 0.5 - cy) ** 2 + (xs + 0.5 - cx) ** 2 <= r * r


def brute_force_cover(mask, grid):
    """bool [h, w] from the rule's words: cell (i, j) is the image rectangle
    [j W/w, (j+1) W/w) x [i H/h, (i+1) H/h); it is covered when some mask pixel's unit
    square [x, x+1) x [y, y+1) meets it (overlaps it in a set of positive area)."""
    H, W = mask.shape
    h, w = grid

    def meets(cells, pixels):                 # [cells, pixels]: does pixel p's span meet cell c's?
        out = np.zeros((cells, pixels), bool)
        for c in range(cells):
            lo, hi = Fraction(c * pixels, cells), Fraction((c + 1) * pixels, cells)
            for p in range(pixels):
                out[c, p] = p < hi and p + 1 > lo
        return out

    rows, cols = meets(h, H).astype(np.int64), meets(w, W).astype(np.int64)
    return (rows @ mask.astype(np.int64) @ cols.T) > 0


def cover_of(masks, grid):
    return torch.from_numpy(np.stack([brute_force_cover(m, grid) for m in masks]))


def reference_with_cover(attn, proc, x, text, images, cover, grid, mode, scales):
    """The layer in float64 from anyms_kernels' reference, given the coverage map [S, h, w]."""
    import torch.nn.functional as tf
    from einops import rearrange

    d = torch.float64
    with torch.no_grad():
        to = lambda m, t: tf.linear(t.to(d), m.weight.to(d), None if m.bias is None else m.bias.to(d))  # noqa: E731
        H = attn.heads
        q = rearrange(to(attn.to_q, x), "b n (h d) -> b h n d", h=H)
        kt = rearrange(to(attn.to_k, text), "b l (h d) -> b h l d", h=H)
        vt = rearrange(to(attn.to_v, text), "b l (h d) -> b h l d", h=H)
        ks = rearrange(to(proc.to_k_ip[0], images), "b s t (h d) -> b h s t d", h=H)
        vs = rearrange(to(proc.to_v_ip[0], images), "b s t (h d) -> b h s t d", h=H)
        B, S = x.shape[0], images.shape[1]
        regions = cover.expand(B, *cover.shape)
        lam = torch.as_tensor(scales, dtype=d).expand(B, S)
        z = region_cross_attention_reference(q, kt, vt, ks, vs, regions, grid, mode=mode, subject_scale=lam)
        return to(attn.to_out[0], rearrange(z, "b h n d -> b n (h d)"))


# ------------------------------------------------------------------------ the rule
@pytest.mark.parametrize("grid", [GRID, (7, 11), (4, 6), (2, 3), (1, 2)])
def test_rectangular_masks_cover_exactly_their_boxes(grid):
    masks = [rect_mask(IMAGE_HW, *r) for r in RECTS]
    boxes = [rect_box(IMAGE_HW, *r) for r in RECTS]
    by_mask = Layout(latent_hw=GRID, masks=masks).coverage(grid)
    by_box = Layout(boxes, GRID).coverage(grid)
    assert torch.equal(by_mask, by_box)
    assert torch.equal(by_mask, cover_of(masks, grid))           # and both follow the rule's words


@pytest.mark.parametrize("grid", [GRID, (7, 11), (4, 6)])
def test_l_and_disc_masks_cover_per_the_rule(grid):
    masks = [l_mask(IMAGE_HW), disc_mask(IMAGE_HW, 50.3, 101.7, 29.0)]
    cover = Layout(latent_hw=GRID, masks=masks).coverage(grid)
    expected = cover_of(masks, grid)
    assert torch.equal(cover, expected)
    # neither region is its bounding box on the finest grid: the masks are routed, not their boxes
    if grid == GRID:
        bbox = Layout([anyms_kernels.mask_bbox(m) for m in masks], GRID).coverage(grid)
        assert (bbox & ~cover).any(dim=(1, 2)).all()


# ------------------------------------------------------------------------ Layout
def test_layout_boxes_come_from_masks_and_a_mixed_list_uses_each_subjects_region():
    L = l_mask(IMAGE_HW)
    box = (0.5, 0.0, 1.0, 0.5)
    layout = Layout([box, None], GRID, masks=[None, L], scales=[1.0, 0.5])
    assert layout.has_masks and layout.image_hw == IMAGE_HW and layout.num_subjects == 2
    assert layout.masks[0] is None and layout.masks[1].dtype == torch.bool
    ys, xs = np.nonzero(L)
    assert layout.boxes.tolist() == [list(box), [xs.min() / 168, ys.min() / 104, (xs.max() + 1) / 168,
                                                 (ys.max() + 1) / 104]]
    cover = layout.coverage(GRID)
    assert torch.equal(cover[0], Layout([box], GRID).coverage(GRID)[0])
    assert torch.equal(cover[1], cover_of([L], GRID)[0])
    # a box given together with a mask is for the pictures only: the mask routes
    both = Layout([box, (0.0, 0.0, 1.0, 1.0)], GRID, masks=[None, L])
    assert torch.equal(both.coverage(GRID), cover) and both.boxes[1].tolist() == [0.0, 0.0, 1.0, 1.0]
    # every mask type: PIL (greyscale, nonzero inside), numpy, torch, a stacked [S, H, W], nested lists
    pil = Image.fromarray(L.astype(np.uint8) * 200)
    for masks in ([pil], [L.astype(np.float32)], [torch.from_numpy(L)], torch.from_numpy(L)[None], [L.tolist()]):
        assert torch.equal(Layout(latent_hw=GRID, masks=masks).coverage(GRID)[0], cover[1])
    # masks at the latent's own size are images of it too (f = 1)
    small = np.zeros(GRID, bool)
    small[2:5, 3:9] = True
    assert Layout(latent_hw=GRID, masks=[small]).image_hw == GRID
    assert "masks=1 at 104x168" in repr(layout)
    with pytest.raises(ValueError, match="has masks.*Layout.routing"):
        layout.token_boxes(GRID[0] * GRID[1], "cpu")


def _bad_layouts():
    good = rect_mask(IMAGE_HW, *RECTS[0])
    nan = good.astype(np.float32)
    nan[3, 3] = np.nan
    return [
        (dict(masks=[good, rect_mask((100, 168), 0, 0, 5, 5)]), ValueError, r"masks\[1\] is 100x168 pixels but masks\[0\] is 104x168"),
        (dict(masks=[rect_mask((100, 168), 0, 0, 5, 5)]), ValueError, r"masks are 100x168 pixels, which is no image of the 13x21 latent"),
        (dict(masks=[rect_mask((168, 104), 0, 0, 5, 5)]), ValueError, r"masks are 168x104 pixels"),          # transposed
        (dict(masks=[rect_mask((104, 84), 0, 0, 5, 5)]), ValueError, r"latent_hw"),                           # two factors
        (dict(masks=[good, np.zeros(IMAGE_HW, bool)]), ValueError, r"masks\[1\] is empty"),
        (dict(masks=[good, nan]), ValueError, r"masks\[1\] holds NaN"),
        (dict(masks=[good.astype(np.complex64)]), TypeError, r"masks\[0\] must hold bools or real numbers"),
        (dict(masks=[np.full(IMAGE_HW, "x")]), TypeError, r"masks\[0\]"),
        (dict(masks=[{"a": 1}]), TypeError, r"masks\[0\] must be a PIL image, a path"),
        (dict(masks=[good[None]]), ValueError, r"masks\[0\] must be a 2-D \[H, W\] mask"),
        (dict(masks=torch.from_numpy(good)), ValueError, r"masks must be \[S, H, W\]"),
        (dict(masks="mask.png"), TypeError, r"masks must be a list"),
        (dict(masks=["/nonexistent/mask.png"]), ValueError, r"masks\[0\]: no mask file"),
        (dict(boxes=[(0, 0, 1, 1)] * 3, masks=[good, None]), ValueError, r"boxes has 3 entries but masks has 2"),
        (dict(boxes=[(0, 0, 1, 1), None], masks=[good, None]), ValueError, r"subject 1 has neither a box"),
        (dict(boxes=[None, (0, 0, 1.5, 1)], masks=[good, None]), ValueError, r"boxes\[1\] must lie inside"),
        (dict(), ValueError, r"needs boxes or masks"),
        (dict(masks=[good], scales=[1.0, 2.0]), ValueError, r"scales must be a float or 1 floats"),
    ]


@pytest.mark.parametrize("kwargs,error,message", _bad_layouts(),
                         ids=lambda v: v if isinstance(v, str) else None)
def test_bad_masks_raise_naming_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        Layout(latent_hw=GRID, **kwargs)


def test_routing_is_built_once_per_grid_and_device_and_kept_by_the_layout():
    a = Layout(latent_hw=GRID, masks=[l_mask(IMAGE_HW)])
    b = Layout(latent_hw=GRID, masks=[l_mask(IMAGE_HW)])
    n = GRID[0] * GRID[1]
    grid, routing = a.routing(n, "cpu")
    assert grid == GRID and isinstance(routing, Routing)
    assert routing.grid == GRID and routing.mode == "overwrite" and routing.num_subjects == 1
    assert a.routing(n, torch.device("cpu"))[1] is routing                 # cached
    assert a.routing(7 * 11, "cpu")[1] is not routing                     # per grid
    assert b.routing(n, "cpu")[1] is not routing                          # per layout, not process-wide
    assert torch.equal(routing.cover.view(1, 1, *GRID), a.coverage(GRID)[None])


def test_routing_first_built_under_inference_mode_serves_later_calls():
    attn, parent = make_layer()
    x, text, images = make_inputs(attn, S=2)
    masks = [l_mask(IMAGE_HW), disc_mask(IMAGE_HW, 60, 90, 30)]
    layout = Layout(latent_hw=GRID, masks=masks, mode="sum")
    proc = AnyMSAttnProcessor.from_ip_adapter_processor(parent, layout)
    attn.set_processor(proc)
    with torch.inference_mode():
        first = attn(x, encoder_hidden_states=(text, [images]))
    _, routing = layout.routing(GRID[0] * GRID[1], "cpu")
    tensors = [routing.cover, routing.order, routing.owner, routing.cover_sorted, *routing.tiles(16)]
    assert not any(t.is_inference() for t in tensors if t is not None)
    assert not any(t.is_inference() for t in (layout.subject_scale("cpu"), layout.coverage(GRID), *layout.masks))
    later = run(attn, proc, x, text, images)                               # no_grad, not inference mode
    assert layout.routing(GRID[0] * GRID[1], "cpu")[1] is routing
    assert torch.equal(later, first.clone())
    fresh = run(attn, AnyMSAttnProcessor.from_ip_adapter_processor(parent, Layout(latent_hw=GRID, masks=masks,
                                                                                   mode="sum")), x, text, images)
    assert torch.equal(later, fresh)


def test_the_processor_hands_the_op_the_layouts_routing(monkeypatch):
    seen = []
    op = anyms_kernels.region_cross_attention

    def spy(*args, **kwargs):
        seen.append((args[5], args[6]))
        return op(*args, **kwargs)

    monkeypatch.setattr(anyms_kernels, "region_cross_attention", spy)
    attn, parent = make_layer()
    x, text, images = make_inputs(attn, S=1)
    layout = Layout(latent_hw=GRID, masks=[l_mask(IMAGE_HW)])
    proc = AnyMSAttnProcessor.from_ip_adapter_processor(parent, layout)
    run(attn, proc, x, text, images)
    run(attn, proc, x, text, images)
    assert len(seen) == 2 and seen[0][0] is seen[1][0] is layout.routing(GRID[0] * GRID[1], "cpu")[1]
    assert seen[0][1] == GRID


# ------------------------------------------------------------------------ processor output
@pytest.mark.parametrize("mode", ["overwrite", "sum"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rectangular_masks_give_the_boxes_output_bit_for_bit(mode, backend):
    if backend == "triton":
        pytest.importorskip("triton")
        if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
            pytest.skip("the Triton kernel needs CUDA or TRITON_INTERPRET=1")
    # The interpreter runs one program per tile and head: one head and one batch row keep it quick.
    heads, batch = (1, 1) if backend == "triton" else (2, 2)
    attn, parent = make_layer(heads=heads, dim_head=32)
    x, text, images = make_inputs(attn, S=len(RECTS), B=batch, seed=4)
    scales = [0.7, 1.0, 1.6, 1.2]
    masks = [rect_mask(IMAGE_HW, *r) for r in RECTS]
    boxes = [rect_box(IMAGE_HW, *r) for r in RECTS]
    layouts = {
        "boxes": Layout(boxes, GRID, scales=scales, mode=mode),
        "masks": Layout(latent_hw=GRID, scales=scales, mode=mode, masks=masks),
        "mixed": Layout([boxes[0], None, boxes[2], None], GRID, scales=scales, mode=mode,
                        masks=[None, masks[1], None, masks[3]]),
    }
    outs = {}
    for name, layout in layouts.items():
        proc = AnyMSAttnProcessor.from_ip_adapter_processor(parent, layout)
        proc.backend = backend
        outs[name] = run(attn, proc, x, text, images)
    assert torch.equal(outs["masks"], outs["boxes"]), f"{backend} {mode}: rectangular masks differ from boxes"
    assert torch.equal(outs["mixed"], outs["boxes"]), f"{backend} {mode}: a mixed list differs from boxes"
    expected = reference_layer(attn, parent, x, text, images, layouts["boxes"], GRID)
    assert_close(outs["masks"], expected, **FP32, what=f"{backend} {mode} vs float64")


@pytest.mark.parametrize("mode", ["overwrite", "sum"])
def test_l_and_disc_masks_route_exactly_per_the_rule(mode):
    """Processor output in float64 equals anyms_kernels' float64 reference fed the brute-force
    coverage; the L and the disc overlap each other and a box, so the modes differ there."""
    attn, parent = make_layer(heads=3, dim_head=40)
    attn.double()
    x, text, images = make_inputs(attn, S=3, dtype=torch.float64, seed=7)
    masks = [l_mask(IMAGE_HW), disc_mask(IMAGE_HW, 50.3, 40.7, 33.0), None]
    box = (0.3, 0.55, 0.8, 1.0)
    scales = [0.8, 1.3, 0.6]
    layout = Layout([None, None, box], GRID, scales=scales, mode=mode, masks=masks)
    actual = run(attn, AnyMSAttnProcessor.from_ip_adapter_processor(parent, layout), x, text, images)
    cover = torch.cat([cover_of(masks[:2], GRID), Layout([box], GRID).coverage(GRID)])
    assert (cover[0] & cover[1]).any() and (cover[1] & cover[2]).any()     # the regions overlap
    expected = reference_with_cover(attn, parent, x, text, images, cover, GRID, mode, layout.scales)  # float32 lambdas
    assert_close(actual, expected, atol=1e-10, rtol=1e-10, what=f"{mode}: masks vs float64 reference")


def test_triton_follows_masks_under_the_interpreter():
    pytest.importorskip("triton")
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("the Triton kernel needs CUDA or TRITON_INTERPRET=1")
    attn, parent = make_layer(heads=1, dim_head=32)
    x, text, images = make_inputs(attn, S=2, B=1, seed=9)
    masks = [l_mask(IMAGE_HW), disc_mask(IMAGE_HW, 50.3, 40.7, 33.0)]
    for mode in ("overwrite", "sum"):
        layout = Layout(latent_hw=GRID, mode=mode, masks=masks)
        proc = AnyMSAttnProcessor.from_ip_adapter_processor(parent, layout)
        proc.backend = "triton"
        actual = run(attn, proc, x, text, images)
        expected = reference_with_cover(attn, parent, x, text, images, cover_of(masks, GRID), GRID, mode, [1, 1])
        assert_close(actual, expected, **FP32, what=f"triton {mode}, masks")


# ------------------------------------------------------------------------ pipeline
STEPS = 2
SIZE = 128                                   # the tiny models' default: latent 16 x 16


def run_pipe(pipe, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "latent")
    return pipe("a cat and a dog", generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_pipeline_rectangular_masks_equal_boxes_bit_for_bit(anyms_and_diffusers, subject_images):
    ours, _ = anyms_and_diffusers()
    a, b = subject_images[:2]
    hw = (SIZE, SIZE)
    r1, r2 = (0, 0, 77, 96), (40, 20, 128, 128)          # overlapping, edges off the 16- and 32-pixel cells
    for mode in ("overwrite", "sum"):
        by_box = run_pipe(ours, subjects=[Subject(a, rect_box(hw, *r1)), Subject(b, rect_box(hw, *r2))],
                          anyms_mode=mode)
        by_mask = run_pipe(ours, subjects=[Subject(a, mask=rect_mask(hw, *r1)),
                                           Subject(b, mask=Image.fromarray(rect_mask(hw, *r2)))], anyms_mode=mode)
        assert torch.equal(by_mask, by_box), mode
        assert ours.anyms_last_plan.layout.has_masks
    mixed = run_pipe(ours, subjects=[Subject(a, rect_box(hw, *r1)), Subject(b, mask=torch.from_numpy(
        rect_mask(hw, *r2)))], anyms_mode="sum")
    assert torch.equal(mixed, by_box)
    # a disc is not its bounding box: the mask acts
    disc = disc_mask(hw, 70.5, 80.5, 40)
    by_disc = run_pipe(ours, subjects=[Subject(a, rect_box(hw, *r1)), Subject(b, mask=disc)], anyms_mode="sum")
    by_bbox = run_pipe(ours, subjects=[Subject(a, rect_box(hw, *r1)), Subject(b, anyms_kernels.mask_bbox(disc))],
                       anyms_mode="sum")
    assert (by_disc - by_bbox).abs().max() > 1e-3


def test_pipeline_takes_the_image_size_from_the_masks(anyms_and_diffusers, subject_images):
    ours, _ = anyms_and_diffusers()
    out = run_pipe(ours, subjects=[Subject(subject_images[0], mask=disc_mask((72, 104), 30, 50, 25))])
    assert out.shape[-2:] == (9, 13)
    plan = ours.anyms_last_plan
    assert plan.layout.image_hw == (72, 104) and plan.layout.latent_hw == (9, 13)
    box = plan.subjects[0].box                                            # derived for the pictures
    assert box == anyms_kernels.mask_bbox(disc_mask((72, 104), 30, 50, 25))
    image = Image.new("RGB", (104, 72), (128, 128, 128))
    assert draw_layout(image, plan.subjects).size == (104, 72)


def test_prepare_subjects_masks_priority_and_checked_subjects(tmp_path, subject_images):
    ring = disc_mask((64, 64), 32, 32, 30) & ~disc_mask((64, 64), 32, 32, 26)   # large bbox, small area
    path = tmp_path / "ring.png"
    Image.fromarray(ring.astype(np.uint8) * 255).save(path)
    subjects = [Subject(subject_images[0], mask=str(path)), Subject(subject_images[1], (0.1, 0.1, 0.6, 0.6))]
    plan = prepare_subjects(subjects, priority="smaller_on_top")
    assert plan.order == [1, 0]                          # the ring's area (~10%) is below the box's (25%)
    assert plan.mask_hw == (64, 64) and plan.image_size(None, None) == (64, 64)
    assert plan.image_size(64, None) == (64, 64)
    assert torch.equal(plan.subjects[1].mask, torch.from_numpy(ring))
    assert plan.subjects[0].mask is None
    with pytest.raises(ValueError, match=r"subjects\[0\]\.mask is 64x64 pixels .* height is 128"):
        plan.image_size(128, 64)
    # checked subjects can be checked again (box and mask both present)
    assert prepare_subjects(plan.subjects).order == [0, 1]


def _bad_pipeline_cases(tmp_path, img, header_only_png):
    Image.new("L", (17000, 8), 255).save(tmp_path / "wide.png")
    header_only_png(tmp_path / "bomb.png", 30000, 30000)
    ok = np.zeros((SIZE, SIZE), bool)
    ok[10:50, 10:50] = True
    nan = ok.astype(np.float64)
    nan[0, 0] = np.nan
    (tmp_path / "text.png").write_text("not an image")
    return [
        (dict(subjects=[Subject(img)]), ValueError, r"subjects\[0\] has neither a box nor a mask"),
        (dict(subjects=[Subject(img, mask=ok)], height=64), ValueError,
         r"subjects\[0\]\.mask is 128x128 pixels .*height is 64"),
        (dict(subjects=[Subject(img, mask=ok), Subject(img, mask=ok[:64])]), ValueError,
         r"subjects\[1\]\.mask is 64x128 pixels but subjects\[0\]\.mask is 128x128"),
        (dict(subjects=[Subject(img, mask=np.ones((100, 100), bool))]), ValueError,
         r"subjects\[0\]\.mask is 100x100 pixels.*multiples of 8"),
        (dict(subjects=[Subject(img, (0, 0, 1, 1)), Subject(img, mask=np.zeros_like(ok))]), ValueError,
         r"subjects\[1\]\.mask is empty"),
        (dict(subjects=[Subject(img, mask=nan)]), ValueError, r"subjects\[0\]\.mask holds NaN"),
        (dict(subjects=[Subject(img, mask=ok.astype(np.complex128))]), TypeError,
         r"subjects\[0\]\.mask must hold bools or real numbers"),
        (dict(subjects=[Subject(img, mask=np.stack([ok, ok], -1))]), ValueError, r"subjects\[0\]\.mask must be a 2-D"),
        (dict(subjects=[Subject(img, mask=42)]), TypeError, r"subjects\[0\]\.mask must be a PIL image"),
        (dict(subjects=[Subject(img, mask=tmp_path / "missing.png")]), ValueError, r"subjects\[0\]\.mask: no mask file"),
        (dict(subjects=[Subject(img, mask=tmp_path / "text.png")]), ValueError, r"subjects\[0\]\.mask: cannot read"),
        (dict(subjects=[Subject(img, (0, 0, 2, 1), mask=ok)]), ValueError, r"subjects\[0\]\.box must lie inside"),
        # a mask sets the image's size: a side above MAX_SIDE is refused, from a file before it is decoded
        (dict(subjects=[Subject(img, mask=np.ones((8, 17000), bool))]), ValueError,
         r"subjects\[0\]\.mask is 8x17000 pixels \(height x width\), above the largest side accepted, 16384"),
        (dict(subjects=[Subject(img, (0, 0, 1, 1)), Subject(img, mask=tmp_path / "wide.png")]), ValueError,
         r"subjects\[1\]\.mask: '.*wide\.png' is 8x17000 pixels \(height x width\), above the largest side"),
        (dict(subjects=[Subject(img, mask=tmp_path / "bomb.png")]), ValueError,
         r"subjects\[0\]\.mask: '.*bomb\.png' is too large to decode \(Image size \(900000000 pixels\)"),
        (dict(subjects=[Subject(tmp_path / "bomb.png", (0, 0, 1, 1))]), ValueError,
         r"subjects\[0\]\.image: '.*bomb\.png' is too large to decode"),
    ]


def test_bad_masks_raise_before_model_work(anyms_and_diffusers, subject_images, tmp_path, header_only_png):
    ours, _ = anyms_and_diffusers()
    calls = []
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "image_encoder"):
        getattr(ours, name).register_forward_pre_hook(lambda m, a, name=name: calls.append(name))
    before = dict(ours.unet.attn_processors)
    for kwargs, error, message in _bad_pipeline_cases(tmp_path, subject_images[0], header_only_png):
        with pytest.raises(error, match=message):
            ours("a cat", num_inference_steps=STEPS, output_type="latent", **kwargs)
        assert calls == [], f"{kwargs}: model work ran before the error: {calls}"
        assert all(ours.unet.attn_processors[k] is before[k] for k in before)


# ------------------------------------------------------------------------ CLI
def _save_mask(path, mask):
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return str(path)


def test_cli_accepts_masks_end_to_end(tiny_sdxl_on_disk, subject_images, tmp_path, capsys):
    model, ip_weight = tiny_sdxl_on_disk
    imgs = []
    for i, img in enumerate(subject_images[:2]):
        imgs.append(str(tmp_path / f"s{i}.png"))
        img.save(imgs[-1])
    hw = (64, 64)
    r0, r1 = (0, 0, 37, 64), (20, 8, 64, 56)
    m0 = _save_mask(tmp_path / "m0.png", rect_mask(hw, *r0))
    m1 = _save_mask(tmp_path / "m1.png", rect_mask(hw, *r1))
    base = ["generate", "--model", model, "--ip-adapter", ip_weight, "--steps", "2", "--device", "cpu",
            "--seed", "3", "a cat and a dog"]

    def pixels(path):
        return np.asarray(Image.open(path).convert("RGB"))

    out_mask = tmp_path / "mask.png"          # no --height/--width: the masks' 64x64
    assert cli.main(base + ["--subject", f"{imgs[0]}:mask={m0}", "--subject", f"{imgs[1]}:mask={m1}:0.7",
                            "--out", str(out_mask)]) == 0
    assert Image.open(out_mask).size == (64, 64)
    assert (tmp_path / "mask.layout.png").is_file() and (tmp_path / "mask.routing.png").is_file()
    out_box = tmp_path / "box.png"
    box0, box1 = ",".join(map(str, rect_box(hw, *r0))), ",".join(map(str, rect_box(hw, *r1)))
    assert cli.main(base + ["--subject", f"{imgs[0]}:{box0}", "--subject", f"{imgs[1]}:{box1}:0.7",
                            "--height", "64", "--width", "64", "--out", str(out_box)]) == 0
    np.testing.assert_array_equal(pixels(out_mask), pixels(out_box))   # rectangular masks = their boxes

    # a layout file with "mask" (paths relative to it), one subject with a box
    disc = _save_mask(tmp_path / "disc.png", disc_mask(hw, 40, 30, 20))
    layout = {"prompt": "a cat and a dog", "subjects": [
        {"image": "s0.png", "box": list(rect_box(hw, *r0)), "label": "cat"},
        {"image": "s1.png", "mask": "disc.png", "scale": 0.7}]}
    (tmp_path / "layout.json").write_text(json.dumps(layout))
    out_file = tmp_path / "file.png"
    assert cli.main(base[:-1] + ["--layout", str(tmp_path / "layout.json"), "--out", str(out_file)]) == 0
    pipe = AnyMSStableDiffusionXLPipeline.from_pretrained(model)
    pipe.load_ip_adapter(os.path.dirname(ip_weight), subfolder="", weight_name=os.path.basename(ip_weight))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat and a dog", subjects=[Subject(imgs[0], rect_box(hw, *r0)),
                                              Subject(imgs[1], scale=0.7, mask=disc)],
                 num_inference_steps=2, generator=torch.Generator().manual_seed(3)).images[0]
    np.testing.assert_array_equal(np.asarray(image), pixels(out_file))
    assert not np.array_equal(pixels(out_file), pixels(out_box))
    capsys.readouterr()


def test_cli_bad_masks_exit_2_before_loading(tmp_path, subject_images, capsys, monkeypatch, header_only_png):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(loading, "_load_pipeline", no_loading)
    img = str(tmp_path / "s.png")
    subject_images[0].save(img)
    good = _save_mask(tmp_path / "good.png", rect_mask((64, 64), 0, 0, 30, 30))
    _save_mask(tmp_path / "empty.png", np.zeros((64, 64), bool))
    _save_mask(tmp_path / "odd.png", np.ones((60, 64), bool))
    (tmp_path / "text.png").write_text("not an image")
    Image.new("L", (17000, 8), 255).save(tmp_path / "wide.png")
    header_only_png(tmp_path / "bomb.png", 30000, 30000)
    (tmp_path / "nomask.json").write_text(json.dumps({"subjects": [{"image": img}]}))
    (tmp_path / "maskint.json").write_text(json.dumps({"subjects": [{"image": img, "mask": 3}]}))
    (tmp_path / "missing.json").write_text(json.dumps({"subjects": [{"image": img, "mask": "nope.png"}]}))
    cases = [
        (["a", "--subject", f"{img}:mask="], r"expected PATH:x0,y0,x1,y1\[:scale\] or PATH:mask=MASK.png"),
        (["a", "--subject", f":mask={good}"], r"expected PATH"),
        (["a", "--subject", f"{img}:mask={tmp_path}/nope.png"], r"subjects\[0\]\.mask: no mask file"),
        (["a", "--subject", f"{img}:mask={tmp_path}/text.png"], r"subjects\[0\]\.mask: cannot read"),
        (["a", "--subject", f"{img}:mask={tmp_path}/empty.png"], r"subjects\[0\]\.mask is empty"),
        (["a", "--subject", f"{img}:mask={good}", "--height", "128"], r"subjects\[0\]\.mask is 64x64 pixels"),
        (["a", "--subject", f"{img}:0,0,1,1", "--subject", f"{img}:mask={tmp_path}/odd.png"],
         r"subjects\[1\]\.mask is 60x64 pixels.*multiples of 8"),
        (["a", "--subject", f"{img}:mask={good}:inf"], r"scale: 'inf' is not a finite number"),
        (["a", "--subject", f"{img}:mask={tmp_path}/wide.png"],
         r"subjects\[0\]\.mask: '.*wide\.png' is 8x17000 pixels \(height x width\), above the largest side"),
        (["a", "--subject", f"{img}:mask={tmp_path}/bomb.png"], r"subjects\[0\]\.mask: '.*bomb\.png' is too large"),
        (["a", "--subject", f"{tmp_path}/bomb.png:0,0,1,1"], r"subjects\[0\]\.image: '.*bomb\.png' is too large"),
        (["a", "--layout", str(tmp_path / "nomask.json")], r"subjects\[0\]: missing \"box\" or \"mask\""),
        (["a", "--layout", str(tmp_path / "maskint.json")], r"subjects\[0\]\.mask must be a path string"),
        (["a", "--layout", str(tmp_path / "missing.json")], r"subjects\[0\]\.mask: no mask file"),
    ]
    for argv, message in cases:
        assert cli.main(["generate", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("anyms generate: error: ") and "Traceback" not in err, err
        assert err.count("\n") == 1, err
        assert re.search(message, err), (argv, err)


def test_parse_subject_with_masks():
    s = cli.parse_subject(r"C:\pics\dog.png:mask=C:\pics\dog_mask.png:0.8")
    assert s.image == r"C:\pics\dog.png" and s.mask == r"C:\pics\dog_mask.png" and s.scale == 0.8 and s.box is None
    s = cli.parse_subject("dog.png:mask=m.png")
    assert (s.image, s.mask, s.scale, s.box) == ("dog.png", "m.png", 1.0, None)
    s = cli.parse_subject("a:b.png:0,0,1,1:0.5")                           # boxes as before
    assert s.image == "a:b.png" and s.box == (0.0, 0.0, 1.0, 1.0) and s.mask is None


# ------------------------------------------------------------------------ pictures
def test_draw_layout_outlines_masks(tmp_path):
    hw = (120, 200)
    base = Image.new("RGB", (hw[1], hw[0]), (128, 128, 128))
    thumb = Image.new("RGB", (12, 12), (255, 255, 0))
    L = l_mask(hw)
    disc = disc_mask(hw, 60, 140, 40)
    box = (0.55, 0.0, 0.75, 0.15)                                         # x 110..150, y 0..18: meets no mask
    subjects = [Subject(thumb, label="L", mask=L), Subject(thumb, box, label="box"),
                Subject(thumb, label="disc", mask=Image.fromarray(disc))]
    out = draw_layout(base, subjects, line_width=2)
    out.save(tmp_path / "layout_masks.png")
    arr = np.asarray(out)
    colors = subject_colors(3)
    # where thumbnails and labels may go: the top-left corner of each bounding box; and the box itself
    zones = rect_mask(hw, 110, 0, 150, 18)
    for mask in (L, disc, zones.copy()):
        ys, xs = np.nonzero(mask)
        zones[ys.min():ys.min() + 40, xs.min():xs.min() + 60] = True
    for s, mask in ((0, L), (2, disc)):
        band = np.asarray(mask_outline(mask, (hw[1], hw[0]), 2)) > 0
        assert band.any() and not (band & ~mask).any()                    # the outline lies inside the mask
        assert (band & ~np.roll(mask, 3, axis=1)).any()                   # and follows its edge, not its box
        painted = (arr == colors[s]).all(-1)
        assert painted[band & ~zones].all()                               # drawn in the subject's colour
        assert (arr[mask & ~band & ~zones] == 128).all()                  # the inside is left alone
    assert (arr[~(L | disc) & ~zones] == 128).all()                       # nothing outside the regions
    assert base.getpixel((0, 0)) == (128, 128, 128)
    with pytest.raises(ValueError, match=r"subjects\[0\]\.mask is empty"):
        draw_layout(base, [Subject(thumb, mask=np.zeros(hw, bool))])
    with pytest.raises(ValueError, match=r"subjects\[0\] has neither a box nor a mask"):
        draw_layout(base, [Subject(thumb)])


@pytest.mark.parametrize("mode", ["overwrite", "sum"])
def test_subject_masks_and_maps_with_masks(mode):
    masks = [l_mask(IMAGE_HW), None, disc_mask(IMAGE_HW, 50.3, 40.7, 33.0)]
    box = (0.3, 0.55, 0.8, 1.0)
    layout = Layout([None, box, None], GRID, scales=[1.0, 0.5, 2.0], mode=mode, masks=masks)
    for grid in (GRID, (7, 11)):
        cover = np.stack([brute_force_cover(masks[0], grid), Layout([box], GRID).coverage(grid)[0].numpy(),
                          brute_force_cover(masks[2], grid)])
        if mode == "overwrite":
            acted = np.zeros_like(cover)
            for r, c in zip(*np.nonzero(cover.any(0))):
                acted[max(s for s in range(3) if cover[s, r, c]), r, c] = True
        else:
            acted = cover
        expected = acted * np.array([1.0, 0.5, 2.0], np.float32)[:, None, None]
        np.testing.assert_array_equal(subject_masks(layout, grid).numpy(), expected)
    im = subject_maps(layout, {GRID: 2, (7, 11): 4}, labels=["L", "box", "disc"])
    assert im.mode == "RGB" and im.width > im.height > 100


def test_load_mask_forms(tmp_path):
    m = l_mask((40, 48))
    path = _save_mask(tmp_path / "m.png", m)
    for form in (m, m.astype(np.uint8) * 3, torch.from_numpy(m).float(), Image.fromarray(m), path,
                 tmp_path / "m.png", Image.fromarray(m.astype(np.uint8) * 255).convert("RGB")):
        got = load_mask(form, "mask")
        assert got.dtype == torch.bool and got.device.type == "cpu" and torch.equal(got, torch.from_numpy(m))


def test_image_files_are_checked_in_their_header_before_decoding(tmp_path, subject_images, header_only_png):
    """Header-only PNGs hold no pixel data: decoding one fails as a truncated file, so a refusal
    that names the size proves the size was checked before decoding."""
    from anyms.pipeline import _load_image

    wide = header_only_png(tmp_path / "wide.png", 17000, 8)
    tall = header_only_png(tmp_path / "tall.png", 8, 16392)
    bomb = header_only_png(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(ValueError, match=r"^m: '.*wide\.png' is 8x17000 pixels \(height x width\), above the largest"):
        load_mask(wide, "m")
    with pytest.raises(ValueError, match=r"^masks\[0\]: '.*tall\.png' is 16392x8 pixels"):
        Layout(latent_hw=GRID, masks=[tall])
    for load in (load_mask, _load_image):
        with pytest.raises(ValueError, match=r"^x: '.*bomb\.png' is too large to decode \(Image size \(900000000"):
            load(bomb, "x")
    # at the largest side the header passes, and the missing pixel data is what fails
    with pytest.raises(ValueError, match=r"^m: cannot read '.*edge\.png' as an image"):
        load_mask(header_only_png(tmp_path / "edge.png", 16384, 8), "m")
    assert load_mask(np.ones((8, 16384), bool)).shape == (8, 16384)
