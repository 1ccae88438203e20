"""The rules of a tiled upscale's options (scale, tile, overlap, strength), without a model.

:func:`anyms.tiled_upscale` checks its arguments with :func:`check_upscale_options` given the
pipeline's U-Net geometry; ``anyms generate --upscale`` checks the same options with the
same function before any model loads (the geometry read from the model's config files where
it can be, else with the rules that need no geometry, the rest once the model is loaded), and
the PNG record's ``"upscale"`` with the model-free rules. One place for each rule; the
``names`` argument says how the errors name each option (``tile``, ``--upscale-tile``,
``--jobs FILE:LINE: "upscale.tile"``).

No torch import: the command line checks its input before importing the model stack.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

__all__ = ["SCALES", "DEFAULT_STRENGTH", "ARCH_GEOMETRY", "UNetGeometry", "geometry_from_configs", "geometry_of_pipe",
           "geometry_of_folder", "check_upscale_options"]

SCALES = (2, 4)
DEFAULT_STRENGTH = 0.3
OPTIONS = ("scale", "tile", "overlap", "strength")


@dataclass(frozen=True)
class UNetGeometry:
    """What the tile rules need of a U-Net pipeline: the VAE's pixels per latent cell
    (``factor``), the U-Net's levels and its native latent side (``sample``)."""

    factor: int
    levels: int
    sample: int

    @property
    def unit(self) -> int:
        """The pixel multiple the U-Net takes: one cell of its coarsest level."""
        return self.factor * 2 ** (self.levels - 1)

    @property
    def native(self) -> int:
        """The U-Net's native image side in pixels (the default tile)."""
        return self.sample * self.factor


def geometry_from_configs(unet_config, vae_config) -> UNetGeometry:
    """The geometry from a U-Net's and a VAE's configs (dicts or diffusers' config objects),
    the VAE's factor computed as diffusers' pipelines compute ``vae_scale_factor``."""
    def get(config, key):
        return config[key] if isinstance(config, dict) else getattr(config, key)

    sample = get(unet_config, "sample_size")
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return UNetGeometry(2 ** (len(get(vae_config, "block_out_channels")) - 1),
                        len(get(unet_config, "block_out_channels")), int(sample))


def geometry_of_pipe(pipe) -> UNetGeometry:
    """The geometry of a loaded U-Net pipeline."""
    sample = pipe.unet.config.sample_size
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return UNetGeometry(int(pipe.vae_scale_factor), len(pipe.unet.config.block_out_channels), int(sample))


def geometry_of_folder(folder: str) -> Optional[UNetGeometry]:
    """The geometry a diffusers pipeline folder declares (its ``unet/`` and ``vae/`` configs),
    read without loading anything; None where they cannot be read (the model then tells, once
    loaded)."""
    try:
        configs = []
        for part in ("unet", "vae"):
            with open(os.path.join(folder, part, "config.json"), encoding="utf-8") as f:
                configs.append(json.load(f))
        return geometry_from_configs(*configs)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _name(names: Optional[Dict[str, str]], key: str) -> str:
    return (names or {}).get(key, key)


def check_upscale_options(scale, tile=None, overlap=None, strength=DEFAULT_STRENGTH, num_inference_steps=None, *,
                          geometry: Optional[UNetGeometry] = None,
                          names: Optional[Dict[str, str]] = None) -> Tuple[int, Optional[int], Optional[int], float]:
    """Check a tiled upscale's options; return ``(scale, tile, overlap, strength)``.

    ``tile`` and ``overlap`` are pixels of the output. With ``geometry`` the defaults are applied
    (tile: the U-Net's native side; overlap: a quarter of the tile, down to the unit) and both
    must be multiples of its unit, the tile at least one unit (one cell of the U-Net's coarsest
    level); without it only what needs no model is checked and an unset tile or overlap stays
    None. ``num_inference_steps`` (when given) must run at least one step at ``strength``.
    Raises ValueError, one line starting with the option's name in ``names``."""
    if isinstance(scale, bool) or scale not in SCALES:
        raise ValueError(f"{_name(names, 'scale')} must be 2 or 4, got {scale!r}")
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 < strength <= 1:
        raise ValueError(f"{_name(names, 'strength')} must be a number in (0, 1] (how far the tiles are noised "
                         f"again), got {strength!r}")
    if num_inference_steps is not None:
        steps = _name(names, "num_inference_steps")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral) \
                or num_inference_steps < 1:
            raise ValueError(f"{steps} must be a positive int, got {num_inference_steps!r}")
        if int(num_inference_steps * strength) < 1:
            raise ValueError(f"{_name(names, 'strength')} {strength} x {steps} {num_inference_steps} runs no step: "
                             f"raise {steps} to at least {math.ceil(1 / strength)}")
    unit = geometry.unit if geometry is not None else None
    if tile is None and geometry is not None:
        tile = geometry.native
    if tile is not None:
        tile = _check_int(tile, _name(names, "tile"))
        if unit is None and tile < 1:
            raise ValueError(f"{_name(names, 'tile')} must be a positive number of pixels, got {tile}")
        if unit is not None and (tile < unit or tile % unit):
            raise ValueError(f"{_name(names, 'tile')} must be a multiple of {unit} pixels, at least {unit} (one cell "
                             f"of the U-Net's coarsest level: the VAE's factor {geometry.factor} x the U-Net's "
                             f"downsampling {unit // geometry.factor}), got {tile}")
    if overlap is None and unit is not None:
        overlap = tile // 4 // unit * unit
    if overlap is not None:
        overlap = _check_int(overlap, _name(names, "overlap"))
        if overlap < 0 or (unit is not None and overlap % unit):
            multiple = "" if unit is None else f"a multiple of {unit} pixels, "
            raise ValueError(f"{_name(names, 'overlap')} must be {multiple}at least 0, got {overlap}")
        if tile is not None and overlap >= tile:
            raise ValueError(f"{_name(names, 'overlap')} must be smaller than the tile ({tile} pixels), got {overlap}")
    return int(scale), tile, overlap, float(strength)


def _check_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int (pixels of the output), got {value!r}")
    return int(value)


# The geometry of each family's checkpoints (SDXL: 3 levels, 1024 px; SD 1.5: 4 levels, 512 px),
# for a model on the Hub before it is loaded.
ARCH_GEOMETRY = {"sdxl": UNetGeometry(8, 3, 128), "sd15": UNetGeometry(8, 4, 64)}
