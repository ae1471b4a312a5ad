"""The second real model, Gemma 3 270M (its first layers, see the fixture in tests/conftest.py): every subgraph against
PyTorch and the stitched greedy tokens against Hugging Face ``generate``, as export validates them."""
from __future__ import annotations

import pytest

from tests.conftest import GEMMA3_LAYERS

pytestmark = pytest.mark.slow


def test_real_config_numbers(gemma3_270m_export):
    arch = gemma3_270m_export.arch
    assert (arch["model_type"], arch["hidden_size"], arch["num_heads"], arch["num_kv_heads"], arch["head_dim"],
            arch["vocab_size"]) == ("gemma3_text", 640, 4, 1, 256, 262144)
    assert arch["layer_windows"] == [512] * 5 + [None]
    inputs = {s["name"] for s in gemma3_270m_export.subgraph("layer_00")["inputs"]}
    assert {"rotary_cos_local", "rotary_sin_local"} <= inputs  # local layers take the 10k-base rotary pair
    assert "rotary_cos" in {s["name"] for s in gemma3_270m_export.subgraph("layer_05")["inputs"]}


def test_every_subgraph_within_tolerance_and_greedy_equals_hf_generate(gemma3_270m_export):
    v = gemma3_270m_export.data["validation"]
    assert v["ok"], [c for c in v["subgraphs"] if not c["ok"]]
    assert {c["subgraph"] for c in v["subgraphs"]} == {"embed", "head",
                                                      *(f"layer_{i:02d}" for i in range(GEMMA3_LAYERS))}
    assert v["end_to_end"]["result"] == "match" and len(v["end_to_end"]["runtime"]) == 32
    assert len(set(v["end_to_end"]["runtime"])) > 5  # varied tokens: equality is a real check
