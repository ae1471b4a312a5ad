"""TensorRT engines behind the ``Engine`` interface, written to the TensorRT 10 Python API (and TensorRT for RTX's).

- Every execution context is created without device memory of its own; one scratch buffer sized for the largest
  engine is shared by all of them. Engines run one after another on one stream, so the sharing is safe.
- Tensor addresses point at torch CUDA tensors: inputs as given, outputs at reused ``OutputPool`` buffers.
- Work is enqueued on torch's current CUDA stream, the one the runtime's own tensor ops use, so no sync is needed.
- Per call: the optimisation profile (prefill or decode, chosen from the shapes) and the input shapes are set.

Before an engine is deserialised, its metadata is compared with this machine (TensorRT flavour and version, GPU
compute capability) and a mismatch is refused with the command to rebuild.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ...contract import TensorSpec
from ...errors import CorruptFileError, InputError
from ..base import BackendUnavailableError, Engine, OutputPool
from .compat import Flavour, device_capability, runs_on
from .config import select_profile


class EngineMismatchError(CorruptFileError):
    """An engine was built for another TensorRT version, GPU or source graph."""


def check_compatible(name: str, metadata: dict, flavour: Flavour, capability: str | None, rebuild: str) -> None:
    """Refuse an engine this TensorRT or this GPU cannot run (``capability`` None: not checked yet)."""
    if metadata["flavour"] != flavour.name or metadata["version"] != flavour.version:
        raise EngineMismatchError(
            f"engine {name} was built by {metadata['flavour']} {metadata['version']}, but this machine has "
            f"{flavour.name} {flavour.version}; TensorRT engines only load in the version that built them: {rebuild}")
    if capability is None:
        return
    targets = tuple(metadata["compute_capabilities"])
    if not runs_on(capability, targets):
        where = metadata.get("device_name") or f"compute capability {', '.join(targets)}"
        raise EngineMismatchError(
            f"engine {name} was built for {where}, but this GPU has compute capability {capability}; engines are "
            f"specific to the GPU they target: {rebuild}")


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT64: torch.int64,
             trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool}
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    return table[dtype]


class TrtEngine(Engine):
    def __init__(self, name: str, engine, inputs: list[TensorSpec], outputs: list[TensorSpec], profiles: list[dict],
                 flavour: Flavour, device: torch.device):
        self.name, self.engine, self.inputs, self.outputs = name, engine, inputs, outputs
        self.profiles, self.flavour, self.device = profiles, flavour, device
        trt = flavour.trt
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        if hasattr(engine, "create_runtime_config"):  # TensorRT for RTX, TensorRT 10.11+ and 11
            runtime_config = engine.create_runtime_config()
            runtime_config.set_execution_context_allocation_strategy(strategy)
            self.context = engine.create_execution_context(runtime_config)
        else:  # TensorRT 10.1-10.10 (JetPack 6.1+ ships 10.3)
            self.context = engine.create_execution_context(strategy)
        if self.context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for engine {name}")
        self.scratch_bytes = engine.device_memory_size_v2
        self._dtypes = {engine.get_tensor_name(i): _torch_dtype(trt, engine.get_tensor_dtype(engine.get_tensor_name(i)))
                        for i in range(engine.num_io_tensors)}
        self._profile = -1
        self._pool = OutputPool(device)

    def use_scratch(self, scratch: torch.Tensor) -> None:
        self.context.set_device_memory(scratch.data_ptr(), scratch.numel())

    def run(self, feeds: dict[str, torch.Tensor], out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        stream = torch.cuda.current_stream(self.device).cuda_stream
        shapes = {name: tuple(t.shape) for name, t in feeds.items() if name in self._dtypes}
        profile = select_profile(self.profiles, shapes)
        ctx = self.context
        if profile != self._profile:
            ctx.set_optimization_profile_async(profile, stream)
            self._profile = profile
        # Converted copies are held until the engine is enqueued (freed earlier, the next copy could take their
        # memory before the engine reads it); freed on return, torch reuses them only for later work on this stream.
        held = {name: feeds[name].to(self._dtypes[name]).contiguous() for name in shapes}
        for name, shape in shapes.items():
            ctx.set_input_shape(name, shape)
            ctx.set_tensor_address(name, held[name].data_ptr())
        outs = {}
        for spec in self.outputs:
            t = (out or {}).get(spec.name)
            if t is None:
                t = self._pool.view(spec.name, self.output_shape(spec, feeds), self._dtypes[spec.name])
            ctx.set_tensor_address(spec.name, t.data_ptr())
            outs[spec.name] = t
        if not ctx.execute_async_v3(stream):
            raise RuntimeError(f"TensorRT failed to run engine {self.name} with shapes {shapes} (its log says why)")
        return outs


def open_trt_engines(folder: Path, data: dict, names: list[str], device: str, rebuild: str) -> dict[str, Engine]:
    """Deserialise the named engines of a checked engine folder onto one GPU, sharing one scratch buffer."""
    from .compat import load_flavour

    flavour = load_flavour(data["backend"])
    entries = data["engines"]
    for name in names:
        check_compatible(name, entries[name]["metadata"], flavour, None, rebuild)
    if not device.startswith("cuda"):
        raise InputError(f"TensorRT engines run on a CUDA GPU: pass device='cuda' (got {device!r})")
    device_id = int(device.split(":")[1]) if ":" in device else 0
    capability = device_capability(device_id)
    if capability is None:
        raise BackendUnavailableError("TensorRT engines need a CUDA GPU and there is none here (torch.cuda is not "
                                      "available); use an ONNX Runtime engine folder on this machine")
    for name in names:
        check_compatible(name, entries[name]["metadata"], flavour, capability, rebuild)
    torch.cuda.set_device(device_id)
    runtime = flavour.trt.Runtime(flavour.logger())
    engines: dict[str, TrtEngine] = {}
    for name in names:
        entry = entries[name]
        engine = runtime.deserialize_cuda_engine((folder / entry["file"]).read_bytes())
        if engine is None:
            raise EngineMismatchError(f"TensorRT could not load {folder / entry['file']} (its log says why): {rebuild}")
        engines[name] = TrtEngine(name, engine, [TensorSpec.from_json(s) for s in entry["inputs"]],
                                  [TensorSpec.from_json(s) for s in entry["outputs"]], entry["profiles"], flavour,
                                  torch.device("cuda", device_id))
    share_scratch(list(engines.values()), torch.device("cuda", device_id))
    return engines


def share_scratch(engines: list[TrtEngine], device: torch.device) -> torch.Tensor:
    """One scratch buffer, as large as the largest engine needs, for every context (they never run concurrently)."""
    scratch = torch.empty(max(e.scratch_bytes for e in engines) or 1, dtype=torch.uint8, device=device)
    for e in engines:
        e.use_scratch(scratch)
        e.scratch = scratch  # keeps the shared buffer alive as long as any engine is
    return scratch


__all__ = ["EngineMismatchError", "TrtEngine", "check_compatible", "open_trt_engines", "share_scratch"]
