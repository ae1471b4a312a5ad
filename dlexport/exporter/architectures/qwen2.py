"""Qwen2 / Qwen2.5: Llama's layout; the q/k/v biases live inside Hugging Face's attention, and sliding-window layers
(``use_sliding_window`` from ``max_window_layers`` on) come through ``layer_types`` as base.py reads them."""
from __future__ import annotations

from .base import Architecture
from .registry import register


@register
class Qwen2Architecture(Architecture):
    model_type = "qwen2"
