"""What a command runs end to end, above every layer it combines: export then validate, export then build.

The exporter, the engines and the runtime each do one thing and import nothing above them; joining them (an
export checked by the runtime it feeds, a build that exports first) happens here.
"""
from __future__ import annotations

from pathlib import Path

from .engines.build import PRECISION_DTYPES, build_engines, choose_backend
from .errors import DlexportError, InputError
from .exporter import export as export_files
from .files import OwnedFolder, check_apart
from .manifest import Manifest
from .runtime.plan import load_plan
from .validation import validate as validate_export


def export(model, out, *, validate: bool = True, **kw) -> Manifest:
    """``exporter.export`` (same arguments), then, by default, validation against the PyTorch model
    (``validation.py``): its report lands in the manifest, and a failed check raises after it is saved."""
    return export_files(model, out, check=validate_export if validate else None, **kw)


def build_from_model(model: str, out: Path | str, *, export_dir: Path | str | None = None, random_weights: bool = False,
                     precision: str | None = None, backend: str = "auto", plan_path: Path | None = None,
                     validate: bool = True, progress: bool = True, log=print, **options) -> dict:
    """Export ``model`` at the build precision when needed (into ``export_dir``), then build from that export."""
    from .engines.tensorrt.config import DEFAULT_TARGET, PRESETS

    out = Path(out)
    export_dir = Path(export_dir) if export_dir else out.parent / f"{out.name}-export"
    check_apart(out, [export_dir])
    OwnedFolder.inspect(out, "engines")
    resolved, _ = choose_backend(backend)
    if precision is None:
        precision = "fp32" if resolved == "onnxruntime" else \
            {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[
                PRESETS[options.get("target") or DEFAULT_TARGET[resolved]].precision]
    source = f"random:{model}:seed0" if random_weights else model
    if precision not in PRECISION_DTYPES:
        raise InputError(f"precision {precision!r} is not one of fp32, fp16, bf16")
    if _reusable_export(export_dir, source, PRECISION_DTYPES[precision]):
        log(f"reusing the export in {export_dir}")
    else:
        export(model, export_dir, random_weights=random_weights, dtype=precision, validate=validate,
               progress=progress, log=log)
    manifest = Manifest.load(export_dir)
    plan = load_plan(plan_path, manifest) if plan_path else None
    return build_engines(export_dir, out, plan=plan, backend=resolved, precision=precision, progress=progress,
                         log=log, **options)


def _reusable_export(export_dir: Path, source: str, dtype: str) -> bool:
    """An export of the same model at the same dtype is already there (re-exporting would redo every subgraph)."""
    try:
        manifest = Manifest.load(export_dir)
    except (DlexportError, FileNotFoundError, ValueError):
        return False
    if manifest.data.get("source") != source or manifest.dtype != dtype:
        return False
    manifest.verify_files()
    return True
