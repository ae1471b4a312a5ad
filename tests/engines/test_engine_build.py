"""`dlexport build`: backend choice, resuming, the shared timing cache, and ONNX Runtime builds end to end."""
import json

import pytest

from dlexport.cli import main
from dlexport.engines.base import BackendUnavailableError
from dlexport.engines.build import build_engines, choose_backend
from dlexport.engines.tensorrt import builder as trt_builder
from dlexport.engines.tensorrt import compat
from dlexport.runtime.plan import Plan, load_plan
from dlexport.runtime.runtime import Runtime


def quiet(*args):
    pass


def _fake_flavours(monkeypatch, installed: dict, capability):
    def load(name):
        if name not in installed:
            raise BackendUnavailableError(f"{name} missing")
        return compat.Flavour(name, installed[name], name)

    monkeypatch.setattr(compat, "load_flavour", load)
    monkeypatch.setattr(compat, "device_capability", lambda device_id=0: capability)


class _Module:
    __version__ = "10.3.0"


def test_auto_prefers_tensorrt_then_rtx_on_a_supported_gpu_then_onnxruntime(monkeypatch):
    _fake_flavours(monkeypatch, {"tensorrt": _Module, "tensorrt-rtx": _Module}, "8.7")
    assert choose_backend("auto") == ("tensorrt", "tensorrt 10.3.0 imports and this GPU has compute capability 8.7")
    _fake_flavours(monkeypatch, {"tensorrt-rtx": _Module}, "8.7")  # Jetson Orin: TensorRT for RTX does not run there
    backend, reason = choose_backend("auto")
    assert backend == "onnxruntime"
    assert "tensorrt is not installed" in reason and "does not run on this GPU (compute capability 8.7)" in reason
    _fake_flavours(monkeypatch, {"tensorrt-rtx": _Module}, "8.9")
    assert choose_backend("auto")[0] == "tensorrt-rtx"
    _fake_flavours(monkeypatch, {"tensorrt-rtx": _Module}, None)
    assert choose_backend("auto") == ("onnxruntime", "tensorrt is not installed; tensorrt-rtx 10.3.0 is installed but "
                                                     "there is no CUDA GPU here to run its engines: using ONNX Runtime")
    assert choose_backend("onnxruntime") == ("onnxruntime", "onnxruntime was asked for")
    with pytest.raises(ValueError, match="unknown --backend"):
        choose_backend("tvm")


def test_auto_on_this_machine_says_which_and_why(tiny_llama_export, tmp_path):
    if compat.device_capability() is not None:
        pytest.skip("this machine has a CUDA GPU; the fallback is exercised with fakes above")
    lines = []
    data = build_engines(tiny_llama_export.folder, tmp_path / "e", plan=Plan.skip(tiny_llama_export, [0]),
                         backend="auto", progress=False, log=lines.append)
    assert data["backend"] == "onnxruntime"
    assert lines[0].startswith("backend: onnxruntime (tensorrt is not installed") and "CUDA GPU" in lines[0]


def test_interrupted_build_resumes_and_changed_settings_rebuild(tiny_llama_export, tmp_path, monkeypatch):
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT for RTX builds the real engines of this test")
    real_build, built = trt_builder.build_engine, []

    def counting(flavour, path, *args, **kwargs):
        if len(built) == 2 and interrupt:
            raise KeyboardInterrupt
        built.append(path.stem)
        return real_build(flavour, path, *args, **kwargs)

    monkeypatch.setattr(trt_builder, "build_engine", counting)
    plan = Plan.skip(tiny_llama_export, [1, 3])
    out = tmp_path / "engines"
    kw = dict(plan=plan, backend="tensorrt-rtx", progress=False, log=quiet, max_batch=1, max_prompt=16, max_context=32)
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        build_engines(tiny_llama_export.folder, out, **kw)
    assert built == ["embed", "layer_01"] and not (out / "engines.json").exists()
    first = {n: (out / f"{n}.engine").stat().st_mtime_ns for n in ("embed", "layer_01")}
    assert not list(out.glob(".*.partial"))

    interrupt, built[:] = False, []
    build_engines(tiny_llama_export.folder, out, **kw)
    assert built == ["layer_03", "head"]
    assert first == {n: (out / f"{n}.engine").stat().st_mtime_ns for n in ("embed", "layer_01")}

    built.clear()
    build_engines(tiny_llama_export.folder, out, **kw)  # everything finished: nothing to do
    assert built == []

    (out / "layer_03.engine").write_bytes(b"truncated")
    build_engines(tiny_llama_export.folder, out, **kw)  # an altered engine is rebuilt, the rest kept
    assert built == ["layer_03"]

    built.clear()
    build_engines(tiny_llama_export.folder, out, **{**kw, "max_context": 64})  # other settings: all rebuilt
    assert built == ["embed", "layer_01", "layer_03", "head"]
    data = json.loads((out / "engines.json").read_text())
    assert {e["metadata"]["limits"]["max_context"] for e in data["engines"].values()} == {64}


def test_one_timing_cache_is_shared_by_every_build_and_persisted(tiny_opt_export, tmp_path, monkeypatch):
    """Standard TensorRT needs a GPU to build: its flavour and builder are stood in for to check the cache's path."""
    _fake_flavours(monkeypatch, {"tensorrt": _Module}, "8.7")
    seen = []

    def fake_build(flavour, path, sub, settings, dtype, timing_cache=None):
        seen.append((path.stem, timing_cache))
        meta = {"flavour": flavour.name, "version": flavour.version, "compute_capabilities": ["8.7"]}
        return b"engine " + path.stem.encode(), [], meta, (timing_cache or b"cache") + b"+" + path.stem.encode()

    monkeypatch.setattr(trt_builder, "build_engine", fake_build)
    out = tmp_path / "engines"
    plan = Plan.skip(tiny_opt_export, [0, 1])
    data = build_engines(tiny_opt_export.folder, out, plan=plan, backend="tensorrt", progress=False, log=quiet)
    assert [name for name, _ in seen] == ["embed", "layer_00", "layer_01", "head"]
    assert [c for _, c in seen] == [None, b"cache+embed", b"cache+embed+layer_00", b"cache+embed+layer_00+layer_01"]
    assert (out / "timing.cache").read_bytes() == b"cache+embed+layer_00+layer_01+head"
    assert data["settings"]["shared_timing_cache"] is True

    seen.clear()  # a rebuild with other settings starts from the persisted cache
    build_engines(tiny_opt_export.folder, out, plan=plan, backend="tensorrt", progress=False, log=quiet, max_batch=2)
    assert seen[0] == ("embed", b"cache+embed+layer_00+layer_01+head")

    seen.clear()
    build_engines(tiny_opt_export.folder, tmp_path / "unshared", plan=plan, backend="tensorrt", progress=False,
                  log=quiet, share_timing_cache=False)
    assert [c for _, c in seen] == [None] * 4


def test_build_command_with_onnxruntime_then_generation_matches_the_export(tiny_opt_export, tmp_path, capsys):
    plan = Plan.skip(tiny_opt_export, [0, 1, 3])
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "engines"
    args = ["build", "--model", "tiny-opt", "--random-weights", "--plan", str(tmp_path / "plan.json"), "--out",
            str(out), "--backend", "onnxruntime", "--quiet", "--no-validate"]
    assert main(args) == 0
    data = json.loads((out / "engines.json").read_text())
    assert data["backend"] == "onnxruntime"
    assert list(data["engines"]) == ["embed", "layer_00", "layer_01", "layer_03", "head"]
    assert data["settings"] == {"provider": "cpu", "opt_level": "all"}
    assert data["manifest"]["fingerprint"] == tiny_opt_export.fingerprint  # same shape and seed: the same model

    prompts = [[2, 17, 40, 99], [2, 5]]
    expected = Runtime.load(tiny_opt_export.folder).generate(prompts, 10, plan).tokens
    runtime = Runtime.load(out)
    assert sorted(runtime.engines) == sorted(data["engines"])
    assert runtime.generate(prompts, 10, load_plan(out / "plan.json", runtime.manifest)).tokens == expected
    assert runtime.generate(prompts, 10).tokens == expected  # the folder's own plan is the default

    capsys.readouterr()
    assert main(args) == 0  # the export and every engine are reused
    log = capsys.readouterr().out
    assert "reusing the export" in log and "built 0 engine(s), reused 5" in log


def test_onnxruntime_folder_refuses_another_provider_and_precision(tiny_llama_export, tmp_path):
    out = tmp_path / "engines"
    build_engines(tiny_llama_export.folder, out, plan=Plan.skip(tiny_llama_export, [2]), backend="onnxruntime",
                  progress=False, log=quiet)
    with pytest.raises(ValueError, match="optimised for ONNX Runtime's cpu provider.*--device cuda"):
        Runtime.load(out, device="cuda")
    with pytest.raises(ValueError, match="exported dtype \\(float32\\), not float16"):
        build_engines(tiny_llama_export.folder, tmp_path / "fp16", backend="onnxruntime", precision="fp16",
                      progress=False, log=quiet)


def test_build_reports_a_plan_for_another_model(tiny_llama_export, tiny_opt_export, tmp_path):
    with pytest.raises(ValueError, match="was made for model"):
        build_engines(tiny_llama_export.folder, tmp_path / "e", plan=Plan.skip(tiny_opt_export, [0]),
                      backend="onnxruntime", progress=False, log=quiet)
    assert main(["build", "--from-export", str(tiny_llama_export.folder), "--out", str(tiny_llama_export.folder),
                 "--backend", "onnxruntime", "--quiet"]) == 2  # --out must not be the export itself


def _copy_export(export, folder):
    import shutil

    shutil.copytree(export.folder, folder)
    return folder


def test_build_never_writes_into_an_export_or_a_users_folder(tiny_opt_export, tiny_llama_export, tmp_path):
    from dlexport.errors import FolderError

    other = _copy_export(tiny_llama_export, tmp_path / "other-export")  # another model's export
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    (tmp_path / "link").symlink_to(tiny_opt_export.folder)
    (tmp_path / "file").write_text("data")
    snapshot = {p: p.read_bytes() for p in [*other.rglob("*"), *user.rglob("*")] if p.is_file()}
    for out, message in [(other, "holds a dlexport export, not a engines"),
                         (user, "not empty and was not made by dlexport"),
                         (tiny_opt_export.folder / "engines", "overlap"),
                         (tmp_path / "link" / "engines", "through a symlink"),
                         (tmp_path / "file", "is a file")]:
        with pytest.raises(FolderError, match=message):
            build_engines(tiny_opt_export.folder, out, backend="onnxruntime", progress=False, log=quiet)
    assert snapshot == {p: p.read_bytes() for p in [*other.rglob("*"), *user.rglob("*")] if p.is_file()}
    assert not (tiny_opt_export.folder / "engines").exists()
    assert main(["build", "--from-export", str(tiny_opt_export.folder), "--out", str(other),
                 "--backend", "onnxruntime", "--quiet"]) == 2


def test_rebuild_cleans_stale_temporaries_and_keeps_the_users_files(tiny_opt_export, tiny_llama_export, tmp_path):
    out = tmp_path / "engines"
    plan = Plan.skip(tiny_opt_export, [0, 1])
    build_engines(tiny_opt_export.folder, out, plan=plan, backend="onnxruntime", progress=False, log=quiet)
    (out / ".layer_01.onnx.abc123.partial.onnx").write_bytes(b"x" * 1000)  # what a SIGKILLed build leaves
    (out / "README.txt").write_text("my notes")
    build_engines(tiny_opt_export.folder, out, plan=plan, backend="onnxruntime", progress=False, log=quiet)
    assert not list(out.glob(".*.partial*")) and (out / "README.txt").read_text() == "my notes"

    from dlexport.errors import FolderError

    with pytest.raises(FolderError, match="another model.*--overwrite"):
        build_engines(tiny_llama_export.folder, out, backend="onnxruntime", progress=False, log=quiet)
    build_engines(tiny_llama_export.folder, out, backend="onnxruntime", overwrite=True, progress=False, log=quiet)
    assert (out / "README.txt").read_text() == "my notes"
    assert Runtime.load(out).manifest.fingerprint == tiny_llama_export.fingerprint
