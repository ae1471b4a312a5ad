"""trtexec command generation and parsing of the files it exports, without TensorRT.

Where the formats and flags come from (NVIDIA/TensorRT on GitHub):
- ``--exportTimes``: a JSON list, one object per inference, with the keys ``samples/trtexec/tracer.py`` reads
  (startInMs, endInMs, startComputeMs, endComputeMs, startOutMs, endOutMs, inMs, computeMs, outMs, latencyMs,
  endToEndMs; all ms).
- ``--exportProfile``: a JSON list whose first element is ``{"count": N}``, then one object per layer with name,
  timeMs, averageMs, percentage, as ``samples/trtexec/profiler.py`` reads it.
- Flags: ``samples/common/sampleOptions.cpp`` (InferenceOptions::parse: --warmUp, --duration, --iterations,
  --useSpinWait, --useCudaGraph, --noDataTransfers, --separateProfileRun, --shapes, --useProfile; ReportingOptions:
  --exportTimes, --exportProfile) and the trtexec section of the TensorRT developer guide. TensorRT 11's trtexec
  captures CUDA graphs by default and takes --noCudaGraph instead of --useCudaGraph.
- The banner ``[TensorRT v100300]`` (MAJOR*10000 + MINOR*100 + PATCH) is what trtexec prints on every run.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from dlexport.tools.trtexec import (TrtexecSettings, TrtexecUnavailableError, find_trtexec, parse_profile, parse_times,
                                    parse_version, plan_runs, profile_trtexec, select_profile, trtexec_command)

TIMES_FORMAT = [  # two inferences, as trtexec --exportTimes writes them (keys from samples/trtexec/tracer.py)
    {"startInMs": 0.0, "endInMs": 0.0, "startComputeMs": 0.01, "endComputeMs": 1.21, "startOutMs": 1.21,
     "endOutMs": 1.21, "inMs": 0.0, "computeMs": 1.2, "outMs": 0.0, "latencyMs": 1.2, "endToEndMs": 1.21},
    {"startInMs": 1.3, "endInMs": 1.3, "startComputeMs": 1.31, "endComputeMs": 2.71, "startOutMs": 2.71,
     "endOutMs": 2.71, "inMs": 0.0, "computeMs": 1.4, "outMs": 0.0, "latencyMs": 1.4, "endToEndMs": 1.41},
]
PROFILE_FORMAT = [  # as trtexec --exportProfile writes it (read by samples/trtexec/profiler.py)
    {"count": 20},
    {"name": "/layer/self_attn/MatMul", "timeMs": 4.0, "averageMs": 0.2, "percentage": 25.0},
    {"name": "/layer/mlp/down_proj/MatMul", "timeMs": 12.0, "averageMs": 0.6, "percentage": 75.0},
]


def test_parse_version_from_banner():
    assert parse_version("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec --help") == (10, 3, 0)
    assert parse_version("[TensorRT v110002]") == (11, 0, 2)
    with pytest.raises(ValueError, match="version"):
        parse_version("no banner")


def test_parse_times_and_profile_files(tmp_path):
    (tmp_path / "times.json").write_text(json.dumps(TIMES_FORMAT))
    (tmp_path / "profile.json").write_text(json.dumps(PROFILE_FORMAT))
    times = parse_times(json.loads((tmp_path / "times.json").read_text()))
    assert times["runs"] == 2
    assert times["median_ms"] == pytest.approx(1.3) and times["p90_ms"] == pytest.approx(1.38)
    prof = parse_profile(json.loads((tmp_path / "profile.json").read_text()))
    assert prof["count"] == 20 and prof["layers"][0]["name"].endswith("down_proj/MatMul")
    with pytest.raises(ValueError, match="exportTimes"):
        parse_times(PROFILE_FORMAT)
    with pytest.raises(ValueError, match="exportProfile"):
        parse_profile(TIMES_FORMAT)


def _cmd(version, cuda_graph):
    return trtexec_command("trtexec", "e.engine", "x:1x2", 1, "t.json", "p.json", version,
                           TrtexecSettings(warmup_ms=100, duration_s=2, iterations=30, cuda_graph=cuda_graph))


def test_command_pins_cuda_graphs_per_tensorrt_version():
    jetpack = _cmd((10, 3, 0), False)
    assert "--noDataTransfers" in jetpack and "--useCudaGraph" not in jetpack and "--noCudaGraph" not in jetpack
    assert "--useCudaGraph" in _cmd((10, 3, 0), True)
    trt11 = _cmd((11, 0, 0), False)
    assert "--noCudaGraph" in trt11 and "--useCudaGraph" not in trt11 and "--noDataTransfers" not in trt11
    assert not {"--noCudaGraph", "--useCudaGraph"} & set(_cmd((11, 0, 0), True))
    for flag in ("--loadEngine=e.engine", "--shapes=x:1x2", "--useProfile=1", "--warmUp=100", "--duration=2",
                 "--iterations=30", "--exportTimes=t.json", "--exportProfile=p.json", "--separateProfileRun"):
        assert flag in jetpack


def _profiles(max_prompt, max_context, inputs):
    def at(sizes, dims):
        return [sizes[d] if isinstance(d, str) else d for d in dims]

    def point(b, t, p):
        return {"batch": b, "tokens": t, "past": p, "past_plus_tokens": t + p}

    out = []
    for name, lo, opt, hi in (("prefill", point(1, 1, 0), point(1, 16, 16), point(1, max_prompt, max_context)),
                              ("decode", point(1, 1, 1), point(1, 1, 64), point(1, 8, max_context))):
        out.append({"name": name, "shapes": {s["name"]: {"min": at(lo, s["shape"]), "opt": at(opt, s["shape"]),
                                                          "max": at(hi, s["shape"])} for s in inputs}})
    return out


@pytest.fixture
def engine_folder(tmp_path, tiny_llama_portable_export):
    """An engine folder index as `dlexport build` writes it (engines.json), with empty stand-in engine files.

    Portable layers: trtexec would feed an in-place layer's write index random values (refused below)."""
    tiny_llama_export = tiny_llama_portable_export
    engines = {}
    for name in ("embed", tiny_llama_export.layer_key(0), "head"):
        sub = tiny_llama_export.subgraph(name)
        (tmp_path / f"{name}.engine").write_bytes(b"")
        engines[name] = {"file": f"{name}.engine", "size": 0, "sha256": "", "inputs": sub["inputs"],
                         "outputs": sub["outputs"], "profiles": _profiles(64, 256, sub["inputs"]), "metadata": {}}
    (tmp_path / "engines.json").write_text(json.dumps({
        "format": "dlexport-engines", "format_version": 1, "backend": "tensorrt", "precision": "float16",
        "manifest": tiny_llama_export.data, "engines": engines}))
    return tmp_path


def test_plan_runs_shapes_profiles_and_skips(engine_folder, tmp_path):
    _, runs, skipped = plan_runs(engine_folder, [32, 128], "trtexec", (10, 3, 0), TrtexecSettings(), tmp_path / "o")
    by = {(r["engine"], r["phase"], r["context"]): r for r in runs}
    layer = by[("layer_00", "decode", 32)]["command"]
    assert "--useProfile=1" in layer  # the decode profile
    shapes = next(a for a in layer if a.startswith("--shapes="))
    assert "hidden_states:1x1x64" in shapes and "attention_mask:1x1x1x33" in shapes
    assert "past_key_values.0.key:1x2x32x16" in shapes
    prefill = by[("layer_00", "prefill", 32)]["command"]
    assert "--useProfile=0" in prefill and "hidden_states:1x32x64" in " ".join(prefill)
    assert "hidden_states:1x1x64" in " ".join(by[("head", "prefill", 32)]["command"])  # head sees the last token
    assert {(s["engine"], s["phase"], s["context"]) for s in skipped} == {("embed", "prefill", 128),
                                                                          ("layer_00", "prefill", 128)}


def test_select_profile_prefers_the_phase_then_any_that_fits():
    profiles = [{"name": "prefill", "shapes": {"x": {"min": [1], "opt": [4], "max": [8]}}},
                {"name": "decode", "shapes": {"x": {"min": [1], "opt": [1], "max": [2]}}}]
    assert select_profile(profiles, "decode", {"x": [1]}) == 1
    assert select_profile(profiles, "decode", {"x": [5]}) == 0
    assert select_profile(profiles, "prefill", {"x": [9]}) is None


FAKE_TRTEXEC = r'''#!{python}
"""Stands in for trtexec: prints the version banner and writes --exportTimes/--exportProfile files in the
documented formats (see this test module's docstring)."""
import json, sys
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
print("&&&& RUNNING TensorRT.trtexec [TensorRT v{version}] # trtexec " + " ".join(sys.argv[1:]))
print("[11/22/2026-01:00:00] [I] Selected Device: NVIDIA H100 80GB HBM3")
open({log!r}, "a").write(json.dumps(sys.argv[1:]) + "\n")
if "--exportTimes" in args:
    json.dump({times}, open(args["--exportTimes"], "w"))
    json.dump({profile}, open(args["--exportProfile"], "w"))
'''


@pytest.fixture
def fake_trtexec(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.jsonl"
    script = bin_dir / "trtexec"
    script.write_text(FAKE_TRTEXEC.format(python=sys.executable, version="110000", log=str(log),
                                          times=repr(TIMES_FORMAT), profile=repr(PROFILE_FORMAT)))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_profile_trtexec_end_to_end_with_a_stand_in(engine_folder, fake_trtexec, tmp_path):
    table = profile_trtexec(engine_folder, [32], device="cuda:0", keep_dir=tmp_path / "runs", log=lambda *a: None)
    assert len(table.entries) == 6 and not table.skipped
    assert all(e["median_ms"] == pytest.approx(1.3) for e in table.entries)
    assert table.meta["tool"] == "trtexec" and table.meta["versions"]["tensorrt"] == "11.0.0"
    assert table.meta["cuda_graph"] is False and table.meta["device"]["name"] == "NVIDIA H100 80GB HBM3"
    calls = [json.loads(line) for line in fake_trtexec.read_text().splitlines()]
    assert all("--noCudaGraph" in c and "--device=0" in c for c in calls if any("--loadEngine" in a for a in c))


def test_missing_trtexec_offers_builtin(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("dlexport.tools.trtexec.SEARCH_PATHS", ())
    with pytest.raises(TrtexecUnavailableError, match="--tool builtin"):
        find_trtexec()


def test_onnxruntime_engine_folders_are_refused(engine_folder, fake_trtexec):
    data = json.loads((engine_folder / "engines.json").read_text())
    data["backend"] = "onnxruntime"
    (engine_folder / "engines.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="--tool builtin"):
        profile_trtexec(engine_folder, [32], log=lambda *a: None)


@pytest.mark.skipif(shutil.which("trtexec") is None, reason="trtexec is not installed here")
def test_in_place_engine_folders_are_refused_with_the_ways_out(engine_folder, tiny_llama_export, tmp_path):
    data = json.loads((engine_folder / "engines.json").read_text())
    layer = tiny_llama_export.layer_key(0)
    data["engines"][layer]["inputs"] = tiny_llama_export.subgraph(layer)["inputs"]  # with past_length
    (engine_folder / "engines.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="in-place KV layers.*--tool builtin.*--kv portable"):
        plan_runs(engine_folder, [32], "trtexec", (10, 3, 0), TrtexecSettings(), tmp_path / "out")


def test_real_trtexec_on_a_tiny_engine_folder(tiny_llama_portable_export, tmp_path):
    tiny_llama_export = tiny_llama_portable_export
    pytest.importorskip("tensorrt")
    out = tmp_path / "engines"
    subprocess.run([sys.executable, "-m", "dlexport.cli", "build", "--from-export", str(tiny_llama_export.folder),
                    "--out", str(out), "--backend", "tensorrt", "--max-prompt", "64", "--max-context", "256"],
                   check=True)
    table = profile_trtexec(out, [32, 128], device="cuda:0", log=lambda *a: None)
    assert {e["phase"] for e in table.entries} == {"prefill", "decode"}
    assert all(e["median_ms"] > 0 for e in table.entries)
