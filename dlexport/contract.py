"""The I/O contract every layer of dlexport shares: tensor specs, subgraph input/output names, dimension names.

A leaf module (it imports nothing of dlexport): the exporter writes graphs to it, the engines and the runtime feed
them by it, so none of them needs another's internals.

- ``embed``: ``input_ids``, ``position_ids`` [batch, tokens] -> ``hidden_states`` (+ ``rotary_cos``/``rotary_sin``).
- ``layer_NN``: ``hidden_states``, ``attention_mask`` [batch, 1, tokens, past_plus_tokens], rotary where needed,
  ``past_key_values.N.key``/``.value`` -> ``hidden_states_out``, ``present.N.key``/``.value``. Portable layers take
  a past of any length and return the new tokens' key/values; in-place layers (exporter/kv_inplace.py) take the
  whole buffer (``capacity`` slots) plus ``past_length`` and return the buffer updated in place.
- ``head``: ``hidden_states`` of any layer -> ``logits``.
"""
from __future__ import annotations

from dataclasses import dataclass

BATCH, TOKENS, PAST, KEYS, CAPACITY = "batch", "tokens", "past", "past_plus_tokens", "capacity"
PAST_LENGTH = "past_length"  # in-place layers: filled slots per row, where the new key/values are written
KV_FLAVOURS = ("inplace", "portable")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # ints for fixed dims, strings for dynamic ones
    dtype: str  # "int64", "float32", "float16", "bfloat16"

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], tuple(d["shape"]), d["dtype"])


def past_key_name(i: int) -> str:
    return f"past_key_values.{i}.key"


def past_value_name(i: int) -> str:
    return f"past_key_values.{i}.value"


def present_key_name(i: int) -> str:
    return f"present.{i}.key"


def present_value_name(i: int) -> str:
    return f"present.{i}.value"


def hidden_tap_name(k: int) -> str:
    """A layer group's output holding the hidden states after its first ``k`` layers (engines/onnxruntime/group.py)."""
    return f"hidden_states_out.{k}"


def past_for_present(name: str) -> str:
    """The past input an in-place layer's present output is bound to: ``present.N.key`` -> ``past_key_values.N.key``."""
    prefix, index, kind = name.split(".")
    if prefix != "present" or kind not in ("key", "value"):
        raise ValueError(f"{name!r} is not a present.N.key/value output")
    return past_key_name(int(index)) if kind == "key" else past_value_name(int(index))


def is_inplace(inputs) -> bool:
    """Whether a layer with these input specs is an in-place KV layer."""
    return any(s.name == PAST_LENGTH for s in inputs)
