"""Qwen3: Qwen2's layout without biases, with a per-head RMSNorm on q and k (inside Hugging Face's attention)."""
from __future__ import annotations

from .base import Architecture
from .registry import register


@register
class Qwen3Architecture(Architecture):
    model_type = "qwen3"
