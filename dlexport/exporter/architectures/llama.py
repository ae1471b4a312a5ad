"""Llama family (SmolLM2, TinyLlama, Llama 2/3): the layout every default in base.py describes."""
from __future__ import annotations

from .base import Architecture
from .registry import register


@register
class LlamaArchitecture(Architecture):
    model_type = "llama"
