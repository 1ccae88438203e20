"""The toy world's images: flat coloured shapes on a mid-grey background, drawn by a seeded generator.

    rng = numpy.random.default_rng(0)
    scene = sample_scene(rng, n_objects=2)
    image = render_scene(scene)              # uint8 H x W x 3, IMAGE_SIZE square
    ref = render_reference(scene[0])         # the object centred on grey: what a user draws
    caption(scene)                           # "red circle and blue cross"

Everything a model of this world knows is here: the palette (pure RGB primaries and
secondaries), the shapes, the background grey, the object sizes and the captions.
Shapes are drawn with 4x4 supersampling (anti-aliased edges), so a reference drawn in
any paint program, with or without anti-aliasing, looks like the training data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

__all__ = [
    "IMAGE_SIZE", "BACKGROUND", "PALETTE", "COLOURS", "SHAPES", "ToyObject",
    "sample_object", "sample_scene", "render_scene", "render_reference", "caption",
    "object_mask",
]

IMAGE_SIZE = 64                     # the world's image side, pixels
BACKGROUND = (128, 128, 128)        # mid-grey
PALETTE = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
    "yellow": (255, 255, 0), "magenta": (255, 0, 255), "cyan": (0, 255, 255),
}
COLOURS: Tuple[str, ...] = tuple(PALETTE)
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Object sizes as fractions of the image side: scenes of one object use the larger
# range, crowded scenes the smaller one; a reference draws its object at REFERENCE_SIZE.
SINGLE_SIZE = (0.30, 0.50)
SCENE_SIZE = (0.24, 0.40)
REFERENCE_SIZE = 0.6
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ToyObject:
    """One object: its colour and shape names, centre (cx, cy) and side, as fractions of the image."""

    colour: str
    shape: str
    cx: float
    cy: float
    size: float

    @property
    def box(self) -> Tuple[float, float, float, float]:
        """The object's bounding box, normalised (x0, y0, x1, y1)."""
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


def sample_object(rng: np.random.Generator, size_range=SINGLE_SIZE) -> ToyObject:
    """A random object placed fully inside the image."""
    size = float(rng.uniform(*size_range))
    h = size / 2
    return ToyObject(COLOURS[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))],
                     float(rng.uniform(h, 1 - h)), float(rng.uniform(h, 1 - h)), size)


def sample_scene(rng: np.random.Generator, n_objects: int) -> List[ToyObject]:
    """``n_objects`` objects of distinct colours; later ones are drawn on top.

    One object gets the large size range; several get the smaller one and are placed so that
    no object hides more than about a third of another (a few tries, then it is accepted).
    """
    size_range = SINGLE_SIZE if n_objects == 1 else SCENE_SIZE
    objects: List[ToyObject] = []
    used = set()
    while len(objects) < n_objects:
        for _ in range(10):
            obj = sample_object(rng, size_range)
            if obj.colour in used:
                continue
            if all(_overlap_fraction(obj, other) < 0.35 for other in objects):
                break
        if obj.colour in used:
            continue
        used.add(obj.colour)
        objects.append(obj)
    return objects


def _overlap_fraction(a: ToyObject, b: ToyObject) -> float:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    w = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    h = max(0.0, min(ay1, by1) - max(ay0, by0))
    return w * h / min(a.size ** 2, b.size ** 2)


def _coverage(obj: ToyObject, size: int) -> np.ndarray:
    """The fraction of each pixel that ``obj`` covers (float32, size x size), by supersampling."""
    n = size * _SUPERSAMPLE
    t = (np.arange(n, dtype=np.float32) + 0.5) / n
    x, y = np.meshgrid(t, t)                       # x to the right, y down, in [0, 1]
    u = (x - obj.cx) / (obj.size / 2)              # [-1, 1] across the object's square
    v = (y - obj.cy) / (obj.size / 2)
    if obj.shape == "circle":
        inside = u * u + v * v <= 1.0
    elif obj.shape == "square":
        inside = (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    elif obj.shape == "triangle":                  # upright, apex at the top
        inside = (v <= 0.9) & (v >= -0.9) & (np.abs(u) <= (v + 0.9) / 1.8)
    elif obj.shape == "cross":
        arm = 0.33
        inside = ((np.abs(u) <= arm) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= arm) & (np.abs(u) <= 1.0))
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {obj.shape!r}")
    return inside.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3)).astype(np.float32)


def object_mask(obj: ToyObject, size: int = IMAGE_SIZE) -> np.ndarray:
    """Where ``obj`` covers at least half a pixel (bool, size x size)."""
    return _coverage(obj, size) >= 0.5


def render_scene(objects: Sequence[ToyObject], size: int = IMAGE_SIZE) -> np.ndarray:
    """The objects on grey, in order (later on top): uint8, size x size x 3."""
    image = np.empty((size, size, 3), np.float32)
    image[:] = BACKGROUND
    for obj in objects:
        a = _coverage(obj, size)[..., None]
        image = image * (1 - a) + np.asarray(PALETTE[obj.colour], np.float32) * a
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_reference(obj: ToyObject, size: int = IMAGE_SIZE, rng: np.random.Generator = None) -> np.ndarray:
    """The reference image of ``obj``: its colour and shape centred on grey at REFERENCE_SIZE.

    With ``rng``, the size and centre jitter a little (training augmentation), so that a
    reference drawn by hand need not match the canonical one to the pixel.
    """
    side, cx, cy = REFERENCE_SIZE, 0.5, 0.5
    if rng is not None:
        side = float(rng.uniform(0.45, 0.75))
        cx, cy = (float(v) for v in rng.uniform(0.45, 0.55, size=2))
    return render_scene([ToyObject(obj.colour, obj.shape, cx, cy, side)], size)


def caption(objects: Sequence[ToyObject]) -> str:
    """The scene's caption: "red circle", "red circle and blue cross", ... ("" for no object)."""
    return " and ".join(f"{o.colour} {o.shape}" for o in objects)
