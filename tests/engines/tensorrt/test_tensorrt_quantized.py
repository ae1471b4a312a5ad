"""Every subgraph of int4/int8 Q/DQ exports of tiny OPT and tiny Llama parsed and built by TensorRT for RTX."""
import json

import pytest

from dlexport.engines.build import build_engines


def quiet(*args):
    pass


@pytest.mark.parametrize("fixture", ["tiny_opt_export", "tiny_llama_export"])
@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_every_quantised_subgraph_builds(fixture, weights, quantized, rtx, tmp_path):
    m = quantized(fixture, weights, "qdq")
    build_engines(m.folder, tmp_path / "engines", backend="tensorrt-rtx", progress=False, log=quiet, max_batch=1,
                  max_prompt=32, max_context=64)
    data = json.loads((tmp_path / "engines" / "engines.json").read_text())
    assert list(data["engines"]) == ["embed"] + [m.layer_key(i) for i in range(m.num_layers)] + ["head"]
    assert data["manifest"]["quantization"]["settings"]["format"] == "qdq"
    for name, entry in data["engines"].items():
        assert entry["source_sha256"] == m.subgraph(name)["files"][0]["sha256"]
        assert entry["metadata"]["optimization_profiles"] == 2


def test_matmulnbits_export_is_refused_naming_the_qdq_format(quantized, rtx, tmp_path):
    m = quantized("tiny_llama_export", "int4", "ort")
    with pytest.raises(ValueError, match="--format qdq"):
        build_engines(m.folder, tmp_path / "engines", backend="tensorrt-rtx", progress=False, log=quiet)
    assert not (tmp_path / "engines").exists() or not list((tmp_path / "engines").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_every_quantised_smollm2_subgraph_builds(weights, smollm2_export, rtx, tmp_path):
    from dlexport.exporter.quantize import WeightQuant, quantize

    m = quantize(smollm2_export.folder, tmp_path / "q", WeightQuant(weights, format="qdq"), progress=False, log=quiet)
    build_engines(m.folder, tmp_path / "engines", backend="tensorrt-rtx", progress=False, log=quiet, max_batch=1,
                  max_prompt=512, max_context=2048)
    data = json.loads((tmp_path / "engines" / "engines.json").read_text())
    assert len(data["engines"]) == 32
    head = (tmp_path / "engines" / data["engines"]["head"]["file"]).stat().st_size
    assert head < smollm2_export.path("head").stat().st_size / 3  # int8 weights stay int8 in the engine (32 of 113 MB)
