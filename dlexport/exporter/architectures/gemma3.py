"""Gemma 3 text decoder (Gemma3ForCausalLM): four (1 + weight) RMSNorms per layer, q/k norm, embeddings scaled by
sqrt(hidden) and the tanh logit soft cap (both inside Hugging Face's modules / base.py's head), tied head, and
interleaved local (sliding-window) and global layers, each kind with its own rotary base: the embed outputs one
cos/sin pair per kind (``rotary_cos``/``rotary_sin`` global, ``rotary_cos_local``/``rotary_sin_local`` local)."""
from __future__ import annotations

from .base import Architecture
from .registry import UnsupportedModelError, register

_KIND = {"full_attention": None, "sliding_attention": "local"}
_LAYER_TYPE = {kind: layer_type for layer_type, kind in _KIND.items()}


@register
class Gemma3Architecture(Architecture):
    model_type = "gemma3_text"

    def check_config(self) -> None:
        super().check_config()
        if self.config.use_bidirectional_attention:
            raise UnsupportedModelError("this Gemma 3 config uses bidirectional attention (an encoder, e.g. "
                                        "EmbeddingGemma); dlexport exports causal decoders")
        if self.float_dtype() == "float16":  # measured: Hugging Face's own fp16 forward gives NaN logits
            raise UnsupportedModelError("Gemma 3's residual stream outgrows float16 (Gemma 3 270M reaches inf at "
                                        "layer 8 on plain prose, and every token after it is NaN): export it in bf16 "
                                        "or fp32 (--dtype; --precision with `dlexport build --model`)")

    def rotary_kinds(self) -> list[str | None]:
        return sorted({_KIND[t] for t in self.config.layer_types}, key=lambda k: k or "")

    def layer_rotary(self, i: int) -> str | None:
        return _KIND[self.config.layer_types[i]]

    def _rotary_call(self, rotary, hidden, position_ids, kind):
        return rotary(hidden, position_ids, _LAYER_TYPE[kind])
