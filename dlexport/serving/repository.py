"""A Triton model repository for a dlexport folder: ``config.pbtxt``, a one-line ``model.py`` and the plans.

Layout (``REPO`` is a folder dlexport owns; the export or engine folder is referenced, never copied)::

    REPO/NAME/config.pbtxt          Python backend, inputs/outputs below, dynamic batching, instance group
    REPO/NAME/serving.json          what the model loads: the folder, device, threads, plans by name
    REPO/NAME/plans/PLAN.json       the plans served (with their exit adapters), selectable per request
    REPO/NAME/1/model.py            imports dlexport.serving.backend: all the work is in the library
    REPO/NAME/learning.json         what speculative requests learned (draft layers, acceptance), written by each
                                    instance when the server stops and read when it starts (``learning``)

Inputs (all but one prompt optional; one prompt per request, concurrent requests are batched by the server):
``text`` (BYTES) or ``input_ids`` (INT64), ``max_new_tokens`` (INT32), ``temperature``/``top_p`` (FP32), ``top_k``
(INT32), ``seed`` (INT64), ``strategy`` and ``plan`` (BYTES), ``lookup`` (INT32: speculative requests' prompt-lookup
n-gram, 0 off; default the repository's). Outputs: ``text_output`` (BYTES), ``output_ids``
(INT64), ``layers_executed`` (INT64: decoder layers run for this request's tokens) and ``mean_layers`` (FP32).
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .. import checks
from ..errors import InputError, MissingFileError
from ..files import OwnedFolder, write_bytes_atomic, write_json_atomic
from ..manifest import MANIFEST, Manifest

KIND = "triton model repository"
FORMAT, VERSION = "dlexport-serving", 1
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RESERVED_PLANS = ("full",)  # every layer; "" (or no plan input) is the folder's default plan

INPUTS = [  # name, Triton type, dims (after the batch dimension), optional
    ("text", "TYPE_STRING", [1], True),
    ("input_ids", "TYPE_INT64", [-1], True),
    ("max_new_tokens", "TYPE_INT32", [1], True),
    ("temperature", "TYPE_FP32", [1], True),
    ("top_k", "TYPE_INT32", [1], True),
    ("top_p", "TYPE_FP32", [1], True),
    ("seed", "TYPE_INT64", [1], True),
    ("strategy", "TYPE_STRING", [1], True),
    ("plan", "TYPE_STRING", [1], True),
    ("lookup", "TYPE_INT32", [1], True),
]
LEARNING = "learning.json"
OUTPUTS = [("text_output", "TYPE_STRING", [1]), ("output_ids", "TYPE_INT64", [-1]),
           ("layers_executed", "TYPE_INT64", [1]), ("mean_layers", "TYPE_FP32", [1])]

MODEL_PY = '''"""Triton Python-backend model written by `dlexport serve-repo`; the work is in dlexport.serving.backend."""
import sys

sys.path.insert(0, {root!r})  # the dlexport that wrote this repository serves it
from dlexport.serving.backend import TritonPythonModel  # noqa: E402,F401
'''


@dataclass
class RepoSettings:
    name: str = "dlexport"
    device: str = "cpu"
    threads: int | None = None
    instances: int = 1
    max_batch_size: int = 16  # requests merged into one batch
    queue_delay_us: int = 2000  # how long the batcher may wait for more requests
    batching: bool = True
    streaming: bool = False  # decoupled: one response per token
    max_new_tokens: int = 32  # when a request gives none
    plans: dict[str, Path] = field(default_factory=dict)  # name -> plan.json
    lookup: int = 0  # speculative requests' prompt-lookup n-gram when a request gives none (0: off)
    learning: bool = True  # keep what speculation learned across server restarts (NAME/learning.json)

    def check(self) -> None:
        if not NAME.match(self.name):
            raise InputError(f"model name {self.name!r} is not a Triton model name: use letters, digits, '_', '-', "
                             "'.' (at most 64)")
        checks.integer(self.instances, "instances", 1, 256, fix="run 1 instance per core group or GPU")
        checks.integer(self.max_batch_size, "max_batch_size", 1, 1024)
        checks.integer(self.queue_delay_us, "queue_delay_us", 0, 10_000_000)
        checks.integer(self.max_new_tokens, "default max_new_tokens", 1, 1 << 20)
        checks.integer(self.lookup, "default lookup", 0, 64, fix="give 0 (off) or the n-gram to match, e.g. 3")
        if self.threads is not None:
            checks.integer(self.threads, "threads", 1, 4096)
        for plan in self.plans:
            if plan in RESERVED_PLANS:
                raise InputError(f"plan name {plan!r} is taken: 'full' always serves every layer; choose another name")
            if not NAME.match(plan):
                raise InputError(f"plan name {plan!r}: use letters, digits, '_', '-', '.' (at most 64)")


def folder_manifest(folder: Path) -> Manifest:
    """The manifest of an export folder or of an engine folder (whose index carries it)."""
    folder = Path(folder)
    if (folder / "engines.json").exists():
        from ..engines.folder import load_engine_index

        return Manifest(folder, load_engine_index(folder)["manifest"])
    if not (folder / MANIFEST).exists():
        raise MissingFileError(f"{folder} holds neither an export ({MANIFEST}) nor engines (engines.json): give the "
                               "folder `dlexport export` or `dlexport build` wrote")
    return Manifest.load(folder)


def write_repository(folder: Path | str, out: Path | str, settings: RepoSettings = RepoSettings()) -> Path:
    """Write (or rewrite) model ``settings.name`` of the repository ``out`` for ``folder``; returns its folder."""
    from ..runtime.plan import load_plan

    settings.check()
    folder = Path(folder).resolve()
    manifest = folder_manifest(folder)
    plans = {name: load_plan(path, manifest) for name, path in settings.plans.items()}  # refused here, not at load
    own = OwnedFolder.claim(out, KIND, manifest.fingerprint, overwrite=None, inputs=[folder])
    model = Path(out) / settings.name
    names = [f"{settings.name}/{f}" for f in ("config.pbtxt", "serving.json", "1/model.py")]
    old_plans = sorted(f for f in own.files if f.startswith(f"{settings.name}/plans/"))
    for rel in old_plans:  # plans of an earlier write of this model: dlexport's files, replaced
        (Path(out) / rel).unlink(missing_ok=True)
    own.forget_missing()
    carried = {}
    for name, plan in plans.items():
        src = Path(settings.plans[name])
        files = [(src, f"plans/{name}.json")]
        if plan.exit is not None:
            files += [(src.parent / a.file, f"plans/{name}/{a.file}") for a in plan.exit.adapters]
        own.add(*(f"{settings.name}/{rel}" for _, rel in files))
        for path, rel in files:
            target = model / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if rel.endswith(".json"):
                data = json.loads(path.read_text())
                for a in (data.get("exit") or {}).get("adapters") or []:
                    a["file"] = f"{name}/{a['file']}"  # relative to the copied plan
                write_json_atomic(target, data)
            else:
                shutil.copyfile(path, target)
        carried[name] = f"plans/{name}.json"
    own.add(*names, *([f"{settings.name}/{LEARNING}"] if settings.learning else []))  # learning: written later
    write_bytes_atomic(model / "config.pbtxt", config_pbtxt(settings).encode())
    write_json_atomic(model / "serving.json", {
        "format": FORMAT, "version": VERSION, "folder": str(folder), "fingerprint": manifest.fingerprint,
        "device": settings.device, "threads": settings.threads, "max_new_tokens": settings.max_new_tokens,
        "streaming": settings.streaming, "plans": carried, "lookup": settings.lookup,
        "learning": LEARNING if settings.learning else None})
    write_bytes_atomic(model / "1" / "model.py", MODEL_PY.format(root=str(_dlexport_root())).encode())
    return model


def _dlexport_root() -> Path:
    import dlexport

    return Path(dlexport.__file__).resolve().parent.parent


def config_pbtxt(s: RepoSettings) -> str:
    kind = "KIND_GPU" if s.device.startswith(("cuda", "tensorrt")) else "KIND_CPU"
    lines = [f'name: "{s.name}"', 'backend: "python"', f"max_batch_size: {s.max_batch_size}"]
    for name, dtype, dims, optional in INPUTS:
        ragged = " allow_ragged_batch: true" if dims == [-1] else ""
        lines.append(f'input {{ name: "{name}" data_type: {dtype} dims: {dims} optional: {str(optional).lower()}'
                     f"{ragged} }}")
    for name, dtype, dims in OUTPUTS:
        lines.append(f'output {{ name: "{name}" data_type: {dtype} dims: {dims} }}')
    lines.append(f"instance_group [ {{ kind: {kind} count: {s.instances} }} ]")
    if s.batching:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {s.queue_delay_us} }}")
    if s.streaming:
        lines.append("model_transaction_policy { decoupled: true }")
    return "\n".join(lines) + "\n"


def read_serving(model_dir: Path) -> dict:
    from ..files import read_json

    data = read_json(Path(model_dir) / "serving.json", "serving settings")
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise InputError(f"{model_dir}/serving.json is not a {FORMAT} v{VERSION} file: rewrite the repository with "
                         "`dlexport serve-repo`")
    return data
