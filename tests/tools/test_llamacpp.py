"""llama.cpp's teacher-forced log-probabilities: its hidden states and the GGUF's head, checked against its own."""
from __future__ import annotations

import pytest
import torch

from .test_bench import _gguf


@pytest.fixture(scope="module")
def scorer():
    pytest.importorskip("xllamacpp", reason="llama.cpp runs need `pip install dlexport[llamacpp]`")
    from dlexport.tools.llamacpp import GGUFScorer

    return GGUFScorer(_gguf(), vocab_size=49152, threads=1, context=64)


def test_logits_match_llama_cpps_own_log_probabilities(scorer):
    from dlexport.tools.llamacpp import CHECK_TOLERANCE

    ids = torch.tensor([[504, 3458, 282, 260, 1345, 314, 1311, 30, 378, 1458],
                        [1000 + i for i in range(10)]])
    logits = scorer.logits(ids)
    assert logits.shape == (2, 10, 49152) and scorer.info["head_activations"] == "Q8_0"  # SmolLM2's tied Q8_0 head
    assert 0 <= scorer.info["check_max_abs_logprob_diff"] <= CHECK_TOLERANCE
    for row in ids.tolist():  # every prefix is its own prompt: the last position agrees with llama.cpp's greedy token
        out = scorer.server.handle_completions({"prompt": row[:6], "max_tokens": 1, "temperature": 0,
                                                "cache_prompt": False, "n_probs": 1})
        (token,) = out["choices"][0]["logprobs"]["content"]
        assert scorer.logits(torch.tensor([row[:6]]))[0, -1].argmax() == token["id"]
        assert scorer.check(row[:6]) <= CHECK_TOLERANCE
    # causal: a position's logits do not depend on later tokens
    assert torch.allclose(scorer.logits(ids[:, :6])[:, :5], logits[:, :5], atol=1e-3)


def test_refusals(scorer, tmp_path):
    from dlexport.tools.llamacpp import GGUFScorer

    with pytest.raises(ValueError, match="49152 tokens, the export 512"):
        GGUFScorer(_gguf(), vocab_size=512, context=64)
    with pytest.raises(FileNotFoundError, match="is not a file"):
        GGUFScorer(tmp_path / "none.gguf", vocab_size=512)
    with pytest.raises(ValueError, match="do not fit llama.cpp's context of 64"):
        scorer.logits(torch.zeros(1, 65, dtype=torch.long))
