"""Mistral: Llama's layout with sliding-window attention on every layer when the config has a ``sliding_window``."""
from __future__ import annotations

from .base import Architecture
from .registry import register


@register
class MistralArchitecture(Architecture):
    model_type = "mistral"

    def layer_window(self, i: int) -> int | None:
        # Hugging Face's Mistral applies the window to every layer, even when a config carries ``layer_types``.
        return self.config.sliding_window
