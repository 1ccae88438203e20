"""anyms_kernels: fused region-masked multi-branch cross-attention for AnyMS.

    import anyms_kernels as ak
    tok = ak.rasterize_boxes(boxes, (h, w))          # or ak.rasterize_masks(masks, (h, w))
    routing = ak.build_routing(tok, (h, w))          # once per layout and grid
    out = ak.region_cross_attention(q, k_text, v_text, k_subj, v_subj, routing, (h, w))

No diffusers import anywhere in this package; importing it never touches a GPU.
"""
from .ops.region_attention import TRITON_DTYPES, TRITON_HEAD_DIMS, region_cross_attention
from .regions import coverage_count, layer_grid, mask_bbox, rasterize_boxes, rasterize_masks, token_owner
from .routing import Routing, build_routing

__version__ = "0.1.0"

__all__ = [
    "region_cross_attention",
    "rasterize_boxes",
    "rasterize_masks",
    "mask_bbox",
    "build_routing",
    "Routing",
    "token_owner",
    "coverage_count",
    "layer_grid",
    "TRITON_HEAD_DIMS",
    "TRITON_DTYPES",
    "__version__",
]
