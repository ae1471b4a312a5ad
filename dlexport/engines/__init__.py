"""Engine backends behind one interface (``base.Engine``): ONNX Runtime here, TensorRT in ``engines/tensorrt``."""
from __future__ import annotations

from pathlib import Path

from ..contract import TensorSpec
from ..manifest import MANIFEST, Manifest
from .base import BackendUnavailableError, Engine
from .threads import use_threads

BACKENDS = ("onnxruntime", "tensorrt", "tensorrt-rtx")


def _ort_provider(device: str) -> str:
    if device == "cpu":
        return "cpu"
    if device.startswith("cuda"):
        return "cuda"
    if device == "tensorrt":
        return "tensorrt"
    raise ValueError(f"unknown device {device!r}: use cpu, cuda or tensorrt (ONNX Runtime's TensorRT provider)")


def open_engines(folder: Path, *, backend: str = "onnxruntime", device: str = "cpu", threads: int | None = None,
                 layers=None, opt_level: str = "all") -> tuple[Manifest, dict[str, Engine]]:
    """Open the embedding, head and (the requested) layer engines of an export or engine folder.

    ``threads``: CPU threads for this process (engines/threads.py); None = the default for this machine.
    """
    from .onnxruntime import OrtConfig, OrtEngine

    threads = use_threads(threads)
    folder = Path(folder)
    if (folder / "engines.json").exists():
        from .folder import open_engine_folder

        return open_engine_folder(folder, device=device, threads=threads, layers=layers)
    if not (folder / MANIFEST).exists():
        raise FileNotFoundError(f"{folder} holds neither an export ({MANIFEST}) nor engines (engines.json): "
                                "create one with `dlexport export` or `dlexport build`")
    if backend != "onnxruntime":
        raise ValueError(f"{folder} is an ONNX export; backend {backend!r} needs engines built with "
                         f"`dlexport build --from-export {folder} --backend {backend}`")
    manifest = Manifest.load(folder)
    names = ["embed", "head"] + [manifest.layer_key(i) for i in (range(manifest.num_layers) if layers is None else layers)]
    manifest.verify_files(names)
    device_id = int(device.split(":")[1]) if ":" in device else 0
    config = OrtConfig(provider=_ort_provider(device.split(":")[0]), threads=threads, opt_level=opt_level,
                       device_id=device_id)
    engines = {}
    for name in names:
        sub = manifest.subgraph(name)
        engines[name] = OrtEngine(name, manifest.path(name), [TensorSpec.from_json(s) for s in sub["inputs"]],
                                  [TensorSpec.from_json(s) for s in sub["outputs"]], config)
    return manifest, engines


__all__ = ["BACKENDS", "BackendUnavailableError", "Engine", "open_engines"]
