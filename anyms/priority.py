"""Which subject is on top where regions overlap: the ``priority`` choices.

``"order"``: the order the subjects were given, later on top (the default); ``"smaller_on_top"``:
by region area, the smallest on top (a mask's pixel count, a box's area; equal areas keep the
given order). :func:`anyms.pipeline.prepare_subjects` applies them; the command line, the
layout and jobs files and the PNG record check against the same tuple.

No torch, no diffusers: the command line imports this before any model work.
"""
from __future__ import annotations

__all__ = ["PRIORITIES"]

PRIORITIES = ("order", "smaller_on_top")
