"""Phi-3 / Phi-4-mini: fused qkv and gate_up projections (inside Hugging Face's modules), partial rotary where
``partial_rotary_factor`` < 1 (cos/sin are then narrower than a head), ``sliding_window`` on every layer if set."""
from __future__ import annotations

from .base import Architecture
from .registry import register


@register
class Phi3Architecture(Architecture):
    model_type = "phi3"
