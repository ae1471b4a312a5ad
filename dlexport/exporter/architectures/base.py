"""What every architecture shares: the I/O contract of the three kinds of subgraph, and the export wrappers.

The contract (the runtime and the engine builders rely on it; `manifest.json` records it per file):

- ``embed``: ``input_ids`` [batch, tokens] int64, ``position_ids`` [batch, tokens] int64
  -> ``hidden_states`` [batch, tokens, hidden] (+ ``rotary_cos``/``rotary_sin`` [batch, tokens, head_dim] for rotary models).
- ``layer_NN``: ``hidden_states``, ``attention_mask`` [batch, 1, tokens, past + tokens] (additive, 0 or a large
  negative), ``rotary_cos``/``rotary_sin`` where needed, ``past_key_values.N.key``/``.value`` [batch, kv_heads, past, head_dim]
  -> ``hidden_states_out``, ``present.N.key``/``.value`` [batch, kv_heads, tokens, head_dim].

  ``present`` holds the key/values of the *new* tokens only. The runtime owns one preallocated cache buffer per layer
  and passes all of it as ``past`` (masking the slots not yet written); it writes ``present`` into the buffer at the
  current length. That is what lets the cache grow, roll back and skip layers without ever being copied.
  ``past`` may have length 0.
- ``head``: ``hidden_states`` [batch, tokens, hidden] from ANY layer -> ``logits`` [batch, tokens, vocab].
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn

from ...contract import (BATCH, KEYS, PAST, TOKENS, TensorSpec, past_key_name, past_value_name,  # noqa: F401
                        present_key_name, present_value_name)

@dataclass(frozen=True)
class ArchNumbers:
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int

    def to_json(self) -> dict:
        return asdict(self)


class ExportCache:
    """Stand-in for a transformers ``Cache`` inside an export wrapper.

    Attention only calls ``update``: it returns past + new for the attention, and keeps the new key/values so the
    wrapper can output them as ``present``.
    """

    is_compileable = False

    def __init__(self, past_key: torch.Tensor, past_value: torch.Tensor):
        self.past_key, self.past_value = past_key, past_value
        self.new_key = self.new_value = None

    def update(self, key, value, layer_idx, *args, **kwargs):
        self.new_key, self.new_value = key, value
        return torch.cat([self.past_key, key], dim=2), torch.cat([self.past_value, value], dim=2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past_key.shape[2]


class Architecture:
    """One small class per architecture: where its modules live, how they are wrapped, and the I/O they export with.

    Subclasses set ``model_type`` and ``rotary`` and implement the four ``_find``/``_wrap`` hooks; everything else
    (I/O specs, dummy inputs, wrapper plumbing) is shared here.
    """

    model_type: ClassVar[str]
    rotary: ClassVar[bool]

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.numbers = self._numbers()
        # Eager attention: explicit matmul + fp32 softmax, which exports to plain ONNX ops every backend parses.
        self.config._attn_implementation = "eager"

    # -- hooks ----------------------------------------------------------------------------------------------------
    def _numbers(self) -> ArchNumbers:
        raise NotImplementedError

    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def embed_module(self) -> nn.Module:
        """(input_ids, position_ids) -> hidden_states[, cos, sin]"""
        raise NotImplementedError

    def head_module(self) -> nn.Module:
        """hidden_states -> logits"""
        raise NotImplementedError

    def call_layer(self, layer: nn.Module, hidden, mask, cache, rotary) -> torch.Tensor:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------------------------
    def layer_module(self, index: int) -> nn.Module:
        return _LayerWrapper(self, index)

    def float_dtype(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def embed_io(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        n, f = self.numbers, self.float_dtype()
        inputs = [TensorSpec("input_ids", (BATCH, TOKENS), "int64"), TensorSpec("position_ids", (BATCH, TOKENS), "int64")]
        outputs = [TensorSpec("hidden_states", (BATCH, TOKENS, n.hidden_size), f)]
        if self.rotary:
            outputs += [TensorSpec(x, (BATCH, TOKENS, n.head_dim), f) for x in ("rotary_cos", "rotary_sin")]
        return inputs, outputs

    def layer_io(self, i: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
        n, f = self.numbers, self.float_dtype()
        kv = (BATCH, n.num_kv_heads, PAST, n.head_dim)
        inputs = [
            TensorSpec("hidden_states", (BATCH, TOKENS, n.hidden_size), f),
            TensorSpec("attention_mask", (BATCH, 1, TOKENS, KEYS), f),
        ]
        if self.rotary:
            inputs += [TensorSpec(x, (BATCH, TOKENS, n.head_dim), f) for x in ("rotary_cos", "rotary_sin")]
        inputs += [TensorSpec(past_key_name(i), kv, f), TensorSpec(past_value_name(i), kv, f)]
        new_kv = (BATCH, n.num_kv_heads, TOKENS, n.head_dim)
        outputs = [
            TensorSpec("hidden_states_out", (BATCH, TOKENS, n.hidden_size), f),
            TensorSpec(present_key_name(i), new_kv, f),
            TensorSpec(present_value_name(i), new_kv, f),
        ]
        return inputs, outputs

    def head_io(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        n, f = self.numbers, self.float_dtype()
        return (
            [TensorSpec("hidden_states", (BATCH, TOKENS, n.hidden_size), f)],
            [TensorSpec("logits", (BATCH, TOKENS, n.vocab_size), f)],
        )


class _LayerWrapper(nn.Module):
    """One decoder layer as a pure function of tensors, for export and for validation."""

    def __init__(self, arch: Architecture, index: int):
        super().__init__()
        self.arch = arch
        self.layer = arch.layers()[index]
        self.rotary = arch.rotary

    def forward(self, hidden_states, attention_mask, *rest):
        rotary = (rest[0], rest[1]) if self.rotary else None
        past_key, past_value = rest[-2], rest[-1]
        cache = ExportCache(past_key, past_value)
        out = self.arch.call_layer(self.layer, hidden_states, attention_mask, cache, rotary)
        if isinstance(out, tuple):
            out = out[0]
        return out, cache.new_key, cache.new_value
