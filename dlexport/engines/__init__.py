"""Engine backends behind one interface (``base.Engine``): ONNX Runtime here, TensorRT in ``engines/tensorrt``."""
from __future__ import annotations

from pathlib import Path

from ..contract import TensorSpec
from ..errors import InputError, MissingFileError, echo
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
    raise InputError(f"unknown device {echo(device)}: use cpu, cuda[:N] or tensorrt (ONNX Runtime's TensorRT provider)")


def device_index(device: str) -> int:
    if not isinstance(device, str):
        raise InputError(f"device must be a string such as 'cpu' or 'cuda:0', got {echo(device)}")
    _, _, index = device.partition(":")
    if index and not index.isdigit():
        raise InputError(f"device {echo(device)}: the part after ':' must be a GPU number, e.g. cuda:0")
    return int(index) if index else 0


def open_engines(folder: Path, *, backend: str = "onnxruntime", device: str = "cpu", threads: int | None = None,
                 layers=None, opt_level: str = "all", groups: bool = False) -> tuple[Manifest, dict[str, Engine]]:
    """Open the embedding, head and (the requested) layer engines of an export or engine folder.

    ``threads``: CPU threads for this process (engines/threads.py); None = the default for this machine.
    ``groups``: an export's in-place layers also open as layer groups (onnxruntime/group.py), one per run of
    consecutive requested layers; the single layers a group covers open on first use.
    """
    from .onnxruntime import OrtConfig, OrtEngine

    threads = use_threads(threads)  # checks the count too
    folder = Path(folder)
    device_index(device)
    if (folder / "engines.json").exists():
        from .folder import open_engine_folder

        return open_engine_folder(folder, device=device, threads=threads, layers=layers)
    if not (folder / MANIFEST).exists():
        raise MissingFileError(f"{folder} holds neither an export ({MANIFEST}) nor engines (engines.json): "
                                "create one with `dlexport export` or `dlexport build`")
    if backend != "onnxruntime":
        raise InputError(f"{folder} is an ONNX export; backend {backend!r} needs engines built with "
                         f"`dlexport build --from-export {folder} --backend {backend}`")
    manifest = Manifest.load(folder)
    if layers is not None:
        from ..checks import layer_list

        layers = layer_list(sorted(set(layers)) if isinstance(layers, (set, frozenset)) else layers,
                            manifest.num_layers, "layers")
    names = ["embed", "head"] + [manifest.layer_key(i) for i in (range(manifest.num_layers) if layers is None else layers)]
    manifest.verify_files(names)
    manifest.check_graphs(names[2:3])
    device_id = device_index(device)
    config = OrtConfig(provider=_ort_provider(device.split(":")[0]), threads=threads, opt_level=opt_level,
                       device_id=device_id)
    grouped = []
    if groups:
        from .onnxruntime.group import runs

        grouped = [open_group(manifest, run, config) for run in runs(manifest, layers)]
    covered = {manifest.layer_key(i) for g in grouped if g is not None for i in g.layers}
    engines = {}
    for name in names:
        sub = manifest.subgraph(name)
        engines[name] = OrtEngine(name, manifest.path(name), [TensorSpec.from_json(s) for s in sub["inputs"]],
                                  [TensorSpec.from_json(s) for s in sub["outputs"]], config, lazy=name in covered)
    engines.update((g.name, g) for g in grouped if g is not None)
    return manifest, engines


def open_group(manifest: Manifest, layers: list[int], config) -> Engine | None:
    """One ONNX Runtime session over ``layers`` of an export (a run from ``onnxruntime.group.runs``), composed into
    dlexport's cache on first use; None where the cache cannot be written."""
    from ..files import cache_dir
    from .onnxruntime import OrtEngine
    from .onnxruntime.group import GRAPH, cache_key, compose, group_io, group_name, layer_io

    folder = cache_dir() / "groups" / cache_key(manifest, layers)
    try:
        graph = folder / GRAPH if (folder / GRAPH).exists() else \
            compose([manifest.path(manifest.layer_key(i)) for i in layers], folder)
    except OSError:  # a read-only or full cache: the layers run one by one
        return None
    engine = OrtEngine(group_name(layers), graph, *group_io(layers, {i: layer_io(manifest, i) for i in layers}), config)
    engine.layers = tuple(layers)
    return engine
