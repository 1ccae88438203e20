"""Image files read safely, and the largest side of an image any pipeline here makes.

- ``MAX_SIDE``: the largest side accepted, for a generated image and for a mask (a mask
  has the generated image's size).
- :func:`read_image` reads an image file (a subject, a mask) after checking the size its
  header claims, so a decompression bomb or an oversized mask is refused before a pixel
  is decoded, naming the argument.

The bottom floor of the package: nothing here imports another module of anyms.
"""
from __future__ import annotations

import os
from typing import Optional

__all__ = ["MAX_SIDE", "read_image"]

# The largest side accepted (pixels). SDXL's U-Net at 16384 px has a 2048 x 2048 latent and
# self-attention over a quarter of a million tokens per layer; beyond it no card holds a step.
MAX_SIDE = 16384


def read_image(path: str, name: str, mode: str, what: str = "image", max_side: Optional[int] = None):
    """The image file at ``path`` as a decoded PIL image in ``mode`` (``"RGB"``, ``"L"``).

    Raises ValueError starting with ``name`` when there is no such file (``"no {what}
    file"``), when it is not an image or is truncated, and, before any pixel is decoded,
    when its header claims more pixels than Pillow decodes (twice
    ``PIL.Image.MAX_IMAGE_PIXELS``: Pillow's decompression-bomb refusal) or a side above
    ``max_side``.
    """
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise ValueError(f"{name}: no {what} file at {path!r}")
    unreadable = (UnidentifiedImageError, OSError, SyntaxError, ValueError)
    try:
        im = Image.open(path)                    # reads the header only, and checks its size
    except Image.DecompressionBombError as e:
        raise ValueError(f"{name}: {path!r} is too large to decode ({e})") from None
    except unreadable as e:
        raise ValueError(f"{name}: cannot read {path!r} as an image ({e})") from None
    with im:
        width, height = im.size
        if max_side is not None and max(width, height) > max_side:
            raise ValueError(f"{name}: {path!r} is {height}x{width} pixels (height x width), above the largest "
                             f"side accepted, {max_side} pixels")
        try:
            return im.convert(mode)              # decodes the pixels: a truncated file fails here
        except Image.DecompressionBombError as e:
            raise ValueError(f"{name}: {path!r} is too large to decode ({e})") from None
        except unreadable as e:
            raise ValueError(f"{name}: cannot read {path!r} as an image ({e})") from None
