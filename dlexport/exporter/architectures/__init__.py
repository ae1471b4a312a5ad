from .base import (Architecture, ArchNumbers, TensorSpec, attention_mask, rotary_names, sequence_mask,
                   past_key_name, past_value_name, present_key_name, present_value_name)
from .registry import UnsupportedModelError, architecture_for, register, supported_model_types
from . import gemma3, llama, mistral, opt, phi3, qwen2, qwen3  # noqa: F401  (registers the architectures)

__all__ = [
    "Architecture", "ArchNumbers", "TensorSpec", "UnsupportedModelError", "architecture_for", "attention_mask",
    "register", "rotary_names", "sequence_mask", "supported_model_types", "past_key_name", "past_value_name",
    "present_key_name", "present_value_name",
]
