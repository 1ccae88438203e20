"""The literal equations of METHOD.md: readable, float64-capable, the oracle of every test."""
from .region_attention import attention, crop_and_merge, region_cross_attention_reference

__all__ = ["attention", "crop_and_merge", "region_cross_attention_reference"]
