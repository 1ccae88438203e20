"""Pictures of a layout: the regions over the output, and where each subject acted.

- :func:`draw_layout` draws the subjects' regions (box outlines, or mask outlines for
  masked subjects), thumbnails and labels over an image.
- :func:`subject_masks` says, for one layer grid, where each subject's branch acted;
  it reads the layout's coverage (:meth:`anyms.Layout.coverage`, the same map the
  layout's routing is built from, with :func:`anyms_kernels.rasterize_boxes` and
  :func:`anyms_kernels.rasterize_masks`) and applies the mode's rule, so the pictures
  cannot drift from the attention that ran.
- :func:`cross_attention_grids` lists the grids a U-Net's cross-attention layers see
  (:func:`cross_attention_layers`: the layers' names by grid).
- :func:`routing_rows` says, per grid and per set of layers where the same subjects act
  (a subject's ``blocks`` select layers; its window may hold no step), where each acts.
- :func:`subject_maps` renders the masks of every grid as one PNG-ready figure: the
  routing (which branch acts where, read from the layout), not measured attention.

No diffusers import here: the U-Net is only read through its ``attn_processors``
names, and the subjects through their ``image``/``box``/``mask``/``scale``/``label`` fields.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from anyms_kernels.regions import Grid, check_grid, mask_bbox, rasterize_boxes

from .layout import load_mask
from .timing import step_acts

__all__ = ["draw_layout", "mask_outline", "subject_masks", "cross_attention_grids", "cross_attention_layers",
           "subject_maps", "routing_figure", "routing_rows", "RoutingRow", "idle_reasons", "subject_colors"]


def subject_colors(num: int) -> List[Tuple[int, int, int]]:
    """``num`` well-separated RGB colours (golden-ratio hues), the same in every picture."""
    colors = []
    for i in range(num):
        r, g, b = colorsys.hsv_to_rgb((0.02 + i * 0.618034) % 1.0, 0.85, 0.95)
        colors.append((int(r * 255), int(g * 255), int(b * 255)))
    return colors


def _label(subject, index: int) -> str:
    label = getattr(subject, "label", None) or getattr(subject, "prompt", None)     # a text-only region: its prompt
    return str(label) if label else f"subject {index}"


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        return ImageFont.load_default()


def draw_layout(image, subjects: Sequence, *, thumbnails: bool = True, line_width: Optional[int] = None,
                labels: Optional[Sequence[str]] = None) -> Image.Image:
    """Draw each subject's region, a thumbnail of its image and its label over ``image``.

    A subject with a mask gets its mask's outline (the boundary pixels of the mask,
    drawn inside it, ``line_width`` thick); a subject with a box only, the box's
    outline. The thumbnail and label go in the top-left corner of the box (for a
    masked subject without a box, its mask's bounding box).

    Args:
        image: the generated image (PIL image).
        subjects: :class:`anyms.Subject` objects (anything with ``box``, ``image``,
            ``scale``, ``label`` and optionally ``mask``), in ascending priority: they
            are drawn in that order, so where regions overlap the one on top in the
            picture is the one on top in the attention (pass them in the order the
            pipeline used, e.g. ``pipe.anyms_last_plan.subjects``).
        thumbnails: paste a small copy of each subject image in its box's corner.
        line_width: outline width in pixels (default: 1/200 of the short side, >= 2).
        labels: override the labels (default: ``subject.label`` or ``"subject i"``).

    Returns:
        a new RGB image of ``image``'s size; ``image`` is left untouched. A mask of
        another size than ``image`` is scaled to it (nearest neighbour) for the picture.

    Raises:
        TypeError: ``image`` is not a PIL image; a mask of an unsupported type.
        ValueError: a box is outside ``[0, 1]`` or inverted; a subject with neither box
            nor mask; an empty or NaN mask; ``labels`` has the wrong length.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
    if labels is not None and len(labels) != len(subjects):
        raise ValueError(f"labels has {len(labels)} entries for {len(subjects)} subjects")
    out = image.convert("RGB")
    W, H = out.size
    lw = line_width or max(2, min(W, H) // 200)
    font = _font(max(10, min(W, H) // 40))
    colors = subject_colors(len(subjects))
    masks, box_list = [], []
    for i, subject in enumerate(subjects):
        # Same checks as the pipeline's, so an overlay never shows a region the pipeline refused.
        raw = getattr(subject, "mask", None)
        mask = None if raw is None else load_mask(raw, f"subjects[{i}].mask")
        box = getattr(subject, "box", None)
        if box is None:
            if mask is None:
                raise ValueError(f"subjects[{i}] has neither a box nor a mask")
            box = mask_bbox(mask)
        masks.append(mask)
        box_list.append(list(box))
    boxes = torch.as_tensor(box_list, dtype=torch.float64).reshape(-1, 4)
    if boxes.numel():
        rasterize_boxes(boxes, (1, 1))
    draw = ImageDraw.Draw(out)
    for i, (subject, box, mask) in enumerate(zip(subjects, boxes.tolist(), masks)):
        color = colors[i]
        x0, y0, x1, y1 = box[0] * W, box[1] * H, box[2] * W, box[3] * H
        if mask is None:
            # a box under a pixel wide is still drawn, one pixel wide (x1 - 1 < x0 would be an error)
            draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=color, width=lw)
        else:
            out.paste(color, (0, 0), mask_outline(mask, (W, H), lw))
        tx, ty = int(x0) + lw, int(y0) + lw
        if thumbnails and getattr(subject, "image", None) is not None:
            thumb = subject.load_image() if hasattr(subject, "load_image") else subject.image
            side = int(max(16, min(x1 - x0, y1 - y0) * 0.3))
            thumb = thumb.convert("RGB")
            thumb.thumbnail((side, side))
            out.paste(thumb, (tx, ty))
            draw.rectangle([tx - 1, ty - 1, tx + thumb.width, ty + thumb.height], outline=color, width=1)
            ty += thumb.height + lw
        text = labels[i] if labels is not None else _label(subject, i)
        scale = float(getattr(subject, "scale", 1.0))
        if scale != 1.0:
            text += f" x{scale:g}"
        left, top, right, bottom = draw.textbbox((tx, ty), text, font=font)
        draw.rectangle([left - 2, top - 2, right + 2, bottom + 2], fill=color)
        draw.text((tx, ty), text, fill=(0, 0, 0), font=font)
    return out


def mask_outline(mask, size: Tuple[int, int], width: int) -> Image.Image:
    """The outline of a mask as a PIL ``"L"`` image of ``size = (W, H)``: 255 on the mask's
    pixels within ``width`` pixels of its boundary (inside the mask), 0 elsewhere.

    ``mask`` is anything :func:`anyms.layout.load_mask` takes; it is scaled to ``size``
    with nearest neighbour first if its size differs. Pixels on the image's border count
    as boundary, so a mask touching the border is closed there.
    """
    m = load_mask(mask, "mask")
    im = Image.fromarray(m.numpy().astype(np.uint8) * 255)
    if im.size != tuple(size):
        im = im.resize(tuple(size), Image.NEAREST)
    width = max(1, int(width))
    # Erode by `width` pixels (outside the image counts as outside the mask) and keep the difference.
    padded = Image.new("L", (im.width + 2 * width, im.height + 2 * width), 0)
    padded.paste(im, (width, width))
    inner = padded.filter(ImageFilter.MinFilter(2 * width + 1)).crop(
        (width, width, width + im.width, width + im.height))
    band = (np.asarray(im) > 0) & (np.asarray(inner) == 0)
    return Image.fromarray(band.astype(np.uint8) * 255)


def subject_masks(layout, grid: Grid, active: Optional[Sequence[bool]] = None,
                  prompt_active: Optional[Sequence[bool]] = None) -> torch.Tensor:
    """Where each subject's branch acted on one layer grid, weighted by its scale.

    Args:
        layout: an :class:`anyms.Layout` (regions in ascending priority, scales, mode).
        grid: ``(h, w)`` of a cross-attention layer.
        active: one bool per subject, the subjects whose image branch acts (default: those
            whose scale is not 0). An inactive branch covers no token, as in the layout's
            routing (:meth:`anyms.Layout.active_coverage`): in ``overwrite`` mode the branch
            of its kind under it takes its tokens.
        prompt_active: one bool per subject, the subjects whose regional prompt acts (default:
            ``active`` where it is given, else every subject: a prompt acts whatever the scale).

    Returns:
        float32 ``[S, h, w]``: ``lambda_s`` where subject ``s``'s image attention was
        added, 1 where only its regional prompt acted (it replaced the prompt's text), 0
        elsewhere. A subject's region covers the tokens whose cells its box or mask meets
        (:meth:`anyms.Layout.coverage`). ``overwrite``: the tokens whose last covering active
        region of the same kind (images among images, prompts among prompts, as the routing
        ranks them) is ``s``'s; ``sum``: every token of ``s``'s region, overlaps included.
    """
    h, w = check_grid(grid)
    num = layout.num_subjects
    if num == 0:
        return torch.zeros(0, h, w)
    if prompt_active is None:
        prompt_active = (True,) * num if active is None else active
    if active is None:
        active = tuple(bool(v) for v in (layout.scales != 0).tolist())
    image, prompt = _branch_masks(layout, (h, w), active, prompt_active)
    return _branch_values(layout, image, prompt)


def _branch_values(layout, image: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """float32 ``[S, h, w]`` from where each subject's image and prompt branches act (bool
    ``[S, h, w]`` each): its scale where its image does, 1 where only its prompt does."""
    num = layout.num_subjects
    values = image.to(torch.float32) * layout.scales.reshape(num, 1, 1)
    return torch.where(prompt & ~image, torch.ones(()), values)


def _branch_masks(layout, grid: Grid, image_active: Sequence[bool], prompt_active: Sequence[bool]):
    """bool ``[S, h, w]`` twice: where each subject's image branch, and its prompt branch, takes
    tokens when the branches of ``image_active`` / ``prompt_active`` act (one bool per subject)."""
    num = layout.num_subjects
    if len(image_active) != num or len(prompt_active) != num:
        raise ValueError(f"active must hold {num} bools (one per subject), got {len(image_active)} and "
                         f"{len(prompt_active)}")
    with torch.inference_mode(False), torch.no_grad():
        cover = layout.coverage(grid).clone()
    kinds = getattr(layout, "kinds", ("image",) * num)

    def acting(members):
        acted = cover & torch.tensor(members, dtype=torch.bool).reshape(num, 1, 1)
        if layout.mode == "overwrite":
            # The last covering subject of the kind owns the token, as the routing ranks them.
            rank = torch.arange(1, num + 1).reshape(num, 1, 1)
            owner = (acted * rank).amax(0) - 1
            acted = owner[None] == torch.arange(num).reshape(num, 1, 1)
        return acted

    image = acting([k != "prompt" and bool(a) for k, a in zip(kinds, image_active)])
    prompt = acting([k != "image" and bool(a) for k, a in zip(kinds, prompt_active)])
    return image, prompt


@dataclass(frozen=True)
class RoutingRow:
    """The layers of one grid at which the same subjects act (one row of the routing picture).

    ``layers``: how many layers of ``grid`` these are (None: not known), of ``grid_layers``.
    ``acts[s]``: subject ``s`` acts at these layers at some step: its image (its blocks select
    them, its scale is not 0 and its window holds a step) or its regional prompt (at every
    layer, whenever its window holds a step). ``masks``: float32 ``[S, h, w]``, ``lambda_s``
    where ``s``'s image branch acts at some step, 1 where only its prompt does (with windows:
    the union over the steps, each step routed with the branches active then). ``together``: bool ``[S, h, w]``, where each acts
    when every subject of ``acts`` does (the composite panel; ``varies``: some subject of
    ``acts`` sits out some steps, so that moment may not occur). ``why_not[s]``: why a subject
    that does not act here does not (``""`` for one that acts).
    """

    grid: Grid
    layers: Optional[int]
    grid_layers: Optional[int]
    acts: Tuple[bool, ...]
    masks: torch.Tensor
    together: torch.Tensor
    varies: bool
    why_not: Tuple[str, ...]


def idle_reasons(layout, num_steps: Optional[int] = None) -> Tuple[str, ...]:
    """Per subject, why it acts at no step at all (``""`` where it acts at some step): its image
    at a scale of 0 (and no prompt), or a window that holds none of the ``num_steps`` steps
    (:mod:`anyms.timing`). A regional prompt acts at every step of its window, whatever the scale."""
    states = _step_states(layout, num_steps)
    kinds = getattr(layout, "kinds", ("image",) * layout.num_subjects)
    out = []
    for s in range(layout.num_subjects):
        start, end = layout.windows[s]
        if kinds[s] == "image" and float(layout.scales[s]) == 0:
            out.append("its scale is 0")
        elif not any(image[s] or prompt[s] for image, prompt in states):
            out.append(f"its window [{start:g}, {end:g}) holds none of the {_num_steps(layout, num_steps)} steps")
        else:
            out.append("")
    return tuple(out)


def _num_steps(layout, num_steps: Optional[int]) -> int:
    if num_steps is not None:
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        return num_steps
    if layout.step is not None:             # a layout a call ran: its loop's length
        return layout.step[1]
    raise ValueError("num_steps: this layout has windows or schedules, so where a subject acts depends on the "
                     "number of denoising steps: give num_steps (a layout a pipeline ran knows it)")


def _step_states(layout, num_steps: Optional[int] = None) -> List[Tuple[Tuple[bool, ...], Tuple[bool, ...]]]:
    """The distinct ``(image, prompt)`` states over the steps: per subject, whether its image branch
    acts (its scale and timing weight are not 0) and whether its prompt branch does (its window
    holds the step), as :meth:`anyms.Layout.set_step` sets them; blocks are the caller's."""
    num = layout.num_subjects
    kinds = getattr(layout, "kinds", ("image",) * num)
    scaled = [float(v) != 0 for v in layout.scales.tolist()]

    def state(weights, windows):
        return (tuple(k != "prompt" and a and w != 0 for k, a, w in zip(kinds, scaled, weights)),
                tuple(k != "image" and bool(o) for k, o in zip(kinds, windows)))

    if not layout.timed:
        return [state((1.0,) * num, (True,) * num)]
    n = _num_steps(layout, num_steps)
    states = []
    for step in range(n):
        current = state(layout.step_weights(step, n), [step_acts(step, n, a, b) for a, b in layout.windows])
        if current not in states:
            states.append(current)
    return states


def routing_rows(layout, grids, num_steps: Optional[int] = None) -> List[RoutingRow]:
    """Where each subject's branch acts, per grid and per set of layers with the same subjects.

    Args:
        layout: the :class:`anyms.Layout` the generation used.
        grids: ``(h, w)`` pairs, ``{grid: layer count}`` (what :func:`cross_attention_grids`
            returns), or ``{grid: [layer names]}`` (:func:`cross_attention_layers`). A layout
            whose subjects select blocks needs the names: a subject acts at a layer only where
            its blocks select it (:meth:`anyms.Layout.block_weights`).
        num_steps: the denoising loop's length, for a layout with windows or schedules
            (default: the one the layout last ran, ``layout.step``).

    Returns:
        :class:`RoutingRow` s, grid by grid in the given order; a grid whose layers select
        different subjects gets one row per distinct set, in the order its layers come.

    Raises:
        ValueError: ``grids`` empty, or layer counts for a layout with blocks; a timed layout
            and no ``num_steps``.
    """
    if isinstance(grids, dict):
        items = [(check_grid(g), v) for g, v in grids.items()]
    else:
        items = [(check_grid(g), None) for g in grids]
    if not items:
        raise ValueError("grids is empty: give at least one (h, w)")
    num = layout.num_subjects
    states = _step_states(layout, num_steps)
    idle = idle_reasons(layout, num_steps)
    rows = []
    for grid, layers in items:
        if isinstance(layers, (list, tuple)):
            groups: Dict[Tuple[bool, ...], int] = {}
            for name in layers:
                selected = tuple(w != 0 for w in layout.block_weights(name))
                groups[selected] = groups.get(selected, 0) + 1
            total = len(layers)
        else:
            if layout.has_blocks:
                raise ValueError("grids: this layout's subjects select blocks, so which act depends on the layer: "
                                 "give {grid: [layer names]} (cross_attention_layers(unet, latent_hw))")
            total = layers
            groups = {(True,) * num: layers}
        for selected, count in groups.items():
            # blocks weigh the image branches only: a prompt acts at every layer
            moments = [(tuple(a and b for a, b in zip(image, selected)), prompt) for image, prompt in states]
            image_union = torch.zeros(num, *grid, dtype=torch.bool)
            prompt_union = torch.zeros(num, *grid, dtype=torch.bool)
            image_acts, prompt_acts = [False] * num, [False] * num
            for image, prompt in moments:
                if any(image) or any(prompt):
                    at_image, at_prompt = _branch_masks(layout, grid, image, prompt)
                    image_union |= at_image
                    prompt_union |= at_prompt
                image_acts = [a or b for a, b in zip(image_acts, image)]
                prompt_acts = [a or b for a, b in zip(prompt_acts, prompt)]
            acts = tuple(a or b for a, b in zip(image_acts, prompt_acts))
            why = tuple("" if acts[s] else (idle[s] or "its blocks leave these layers out") for s in range(num))
            if num:
                together = torch.ne(_branch_values(layout, *_branch_masks(layout, grid, image_acts, prompt_acts)), 0)
            else:
                together = torch.zeros(0, *grid, dtype=torch.bool)
            varies = any(any((a and not i) or (b and not p) for a, i, b, p in zip(image_acts, image, prompt_acts,
                                                                                 prompt))
                         for image, prompt in moments)
            rows.append(RoutingRow(grid, count, total, acts, _branch_values(layout, image_union, prompt_union),
                                   together, varies, why))
    return rows


def cross_attention_layers(unet, latent_hw: Grid) -> Dict[Grid, List[str]]:
    """The cross-attention (``attn2``) layers of a U-Net by grid: ``{(h, w): [layer names]}``,
    the attention modules' names (``up_blocks.0.attentions.1.transformer_blocks.0.attn2``, what
    a subject's ``blocks`` select). The grids as :func:`cross_attention_grids` places them."""
    h, w = check_grid(latent_hw, "latent_hw")
    levels = len(unet.config.down_block_types)
    by_level: Dict[int, List[str]] = {}
    for name in unet.attn_processors:
        if ".attn2." not in name:
            continue
        parts = name.split(".")
        if parts[0] == "down_blocks":
            level = int(parts[1])
        elif parts[0] == "up_blocks":
            level = levels - 1 - int(parts[1])
        elif parts[0] == "mid_block":
            level = levels - 1
        else:
            raise ValueError(f"cannot place the cross-attention layer {name!r} on a U-Net level")
        by_level.setdefault(level, []).append(name[:-len(".processor")] if name.endswith(".processor") else name)
    grids: Dict[Grid, List[str]] = {}
    for level in sorted(by_level):
        gh, gw = h, w
        for _ in range(level):
            gh, gw = -(-gh // 2), -(-gw // 2)
        grids.setdefault((gh, gw), []).extend(by_level[level])
    return grids


def cross_attention_grids(unet, latent_hw: Grid) -> Dict[Grid, int]:
    """The grids of a U-Net's cross-attention (``attn2``) layers: ``{(h, w): layer count}``.

    Reads the processor names (``down_blocks.i...``, ``mid_block...``, ``up_blocks.j...``):
    down block ``i`` runs at level ``i``, the mid block at the last level, up block ``j``
    at level ``levels - 1 - j``; each level halves the latent, odd sizes rounding up
    (a stride-2 convolution), as :func:`anyms_kernels.layer_grid` assumes. Sorted
    from the finest grid to the coarsest.
    """
    return {grid: len(names) for grid, names in cross_attention_layers(unet, latent_hw).items()}


def subject_maps(layout, grids, *, labels: Optional[Sequence[str]] = None, image: Optional[Image.Image] = None,
                 dpi: int = 100, num_steps: Optional[int] = None) -> Image.Image:
    """One figure of where every subject's branch acted at every grid.

    Rows are grids (fine to coarse; a grid whose layers select different subjects, by their
    ``blocks``, has a row per set of layers, :func:`routing_rows`), columns the routing of the
    whole layout (each token coloured by the subject it went to; in ``sum`` mode, how many
    subjects added up there) followed by one panel per subject (where its branch acts at some
    step). A subject that does not act at a row's layers (its blocks leave them out, its window
    holds no step, its scale is 0) has an empty panel saying why. With ``image``, the output is
    shown faintly under each panel.

    Args:
        layout: the :class:`anyms.Layout` the generation used (its boxes in priority order).
        grids: ``(h, w)`` pairs, the dict :func:`cross_attention_grids` returns (its layer
            counts go into the row titles), or :func:`cross_attention_layers`' (needed when
            subjects select blocks).
        labels: one per subject, in the layout's order (default ``"subject i"``).
        image: the generated image, as a faint background.
        num_steps: the denoising loop's length for a layout with windows (default: the one
            the layout last ran).

    Returns:
        an RGB PIL image (save it as PNG).
    """
    fig = routing_figure(layout, grids, labels=labels, image=image, dpi=dpi, num_steps=num_steps)
    return Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB")


def routing_figure(layout, grids, *, labels: Optional[Sequence[str]] = None, image: Optional[Image.Image] = None,
                   dpi: int = 100, num_steps: Optional[int] = None):
    """The matplotlib figure :func:`subject_maps` renders (same arguments), drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    num = layout.num_subjects
    if labels is not None and len(labels) != num:
        raise ValueError(f"labels has {len(labels)} entries for {num} subjects")
    rows = routing_rows(layout, grids, num_steps)
    labels = list(labels) if labels is not None else [f"subject {s}" for s in range(num)]
    colors = [tuple(c / 255 for c in rgb) for rgb in subject_colors(num)]
    hh, ww = layout.latent_hw
    aspect = ww / hh
    cols = num + 1
    fig = Figure(figsize=(2.2 * cols * max(aspect, 0.5), 2.6 * len(rows)), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), cols, squeeze=False)
    background = image.convert("L") if image is not None else None
    for r, row in enumerate(rows):
        h, w = row.grid
        acted = row.masks != 0
        extent = (0, w, h, 0)
        if row.layers is None:
            title = f"{h}x{w}"
        elif row.layers == row.grid_layers:
            title = f"{h}x{w} ({row.layers} layer{'s' * (row.layers != 1)})"
        else:
            title = f"{h}x{w} ({row.layers} of {row.grid_layers} layers)"
        when = ", when all act" if row.varies else ""
        ax = axes[r][0]
        if background is not None:
            ax.imshow(background, cmap="gray", extent=extent, alpha=0.35)
        if layout.mode == "overwrite":
            # token -> subject index + 1, 0 where only the text branch acted
            owner = (row.together * torch.arange(1, num + 1).reshape(num, 1, 1)).amax(0) if num else torch.zeros(h, w)
            cmap = ListedColormap([(0, 0, 0, 0)] + [c + (0.85,) for c in colors])
            ax.imshow(owner.numpy(), cmap=cmap, vmin=-0.5, vmax=num + 0.5, extent=extent, interpolation="nearest")
            ax.set_title(f"{title}\nrouting (overwrite{when})", fontsize=8)
        else:
            count = row.together.sum(0) if num else torch.zeros(h, w)
            im = ax.imshow(count.numpy(), cmap="magma", vmin=0, vmax=max(1, num), extent=extent,
                           interpolation="nearest", alpha=0.85)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            ax.set_title(f"{title}\nsubjects added (sum{when})", fontsize=8)
        for s in range(num):
            ax = axes[r][s + 1]
            if background is not None:
                ax.imshow(background, cmap="gray", extent=extent, alpha=0.35)
            cmap = ListedColormap([(0, 0, 0, 0), colors[s] + (0.85,)])
            ax.imshow(acted[s].numpy().astype("float32"), cmap=cmap, vmin=0, vmax=1, extent=extent,
                      interpolation="nearest")
            kind = getattr(layout, "kinds", ("image",) * num)[s]
            what = "prompt" if kind == "prompt" else f"x{float(layout.scales[s]):g}" + (" + prompt" if kind == "both"
                                                                                          else "")
            if row.acts[s]:
                share = float(acted[s].float().mean()) * 100
                some_step = " at some step" if row.varies else ""
                ax.set_title(f"{_short_label(labels[s])} {what}\n{share:.0f}% of tokens{some_step}", fontsize=8)
            else:
                ax.set_title(f"{_short_label(labels[s])}: acts not here\n({row.why_not[s]})", fontsize=7)
        for ax in axes[r]:
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
            ax.set_xticks([])
            ax.set_yticks([])
    rule = "later subjects on top" if layout.mode == "overwrite" else "overlapping subjects add up"
    branch = "image branch (or regional prompt, in place of the prompt's text)" if getattr(layout, "has_prompts", False) \
        else "image branch"
    _fitted_title(fig, f"routing: where each subject's {branch} acts, from the layout ({layout.mode} mode: "
                       f"{rule}); not measured attention", fontsize=9)
    fig.canvas.draw()
    return fig


def _short_label(label: str, chars: int = 28) -> str:
    """A label (a regional prompt may be long) cut to ``chars`` characters for a panel's title."""
    return label if len(label) <= chars else label[:chars - 1] + "\u2026"


def _fitted_title(fig, text: str, fontsize: float):
    """``fig.suptitle(text)``, wrapped onto as many lines as it needs to fit the figure's width.

    A figure of one or two subjects is narrower than the title on one line, which was clipped."""
    import textwrap

    title = fig.suptitle(text, fontsize=fontsize)
    renderer = fig.canvas.get_renderer()
    room = 0.96 * fig.bbox.width
    chars = len(text)
    while title.get_window_extent(renderer).width > room and chars > 8:
        chars = max(8, int(chars * 0.9))
        title.set_text("\n".join(textwrap.wrap(text, chars)))
    return title
