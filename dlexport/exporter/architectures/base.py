"""What every architecture shares: the I/O contract of the three kinds of subgraph, and the export wrappers.

The contract (the runtime and the engine builders rely on it; `manifest.json` records it per file):

- ``embed``: ``input_ids`` [batch, tokens] int64, ``position_ids`` [batch, tokens] int64
  -> ``hidden_states`` [batch, tokens, hidden], plus for rotary models one ``rotary_cos``/``rotary_sin`` pair
  [batch, tokens, rotary_dim] per rotary kind: ``rotary_cos``/``rotary_sin`` for the global layers and, where local
  (sliding-window) layers have their own rotary base (Gemma 3), ``rotary_cos_local``/``rotary_sin_local``.
- ``layer_NN``: ``hidden_states``, ``attention_mask`` [batch, 1, tokens, past + tokens] (additive, 0 or a large
  negative), the rotary pair of the layer's kind where needed (named as the embed outputs it takes),
  ``past_key_values.N.key``/``.value`` [batch, kv_heads, past, head_dim]
  -> ``hidden_states_out``, ``present.N.key``/``.value`` [batch, kv_heads, tokens, head_dim].

  ``present`` holds the key/values of the *new* tokens only. The runtime owns one preallocated cache buffer per layer
  and passes all of it as ``past`` (masking the slots not yet written); it writes ``present`` into the buffer at the
  current length. That is what lets the cache grow, roll back and skip layers without ever being copied.
  ``past`` may have length 0. The layer sees exactly the keys its mask allows: a sliding-window layer (its window is
  ``layer_windows[N]`` in the manifest's architecture numbers, None for global attention) must get the mask
  ``attention_mask()`` below builds with that window, so that it sees only the last ``window`` positions.
- ``head``: ``hidden_states`` [batch, tokens, hidden] from ANY layer -> ``logits`` [batch, tokens, vocab].
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn

from ...contract import (BATCH, KEYS, PAST, TOKENS, TensorSpec, past_key_name, past_value_name,  # noqa: F401
                        present_key_name, present_value_name)
from .registry import UnsupportedModelError

# rope types whose frequencies depend on the sequence length at run time: a traced graph would freeze one branch
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")

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
    layer_windows: tuple  # per layer: positions a sliding-window layer sees (itself included), None for global

    def to_json(self) -> dict:
        d = asdict(self)
        d["layer_windows"] = list(self.layer_windows)
        return d


def rotary_names(kind: str | None) -> tuple[str, str]:
    """The embed outputs / layer inputs of one rotary kind: None for the global one, "local" for sliding layers."""
    suffix = f"_{kind}" if kind else ""
    return f"rotary_cos{suffix}", f"rotary_sin{suffix}"


def attention_mask(key_slots: torch.Tensor, key_ok: torch.Tensor, query_slots: torch.Tensor, window: int | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """The additive mask [batch, 1, queries, keys] every caller builds (runtime, validation, references).

    A key is visible to a query when it is valid (``key_ok`` [batch, keys]: written and not padding), not in the
    future (its slot <= the query's) and, with a ``window``, one of the last ``window`` positions (query slot - key
    slot < window, as Hugging Face's sliding-window mask). The last ``queries`` keys are the new tokens themselves:
    each query always sees its own key, so a padding row never has every key masked (its softmax stays finite).
    """
    rel = query_slots[:, None] - key_slots[None, :]
    ok = rel >= 0
    if window is not None:
        ok &= rel < window
    ok = key_ok[:, None, :] & ok[None]
    q, k = len(query_slots), len(key_slots)
    ok[:, :, k - q:] |= torch.eye(q, dtype=torch.bool, device=ok.device)
    return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, torch.finfo(dtype).min)[:, None]


def sequence_mask(valid: torch.Tensor, queries: int, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """The mask for the last ``queries`` slots of whole sequences (no cache buffer): ``valid`` [batch, slots]."""
    slots = torch.arange(valid.shape[1], device=valid.device)
    return attention_mask(slots, valid, slots[-queries:], window, dtype)


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

    The defaults fit the Hugging Face decoders laid out as Llama's (``model.embed_tokens``, ``model.layers``,
    ``model.norm``, ``model.rotary_emb``, ``lm_head``; rotary positions): config numbers, sliding windows, I/O specs,
    embed/head wrappers and the layer call are all shared here. A family's class sets ``model_type`` and overrides
    only what differs from that.
    """

    model_type: ClassVar[str]
    rotary: ClassVar[bool] = True

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.check_config()
        self.numbers = self._numbers()
        # Eager attention: explicit matmul + fp32 softmax, which exports to plain ONNX ops every backend parses.
        self.config._attn_implementation = "eager"

    # -- what a family may override -----------------------------------------------------------------------------
    def check_config(self) -> None:
        """Refuse configurations the export cannot reproduce exactly."""
        if not self.rotary:
            return
        kinds = self.decoder().rotary_emb.rope_type
        kinds = kinds.values() if isinstance(kinds, dict) else [kinds]
        bad = sorted(set(kinds) & set(_LENGTH_DEPENDENT_ROPE))
        if bad:
            raise UnsupportedModelError(
                f"rope type {bad[0]!r} changes its frequencies with the sequence length at run time, which a traced "
                "graph cannot follow; dlexport exports rope types with fixed frequencies (default, linear, llama3, "
                "yarn). Use a config without it (e.g. the model's short-context variant).")

    def decoder(self) -> nn.Module:
        """The module holding the token embedding, the layers and the final norm."""
        return self.model.model

    def layers(self) -> nn.ModuleList:
        return self.decoder().layers

    def layer_window(self, i: int) -> int | None:
        """Positions layer ``i`` attends to (itself included), None for global attention; Hugging Face's rule:
        ``sliding_window`` on the layers ``layer_types`` marks sliding, or on every layer when there is no such list."""
        window = getattr(self.config, "sliding_window", None)
        types = getattr(self.config, "layer_types", None)
        return window if types is None or types[i] == "sliding_attention" else None

    def rotary_kinds(self) -> list[str | None]:
        """The rotary pairs the embed computes (see ``rotary_names``); one shared by every layer by default."""
        return [None] if self.rotary else []

    def layer_rotary(self, i: int) -> str | None:
        """Which rotary kind layer ``i`` takes."""
        return None

    def embed_module(self) -> nn.Module:
        """(input_ids, position_ids) -> hidden_states[, cos, sin per rotary kind]"""
        return _DecoderEmbed(self.decoder(), self.rotary_kinds(), self._rotary_call)

    def _rotary_call(self, rotary: nn.Module, hidden, position_ids, kind):
        return rotary(hidden, position_ids)

    def head_module(self) -> nn.Module:
        """hidden_states -> logits"""
        softcap = getattr(self.config, "final_logit_softcapping", None)
        return _DecoderHead(self.decoder().norm, self.model.lm_head, softcap)

    def call_layer(self, layer: nn.Module, hidden, mask, cache, rotary) -> torch.Tensor:
        extra = {"position_embeddings": rotary} if rotary is not None else {}
        return layer(hidden, attention_mask=mask, past_key_values=cache, use_cache=True, **extra)

    # -- shared ---------------------------------------------------------------------------------------------------
    def _numbers(self) -> ArchNumbers:
        c = self.config
        heads = c.num_attention_heads
        return ArchNumbers(
            model_type=c.model_type,
            num_layers=c.num_hidden_layers,
            hidden_size=c.hidden_size,
            num_heads=heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            vocab_size=c.vocab_size,
            max_positions=c.max_position_embeddings,
            layer_windows=tuple(self.layer_window(i) for i in range(c.num_hidden_layers)),
        )

    def layer_module(self, index: int) -> nn.Module:
        return _LayerWrapper(self, index)

    def layer_structure(self, i: int) -> tuple:
        """Layers with equal keys trace to the same graph up to their weights (fast export traces one of them): the
        module tree with its settings, every parameter's and buffer's name, shape and dtype, the rotary kind and
        whether the layer has a window (its attention module may differ even where eager attention does not)."""
        layer = self.layers()[i]
        tensors = [*layer.named_parameters(), *layer.named_buffers()]
        return (repr(layer), tuple((n, tuple(t.shape), t.dtype) for n, t in tensors), self.layer_rotary(i),
                self.numbers.layer_windows[i] is None)

    def float_dtype(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def rotary_dim(self) -> int:
        """Width of cos/sin: the head dim, or the rotated part of it (partial rotary, e.g. Phi-4-mini)."""
        rotary = self.decoder().rotary_emb
        freqs = [b for name, b in rotary.named_buffers() if name.endswith("inv_freq") and "original" not in name]
        return 2 * freqs[0].numel()

    def _rotary_specs(self, kinds) -> list[TensorSpec]:
        if not kinds:
            return []
        shape = (BATCH, TOKENS, self.rotary_dim())
        return [TensorSpec(x, shape, self.float_dtype()) for kind in kinds for x in rotary_names(kind)]

    def embed_io(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        n, f = self.numbers, self.float_dtype()
        inputs = [TensorSpec("input_ids", (BATCH, TOKENS), "int64"), TensorSpec("position_ids", (BATCH, TOKENS), "int64")]
        outputs = [TensorSpec("hidden_states", (BATCH, TOKENS, n.hidden_size), f)]
        return inputs, outputs + self._rotary_specs(self.rotary_kinds())

    def layer_io(self, i: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
        n, f = self.numbers, self.float_dtype()
        kv = (BATCH, n.num_kv_heads, PAST, n.head_dim)
        inputs = [
            TensorSpec("hidden_states", (BATCH, TOKENS, n.hidden_size), f),
            TensorSpec("attention_mask", (BATCH, 1, TOKENS, KEYS), f),
        ]
        if self.rotary:
            inputs += self._rotary_specs([self.layer_rotary(i)])
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

    def split_embed(self, out) -> tuple[torch.Tensor, dict]:
        """Embed module output -> (hidden_states, {rotary name: tensor}) for ``_LayerWrapper.step``."""
        out = out if isinstance(out, tuple) else (out,)
        return out[0], {s.name: t for s, t in zip(self.embed_io()[1][1:], out[1:])}


class _DecoderEmbed(nn.Module):
    """Token embedding plus the rotary cos/sin of each kind, computed once per step and shared by the layers."""

    def __init__(self, decoder, kinds, rotary_call):
        super().__init__()
        self.tokens, self.kinds, self.rotary_call = decoder.embed_tokens, kinds, rotary_call
        self.rotary = decoder.rotary_emb if kinds else None

    def forward(self, input_ids, position_ids):
        hidden = self.tokens(input_ids)  # Gemma's scaled embedding multiplies by sqrt(hidden) itself
        out = [hidden]
        for kind in self.kinds:
            out += self.rotary_call(self.rotary, hidden, position_ids, kind)
        return tuple(out) if len(out) > 1 else hidden


class _DecoderHead(nn.Module):
    """Final norm, LM head, and the tanh soft cap of the logits where the config sets one (Gemma)."""

    def __init__(self, norm, lm_head, softcap: float | None = None):
        super().__init__()
        self.norm, self.lm_head, self.softcap = norm, lm_head, softcap

    def cap(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap

    def forward(self, hidden_states):
        return self.cap(self.lm_head(self.norm(hidden_states)))


class _LayerWrapper(nn.Module):
    """One decoder layer as a pure function of tensors, for export and for validation."""

    def __init__(self, arch: Architecture, index: int):
        super().__init__()
        self.arch = arch
        self.layer = arch.layers()[index]
        self.rotary = arch.rotary
        self.window = arch.numbers.layer_windows[index]
        self.rotary_inputs = rotary_names(arch.layer_rotary(index)) if arch.rotary else ()

    def forward(self, hidden_states, attention_mask, *rest):
        rotary = (rest[0], rest[1]) if self.rotary else None
        past_key, past_value = rest[-2], rest[-1]
        cache = ExportCache(past_key, past_value)
        out = self.arch.call_layer(self.layer, hidden_states, attention_mask, cache, rotary)
        if isinstance(out, tuple):
            out = out[0]
        return out, cache.new_key, cache.new_value

    def step(self, hidden, mask, rotary: dict, past_key, past_value):
        """Call with the embed's rotary outputs by name (``Architecture.split_embed``): picks this layer's pair."""
        return self(hidden, mask, *(rotary[n] for n in self.rotary_inputs), past_key, past_value)
