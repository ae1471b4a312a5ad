"""Profile TensorRT engines with ``trtexec``: command generation, the run, and the JSON files it exports.

Flags (TensorRT's ``samples/common/sampleOptions.cpp`` and the trtexec section of the TensorRT docs):
``--loadEngine``, ``--shapes=name:AxBxC,...``, ``--useProfile=N`` (optimization profile), ``--warmUp`` (ms),
``--duration`` (s), ``--iterations``, ``--useSpinWait``, ``--separateProfileRun`` (per-layer profiling in a second
run, so it does not perturb the timings), ``--exportTimes``, ``--exportProfile``, ``--device``.

CUDA graphs are pinned explicitly because the default changed: TensorRT 10 (JetPack 6 ships 10.3) captures no graph
unless ``--useCudaGraph`` is given; TensorRT 11 captures one by default, dropped ``--useCudaGraph`` and takes
``--noCudaGraph`` to turn it off. Host/device copies are excluded on both (``--noDataTransfers`` on 10; 11 excludes
them by default), because the runtime keeps every tensor on the device.

Exported formats (as read by TensorRT's ``samples/trtexec/tracer.py`` and ``profiler.py``):
``--exportTimes``: a list with one object per inference, times in ms: ``startInMs``, ``endInMs``,
``startComputeMs``, ``endComputeMs``, ``startOutMs``, ``endOutMs``, ``inMs``, ``computeMs``, ``outMs``,
``latencyMs``, ``endToEndMs``. ``--exportProfile``: a list whose first object is ``{"count": runs}`` followed by
one object per layer: ``name``, ``timeMs`` (total), ``averageMs``, ``percentage`` (newer versions add ``medianMs``).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import CorruptFileError, InputError, MissingFileError, UnavailableError
from ..contract import TensorSpec, is_inplace
from ..files import read_json
from ..manifest import Manifest
from .costs import PHASES, CostTable, phase_shape
from .environment import profile_meta
from .stats import percentile

ENGINES_JSON = "engines.json"
SEARCH_PATHS = ("/usr/src/tensorrt/bin/trtexec", "/opt/tensorrt/bin/trtexec")  # JetPack, NGC containers


class TrtexecUnavailableError(UnavailableError):
    pass


@dataclass(frozen=True)
class TrtexecSettings:
    warmup_ms: int = 200
    duration_s: float = 1.0
    iterations: int = 50
    cuda_graph: bool = False  # the runtime launches engines one by one without graphs: time them the same way
    device_index: int = 0


def find_trtexec() -> str:
    found = shutil.which("trtexec") or next((p for p in SEARCH_PATHS if Path(p).exists()), None)
    if found is None:
        raise TrtexecUnavailableError(
            "trtexec was not found (not on PATH, nor in " + ", ".join(SEARCH_PATHS) + "). Install TensorRT with its "
            "samples (JetPack has it in /usr/src/tensorrt/bin) or put trtexec on PATH; or use `--tool builtin`, "
            "which times the same engines through dlexport's engine interface.")
    return found


def parse_version(text: str) -> tuple[int, int, int]:
    """TensorRT's version from trtexec's banner, e.g. ``[TensorRT v100300]`` -> (10, 3, 0)."""
    m = re.search(r"\[TensorRT v(\d+)\]", text)
    if not m:
        raise InputError("could not read the TensorRT version from trtexec's output (no '[TensorRT vNNNNNN]' tag)")
    n = int(m.group(1))
    return n // 10000, n // 100 % 100, n % 100


def selected_device(output: str) -> str | None:
    """The GPU trtexec ran on, from its ``Selected Device: NAME`` log line."""
    m = re.search(r"Selected Device:\s*(.+)", output)
    return m.group(1).strip() if m else None


def trtexec_version(binary: str) -> tuple[int, int, int]:
    out = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60)
    return parse_version(out.stdout + out.stderr)


def shapes_arg(inputs: list[TensorSpec], dims: dict) -> str:
    """``name:1x64x576,...`` for every input, symbolic dims resolved from ``dims``."""
    parts = []
    for spec in inputs:
        shape = [dims[d] if isinstance(d, str) else d for d in spec.shape]
        parts.append(f"{spec.name}:" + "x".join(str(s) for s in shape))
    return ",".join(parts)


def concrete_shapes(inputs: list[TensorSpec], dims: dict) -> dict[str, list[int]]:
    return {s.name: [dims[d] if isinstance(d, str) else d for d in s.shape] for s in inputs}


def select_profile(profiles: list[dict], phase: str, shapes: dict[str, list[int]]) -> int | None:
    """Index of the optimization profile to run ``shapes`` with: the one named after the phase if the shapes fit
    it, else the first that fits; None when none does."""
    def fits(profile):
        for name, shape in shapes.items():
            rng = profile["shapes"].get(name)
            if rng is None:
                continue
            if len(rng["min"]) != len(shape) or any(not lo <= s <= hi for s, lo, hi in zip(shape, rng["min"], rng["max"])):
                return False
        return True

    order = sorted(range(len(profiles)), key=lambda i: profiles[i].get("name") != phase)
    return next((i for i in order if fits(profiles[i])), None)


def trtexec_command(binary: str, engine_file: Path, shapes: str, profile_index: int, times_json: Path,
                    profile_json: Path, version: tuple[int, int, int], settings: TrtexecSettings) -> list[str]:
    cmd = [binary, f"--loadEngine={engine_file}", f"--shapes={shapes}", f"--useProfile={profile_index}",
           f"--warmUp={settings.warmup_ms}", f"--duration={settings.duration_s:g}",
           f"--iterations={settings.iterations}", f"--device={settings.device_index}", "--useSpinWait",
           "--separateProfileRun", f"--exportTimes={times_json}", f"--exportProfile={profile_json}"]
    if version[0] >= 11:
        if not settings.cuda_graph:
            cmd.append("--noCudaGraph")  # on by default since TensorRT 11
    else:
        cmd.append("--noDataTransfers")  # TensorRT 11 leaves copies out by default
        if settings.cuda_graph:
            cmd.append("--useCudaGraph")  # off by default up to TensorRT 10
    return cmd


def parse_times(data) -> dict:
    """Summary of an ``--exportTimes`` file: GPU compute median / p90 and host latency median (ms)."""
    if not isinstance(data, list) or not data or "computeMs" not in data[0]:
        raise CorruptFileError("not a trtexec --exportTimes file: expected a list of objects with 'computeMs'")
    compute = [float(r["computeMs"]) for r in data]
    latency = [float(r["latencyMs"]) for r in data]
    return {"median_ms": percentile(compute, 50), "p90_ms": percentile(compute, 90),
            "latency_median_ms": percentile(latency, 50), "runs": len(compute)}


def parse_profile(data) -> dict:
    """An ``--exportProfile`` file: the run count and per-layer average ms, slowest first."""
    if not isinstance(data, list) or not data or "count" not in data[0]:
        raise CorruptFileError("not a trtexec --exportProfile file: expected a list starting with {'count': N}")
    layers = sorted(({"name": r["name"], "average_ms": float(r["averageMs"]), "percentage": float(r["percentage"])}
                     for r in data[1:]), key=lambda r: -r["average_ms"])
    return {"count": int(data[0]["count"]), "layers": layers}


def read_engine_folder(folder: Path) -> dict:
    path = Path(folder) / ENGINES_JSON
    if not path.exists():
        raise MissingFileError(f"{folder} has no {ENGINES_JSON}: trtexec profiles TensorRT engines; build them with "
                                f"`dlexport build --from-export ... --backend tensorrt`, or profile this folder with "
                                "`--tool builtin`")
    data = read_json(path, "engine folder index")
    if data.get("format") != "dlexport-engines":
        raise CorruptFileError(f"{path} is not a dlexport engine index (format {data.get('format')!r})")
    if data.get("backend") != "tensorrt":
        raise InputError(f"{folder} holds {data.get('backend')} engines; trtexec runs standard TensorRT engines only "
                         "(TensorRT for RTX ships its own tensorrt_rtx tool): use `--tool builtin`")
    return data


def plan_runs(folder: Path, contexts, binary: str, version, settings: TrtexecSettings, out_dir: Path):
    """Every (engine, phase, context) to time: its command, or the reason it is skipped."""
    data = read_engine_folder(folder)
    runs, skipped = [], []
    for name, entry in data["engines"].items():
        inputs = [TensorSpec.from_json(s) for s in entry["inputs"]]
        if is_inplace(inputs):
            raise InputError(f"{folder} holds in-place KV layers: trtexec would feed their past_length (the cache write "
                             "index) random values. Profile them with `--tool builtin`, or build from a `--kv portable` "
                             "export")
        for context in contexts:
            for phase in PHASES:
                dims = phase_shape(phase, context, name)
                index = select_profile(entry["profiles"], phase, concrete_shapes(inputs, dims))
                if index is None:
                    skipped.append({"engine": name, "phase": phase, "context": context,
                                    "reason": "shapes outside every optimization profile of the engine"})
                    continue
                stem = out_dir / f"{name}.{phase}.{context}"
                times, prof = stem.with_suffix(".times.json"), stem.with_suffix(".profile.json")
                cmd = trtexec_command(binary, Path(folder) / entry["file"], shapes_arg(inputs, dims), index, times,
                                      prof, version, settings)
                runs.append({"engine": name, "phase": phase, "context": context, "tokens": dims["tokens"],
                             "past": dims["past"], "command": cmd, "times": times, "profile": prof})
    return data, runs, skipped


def profile_trtexec(folder: Path | str, contexts, *, device: str = "cuda", cuda_graph: bool = False,
                    settings: TrtexecSettings | None = None, keep_dir: Path | None = None, log=print) -> CostTable:
    """Run trtexec per engine, phase and context; raises TrtexecUnavailableError where there is no trtexec."""

    binary = find_trtexec()
    version = trtexec_version(binary)
    index = int(device.split(":")[1]) if ":" in device else 0
    settings = settings or TrtexecSettings(cuda_graph=cuda_graph, device_index=index)
    out_dir = Path(keep_dir) if keep_dir else Path(tempfile.mkdtemp(prefix="dlexport-trtexec-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    data, runs, skipped = plan_runs(Path(folder), contexts, binary, version, settings, out_dir)
    entries, device_name = [], None
    for run in runs:
        t0 = time.perf_counter()
        proc = subprocess.run(run["command"], capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"trtexec failed on {run['engine']} ({run['phase']}, context {run['context']}):\n"
                               f"{' '.join(run['command'])}\n{tail}")
        device_name = device_name or selected_device(proc.stdout)
        summary = parse_times(json.loads(run["times"].read_text()))
        layers = parse_profile(json.loads(run["profile"].read_text()))["layers"][:5]
        entries.append({k: run[k] for k in ("engine", "phase", "context", "tokens", "past")} | summary
                       | {"slowest_layers": layers})
        log(f"  {run['engine']} {run['phase']} {run['context']}: {summary['median_ms']:.3f} ms "
            f"({time.perf_counter() - t0:.1f} s)")
    manifest = Manifest(Path(folder), data["manifest"])
    meta = profile_meta(manifest, folder, "trtexec", device, data["backend"], contexts)
    meta["versions"]["tensorrt"] = ".".join(map(str, version))
    if device_name:
        meta["device"]["name"] = device_name
    meta.update({"precision": data.get("precision"), "cuda_graph": settings.cuda_graph,
                 "trtexec": {"binary": binary, "warmup_ms": settings.warmup_ms, "duration_s": settings.duration_s,
                             "iterations": settings.iterations, "metric": "computeMs (GPU compute, no H2D/D2H)"}})
    return CostTable(entries, meta, skipped)
