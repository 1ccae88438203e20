"""The layout of one generation: subjects' boxes, scales and the overlap mode.

A ``Layout`` is made once per generation (by the pipeline, or by a user of the
processor) and shared by every AnyMS processor of the U-Net. It turns the
normalised boxes into token boxes once per layer grid and device, so that the
70 cross-attention layers of SDXL do no box arithmetic per call.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from anyms_kernels.regions import Grid, check_grid, check_mode, check_normalized_boxes, layer_grid, rasterize_boxes


class Layout:
    """Boxes (normalised ``(x0, y0, x1, y1)``, ascending priority), scales and mode.

    Args:
        boxes: ``[S, 4]`` floats in ``[0, 1]``; later boxes are on top where they overlap.
        latent_hw: ``(h, w)`` of the latent the U-Net denoises (image size / 8 for SD).
        scales: lambda_s, a float or ``S`` floats (IP-Adapter scale per subject).
        mode: ``"overwrite"`` (AnyMS) or ``"sum"`` (the paper's Eq. 7, diffusers' masks).
    """

    def __init__(self, boxes, latent_hw: Grid, scales=1.0, mode: str = "overwrite"):
        boxes = torch.as_tensor(boxes, dtype=torch.float64)
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"boxes must be [S, 4] normalised (x0, y0, x1, y1), got shape {tuple(boxes.shape)}")
        if boxes.numel():
            check_normalized_boxes(boxes, "boxes")
        self.boxes = boxes
        self.latent_hw = check_grid(latent_hw, "latent_hw")
        self.mode = check_mode(mode)
        num = boxes.shape[0]
        scales = torch.as_tensor(scales, dtype=torch.float32)
        if scales.dim() == 0:
            scales = scales.expand(num).clone()
        if scales.shape != (num,):
            raise ValueError(f"scales must be a float or {num} floats (one per box), got shape {tuple(scales.shape)}")
        if not torch.isfinite(scales).all():
            raise ValueError("scales holds NaN or inf")
        self.scales = scales
        self._cache: Dict[Tuple[Grid, torch.device], torch.Tensor] = {}
        self._scale_cache: Dict[torch.device, torch.Tensor] = {}

    @property
    def num_subjects(self) -> int:
        return self.boxes.shape[0]

    def grid_for(self, num_tokens: int) -> Grid:
        """The ``(h, w)`` of a layer with ``num_tokens`` query tokens (odd sizes round up)."""
        return layer_grid(self.latent_hw, num_tokens)

    def token_boxes(self, num_tokens: int, device) -> Tuple[Grid, torch.Tensor]:
        """``(grid, int32 [S, 4] token boxes on device)``, computed once per grid and device."""
        grid = self.grid_for(num_tokens)
        key = (grid, torch.device(device))
        if key not in self._cache:
            self._cache[key] = rasterize_boxes(self.boxes, grid).to(device)
        return grid, self._cache[key]

    def subject_scale(self, device) -> torch.Tensor:
        device = torch.device(device)
        if device not in self._scale_cache:
            self._scale_cache[device] = self.scales.to(device)
        return self._scale_cache[device]

    def __repr__(self) -> str:
        return f"Layout(S={self.num_subjects}, latent_hw={self.latent_hw}, mode={self.mode!r})"
