"""Every subgraph of tiny OPT, Llama, Gemma 3, Phi-3, SmolLM2-135M and every distinct one of Gemma 3 270M parsed and
built into a real engine by TensorRT for RTX."""
import json

import pytest

from dlexport.engines.build import build_engines
from dlexport.engines.tensorrt.builder import EngineBuildError, build_engine
from dlexport.engines.tensorrt.config import settings_for
from dlexport.pipeline import export
from dlexport.files import sha256_file
from dlexport.runtime.plan import Plan


def quiet(*args):
    pass


def _check_folder(out, manifest, rtx, precision="float32", layers=None):
    data = json.loads((out / "engines.json").read_text())
    layers = range(manifest.num_layers) if layers is None else layers
    names = ["embed"] + [manifest.layer_key(i) for i in layers] + ["head"]
    assert list(data["engines"]) == names
    assert (data["format"], data["backend"], data["precision"]) == ("dlexport-engines", "tensorrt-rtx", precision)
    assert data["manifest"]["fingerprint"] == manifest.fingerprint
    for name, entry in data["engines"].items():
        path = out / entry["file"]
        assert path.stat().st_size == entry["size"] > 10_000
        assert sha256_file(path) == entry["sha256"]
        assert entry["source_sha256"] == manifest.subgraph(name)["files"][0]["sha256"]
        assert [p["name"] for p in entry["profiles"]] == ["prefill", "decode"]
        meta = entry["metadata"]
        assert meta["optimization_profiles"] == 2  # counted by TensorRT's builder config
        assert (meta["flavour"], meta["version"], meta["precision"]) == ("tensorrt-rtx", rtx.version, precision)
        assert meta["compute_capabilities"] == ["8.0", "8.6", "8.9", "12.x"]
    assert not (out / "timing.cache").exists()  # TensorRT for RTX has no timing cache
    return data


@pytest.mark.parametrize("fixture", ["tiny_opt_export", "tiny_llama_export", "tiny_opt_portable_export",
                                     "tiny_llama_portable_export"])
def test_every_tiny_subgraph_builds_with_both_profiles(fixture, request, rtx, tmp_path):
    manifest = request.getfixturevalue(fixture)
    build_engines(manifest.folder, tmp_path / "engines", backend="tensorrt-rtx", progress=False, log=quiet,
                  max_batch=2, max_prompt=64, max_context=128)
    data = _check_folder(tmp_path / "engines", manifest, rtx)
    assert data["settings"]["limits"] == {"max_batch": 2, "max_prompt": 64, "max_context": 128,
                                          "max_decode_tokens": 8}


@pytest.mark.parametrize("shape", ["tiny-gemma3", "tiny-phi3"])
def test_families_with_two_rotary_kinds_or_partial_rotary_build(shape, family_export, rtx, tmp_path):
    manifest = family_export(shape)
    build_engines(manifest.folder, tmp_path / "engines", backend="tensorrt-rtx", progress=False, log=quiet,
                  max_batch=2, max_prompt=64, max_context=128)
    _check_folder(tmp_path / "engines", manifest, rtx)


@pytest.mark.slow
def test_every_smollm2_subgraph_builds_with_both_profiles(smollm2_export, rtx, tmp_path):
    build_engines(smollm2_export.folder, tmp_path / "engines", backend="tensorrt-rtx", progress=False, log=quiet,
                  max_batch=1, max_prompt=512, max_context=2048)
    _check_folder(tmp_path / "engines", smollm2_export, rtx)


@pytest.mark.slow
def test_every_distinct_gemma3_270m_subgraph_builds(gemma3_270m_export, rtx, tmp_path):
    """The real Gemma 3 270M's embedding, a local layer, the global layer and the 262144 x 640 head."""
    plan = Plan.skip(gemma3_270m_export, [0, 5])
    build_engines(gemma3_270m_export.folder, tmp_path / "engines", plan=plan, backend="tensorrt-rtx", progress=False,
                  log=quiet, max_batch=1, max_prompt=512, max_context=2048)
    data = _check_folder(tmp_path / "engines", gemma3_270m_export, rtx, layers=[0, 5])
    assert data["engines"]["head"]["size"] > 262144 * 640 * 4  # the fp32 head is in the engine whole


def test_fp16_export_builds_fp16_engines(rtx, tmp_path):
    manifest = export("tiny-llama", tmp_path / "export", random_weights=True, dtype="fp16", validate=False,
                      progress=False, log=quiet)
    plan = Plan.skip(manifest, [1])
    build_engines(manifest.folder, tmp_path / "engines", plan=plan, backend="tensorrt-rtx", progress=False, log=quiet)
    data = json.loads((tmp_path / "engines" / "engines.json").read_text())
    assert data["precision"] == "float16" and list(data["engines"]) == ["embed", "layer_01", "head"]
    assert {e["metadata"]["precision"] for e in data["engines"].values()} == {"float16"}


def test_precision_tensorrt_for_rtx_cannot_build_is_refused_before_any_work(tiny_llama_export, rtx, tmp_path):
    with pytest.raises(ValueError, match="--dtype fp16"):
        build_engines(tiny_llama_export.folder, tmp_path / "engines", backend="tensorrt-rtx", precision="fp16",
                      progress=False, log=quiet)
    assert not list(tmp_path.rglob("*.engine"))


def test_compute_capability_targets(tiny_llama_export, rtx, tmp_path):
    plan = Plan.skip(tiny_llama_export, [0])
    build_engines(tiny_llama_export.folder, tmp_path / "engines", plan=plan, backend="tensorrt-rtx", progress=False,
                  log=quiet, compute_capabilities=("8.6", "8.9"))
    data = json.loads((tmp_path / "engines" / "engines.json").read_text())
    assert {tuple(e["metadata"]["compute_capabilities"]) for e in data["engines"].values()} == {("8.6", "8.9")}
    with pytest.raises(ValueError, match="not one TensorRT for RTX targets"):
        build_engines(tiny_llama_export.folder, tmp_path / "other", plan=plan, backend="tensorrt-rtx",
                      progress=False, log=quiet, compute_capabilities=("9.0",))


def test_unparsable_graph_names_the_file(rtx, tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a protobuf")
    sub = {"inputs": [{"name": "input_ids", "shape": ["batch", "tokens"], "dtype": "int64"}]}
    with pytest.raises(EngineBuildError, match="cannot parse .*broken.onnx"):
        build_engine(rtx, bad, sub, settings_for("tensorrt-rtx", "float32", max_positions=256), "float32")


def test_build_command_exports_at_the_preset_precision_then_builds(rtx, tmp_path, capsys):
    from dlexport.cli import main

    out = tmp_path / "engines"
    assert main(["build", "--model", "tiny-llama", "--random-weights", "--backend", "tensorrt-rtx", "--out", str(out),
                 "--max-context", "64", "--quiet", "--no-validate"]) == 0
    assert "backend: tensorrt-rtx (tensorrt-rtx was asked for)" in capsys.readouterr().out
    export_manifest = json.loads((tmp_path / "engines-export" / "manifest.json").read_text())
    data = json.loads((out / "engines.json").read_text())
    assert export_manifest["dtype"] == data["precision"] == "float16"  # the `rtx` preset's precision
    assert list(data["engines"]) == ["embed", "layer_00", "layer_01", "layer_02", "layer_03", "head"]
    assert data["settings"]["limits"]["max_context"] == 64 and data["settings"]["target"] == "rtx"
