"""Llama family (SmolLM2, TinyLlama, Llama 2/3): RMSNorm, rotary positions, grouped key/value heads."""
from __future__ import annotations

import torch
from torch import nn

from .base import Architecture, ArchNumbers
from .registry import register


class _LlamaEmbed(nn.Module):
    """Token embedding plus the rotary cos/sin, computed once per step and shared by every layer."""

    def __init__(self, inner):
        super().__init__()
        self.tokens, self.rotary = inner.embed_tokens, inner.rotary_emb

    def forward(self, input_ids, position_ids):
        hidden = self.tokens(input_ids)
        cos, sin = self.rotary(hidden, position_ids)
        return hidden, cos, sin


class _LlamaHead(nn.Module):
    def __init__(self, inner, lm_head):
        super().__init__()
        self.norm, self.lm_head = inner.norm, lm_head

    def forward(self, hidden_states):
        return self.lm_head(self.norm(hidden_states))


@register
class LlamaArchitecture(Architecture):
    model_type = "llama"
    rotary = True

    def _numbers(self) -> ArchNumbers:
        c = self.config
        return ArchNumbers(
            model_type=c.model_type,
            num_layers=c.num_hidden_layers,
            hidden_size=c.hidden_size,
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_key_value_heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            vocab_size=c.vocab_size,
            max_positions=c.max_position_embeddings,
        )

    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def embed_module(self) -> nn.Module:
        return _LlamaEmbed(self.model.model)

    def head_module(self) -> nn.Module:
        return _LlamaHead(self.model.model, self.model.lm_head)

    def call_layer(self, layer, hidden, mask, cache, rotary) -> torch.Tensor:
        return layer(hidden, attention_mask=mask, past_key_values=cache, use_cache=True, position_embeddings=rotary)
