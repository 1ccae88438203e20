"""anyms.visualize: the per-subject maps follow METHOD.md's rules, checked by brute force."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from anyms import Subject
from anyms.layout import Layout
from anyms.visualize import cross_attention_grids, draw_layout, subject_maps, subject_masks

BOXES = [[0.0, 0.0, 0.6, 0.6], [0.4, 0.3, 1.0, 0.9], [0.2, 0.5, 0.21, 0.52], [0.0, 0.9, 1.0, 1.0]]
SCALES = [1.0, 0.5, 2.0, 0.75]


def brute_force_acted(boxes, grid, mode):
    """[S, h, w] bool, token by token, from METHOD.md's formulas (no anyms_kernels code)."""
    h, w = grid
    covers = np.zeros((len(boxes), h, w), bool)
    for s, (x0, y0, x1, y1) in enumerate(boxes):
        r0, c0 = math.floor(y0 * h), math.floor(x0 * w)
        r1, c1 = min(h, max(r0 + 1, math.ceil(y1 * h))), min(w, max(c0 + 1, math.ceil(x1 * w)))
        covers[s, r0:r1, c0:c1] = True
    if mode == "sum":
        return covers
    acted = np.zeros_like(covers)
    for r in range(h):
        for c in range(w):
            owners = [s for s in range(len(boxes)) if covers[s, r, c]]
            if owners:
                acted[owners[-1], r, c] = True      # the last (highest-priority) box wins
    return acted


@pytest.mark.parametrize("mode", ["overwrite", "sum"])
@pytest.mark.parametrize("grid", [(13, 21), (7, 11), (1, 1), (64, 64)])
def test_subject_masks_follow_the_method(mode, grid):
    layout = Layout(BOXES, (26, 42), scales=SCALES, mode=mode)
    masks = subject_masks(layout, grid)
    expected = brute_force_acted(BOXES, grid, mode) * np.array(SCALES, np.float32)[:, None, None]
    np.testing.assert_array_equal(masks.numpy(), expected)
    if mode == "overwrite":
        assert ((masks != 0).sum(0) <= 1).all()   # one subject per token at most


def test_cross_attention_grids_are_the_grids_the_unet_runs(anyms_and_diffusers, subject_images, one_thread):
    ours, _ = anyms_and_diffusers()
    seen = {}

    def record(module, args, kwargs):
        n = args[0].shape[1]
        seen[n] = seen.get(n, 0) + 1

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True)
             for name, m in ours.unet.named_modules() if name.endswith("attn2")]
    ours("a cat", subjects=[Subject(subject_images[0], (0, 0, 1, 1))], height=72, width=104,
         num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    for h in hooks:
        h.remove()
    grids = cross_attention_grids(ours.unet, (9, 13))
    assert grids == {(5, 7): 3, (3, 4): 8}
    assert {gh * gw: count for (gh, gw), count in grids.items()} == seen


def test_draw_layout_draws_in_each_box_and_leaves_the_input_alone():
    base = Image.new("RGB", (200, 120), (128, 128, 128))
    thumb = Image.new("RGB", (30, 30), (255, 255, 0))
    subjects = [Subject(thumb, (0.0, 0.0, 0.5, 0.5), label="a"), Subject(thumb, (0.5, 0.5, 1.0, 1.0), 0.5)]
    out = draw_layout(base, subjects)
    assert out.size == base.size and base.getpixel((0, 0)) == (128, 128, 128)
    arr = np.asarray(out)
    for x0, y0, x1, y1 in ((0, 0, 100, 60), (100, 60, 200, 120)):
        assert (arr[y0:y1, x0:x1] != 128).any(axis=-1).mean() > 0.05   # outline, thumbnail, label
    assert (arr[70:110, 10:90] == 128).all()                            # nothing outside the boxes
    with pytest.raises(ValueError, match="inside \\[0, 1\\]"):
        draw_layout(base, [Subject(thumb, (0.0, 0.0, 1.5, 1.0))])
    with pytest.raises(TypeError, match="PIL image"):
        draw_layout(np.asarray(base), subjects)


def test_subject_maps_renders_and_checks_its_arguments():
    layout = Layout(BOXES, (13, 21), scales=SCALES)
    im = subject_maps(layout, {(13, 21): 2, (7, 11): 6}, labels=list("abcd"),
                      image=Image.new("RGB", (168, 104), (10, 200, 30)))
    assert im.mode == "RGB" and im.width > im.height > 100
    with pytest.raises(ValueError, match="grids is empty"):
        subject_maps(layout, [])
    with pytest.raises(ValueError, match="labels has 1 entries for 4 subjects"):
        subject_maps(layout, [(13, 21)], labels=["a"])


def test_a_box_under_a_pixel_wide_is_drawn():
    from PIL import Image

    import anyms

    image = Image.new("RGB", (64, 64), (128, 128, 128))
    subject = anyms.Subject(Image.new("RGB", (8, 8), (255, 0, 0)), box=(0.5, 0.5, 0.505, 0.503))
    picture = anyms.draw_layout(image, [subject])
    assert picture.size == image.size and picture.tobytes() != image.tobytes()


@pytest.mark.parametrize("mode", ["overwrite", "sum"])
@pytest.mark.parametrize("num,latent_hw", [(1, (16, 16)), (2, (16, 16)), (1, (32, 8)), (2, (8, 32)), (9, (16, 16))],
                         ids=["1", "2", "1-tall", "2-wide", "9"])
def test_the_routing_title_fits_the_picture_and_keeps_every_word(num, latent_hw, mode):
    """The title is wrapped to the figure's width: with one or two subjects it used to be clipped."""
    from anyms.visualize import routing_figure

    boxes = [[0.1 * (s % 5), 0.1 * (s // 5), 0.1 * (s % 5) + 0.5, 0.1 * (s // 5) + 0.5] for s in range(num)]
    layout = Layout(boxes, latent_hw, mode=mode)
    fig = routing_figure(layout, [latent_hw, (latent_hw[0] // 2, latent_hw[1] // 2)])
    title = fig._suptitle
    box = title.get_window_extent(fig.canvas.get_renderer())
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width, (box, fig.bbox.width)
    assert 0 <= box.y0 and box.y1 <= fig.bbox.height, (box, fig.bbox.height)
    rule = "later subjects on top" if mode == "overwrite" else "overlapping subjects add up"
    assert " ".join(title.get_text().split()) == (f"routing: where each subject's image branch acts, from the "
                                                  f"layout ({mode} mode: {rule}); not measured attention")
    # the picture is what subject_maps returns
    picture = subject_maps(layout, [latent_hw])
    assert picture.mode == "RGB" and picture.width > 0


# ------------------------------------------------------------------ what acts: blocks and windows
FULL = [0.0, 0.0, 1.0, 1.0]
DOWN1 = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"       # the tiny SDXL U-Net's 4x4 layers
UP1 = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
MID = "mid_block.attentions.0.transformer_blocks.0.attn2"              # ... and one of its 2x2 ones
TINY_LAYERS = {(4, 4): [DOWN1, UP1], (2, 2): [MID]}


def _panels(fig, cols):
    """Per row of an overwrite-mode routing figure of ``cols - 1`` subjects: (row title, composite
    image, [subject images], [subject titles])."""
    axes = fig.axes
    rows = []
    for i in range(0, len(axes), cols):
        arrays = [np.asarray(ax.get_images()[-1].get_array()) for ax in axes[i:i + cols]]
        rows.append((axes[i].get_title(), arrays[0], arrays[1:], [ax.get_title() for ax in axes[i + 1:i + cols]]))
    return rows


def test_the_picture_shows_a_subject_only_at_the_layers_its_blocks_select():
    """The subject on top selects one block of the 4x4 level: there it owns every token at that
    block's layer, and elsewhere (the 4x4 level's other layer, the 2x2 level) the subject under it
    does, as the routing of those layers has it."""
    from anyms.visualize import routing_figure, routing_rows

    layout = Layout([FULL, FULL], (8, 8), blocks=[None, ["down_blocks.1"]])
    rows = routing_rows(layout, TINY_LAYERS)
    assert [(r.grid, r.layers, r.grid_layers, r.acts) for r in rows] == [
        ((4, 4), 1, 2, (True, True)), ((4, 4), 1, 2, (True, False)), ((2, 2), 1, 1, (True, False))]
    for row, owner in zip(rows, (1, 0, 0)):
        assert row.together[owner].all() and not row.together[1 - owner].any()
        assert row.masks[owner].all() and not row.masks[1 - owner].any()
    assert rows[2].why_not == ("", "its blocks leave these layers out")
    fig = routing_figure(layout, TINY_LAYERS, labels=["under", "top"])
    panels = _panels(fig, 3)
    assert [p[0].split("\n")[0] for p in panels] == ["4x4 (1 of 2 layers)", "4x4 (1 of 2 layers)", "2x2 (1 layer)"]
    for (_, composite, subjects, titles), owner in zip(panels, (2, 1, 1)):    # owner: subject index + 1
        assert (composite == owner).all()
        assert subjects[owner - 1].all() and not subjects[2 - owner].any()
    assert panels[2][3][1] == "top: acts not here\n(its blocks leave these layers out)"
    # layer counts cannot say which layers a subject's blocks select: refused, not drawn as if all
    with pytest.raises(ValueError, match=r"grids: this layout's subjects select blocks"):
        routing_rows(layout, {(4, 4): 2, (2, 2): 1})


def test_the_picture_shows_a_subject_whose_window_holds_no_step_as_inactive():
    from anyms.visualize import routing_figure, routing_rows

    layout = Layout([FULL, [0.0, 0.0, 0.5, 1.0]], (8, 8), windows=[(0.0, 1.0), (0.0, 0.0)])
    layout.set_step(3, 4)                     # as a 4-step call leaves it
    fig = routing_figure(layout, {(4, 4): 2}, labels=["under", "never"])
    (title, composite, subjects, titles), = _panels(fig, 3)
    assert (composite == 1).all() and subjects[0].all() and not subjects[1].any()
    assert titles[1] == "never: acts not here\n(its window [0, 0) holds none of the 4 steps)"
    # a subject active in half the steps: its panel is where it acts then; the one under it gets
    # its tokens in the other half, and the composite is marked as the moment when both act
    layout = Layout([FULL, [0.0, 0.0, 0.5, 1.0]], (8, 8), windows=[(0.0, 1.0), (0.0, 0.5)])
    titles = [t for _, _, _, t in _panels(routing_figure(layout, [(4, 4)], labels=["under", "half"], num_steps=4), 3)]
    assert titles == [["under x1\n100% of tokens at some step", "half x1\n50% of tokens at some step"]]
    row, = routing_rows(layout, [(4, 4)], num_steps=4)
    assert row.acts == (True, True) and row.varies
    assert row.masks[0].all() and row.masks[1][:, :2].all() and not row.masks[1][:, 2:].any()
    assert row.together[0][:, 2:].all() and not row.together[0][:, :2].any()
    with pytest.raises(ValueError, match="num_steps: this layout has windows"):
        routing_rows(layout, [(4, 4)])


def test_a_subject_of_scale_zero_leaves_its_tokens_to_the_one_under_it():
    layout = Layout([FULL, FULL], (8, 8), scales=[1.0, 0.0])
    masks = subject_masks(layout, (4, 4))
    assert (masks[0] == 1).all() and (masks[1] == 0).all()


def test_a_subject_acts_where_its_image_or_its_prompt_does():
    """A subject's prompt acts at every layer, at weight 1, within its window, whatever its scale,
    schedule and blocks (which weigh its image only): the routing rows, the idle reasons and the
    warnings count the subject as acting wherever either branch does."""
    from anyms.preflight import idle_subjects, unreached_message, unreached_subjects
    from anyms.visualize import idle_reasons, routing_rows

    left, right = [0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]
    # image and prompt at scale 0: the prompt acts (weight 1 in its region), the image does not
    both0 = Layout([left, right], (8, 8), scales=[0.0, 1.0], kinds=["both", "image"])
    assert idle_reasons(both0) == ("", "")
    (row,) = routing_rows(both0, [(8, 8)])
    assert row.acts == (True, True) and row.why_not == ("", "")
    region = both0.coverage((8, 8))[0]
    assert row.masks[0][region].eq(1.0).all() and not row.masks[0][~region].any()
    assert row.together[0].equal(region)
    assert idle_subjects(both0, [(8, 8)]) == [] and unreached_subjects(both0, [(8, 8)]) == []
    # an image alone at scale 0 still never acts
    image0 = Layout([left, right], (8, 8), scales=[0.0, 1.0], kinds=["image", "image"])
    assert idle_reasons(image0) == ("its scale is 0", "")
    assert idle_subjects(image0, [(8, 8)]) == [(0, "its scale is 0")]
    # blocks weigh the image only: image and prompt at a block's layers, the prompt alone elsewhere
    both_blocks = Layout([left], (8, 8), kinds=["both"], blocks=[["down_blocks.1"]])
    rows = routing_rows(both_blocks, TINY_LAYERS)
    assert [r.acts for r in rows] == [(True,)] * len(rows) and all(r.why_not == ("",) for r in rows)
    assert all(r.masks[0][both_blocks.coverage(r.grid)[0]].eq(1.0).all() for r in rows)
    # a prompt-only subject under blocks (the call's): it acts at every layer; the image subject not
    prompt_blocks = Layout([left, right], (8, 8), kinds=["image", "prompt"],
                           blocks=[["down_blocks.1"], ["down_blocks.1"]])
    rows = routing_rows(prompt_blocks, TINY_LAYERS)
    assert [r.acts for r in rows] == [(True, True), (False, True), (False, True)]
    assert rows[2].why_not == ("its blocks leave these layers out", "")
    assert idle_subjects(prompt_blocks, TINY_LAYERS) == []
    # a window that holds no step silences both branches
    shut = Layout([left], (8, 8), scales=[0.0], kinds=["both"], windows=[(0.0, 0.0)])
    assert idle_reasons(shut, 4) == ("its window [0, 0) holds none of the 4 steps",)


def test_the_unreached_warning_names_the_branches_of_the_subject_s_kind():
    from anyms.preflight import unreached_message, unreached_subjects

    layout = Layout([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]], (16, 16),
                    kinds=["prompt", "image", "prompt"])
    unreached = unreached_subjects(layout, {(16, 16): 1, (8, 8): 1})
    assert [s for s, _, _ in unreached] == [0, 0]
    (line,) = unreached_message(unreached, ["small text", "big image", "big text"], kinds=layout.kinds)
    assert "its prompt does not act at those levels" in line and "image" not in line, line
    both = unreached_message([(0, (8, 8), 1)], ["x"], kinds=["both"])
    assert "its image and its prompt do not act at that level" in both[0], both
    assert "its image does not act at that level" in unreached_message([(0, (8, 8), 1)], ["x"])[0]
