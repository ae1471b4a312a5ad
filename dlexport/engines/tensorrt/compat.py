"""The two TensorRT flavours behind one code path: standard TensorRT 10.x (Jetson, datacenter) and TensorRT for RTX.

What differs, and how this module hides it:

- module: ``tensorrt`` vs ``tensorrt_rtx`` (NVIDIA's wheel) or ``tensorrt_rtx_bindings`` (the split cu13 wheels).
- precision: TensorRT for RTX builds strongly typed networks only (no FP16/BF16 builder flags): an engine computes in
  the ONNX graph's own dtypes, so fp16 needs an fp16 export. Standard TensorRT does the same when the precision equals
  the export's dtype, and otherwise builds a weakly typed network with the FP16/BF16 flag (I/O keeps the export dtype).
- timing cache: real in standard TensorRT (tactic timings reused across the N identical layers); a no-op in
  TensorRT for RTX (deprecated there since 1.2: it compiles kernels just in time on the target GPU instead).
- targets: a standard engine is built for, and runs only on, the GPU it was built on. A TensorRT for RTX engine is
  built ahead of time without a GPU and runs on the compute capabilities it targets (by default 8.0, 8.6, 8.9, 12.x).

Polygraphy's loaders are not used: with POLYGRAPHY_USE_TENSORRT_RTX=1 (0.53.6) they import ``tensorrt_rtx``, which the
split cu13 wheels do not provide (they install ``tensorrt_rtx_bindings``), and the path needed here is a few calls.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..base import BackendUnavailableError

FLAVOURS = ("tensorrt", "tensorrt-rtx")
_MODULES = {"tensorrt": ("tensorrt",), "tensorrt-rtx": ("tensorrt_rtx", "tensorrt_rtx_bindings")}
_INSTALL = {
    "tensorrt": "install TensorRT 10 (JetPack 6 ships it; on x86 `pip install tensorrt`) on the machine that will "
                "run the engines",
    "tensorrt-rtx": "`pip install tensorrt-rtx` (x86-64 Linux/Windows, RTX GPUs of compute capability 8.0+)",
}
# What a TensorRT for RTX engine runs on when no compute capability is set at build time (its documented default).
RTX_DEFAULT_CAPABILITIES = ("8.0", "8.6", "8.9", "12.x")
_RTX_CAPABILITY_ENUM = {"7.5": "SM75", "8.0": "SM80", "8.6": "SM86", "8.9": "SM89", "12.0": "SM120", "12.1": "SM121"}


@dataclass(frozen=True)
class Flavour:
    name: str  # "tensorrt" or "tensorrt-rtx"
    trt: object  # the imported module
    module_name: str

    @property
    def version(self) -> str:
        return self.trt.__version__

    @property
    def rtx(self) -> bool:
        return self.name == "tensorrt-rtx"

    @property
    def has_timing_cache(self) -> bool:
        return not self.rtx

    def logger(self):
        return self.trt.Logger(self.trt.Logger.WARNING)

    def network_flags(self, strongly_typed: bool) -> int:
        if self.rtx or not strongly_typed:
            return 0  # TensorRT for RTX networks are strongly typed without asking
        return 1 << int(self.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)

    def strongly_typed_for(self, precision: str, export_dtype: str) -> bool:
        """True when the network keeps the graph's dtypes; refuse what this flavour cannot build."""
        if precision == export_dtype:
            return True
        if self.rtx:
            raise ValueError(
                f"TensorRT for RTX builds strongly typed networks: an engine computes in the ONNX graph's dtypes, and "
                f"this export is {export_dtype}, not {precision}. Export at that precision (`dlexport export --dtype "
                f"{_SHORT[precision]}`, or let `dlexport build --model M --precision {_SHORT[precision]}` export it)")
        if precision == "float32":
            raise ValueError(f"this export is {export_dtype}: an fp32 engine needs an fp32 export (`dlexport export "
                             "--dtype fp32`)")
        return False

    def set_precision(self, config, precision: str, strongly_typed: bool) -> None:
        if strongly_typed:
            return
        flag = {"float16": "FP16", "bfloat16": "BF16"}[precision]
        config.set_flag(getattr(self.trt.BuilderFlag, flag))

    def set_capabilities(self, config, capabilities: tuple[str, ...]) -> tuple[str, ...]:
        """Target compute capabilities (TensorRT for RTX only); returns what the engine will run on."""
        if not self.rtx:
            return ()
        if not capabilities:
            return RTX_DEFAULT_CAPABILITIES
        unknown = [c for c in capabilities if c not in _RTX_CAPABILITY_ENUM]
        if unknown:
            raise ValueError(f"compute capability {unknown} is not one TensorRT for RTX targets; choose from "
                             f"{', '.join(_RTX_CAPABILITY_ENUM)}")
        config.num_compute_capabilities = len(capabilities)
        for i, c in enumerate(capabilities):
            config.set_compute_capability(getattr(self.trt.ComputeCapability, _RTX_CAPABILITY_ENUM[c]), i)
        return tuple(capabilities)


_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def load_flavour(name: str) -> Flavour:
    """Import a flavour's module, or say how to install it."""
    if name not in FLAVOURS:
        raise ValueError(f"unknown TensorRT flavour {name!r}; choose one of {', '.join(FLAVOURS)}")
    errors = []
    for module_name in _MODULES[name]:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            errors.append(f"{module_name}: {e}")
            continue
        if hasattr(module, "Builder") and hasattr(module, "__version__"):
            return Flavour(name, module, module_name)
        errors.append(f"{module_name}: {getattr(module, '__path__', module)} is not TensorRT (no Builder)")
    raise BackendUnavailableError(f"{name} is not installed here ({'; '.join(errors)}): {_INSTALL[name]}")


def device_capability(device_id: int = 0) -> str | None:
    """The CUDA GPU's compute capability as "major.minor", or None when there is no usable CUDA GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device_id)
    return f"{major}.{minor}"


def runs_on(capability: str, targets: tuple[str, ...]) -> bool:
    """Whether a GPU of ``capability`` is among an engine's targets ("12.x" covers every 12.y)."""
    major = capability.split(".")[0]
    return capability in targets or f"{major}.x" in targets
