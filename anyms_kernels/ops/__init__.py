"""One module per op: kernel -> launcher -> torch.library registration -> public function."""
from .region_attention import TRITON_DTYPES, TRITON_HEAD_DIMS, region_cross_attention

__all__ = ["region_cross_attention", "TRITON_HEAD_DIMS", "TRITON_DTYPES"]
