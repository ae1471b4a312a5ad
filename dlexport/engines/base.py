"""The engine interface every backend implements: one compiled subgraph, run on buffers that stay on the device."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..contract import TensorSpec
from ..errors import UnavailableError

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}


class BackendUnavailableError(UnavailableError):
    """A requested backend or execution provider is not installed or has no device here."""


class Engine(ABC):
    """A loaded subgraph. ``run`` takes torch tensors on ``device`` and returns torch tensors on ``device``.

    Returned tensors may be views of buffers the engine reuses on its next call: copy what must outlive it.
    """

    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    device: torch.device
    layers: tuple[int, ...] = ()  # the consecutive layers a layer-group engine runs (onnxruntime/group.py)

    @abstractmethod
    def run(self, feeds: dict[str, torch.Tensor], out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``out``: buffers some outputs must be written to (an in-place layer's present = its KV buffer)."""

    def output_shape(self, spec: TensorSpec, feeds: dict[str, torch.Tensor]) -> tuple[int, ...]:
        """Resolve an output's symbolic dims from the inputs that carry the same names (batch, tokens, ...)."""
        sizes = {}
        for s in self.inputs:
            for dim, size in zip(s.shape, feeds[s.name].shape):
                if isinstance(dim, str):
                    sizes[dim] = size
        return tuple(sizes[d] if isinstance(d, str) else d for d in spec.shape)


class OutputPool:
    """Reused output buffers: one flat allocation per output, grown only when a larger shape first appears.

    A prefix of a flat buffer is contiguous for any shape, so every call gets a view with no allocation; the view of
    each shape is made once (a decode step asks for the same shapes every time).
    """

    def __init__(self, device: torch.device):
        self.device, self.flat, self.views = device, {}, {}

    def view(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = self.views.get((name, shape))
        if t is not None and t.dtype == dtype:
            return t
        numel = 1
        for s in shape:
            numel *= s
        buf = self.flat.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self.flat[name] = torch.empty(max(numel, 1), dtype=dtype, device=self.device)
            self.views = {k: v for k, v in self.views.items() if k[0] != name}  # views of the old buffer go
        if len(self.views) >= 256:  # many prompt lengths: a bounded memo, not a leak
            self.views.clear()
        t = self.views[(name, shape)] = buf[:numel].view(shape)
        return t
