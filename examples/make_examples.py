"""Make the small sample inputs that the README's quickstart uses, deterministically.

    python examples/make_examples.py            # (re)writes the files below, beside this script
    python examples/make_examples.py --check    # exit 1 if a committed file differs from what this makes

- ``dog.png``, ``cat.png``, ``ball.png``: 64x64 subject reference images, drawn with plain
  shapes (no randomness, no downloads). They stand for real photos of your subjects.
- ``dog_mask.png``, ``cat_mask.png``: 128x128 masks (white = inside), the size of the
  built-in tiny model's images (a mask must have the generated image's size; for a real
  1024x1024 model, draw masks at 1024x1024).
- ``layout.json``: a layout file (``anyms generate --layout``): a box and a mask.
- ``timed_layout.json``: the same subjects, timed: the dog acts in the first 60% of the
  steps, fading out; the cat from 20% of the steps on, easing in.
- ``blocks_layout.json``: the same subjects, each on some blocks of the model only: the dog
  everywhere but at a weaker weight in the encoder, the cat in the "style" preset's block.
- ``regional_layout.json``: regional prompts: the cat's region with its own prompt beside its
  image, and a text-only region (a blanket along the bottom, in the first 80% of the steps).
- ``jobs.jsonl``: three jobs for ``anyms generate --jobs``, each with its own output name.

Only Pillow is needed. The PNG bytes may differ between zlib versions; the pixels and the
JSON text do not, which is what ``--check`` compares.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))
MASK_SIZE = 128          # the tiny model's default image side

LAYOUT = {
    "prompt": "a dog and a cat on a sofa",
    "subjects": [
        {"image": "dog.png", "box": [0.05, 0.3, 0.5, 0.95], "label": "dog"},
        {"image": "cat.png", "mask": "cat_mask.png", "scale": 0.8, "label": "cat"},
    ],
}

TIMED_LAYOUT = {
    "prompt": "a dog and a cat on a sofa",
    "subjects": [
        {"image": "dog.png", "box": [0.05, 0.3, 0.5, 0.95], "label": "dog", "end": 0.6, "schedule": "linear_down"},
        {"image": "cat.png", "mask": "cat_mask.png", "scale": 0.8, "label": "cat", "start": 0.2,
         "schedule": "ease_in"},
    ],
}
BLOCKS_LAYOUT = {
    "prompt": "a dog and a cat on a sofa",
    "subjects": [
        {"image": "dog.png", "box": [0.05, 0.3, 0.5, 0.95], "label": "dog",
         "blocks": {"down_blocks": 0.5, "mid_block": 1.0, "up_blocks": 1.0}},
        {"image": "cat.png", "mask": "cat_mask.png", "scale": 0.8, "label": "cat", "blocks": "style"},
    ],
}
REGIONAL_LAYOUT = {
    "prompt": "a dog and a cat on a sofa",
    "subjects": [
        {"image": "dog.png", "box": [0.05, 0.3, 0.5, 0.95], "label": "dog"},
        {"image": "cat.png", "mask": "cat_mask.png", "scale": 0.8, "label": "cat", "prompt": "a ginger cat, sleeping"},
        {"prompt": "a red woollen blanket", "box": [0.0, 0.75, 1.0, 1.0], "end": 0.8},
    ],
}

JOBS = [
    {"prompt": "a dog and a cat on a sofa", "out": "sofa.png", "subjects": [
        {"image": "dog.png", "box": [0.05, 0.3, 0.5, 0.95]},
        {"image": "cat.png", "box": [0.5, 0.3, 0.95, 0.95], "scale": 0.8}]},
    {"prompt": "a dog with a ball in a garden", "out": "garden.png", "seed": 3, "subjects": [
        {"image": "dog.png", "mask": "dog_mask.png"},
        {"image": "ball.png", "box": [0.6, 0.6, 0.9, 0.9]}]},
    {"prompt": "a cat on a rug", "out": "rug.png", "subjects": [
        {"image": "cat.png", "mask": "cat_mask.png"}]},
]


def _dog() -> Image.Image:
    im = Image.new("RGB", (64, 64), (196, 222, 240))
    d = ImageDraw.Draw(im)
    d.ellipse((12, 18, 52, 58), fill=(150, 95, 45))          # head
    d.ellipse((4, 10, 22, 40), fill=(100, 60, 25))           # ears
    d.ellipse((42, 10, 60, 40), fill=(100, 60, 25))
    d.ellipse((22, 30, 28, 36), fill=(20, 20, 20))           # eyes
    d.ellipse((36, 30, 42, 36), fill=(20, 20, 20))
    d.ellipse((27, 42, 37, 50), fill=(30, 20, 15))           # nose
    return im


def _cat() -> Image.Image:
    im = Image.new("RGB", (64, 64), (236, 226, 200))
    d = ImageDraw.Draw(im)
    d.polygon([(12, 28), (18, 4), (30, 22)], fill=(120, 120, 128))   # ears
    d.polygon([(34, 22), (46, 4), (52, 28)], fill=(120, 120, 128))
    d.ellipse((10, 16, 54, 58), fill=(150, 150, 160))                # head
    d.ellipse((20, 30, 28, 38), fill=(90, 170, 60))                  # eyes
    d.ellipse((36, 30, 44, 38), fill=(90, 170, 60))
    d.polygon([(29, 44), (35, 44), (32, 48)], fill=(230, 130, 150))  # nose
    return im


def _ball() -> Image.Image:
    im = Image.new("RGB", (64, 64), (120, 180, 90))
    d = ImageDraw.Draw(im)
    d.ellipse((8, 8, 56, 56), fill=(220, 40, 40))
    d.arc((8, 8, 56, 56), 200, 340, fill=(250, 250, 250), width=5)
    d.arc((8, 8, 56, 56), 20, 160, fill=(250, 250, 250), width=5)
    return im


def _mask(shape: str) -> Image.Image:
    im = Image.new("L", (MASK_SIZE, MASK_SIZE), 0)
    d = ImageDraw.Draw(im)
    if shape == "cat":      # a triangle in the right half: a region no box describes
        d.polygon([(68, 120), (122, 120), (96, 36)], fill=255)
    else:                   # an ellipse in the left half
        d.ellipse((6, 30, 70, 122), fill=255)
    return im


def files() -> dict:
    """file name -> a PIL image or the file's text."""
    return {
        "dog.png": _dog(), "cat.png": _cat(), "ball.png": _ball(),
        "dog_mask.png": _mask("dog"), "cat_mask.png": _mask("cat"),
        "layout.json": json.dumps(LAYOUT, indent=2) + "\n",
        "timed_layout.json": json.dumps(TIMED_LAYOUT, indent=2) + "\n",
        "blocks_layout.json": json.dumps(BLOCKS_LAYOUT, indent=2) + "\n",
        "regional_layout.json": json.dumps(REGIONAL_LAYOUT, indent=2) + "\n",
        "jobs.jsonl": "".join(json.dumps(job) + "\n" for job in JOBS),
    }


def differs(name: str, made, folder: str = HERE) -> bool:
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return True
    if isinstance(made, str):
        with open(path, encoding="utf-8") as f:
            return f.read() != made
    with Image.open(path) as on_disk:
        return on_disk.mode != made.mode or on_disk.size != made.size or on_disk.tobytes() != made.tobytes()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    parser.add_argument("--out-dir", default=HERE, help="where to write (default: beside this script)")
    args = parser.parse_args(argv)
    bad = []
    for name, made in files().items():
        if args.check:
            if differs(name, made, args.out_dir):
                bad.append(name)
            continue
        path = os.path.join(args.out_dir, name)
        if isinstance(made, str):
            with open(path, "w", encoding="utf-8") as f:
                f.write(made)
        else:
            made.save(path)
    if bad:
        print(f"differ from what {os.path.basename(__file__)} makes: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
