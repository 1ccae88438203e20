"""A small trained world of flat coloured shapes on grey, so that AnyMS's layout control can be seen and measured.

    from anyms.toy import toy_pipeline, reference
    from anyms import Subject
    pipe = toy_pipeline()                                  # the shipped weights, CPU, float32
    image = pipe("red circle and blue cross", subjects=[
        Subject(reference("red", "circle"), box=(0.05, 0.1, 0.45, 0.5)),
        Subject(reference("blue", "cross"), box=(0.5, 0.45, 0.95, 0.9)),
    ], num_inference_steps=20).images[0]                   # 64 x 64

The world (``anyms.toy.world``): 64x64 images of 1-4 objects in six pure colours (red, green,
blue, yellow, magenta, cyan) and four shapes (circle, square, triangle, cross) on mid-grey.
A reference image is one object centred on mid-grey (:func:`reference`, or drawn by hand).
The models (``anyms.toy.models``) are an SD 1.5-style pipeline with an IP-Adapter, saved as
diffusers / transformers folders and loaded through the real ``from_pretrained`` and
``load_ip_adapter``. They were trained from scratch by ``python -m anyms toy train``
without any boxes: layout control comes from AnyMS alone.
"""
from __future__ import annotations

import os
from typing import Optional

__all__ = ["WEIGHTS_DIR", "DEFAULT_STEPS", "DEFAULT_GUIDANCE", "toy_pipeline", "reference", "prompt_for"]

# The shipped world: a diffusers pipeline folder with the IP-Adapter in its ip_adapter/ subfolder.
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0


def toy_pipeline(folder: Optional[str] = None, pipeline_cls=None):
    """The toy world as an AnyMS pipeline (CPU, float32, progress bar off), IP-Adapter loaded.

    Args:
        folder: a world folder (default: the shipped weights, ``WEIGHTS_DIR``), as written by
            ``anyms toy train`` (``OUT/world``).
        pipeline_cls: default ``AnyMSStableDiffusionPipeline``; any ``StableDiffusionPipeline``
            subclass loads it.

    Raises:
        FileNotFoundError: the folder has no ``model_index.json`` (naming the folder).
    """
    from .models import IP_SUBFOLDER, IP_WEIGHT_NAME

    folder = folder or WEIGHTS_DIR
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise FileNotFoundError(f"toy world: no model_index.json in {folder!r} (train one with "
                                f"`python -m anyms toy train --out DIR` and use DIR/world)")
    if pipeline_cls is None:
        from ..pipeline import AnyMSStableDiffusionPipeline as pipeline_cls
    from ..tiny import _diffusers_errors_only, _quiet_transformers_progress

    with _quiet_transformers_progress(), _diffusers_errors_only():
        pipe = pipeline_cls.from_pretrained(folder)
        pipe.load_ip_adapter(folder, subfolder=IP_SUBFOLDER, weight_name=IP_WEIGHT_NAME)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(colour: str, shape: str):
    """The canonical reference image of a ``colour`` ``shape`` (PIL, 64x64): centred on mid-grey."""
    from PIL import Image

    from . import world

    if colour not in world.PALETTE:
        raise ValueError(f"colour must be one of {world.COLOURS}, got {colour!r}")
    if shape not in world.SHAPES:
        raise ValueError(f"shape must be one of {world.SHAPES}, got {shape!r}")
    return Image.fromarray(world.render_reference(world.ToyObject(colour, shape, 0.5, 0.5, world.REFERENCE_SIZE)))


def prompt_for(objects) -> str:
    """The caption the world was trained on, for (colour, shape) pairs: "red circle and blue cross"."""
    return " and ".join(f"{c} {s}" for c, s in objects)
