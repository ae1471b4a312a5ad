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


def unsupported(model_type, of: str = "") -> UnsupportedModelError:
    """The error for a model type without an architecture class: what is supported, and how to add one."""
    return UnsupportedModelError(
        f"model type {model_type!r}{f' of {of!r}' if of else ''} is not supported; dlexport exports "
        f"{', '.join(supported_model_types())}. To add it: write a small Architecture subclass in "
        f"dlexport/exporter/architectures/ with model_type = {model_type!r} and @register, overriding only what "
        "differs from the Llama layout of base.py; import it in architectures/__init__.py; add a tiny random shape "
        "to RANDOM_SHAPES in exporter/sources.py and a test (README: 'Adding an architecture')."
    )


def architecture_for(model: nn.Module):
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _REGISTRY:
        raise unsupported(model_type)
    return _REGISTRY[model_type](model)
