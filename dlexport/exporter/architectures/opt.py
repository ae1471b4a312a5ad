"""OPT (all sizes): learned positions with an offset of 2, optional project_in/out, pre- or post-layer-norm."""
from __future__ import annotations

from torch import nn

from .base import Architecture
from .registry import register


class _OptEmbed(nn.Module):
    def __init__(self, decoder):
        super().__init__()
        self.tokens, self.positions, self.project_in = decoder.embed_tokens, decoder.embed_positions, decoder.project_in

    def forward(self, input_ids, position_ids):
        hidden = self.tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        # Same lookup as OPTLearnedPositionalEmbedding(position_ids=...): the table is offset by 2.
        return hidden + self.positions.weight[position_ids + self.positions.offset]


class _OptHead(nn.Module):
    def __init__(self, decoder, lm_head):
        super().__init__()
        self.norm, self.project_out, self.lm_head = decoder.final_layer_norm, decoder.project_out, lm_head

    def forward(self, hidden_states):
        if self.norm is not None:  # None when do_layer_norm_before is False (opt-350m)
            hidden_states = self.norm(hidden_states)
        if self.project_out is not None:
            hidden_states = self.project_out(hidden_states)
        return self.lm_head(hidden_states)


@register
class OptArchitecture(Architecture):
    model_type = "opt"
    rotary = False

    def decoder(self) -> nn.Module:
        return self.model.model.decoder

    def embed_module(self) -> nn.Module:
        return _OptEmbed(self.decoder())

    def head_module(self) -> nn.Module:
        return _OptHead(self.decoder(), self.model.lm_head)
