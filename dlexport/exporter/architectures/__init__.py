from .base import Architecture, ArchNumbers, TensorSpec, past_key_name, past_value_name, present_key_name, present_value_name
from .registry import UnsupportedModelError, architecture_for, register, supported_model_types
from . import llama, opt  # noqa: F401  (registers the architectures)

__all__ = [
    "Architecture", "ArchNumbers", "TensorSpec", "UnsupportedModelError", "architecture_for", "register",
    "supported_model_types", "past_key_name", "past_value_name", "present_key_name", "present_value_name",
]
