"""Create ONNX Runtime sessions with the requested provider, or say clearly why it cannot be had."""
from __future__ import annotations

from pathlib import Path

from ...errors import CorruptFileError, InputError
from ..base import BackendUnavailableError
from ..threads import claim, resolve_threads
from .config import OPT_LEVELS, PROVIDERS, OrtConfig


def _ort():
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - onnxruntime is a core dependency
        raise BackendUnavailableError("onnxruntime is not installed: `pip install onnxruntime`") from e
    return onnxruntime


def providers_for(config: OrtConfig) -> list:
    ort = _ort()
    if config.provider not in PROVIDERS:
        raise InputError(f"unknown ONNX Runtime provider {config.provider!r}; choose one of {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[config.provider]
    available = ort.get_available_providers()
    if wanted not in available:
        hint = {
            "cuda": "install onnxruntime-gpu (`pip install dlexport[gpu]`) matching your CUDA, and import torch first",
            "tensorrt": "install onnxruntime-gpu built with TensorRT and put TensorRT's libraries on the library path",
        }.get(config.provider, "")
        raise BackendUnavailableError(
            f"ONNX Runtime provider {wanted} is not available here (available: {', '.join(available)}). {hint}"
        )
    opts = dict(config.provider_options)
    if config.provider in ("cuda", "tensorrt"):
        opts.setdefault("device_id", config.device_id)
    if config.provider == "cuda":
        import torch  # loads the CUDA/cuDNN libraries the provider needs; share its stream so no sync is needed

        opts.setdefault("user_compute_stream", str(torch.cuda.current_stream(config.device_id).cuda_stream))
        if config.cuda_graph:
            opts["enable_cuda_graph"] = "1"
    chain = [(wanted, opts)]
    if config.provider == "tensorrt":
        chain.append(("CUDAExecutionProvider", {"device_id": config.device_id}))
    if config.provider != "cpu":
        chain.append("CPUExecutionProvider")
    return chain


def create_session(path: Path, config: OrtConfig):
    ort = _ort()
    if config.opt_level not in OPT_LEVELS:
        raise InputError(f"unknown graph optimisation level {config.opt_level!r}; choose one of {', '.join(OPT_LEVELS)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[config.opt_level]
    if claim(resolve_threads(config.threads)):  # every session of the process shares one pool (engines/threads.py)
        so.use_per_session_threads = False
    else:  # one thread and no pool yet: the calling thread alone, nothing spinning
        so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if config.optimized_model_path:
        so.optimized_model_filepath = str(config.optimized_model_path)
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=providers_for(config))
    except Exception as e:  # ORT raises its own exception types; turn them into an actionable message
        if "INVALID_PROTOBUF" in str(e) or "Protobuf parsing failed" in str(e) or "INVALID_GRAPH" in str(e):
            raise CorruptFileError(f"{path} is not a valid ONNX model ({e}); the file is corrupt: re-export it") from e
        raise
