"""Architectures registered by Hugging Face ``model_type``."""
from __future__ import annotations

from torch import nn

from ...errors import InputError

_REGISTRY: dict[str, type] = {}


class UnsupportedModelError(InputError):
    pass


def register(cls):
    _REGISTRY[cls.model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def architecture_for(model: nn.Module):
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _REGISTRY:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; dlexport exports {', '.join(supported_model_types())}. "
            "Adding one means a small Architecture subclass in dlexport/exporter/architectures/."
        )
    return _REGISTRY[model_type](model)
