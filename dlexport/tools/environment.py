"""Where a measurement was taken: device and library versions, recorded next to every number we publish."""
from __future__ import annotations

import os
import platform
import time
from importlib.metadata import PackageNotFoundError, version


def _version(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: str) -> dict:
    if device.startswith("cuda") or device == "tensorrt":
        import torch

        index = int(device.split(":")[1]) if ":" in device else 0
        name = torch.cuda.get_device_name(index) if torch.cuda.is_available() else "unknown (no CUDA in torch here)"
        return {"kind": "cuda", "name": name, "index": index}
    return {"kind": "cpu", "name": cpu_name(), "cores": os.cpu_count()}


def versions() -> dict:
    pkgs = ("dlexport", "torch", "transformers", "onnxruntime", "onnxruntime-gpu", "tensorrt", "numpy")
    found = {p: _version(p) for p in pkgs}
    return {"python": platform.python_version(), **{k: v for k, v in found.items() if v}}


def profile_meta(manifest, folder, tool: str, device: str, backend: str, contexts) -> dict:
    """What every profile.json records about where and how it was measured (either tool)."""
    return {
        "tool": tool,
        "folder": str(folder),
        "model": {"source": manifest.data.get("source"), "fingerprint": manifest.fingerprint,
                  "num_layers": manifest.num_layers, "dtype": manifest.dtype},
        "backend": backend,
        "device": describe_device(device),
        "versions": versions(),
        "contexts": list(contexts),
        "batch": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
