"""Session settings for the ONNX Runtime backend: providers, threads and graph optimisation."""
from __future__ import annotations

from dataclasses import dataclass, field

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
OPT_LEVELS = ("disable", "basic", "extended", "all")


@dataclass
class OrtConfig:
    provider: str = "cpu"  # "cpu", "cuda" or "tensorrt" (the TensorRT EP falls back to CUDA for what it cannot take)
    threads: int | None = None  # intra-op threads: 1 = the calling thread only; more = the process's shared pool; None = that pool or engines.threads.default_threads()
    opt_level: str = "all"
    device_id: int = 0
    cuda_graph: bool = False  # needs fixed shapes and addresses per session: left to benchmarks that pin them
    optimized_model_path: str | None = None  # where `dlexport build` saves the optimised graph for fast loading
    provider_options: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"provider": self.provider, "threads": self.threads, "opt_level": self.opt_level}
