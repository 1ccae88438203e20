"""Pictures of a layout: the regions over the output, and where each subject acted.

- :func:`draw_layout` draws the subjects' regions (box outlines, or mask outlines for
  masked subjects), thumbnails and labels over an image.
- :func:`subject_masks` says, for one layer grid, where each subject's branch acted;
  it reads the layout's coverage (:meth:`anyms.Layout.coverage`, the same map the
  layout's routing is built from, with :func:`anyms_kernels.rasterize_boxes` and
  :func:`anyms_kernels.rasterize_masks`) and applies the mode's rule, so the pictures
  cannot drift from the attention that ran.
- :func:`cross_attention_grids` lists the grids a U-Net's cross-attention layers see.
- :func:`subject_maps` renders the masks of every grid as one PNG-ready figure: the
  routing (which branch acts where, read from the layout), not measured attention.

No diffusers import here: the U-Net is only read through its ``attn_processors``
names, and the subjects through their ``image``/``box``/``mask``/``scale``/``label`` fields.
"""
from __future__ import annotations

import colorsys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from anyms_kernels.regions import Grid, check_grid, mask_bbox, rasterize_boxes

from .layout import load_mask

__all__ = ["draw_layout", "mask_outline", "subject_masks", "cross_attention_grids", "subject_maps", "routing_figure",
           "subject_colors"]


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


def subject_masks(layout, grid: Grid) -> torch.Tensor:
    """Where each subject's branch acted on one layer grid, weighted by its scale.

    Args:
        layout: an :class:`anyms.Layout` (regions in ascending priority, scales, mode).
        grid: ``(h, w)`` of a cross-attention layer.

    Returns:
        float32 ``[S, h, w]``: ``lambda_s`` where subject ``s``'s image attention was
        added, 1 where only its regional prompt acted (it replaced the prompt's text), 0
        elsewhere. A subject's region covers the tokens whose cells its box or mask meets
        (:meth:`anyms.Layout.coverage`). ``overwrite``: the tokens whose last covering
        region of the same kind (images among images, prompts among prompts, as the routing
        ranks them) is ``s``'s; ``sum``: every token of ``s``'s region, overlaps included.
    """
    h, w = check_grid(grid)
    num = layout.num_subjects
    if num == 0:
        return torch.zeros(0, h, w)
    cover = layout.coverage((h, w))
    kinds = getattr(layout, "kinds", ("image",) * num)

    def acting(members):
        acted = cover & torch.tensor(members, dtype=torch.bool).reshape(num, 1, 1)
        if layout.mode == "overwrite":
            # The last covering subject of the kind owns the token, as the routing ranks them.
            rank = torch.arange(1, num + 1).reshape(num, 1, 1)
            owner = (acted * rank).amax(0) - 1
            acted = owner[None] == torch.arange(num).reshape(num, 1, 1)
        return acted

    image = acting([k != "prompt" for k in kinds])
    values = image.to(torch.float32) * layout.scales.reshape(num, 1, 1)
    if any(k != "image" for k in kinds):
        prompt = acting([k != "image" for k in kinds])
        values = torch.where(prompt & ~image, torch.ones(()), values)
    return values


def cross_attention_grids(unet, latent_hw: Grid) -> Dict[Grid, int]:
    """The grids of a U-Net's cross-attention (``attn2``) layers: ``{(h, w): layer count}``.

    Reads the processor names (``down_blocks.i...``, ``mid_block...``, ``up_blocks.j...``):
    down block ``i`` runs at level ``i``, the mid block at the last level, up block ``j``
    at level ``levels - 1 - j``; each level halves the latent, odd sizes rounding up
    (a stride-2 convolution), as :func:`anyms_kernels.layer_grid` assumes. Sorted
    from the finest grid to the coarsest.
    """
    h, w = check_grid(latent_hw, "latent_hw")
    levels = len(unet.config.down_block_types)
    counts: Dict[int, int] = {}
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
        counts[level] = counts.get(level, 0) + 1
    grids: Dict[Grid, int] = {}
    for level in sorted(counts):
        gh, gw = h, w
        for _ in range(level):
            gh, gw = -(-gh // 2), -(-gw // 2)
        grids[(gh, gw)] = grids.get((gh, gw), 0) + counts[level]
    return grids


def subject_maps(layout, grids, *, labels: Optional[Sequence[str]] = None, image: Optional[Image.Image] = None,
                 dpi: int = 100) -> Image.Image:
    """One figure of where every subject's branch acted at every grid.

    Rows are grids (fine to coarse), columns the routing of the whole layout (each
    token coloured by the subject it went to; in ``sum`` mode, how many subjects
    added up there) followed by one panel per subject (its :func:`subject_masks`).
    With ``image``, the output is shown faintly under each panel.

    Args:
        layout: the :class:`anyms.Layout` the generation used (its boxes in priority order).
        grids: ``(h, w)`` pairs, or the dict :func:`cross_attention_grids` returns
            (its layer counts go into the row titles).
        labels: one per subject, in the layout's order (default ``"subject i"``).
        image: the generated image, as a faint background.

    Returns:
        an RGB PIL image (save it as PNG).
    """
    fig = routing_figure(layout, grids, labels=labels, image=image, dpi=dpi)
    return Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB")


def routing_figure(layout, grids, *, labels: Optional[Sequence[str]] = None, image: Optional[Image.Image] = None,
                   dpi: int = 100):
    """The matplotlib figure :func:`subject_maps` renders (same arguments), drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    counts = dict(grids) if isinstance(grids, dict) else {check_grid(g): None for g in grids}
    if not counts:
        raise ValueError("grids is empty: give at least one (h, w)")
    num = layout.num_subjects
    if labels is not None and len(labels) != num:
        raise ValueError(f"labels has {len(labels)} entries for {num} subjects")
    labels = list(labels) if labels is not None else [f"subject {s}" for s in range(num)]
    colors = [tuple(c / 255 for c in rgb) for rgb in subject_colors(num)]
    hh, ww = layout.latent_hw
    aspect = ww / hh
    cols = num + 1
    fig = Figure(figsize=(2.2 * cols * max(aspect, 0.5), 2.6 * len(counts)), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(counts), cols, squeeze=False)
    background = image.convert("L") if image is not None else None
    for row, (grid, n_layers) in enumerate(counts.items()):
        h, w = check_grid(grid)
        masks = subject_masks(layout, (h, w))
        acted = masks != 0
        extent = (0, w, h, 0)
        title = f"{h}x{w}" + (f" ({n_layers} layers)" if n_layers else "")
        ax = axes[row][0]
        if background is not None:
            ax.imshow(background, cmap="gray", extent=extent, alpha=0.35)
        if layout.mode == "overwrite":
            # token -> subject index + 1, 0 where only the text branch acted
            owner = (acted * torch.arange(1, num + 1).reshape(num, 1, 1)).amax(0) if num else torch.zeros(h, w)
            cmap = ListedColormap([(0, 0, 0, 0)] + [c + (0.85,) for c in colors])
            ax.imshow(owner.numpy(), cmap=cmap, vmin=-0.5, vmax=num + 0.5, extent=extent, interpolation="nearest")
            ax.set_title(f"{title}\nrouting (overwrite)", fontsize=8)
        else:
            count = acted.sum(0) if num else torch.zeros(h, w)
            im = ax.imshow(count.numpy(), cmap="magma", vmin=0, vmax=max(1, num), extent=extent,
                           interpolation="nearest", alpha=0.85)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            ax.set_title(f"{title}\nsubjects added (sum)", fontsize=8)
        for s in range(num):
            ax = axes[row][s + 1]
            if background is not None:
                ax.imshow(background, cmap="gray", extent=extent, alpha=0.35)
            cmap = ListedColormap([(0, 0, 0, 0), colors[s] + (0.85,)])
            ax.imshow(acted[s].numpy().astype("float32"), cmap=cmap, vmin=0, vmax=1, extent=extent,
                      interpolation="nearest")
            share = float(acted[s].float().mean()) * 100
            kind = getattr(layout, "kinds", ("image",) * num)[s]
            what = "prompt" if kind == "prompt" else f"x{float(layout.scales[s]):g}" + (" + prompt" if kind == "both"
                                                                                          else "")
            ax.set_title(f"{_short_label(labels[s])} {what}\n{share:.0f}% of tokens", fontsize=8)
        for ax in axes[row]:
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
