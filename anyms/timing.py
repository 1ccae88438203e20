"""When a subject acts, and how strongly: its window ``[start, end)`` and its schedule.

A subject acts only at the denoising steps its window covers, with its scale
multiplied by its schedule's weight at that step. The rules, for a call of ``N`` steps
(``i = 0 .. N-1``, as the pipeline's ``callback_on_step_end`` numbers them; ``N`` is the
loop's length, ``pipe.num_timesteps``, which is ``num_inference_steps + 1`` with PNDM):

- **window**: step ``i`` acts when ``start <= i / N`` and ``(i + 1) / N <= end``, the
  whole step inside the window. This is diffusers' ControlNet rule for
  ``control_guidance_start`` / ``control_guidance_end``
  (``StableDiffusionXLControlNetPipeline``: ``keep = 1 - (i / N < s or (i + 1) / N > e)``),
  computed with the same float operations. ``start=0, end=1``: every step; ``end=0``:
  none. A window shorter than one step may hold no step at all.
- **schedule**: within the window, with the step's progress ``p`` taken at its middle,
  ``p = ((i + 0.5) / N - start) / (end - start)`` (strictly between 0 and 1 for a step
  that acts), the scale is ``scale * w(p)``:

  ============  =====================  =====================================
  name          w(p)                   shape
  ============  =====================  =====================================
  constant      1                      the default
  linear_up     p                      from ~0 to ~1
  linear_down   1 - p                  from ~1 to ~0
  ease_in       p ** 2                 starts slowly, ends strong
  ease_out      1 - (1 - p) ** 2       starts strong, flattens out
  ============  =====================  =====================================

A subject whose scale at a step is 0 (outside its window, or a scale of 0) is absent
from the image branches at that step: in ``overwrite`` mode the subject under it takes
its tokens, exactly as if it had not been given (:class:`anyms.Layout` routes each set
of active subjects once).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

__all__ = ["SCHEDULES", "check_window", "check_schedule", "step_acts", "step_progress", "step_weight"]

SCHEDULES: Dict[str, Callable[[float], float]] = {
    "constant": lambda p: 1.0,
    "linear_up": lambda p: p,
    "linear_down": lambda p: 1.0 - p,
    "ease_in": lambda p: p * p,
    "ease_out": lambda p: 1.0 - (1.0 - p) * (1.0 - p),
}


def _fraction(value, name: str) -> float:
    if isinstance(value, (bool, str, bytes)):
        raise ValueError(f"{name} must be a number in [0, 1] (a fraction of the denoising steps), got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a number in [0, 1] (a fraction of the denoising steps), "
                         f"got {value!r}") from None
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1] (a fraction of the denoising steps), got {value!r}")
    return number


def check_window(start, end, name: str) -> Tuple[float, float]:
    """``(start, end)`` as floats; ValueError naming ``{name}.start`` / ``{name}.end`` unless both
    are numbers in ``[0, 1]`` with ``start <= end``."""
    lo, hi = _fraction(start, f"{name}.start"), _fraction(end, f"{name}.end")
    if lo > hi:
        raise ValueError(f"{name}.start ({lo:g}) must not be after {name}.end ({hi:g})")
    return lo, hi


def check_schedule(schedule, name: str) -> str:
    """``schedule`` if it names one of :data:`SCHEDULES`; else ValueError naming ``name``."""
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise ValueError(f"{name} must be one of {list(SCHEDULES)}, got {schedule!r}")
    return schedule


def step_acts(step: int, num_steps: int, start: float, end: float) -> bool:
    """Whether step ``step`` of ``num_steps`` lies in the window (diffusers' ControlNet rule)."""
    return not (step / num_steps < start or (step + 1) / num_steps > end)


def step_progress(step: int, num_steps: int, start: float, end: float) -> float:
    """The progress ``p`` of a step that acts, at its middle: ``((i + 0.5) / N - start) / (end - start)``."""
    return ((step + 0.5) / num_steps - start) / (end - start)


def step_weight(step: int, num_steps: int, start: float, end: float, schedule: str) -> float:
    """The factor of a subject's scale at ``step``: 0 outside its window, else its schedule's ``w(p)``."""
    if not step_acts(step, num_steps, start, end):
        return 0.0
    return float(SCHEDULES[schedule](step_progress(step, num_steps, start, end)))
