"""Engine folders written by ``dlexport build`` and opened by ``Runtime.load(engine_dir)``.

Layout (self-contained: the export folder is not needed once the engines are built)::

    engines.json     the index below
    embed.engine     one file per subgraph the plan needs (``.onnx`` for ONNX Runtime: the optimised graph)
    layer_05.engine
    head.engine
    plan.json        the plan the folder was built for, when one was given
    timing.cache     standard TensorRT only: the tactic timings shared by every build (reused by a rebuild)
    tokenizer/       copied from the export

``engines.json`` (format "dlexport-engines", format_version 1)::

    {"format": "dlexport-engines", "format_version": 1,
     "backend": "tensorrt" | "tensorrt-rtx" | "onnxruntime", "precision": "float32" | "float16" | "bfloat16",
     "build": {fingerprint, backend, version, settings},      # identity of the build, for resuming
     "settings": {...},                                       # TensorRT: target, workspace_bytes, optimization_level,
                                                              #   limits, compute_capabilities, shared_timing_cache;
                                                              # ONNX Runtime: provider, opt_level
     "manifest": {...},                                       # the export's manifest.json data
     "plan": {...} | null,                                    # plan.json data
     "engines": {"embed": {"file", "size", "sha256",
                           "source_sha256",                   # the ONNX file's sha256 (over .onnx+.data shas if split)
                           "inputs": [...], "outputs": [...], # the export's tensor specs
                           "profiles": [{"name": "prefill", "shapes": {input: {"min", "opt", "max"}}},
                                        {"name": "decode", ...}],          # [] for ONNX Runtime
                           "metadata": {"flavour", "version", "precision", "compute_capabilities", "device_name",
                                        "target", "workspace_bytes", "optimization_level", "limits", ...}},
                 "layer_05": {...}, "head": {...}}}

Opening refuses, naming the rebuild command: another format version, a missing or altered engine file (size or
sha256), an engine whose source sha256 differs from the manifest's graph, another TensorRT flavour or version, a GPU
the engine does not target, and an ONNX Runtime folder optimised for another provider.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import CorruptFileError, InputError, MissingFileError, echo
from ..files import read_json, sha256_file
from ..manifest import Manifest
from .base import Engine

ENGINES_JSON = "engines.json"
FORMAT, FORMAT_VERSION = "dlexport-engines", 1
PLAN_FILE = "plan.json"
TIMING_CACHE = "timing.cache"
TOKENIZER = "tokenizer"


def rebuild_hint(folder: Path, data: dict) -> str:
    return (f"rebuild on this machine with `dlexport build --from-export EXPORT_DIR --backend {data.get('backend')} "
            f"--out {folder}`" + (f" --plan {folder / PLAN_FILE}" if data.get("plan") else ""))


def load_engine_index(folder: Path) -> dict:
    """engines.json, checked: its fields, the manifest inside it, and one entry per engine the manifest allows."""
    path = folder / ENGINES_JSON
    data = read_json(path, "engine index")
    if data.get("format") != FORMAT:
        raise CorruptFileError(f"{path} is not a dlexport engine index (format {echo(data.get('format'))})")
    if data.get("format_version") != FORMAT_VERSION:
        raise CorruptFileError(f"{folder} holds engine folder format {echo(data.get('format_version'))}, this "
                               f"dlexport reads {FORMAT_VERSION}: {rebuild_hint(folder, data)}")
    hint = f"the index is damaged or was edited: {rebuild_hint(folder, data)}"
    if not isinstance(data.get("manifest"), dict) or not isinstance(data.get("engines"), dict) \
            or not isinstance(data.get("settings"), dict) or data.get("backend") not in ("onnxruntime", "tensorrt",
                                                                                          "tensorrt-rtx"):
        raise CorruptFileError(f"{path}: 'manifest', 'engines', 'settings' or 'backend' is missing or malformed; {hint}")
    manifest = Manifest(folder, data["manifest"])
    manifest.check(f"{path} (its 'manifest')")
    known = {"embed", "head", *(manifest.layer_key(i) for i in range(manifest.num_layers))}
    for name, entry in data["engines"].items():
        if name not in known:
            raise CorruptFileError(f"{path}: engine {echo(name)} is not a subgraph of this model; {hint}")
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("size"), int)
                and isinstance(entry.get("sha256"), str) and isinstance(entry.get("source_sha256"), str)
                and isinstance(entry.get("inputs"), list) and isinstance(entry.get("outputs"), list)):
            raise CorruptFileError(f"{path}: engine {name!r} lacks its file, size, sha256, source_sha256, inputs or "
                                   f"outputs; {hint}")
        if not (folder / entry["file"]).resolve().is_relative_to(folder.resolve()):
            raise CorruptFileError(f"{path}: engine {name!r} names a file outside the folder; {hint}")
        if entry["inputs"] != manifest.subgraph(name)["inputs"] or \
                entry["outputs"] != manifest.subgraph(name)["outputs"]:
            raise CorruptFileError(f"{path}: engine {name!r} has other inputs/outputs than its manifest entry; {hint}")
    missing = [n for n in ("embed", "head") if n not in data["engines"]]
    if missing:
        raise CorruptFileError(f"{path} has no {' or '.join(missing)} engine; {hint}")
    return data


def source_digest(files: list[dict]) -> str:
    """One hash for a subgraph's files: the .onnx's own sha256, or a hash over it and its external data's."""
    if len(files) == 1:
        return files[0]["sha256"]
    return hashlib.sha256("".join(f["sha256"] for f in files).encode()).hexdigest()


def check_engine_files(folder: Path, data: dict, names: list[str]) -> None:
    """Refuse missing or altered engine files and engines built from another graph than the manifest's."""
    hint = rebuild_hint(folder, data)
    for name in names:
        entry = data["engines"][name]
        path = folder / entry["file"]
        if not path.exists():
            raise MissingFileError(f"{path} is missing from the engine folder: {hint}")
        if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise CorruptFileError(f"{path} does not match engines.json (size or sha256 differ): the file is corrupt or "
                             f"was replaced; {hint}")
        graph = source_digest(data["manifest"]["subgraphs"][name]["files"])
        if entry["source_sha256"] != graph:
            raise CorruptFileError(f"engine {name} was built from another ONNX graph (sha256 {entry['source_sha256'][:12]}…) "
                             f"than this folder's manifest names ({graph[:12]}…); {hint}")


def open_engine_folder(folder: Path, *, device: str = "cpu", threads: int | None = None,
                       layers=None) -> tuple[Manifest, dict[str, Engine]]:
    """Open the embedding, head and layer engines (``layers``: a subset of the built ones; None: all built)."""
    folder = Path(folder)
    data = load_engine_index(folder)
    manifest = Manifest(folder, data["manifest"])
    built = [manifest.layer_key(i) for i in range(manifest.num_layers) if manifest.layer_key(i) in data["engines"]]
    if layers is None:
        wanted = built
    else:
        from ..checks import layer_list

        wanted = [manifest.layer_key(i) for i in layer_list(layers, manifest.num_layers, "layers")]
        missing = [n for n in wanted if n not in data["engines"]]
        if missing:
            raise InputError(f"{folder} has no engines for {', '.join(missing)} (it holds {', '.join(built)}): build "
                             "them with `dlexport build --plan` for a plan that runs those layers")
    names = ["embed", "head"] + wanted
    check_engine_files(folder, data, names)
    backend = data["backend"]
    if backend == "onnxruntime":
        return manifest, _open_ort(folder, data, names, device, threads)
    from .tensorrt.runner import open_trt_engines

    return manifest, open_trt_engines(folder, data, names, device, rebuild_hint(folder, data))


def _open_ort(folder: Path, data: dict, names: list[str], device: str, threads: int | None) -> dict[str, Engine]:
    from ..contract import TensorSpec
    from . import _ort_provider, device_index
    from .onnxruntime import OrtConfig, OrtEngine

    provider = _ort_provider(device.split(":")[0])
    built_for = data["settings"]["provider"]
    if provider != built_for:
        raise InputError(f"{folder} holds graphs optimised for ONNX Runtime's {built_for} provider, and device "
                         f"{device!r} uses {provider}: optimised graphs are provider-specific; rebuild with "
                         f"`dlexport build --backend onnxruntime --device {device}`")
    device_id = device_index(device)
    # The graphs are optimised already: loading them with optimisation off is what makes loading fast.
    config = OrtConfig(provider=provider, threads=threads, opt_level="disable", device_id=device_id)
    return {name: OrtEngine(name, folder / data["engines"][name]["file"],
                            [TensorSpec.from_json(s) for s in data["engines"][name]["inputs"]],
                            [TensorSpec.from_json(s) for s in data["engines"][name]["outputs"]], config)
            for name in names}


def describe_engine_folder(folder: Path) -> str:
    """A readable summary of an engine folder: what it was built from, with which backend, for which plan."""
    folder = Path(folder)
    data = load_engine_index(folder)
    m = Manifest(folder, data["manifest"])
    layers = [i for i in range(m.num_layers) if m.layer_key(i) in data["engines"]]
    size = sum(e["size"] for e in data["engines"].values())
    plan = data.get("plan") or {}
    return "\n".join([
        f"engine folder {folder}",
        f"  source       {m.data.get('source')}  (fingerprint {m.fingerprint}), {m.num_layers} layers",
        f"  backend      {data['backend']} {data.get('build', {}).get('version', '')}, precision {data.get('precision')}",
        f"  engines      embed, head and {len(layers)} layer(s) {layers}, {size / 1e6:.1f} MB",
        f"  plan         {plan.get('name') or ('built for a plan' if plan else 'none: every layer')}",
    ])
