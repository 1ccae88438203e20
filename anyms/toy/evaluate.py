"""Measure layout control on the toy world: owner, presence, shape, leakage and reference similarity per box.

    layouts = sample_layouts(numpy.random.default_rng(0), 10, kind="disjoint")
    images = generate(pipe, layout, mode="overwrite", seeds=[0, 1])
    box_metrics(images[0], layout)

Colours are read per pixel as the nearest of the palette and the background grey (pixels far
from all of them count as neither). A subject's *region* is the part of its box no later
(higher-priority) box covers: the pixels AnyMS's overwrite routes to it.

- owner: the colour with most pixels in the region is the subject's;
- presence: the subject's colour covers at least ``PRESENCE_FRACTION`` of its region;
- shape: the shape classifier (a small CNN trained on the generator, see
  :func:`train_shape_classifier`) names the subject's shape from the subject-coloured pixels
  of its box (boxes that no other box touches only, where the whole shape can be seen);
- leakage: the fraction of pixels outside every box that show a palette colour;
- similarity: cosine similarity, in the world's own image encoder and measured from the
  embedding of an empty grey picture, between the reference and the box's crop re-centred on
  grey (the toy analogue of CLIP-I; 1 = the same picture, 0 = unrelated).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from . import DEFAULT_GUIDANCE, world

__all__ = ["LayoutSubject", "ToyLayout", "MODES", "LAYOUT_KINDS", "sample_layouts", "generate",
           "colour_map", "box_metrics", "train_shape_classifier", "ShapeClassifier"]

MODES = ("overwrite", "sum", "diffusers_masks", "everywhere", "text_only")
LAYOUT_KINDS = ("disjoint", "partial", "large_overlap")
PRESENCE_FRACTION = 0.2
_CENTRES = np.array([world.BACKGROUND] + [world.PALETTE[c] for c in world.COLOURS], np.float32)
_FAR = 110.0     # RGB distance beyond which a pixel is neither grey nor a palette colour


@dataclass(frozen=True)
class LayoutSubject:
    colour: str
    shape: str
    box: Tuple[float, float, float, float]


@dataclass
class ToyLayout:
    subjects: List[LayoutSubject]
    kind: str = "disjoint"

    @property
    def prompt(self) -> str:
        return " and ".join(f"{s.colour} {s.shape}" for s in self.subjects)


# -------------------------------------------------------------------------- layouts
def _iou_parts(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
    return inter, inter / min(area(a), area(b))


def _random_box(rng, lo=0.3, hi=0.5):
    w, h = rng.uniform(lo, hi, size=2)
    x0, y0 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
    return tuple(round(float(v), 3) for v in (x0, y0, x0 + w, y0 + h))


def sample_layouts(rng: np.random.Generator, n: int, kind: str = "disjoint") -> List[ToyLayout]:
    """``n`` random layouts of 2-4 subjects of distinct colours.

    ``disjoint``: no two boxes meet. ``partial``: each new box overlaps an earlier one by
    5-30% of the smaller box. ``large_overlap``: two subjects, the later box covering 40-70%
    of the earlier one (where overwrite and sum differ most), plus up to one disjoint box.
    """
    if kind not in LAYOUT_KINDS:
        raise ValueError(f"kind must be one of {LAYOUT_KINDS}, got {kind!r}")
    layouts = []
    while len(layouts) < n:
        count = int(rng.integers(2, 5)) if kind != "large_overlap" else int(rng.integers(2, 4))
        colours = rng.permutation(len(world.COLOURS))[:count]
        boxes: List[tuple] = []
        for i in range(count):
            for _ in range(200):
                box = _random_box(rng)
                fracs = [_iou_parts(box, b)[1] for b in boxes]
                if kind == "disjoint" or (kind == "large_overlap" and i >= 2):
                    ok = all(f == 0 for f in fracs)
                elif kind == "partial":
                    ok = not boxes or (all(f <= 0.3 for f in fracs) and any(f >= 0.05 for f in fracs))
                else:   # the second box of a large overlap
                    ok = not boxes or 0.4 <= fracs[0] <= 0.7
                if ok:
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) < count:
            continue
        layouts.append(ToyLayout([LayoutSubject(world.COLOURS[c], world.SHAPES[int(rng.integers(len(world.SHAPES)))], b)
                                  for c, b in zip(colours, boxes)], kind))
    return layouts


# ------------------------------------------------------------------------ generation
def _box_mask(box, size: int = world.IMAGE_SIZE) -> np.ndarray:
    """Pixels whose centre is inside the normalised box."""
    c = (np.arange(size) + 0.5) / size
    inx = (c >= box[0]) & (c < box[2])
    iny = (c >= box[1]) & (c < box[3])
    return iny[:, None] & inx[None, :]


def generate(pipe, layout: ToyLayout, mode: str = "overwrite", seeds: Sequence[int] = (0,), steps: int = 20,
             guidance: float = DEFAULT_GUIDANCE, scale: float = 1.0) -> List[np.ndarray]:
    """One image per seed (uint8 arrays) of ``layout`` in ``mode`` (see :data:`MODES`).

    ``overwrite`` / ``sum``: the AnyMS pipeline with subjects. ``diffusers_masks``: diffusers'
    own multi-image IP-Adapter with ``ip_adapter_masks`` (the boxes as binary masks, through
    ``IPAdapterMaskProcessor``). ``everywhere``: every reference over the whole image.
    ``text_only``: the prompt alone (IP-Adapter scale 0).
    """
    from ..pipeline import Subject
    from . import reference

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    refs = [reference(s.colour, s.shape) for s in layout.subjects]
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=len(seeds),
                  generator=[torch.Generator().manual_seed(int(s)) for s in seeds], output_type="np")
    if mode in ("overwrite", "sum"):
        out = pipe(layout.prompt, subjects=[Subject(r, box=s.box, scale=scale) for r, s in zip(refs, layout.subjects)],
                   anyms_mode=mode, **kwargs)
    else:
        call = dict(kwargs, ip_adapter_image=[refs])
        if mode == "diffusers_masks":
            from diffusers.image_processor import IPAdapterMaskProcessor
            from PIL import Image

            masks = [Image.fromarray(_box_mask(s.box).astype(np.uint8) * 255) for s in layout.subjects]
            processed = IPAdapterMaskProcessor().preprocess(masks, height=world.IMAGE_SIZE, width=world.IMAGE_SIZE)
            call["cross_attention_kwargs"] = {"ip_adapter_masks": [processed.reshape(1, len(masks), *processed.shape[-2:])]}
        pipe.set_ip_adapter_scale(0.0 if mode == "text_only" else scale)
        try:
            out = pipe(layout.prompt, **call)
        finally:
            pipe.set_ip_adapter_scale(1.0)
    return [np.clip(np.rint(im * 255), 0, 255).astype(np.uint8) for im in out.images]


# ---------------------------------------------------------------------------- metrics
def colour_map(image: np.ndarray) -> np.ndarray:
    """Per pixel: 0 grey, 1..6 the palette colours (COLOURS order), -1 neither."""
    d = np.linalg.norm(image[..., None, :].astype(np.float32) - _CENTRES, axis=-1)
    label = d.argmin(-1)
    label[d.min(-1) > _FAR] = -1
    return label


def _regions(layout: ToyLayout) -> List[np.ndarray]:
    """Each subject's box minus every later box (the pixels routed to it)."""
    masks = [_box_mask(s.box) for s in layout.subjects]
    regions = []
    for i, m in enumerate(masks):
        r = m.copy()
        for later in masks[i + 1:]:
            r &= ~later
        regions.append(r)
    return regions


class ShapeClassifier(torch.nn.Module):
    """A small CNN from a 32x32 binary silhouette to one of world.SHAPES."""

    def __init__(self):
        super().__init__()
        c = 16
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, c, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(c, 2 * c, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(2 * c, 2 * c, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(2 * c, len(world.SHAPES)))

    def forward(self, x):
        return self.net(x)

    @torch.no_grad()
    def predict(self, silhouettes: np.ndarray) -> np.ndarray:
        return self(torch.from_numpy(silhouettes).float()[:, None]).argmax(-1).numpy()


def silhouette(mask: np.ndarray, box, size: int = 32) -> np.ndarray:
    """The box's crop of a boolean mask, resized to ``size`` x ``size`` (float32 in [0, 1])."""
    from PIL import Image

    n = mask.shape[0]
    x0, y0 = int(np.floor(box[0] * n)), int(np.floor(box[1] * n))
    x1, y1 = max(x0 + 1, int(np.ceil(box[2] * n))), max(y0 + 1, int(np.ceil(box[3] * n)))
    crop = Image.fromarray(mask[y0:y1, x0:x1].astype(np.uint8) * 255)
    return np.asarray(crop.resize((size, size), Image.BILINEAR), np.float32) / 255


def _classifier_example(rng):
    """A silhouette as the benchmark sees one: an object of random size and place inside a random box."""
    box = _random_box(rng)
    bw, bh = box[2] - box[0], box[3] - box[1]
    side = float(rng.uniform(0.5, 1.0)) * min(bw, bh)
    cx = float(rng.uniform(box[0] + side / 2, box[2] - side / 2))
    cy = float(rng.uniform(box[1] + side / 2, box[3] - side / 2))
    k = int(rng.integers(len(world.SHAPES)))
    obj = world.ToyObject("red", world.SHAPES[k], cx, cy, side)
    mask = world.object_mask(obj)
    # noise: a few pixels flipped, as a denoised image's ragged edge
    flip = rng.random(mask.shape) < 0.03
    return silhouette(mask ^ flip, box), k


def train_shape_classifier(seed: int = 0, steps: int = 300, batch: int = 64):
    """Train the shape classifier on the generator; return (classifier, its accuracy on fresh clean examples)."""
    rng = np.random.default_rng([seed, 11])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ShapeClassifier()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(steps):
            xs, ys = zip(*(_classifier_example(rng) for _ in range(batch)))
            loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(np.stack(xs))[:, None]),
                                                     torch.tensor(ys))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    test = np.random.default_rng([seed, 12])
    xs, ys = zip(*(_classifier_example(test) for _ in range(400)))
    accuracy = float((model.predict(np.stack(xs)) == np.array(ys)).mean())
    return model, accuracy


def box_metrics(image: np.ndarray, layout: ToyLayout, classifier=None, encoder=None) -> List[Dict]:
    """Per subject of ``layout``: owner, present, shape (None where not judged), similarity; and the image's leakage.

    ``encoder``: a callable from a list of uint8 images to embeddings (for similarity), e.g.
    :func:`image_encoder_fn`.
    """
    labels = colour_map(image)
    regions = _regions(layout)
    boxes = [_box_mask(s.box) for s in layout.subjects]
    outside = ~np.logical_or.reduce(boxes)
    leakage = float((labels[outside] >= 1).mean()) if outside.any() else 0.0
    rows = []
    for i, (s, region) in enumerate(zip(layout.subjects, regions)):
        want = world.COLOURS.index(s.colour) + 1
        counts = np.bincount(labels[region][labels[region] >= 1], minlength=len(world.COLOURS) + 1)
        owner = bool(counts.sum() > 0 and counts.argmax() == want)
        present = bool(counts[want] >= PRESENCE_FRACTION * region.sum())
        shape = None
        alone = all(_iou_parts(s.box, o.box)[0] == 0 for j, o in enumerate(layout.subjects) if j != i)
        if classifier is not None and alone:
            sil = silhouette(labels == want, s.box)
            shape = bool(present and world.SHAPES[int(classifier.predict(sil[None])[0])] == s.shape)
        rows.append(dict(subject=i, colour=s.colour, shape_name=s.shape, owner=owner, present=present,
                         shape=shape, leakage=leakage, region_pixels=int(region.sum())))
    if encoder is not None:
        crops = [_recentred_crop(image, s.box) for s in layout.subjects]
        refs = [world.render_reference(world.ToyObject(s.colour, s.shape, .5, .5, world.REFERENCE_SIZE))
                for s in layout.subjects]
        grey = np.empty_like(crops[0])
        grey[:] = world.BACKGROUND
        e = encoder(crops + refs + [grey])
        # measured from the empty picture's embedding: every picture of this world is mostly grey,
        # so raw cosines all sit near 1 and would not tell a right shape from a wrong one
        e = e[:-1] - e[-1:]
        e = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
        n = len(crops)
        for i, row in enumerate(rows):
            row["similarity"] = float((e[i] * e[n + i]).sum())
    return rows


def _recentred_crop(image: np.ndarray, box) -> np.ndarray:
    """The box's crop of ``image``, scaled so its longer side is REFERENCE_SIZE of a grey canvas, centred."""
    from PIL import Image

    n = image.shape[0]
    x0, y0 = int(np.floor(box[0] * n)), int(np.floor(box[1] * n))
    x1, y1 = max(x0 + 1, int(np.ceil(box[2] * n))), max(y0 + 1, int(np.ceil(box[3] * n)))
    crop = Image.fromarray(image[y0:y1, x0:x1])
    k = world.REFERENCE_SIZE * n / max(crop.size) * 1.15     # the object fills most of its box
    crop = crop.resize((max(1, round(crop.size[0] * k)), max(1, round(crop.size[1] * k))), Image.BILINEAR)
    canvas = Image.new("RGB", (n, n), world.BACKGROUND)
    canvas.paste(crop, ((n - crop.size[0]) // 2, (n - crop.size[1]) // 2))
    return np.asarray(canvas)


def image_encoder_fn(pipe):
    """A callable: list of uint8 images -> image_embeds (numpy) from ``pipe``'s own image encoder."""
    @torch.no_grad()
    def encode(images):
        pixels = pipe.feature_extractor(list(images), return_tensors="pt").pixel_values
        return pipe.image_encoder(pixels.to(pipe.image_encoder.dtype)).image_embeds.float().numpy()
    return encode


def summarize_layouts(world_folder=None, layouts: int = 10, seeds=(0, 1), steps: int = 20, mode: str = "overwrite",
                      guidance: float = DEFAULT_GUIDANCE, seed: int = 0, pipe=None) -> Dict[str, float]:
    """Mean owner / presence / shape / leakage / similarity of ``mode`` over random layouts of every kind."""
    from . import toy_pipeline

    pipe = pipe or toy_pipeline(world_folder)
    classifier, clean = train_shape_classifier(seed)
    encoder = image_encoder_fn(pipe)
    rows = []
    rng = np.random.default_rng([seed, 21])
    for kind in LAYOUT_KINDS:
        for layout in sample_layouts(rng, layouts, kind):
            for image in generate(pipe, layout, mode, seeds=seeds, steps=steps, guidance=guidance):
                rows.extend(box_metrics(image, layout, classifier, encoder))
    shapes = [r["shape"] for r in rows if r["shape"] is not None]
    return {"boxes": len(rows), "owner": float(np.mean([r["owner"] for r in rows])),
            "presence": float(np.mean([r["present"] for r in rows])),
            "shape": float(np.mean(shapes)) if shapes else float("nan"),
            "leakage": float(np.mean([r["leakage"] for r in rows])),
            "similarity": float(np.mean([r["similarity"] for r in rows])),
            "classifier_clean_accuracy": clean}
