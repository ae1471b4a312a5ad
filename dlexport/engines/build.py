"""``dlexport build``: compile the subgraphs a plan needs (embedding, its layers, the head) into an engine folder.

One engine per subgraph, one at a time, each written to a temporary file and renamed into place; a progress journal
records each finished engine with the facts that make it reusable (backend version, settings, source graph hash),
so an interrupted build resumes and a changed setting rebuilds. The folder layout is described in ``folder.py``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import DlexportError, InputError
from ..files import (Journal, OwnedFolder, atomic_path, check_apart, is_whole, read_json, sha256_file,
                     write_bytes_atomic, write_json_atomic)
from ..manifest import Manifest
from .base import BackendUnavailableError
from .folder import ENGINES_JSON, FORMAT, FORMAT_VERSION, PLAN_FILE, TIMING_CACHE, TOKENIZER, source_digest

BUILD_BACKENDS = ("auto", "tensorrt", "tensorrt-rtx", "onnxruntime")
JOURNAL = ".build-progress.json"
PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "float32": "float32", "float16": "float16",
          "bfloat16": "bfloat16"}


def choose_backend(requested: str) -> tuple[str, str]:
    """Resolve ``auto`` (TensorRT where it imports and has a GPU to build for, else ONNX Runtime); say why."""
    if requested != "auto":
        if requested not in BUILD_BACKENDS:
            raise InputError(f"unknown --backend {requested!r}; choose one of {', '.join(BUILD_BACKENDS)}")
        return requested, f"{requested} was asked for"
    from .tensorrt.compat import FLAVOURS, RTX_DEFAULT_CAPABILITIES, device_capability, load_flavour, runs_on

    capability = device_capability()
    reasons = []
    for flavour in FLAVOURS:
        try:
            found = load_flavour(flavour)
        except BackendUnavailableError:
            reasons.append(f"{flavour} is not installed")
            continue
        if capability is None:
            reasons.append(f"{flavour} {found.version} is installed but there is no CUDA GPU here to run its engines")
        elif found.rtx and not runs_on(capability, RTX_DEFAULT_CAPABILITIES):
            reasons.append(f"{flavour} {found.version} does not run on this GPU (compute capability {capability})")
        else:
            return flavour, f"{flavour} {found.version} imports and this GPU has compute capability {capability}"
    return "onnxruntime", "; ".join(reasons) + ": using ONNX Runtime"


def _still_whole(out: Path, entry: dict | None, source: str) -> bool:
    if not isinstance(entry, dict) or entry.get("source_sha256") != source:
        return False
    try:
        return (out / entry["file"]).resolve().is_relative_to(out.resolve()) and \
            is_whole(out / entry["file"], entry["size"], entry["sha256"])
    except (KeyError, TypeError, OSError):  # a malformed entry is rebuilt, not trusted
        return False


def _subgraph_names(manifest: Manifest, plan) -> list[str]:
    layers = range(manifest.num_layers) if plan is None else plan.layers
    return ["embed"] + [manifest.layer_key(i) for i in layers] + ["head"]


class _TrtBackend:
    """Builds TensorRT engines; one shared timing cache, persisted in the folder after every engine."""

    suffix = ".engine"

    def __init__(self, flavour_name: str, manifest: Manifest, out: Path, precision: str, options: dict,
                 share_timing_cache: bool):
        from .tensorrt.compat import load_flavour
        from .tensorrt.config import settings_for

        quant = manifest.data.get("quantization")
        if quant and quant["settings"]["format"] != "qdq":
            raise ValueError(f"{manifest.folder} holds ONNX Runtime's MatMulNBits operator (`dlexport quantize "
                             f"--format {quant['settings']['format']}`); {flavour_name} engines are built from the "
                             "Q/DQ form (TensorRT for RTX 1.7 refuses MatMulNBits on fp32 activations): quantise "
                             "the source export with `dlexport quantize --format qdq`, or build this one with "
                             "--backend onnxruntime")
        self.flavour = load_flavour(flavour_name)
        self.manifest, self.out, self.share = manifest, out, share_timing_cache
        self.settings = settings_for(flavour_name, precision, max_positions=manifest.arch["max_positions"], **options)
        self.flavour.strongly_typed_for(precision, manifest.dtype)  # refuse an impossible precision before any work
        self.cache_path = out / TIMING_CACHE
        self.timing_cache = None

    def identity(self) -> dict:
        return {"backend": self.flavour.name, "version": self.flavour.version, "settings": self.settings.to_json()}

    def settings_json(self) -> dict:
        return {**self.settings.to_json(), "shared_timing_cache": self.share and self.flavour.has_timing_cache}

    def start(self) -> None:
        """Start from the folder's timing cache (TensorRT itself rejects one from another version or GPU)."""
        if self.share and self.flavour.has_timing_cache and self.cache_path.exists():
            self.timing_cache = self.cache_path.read_bytes()

    def build(self, name: str, dest: Path) -> dict:
        from .tensorrt.builder import build_engine

        sub = self.manifest.subgraph(name)
        engine, profiles, metadata, cache = build_engine(self.flavour, self.manifest.path(name), sub, self.settings,
                                                         self.manifest.dtype, self.timing_cache if self.share else None)
        write_bytes_atomic(dest, engine)
        if cache is not None and self.share:
            self.timing_cache = cache
            write_bytes_atomic(self.cache_path, cache)
        return {"profiles": profiles, "metadata": metadata}


class _OrtBackend:
    """ONNX Runtime "build": the graph optimised once for a provider and saved, so loading skips optimisation."""

    suffix = ".onnx"

    def __init__(self, manifest: Manifest, out: Path, precision: str, device: str):
        import onnxruntime

        if precision != manifest.dtype:
            raise InputError(f"ONNX Runtime runs the graph in its exported dtype ({manifest.dtype}), not {precision}: "
                             f"export at that precision (`dlexport export --dtype ...`) or drop --precision")
        from . import _ort_provider

        self.manifest, self.out, self.version = manifest, out, onnxruntime.__version__
        self.provider = _ort_provider(device.split(":")[0])

    def identity(self) -> dict:
        return {"backend": "onnxruntime", "version": self.version, "settings": self.settings_json()}

    def settings_json(self) -> dict:
        return {"provider": self.provider, "opt_level": "all"}

    def start(self) -> None:
        pass

    def build(self, name: str, dest: Path) -> dict:
        from .onnxruntime import OrtConfig
        from .onnxruntime.loader import create_session

        with atomic_path(dest, suffix=".partial.onnx") as tmp:
            create_session(self.manifest.path(name), OrtConfig(provider=self.provider, opt_level="all",
                                                               optimized_model_path=str(tmp)))
        return {"profiles": [], "metadata": {"flavour": "onnxruntime", "version": self.version,
                                             "precision": self.manifest.dtype, **self.settings_json()}}


def build_engines(export_dir: Path | str, out: Path | str, *, plan=None, backend: str = "auto",
                  precision: str | None = None, ort_device: str = "cpu", share_timing_cache: bool = True,
                  overwrite: bool = False, progress: bool = True, log=print, **trt_options) -> dict:
    """Build the engines ``plan`` needs (all layers when None) from an export into ``out``; returns engines.json.

    ``trt_options``: target, workspace_gib, optimization_level, max_batch, max_prompt, max_context,
    max_decode_tokens, compute_capabilities (see ``tensorrt.config.settings_for``). ``out`` must be new, empty or
    an engine folder of the same model (``overwrite``: of another model; only dlexport's files there are replaced).
    """
    from tqdm.auto import tqdm

    manifest = Manifest.load(export_dir)
    out = Path(out)
    check_apart(out, [manifest.folder])
    OwnedFolder.inspect(out, "engines", legacy=_legacy_engines)
    if plan is not None:
        plan.check()
        plan.check_model(manifest)
    backend, reason = choose_backend(backend)
    log(f"backend: {backend} ({reason})")
    if precision is not None and precision not in PRECISION_DTYPES:
        raise InputError(f"precision {precision!r} is not one of fp32, fp16, bf16")
    precision = PRECISION_DTYPES[precision] if precision else manifest.dtype
    names = _subgraph_names(manifest, plan)
    manifest.verify_files(names)
    if backend == "onnxruntime":
        ignored = sorted(k for k, v in trt_options.items() if v and k != "max_decode_tokens")
        if ignored:
            log(f"note: {', '.join(ignored)} are TensorRT settings; ONNX Runtime takes any shape and ignores them")
        builder = _OrtBackend(manifest, out, precision, ort_device)
    else:
        builder = _TrtBackend(backend, manifest, out, precision, trt_options, share_timing_cache)

    identity = {"fingerprint": manifest.fingerprint, **builder.identity()}
    own = OwnedFolder.claim(out, "engines", manifest.fingerprint, overwrite=overwrite, inputs=[manifest.folder],
                            legacy=_legacy_engines)
    own.add(JOURNAL, ENGINES_JSON, PLAN_FILE, TIMING_CACHE)
    journal = Journal(out / JOURNAL, identity)
    previous = _previous_entries(out, identity)
    builder.start()
    entries, rebuilt = {}, 0
    bar = tqdm(names, desc=f"build {backend}", unit="engine", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        sub = manifest.subgraph(name)
        source = source_digest(sub["files"])
        entry = journal.get(name) or previous.get(name)
        if not _still_whole(out, entry, source):
            file = name + builder.suffix
            own.add(file)
            built = builder.build(name, out / file)
            entry = {"file": file, "size": (out / file).stat().st_size, "sha256": sha256_file(out / file),
                     "source_sha256": source, "inputs": sub["inputs"], "outputs": sub["outputs"], **built}
            rebuilt += 1
        journal.record(name, entry)
        entries[name] = entry

    if manifest.tokenizer_dir() is not None and manifest.tokenizer_dir().exists():
        shutil.copytree(manifest.tokenizer_dir(), out / TOKENIZER, dirs_exist_ok=True)
        own.add_tree(TOKENIZER)
    manifest_data = dict(manifest.data, tokenizer=TOKENIZER if (out / TOKENIZER).exists() else None)
    if plan is not None:
        plan.save(out / PLAN_FILE)
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, "backend": backend, "precision": precision,
            "build": identity, "settings": builder.settings_json(), "manifest": manifest_data,
            "plan": plan.to_json() if plan is not None else None, "engines": entries}
    write_json_atomic(out / ENGINES_JSON, data)
    journal.remove()
    own.forget_missing()
    log(f"built {rebuilt} engine(s), reused {len(names) - rebuilt}, into {out}")
    return data


def _legacy_engines(folder: Path):
    """An engine folder written before ownership markers: its model and the files engines.json accounts for."""
    from .folder import load_engine_index

    data = load_engine_index(folder)
    files = [e["file"] for e in data["engines"].values()] + [ENGINES_JSON, JOURNAL, PLAN_FILE, TIMING_CACHE,
                                                             "profile.json"]
    files += [p.relative_to(folder).as_posix() for p in (folder / TOKENIZER).rglob("*") if p.is_file()]
    return data["manifest"]["fingerprint"], files


def _previous_entries(out: Path, identity: dict) -> dict:
    """Entries of a finished build into ``out`` with the same identity: a re-run reuses them."""
    try:
        old = read_json(out / ENGINES_JSON, "engines.json")
    except (DlexportError, FileNotFoundError, ValueError):
        return {}
    return old.get("engines", {}) if old.get("build") == identity else {}
