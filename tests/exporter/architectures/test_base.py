"""The shared contract: masks (global and sliding window) as Hugging Face defines them, rotary I/O names, refusals."""
from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

from dlexport.exporter import load_model
from dlexport.exporter.architectures import (UnsupportedModelError, architecture_for, attention_mask, rotary_names,
                                             sequence_mask)


@pytest.mark.parametrize("window", [None, 1, 3, 4])
def test_sequence_mask_equals_hugging_faces_causal_and_sliding_masks(window):
    hf = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    n = 9
    t = torch.tensor
    expected = torch.tensor([[bool(hf(t(0), t(0), t(q), t(k))) for k in range(n)] for q in range(n)])
    got = sequence_mask(torch.ones(1, n, dtype=torch.bool), n, window, torch.float32)[0, 0] == 0
    assert torch.equal(got, expected)


def test_cached_queries_see_only_their_window_of_written_unpadded_slots():
    # keys: a 6-slot buffer with 4 written (slot 0 padding), then 2 new tokens at slots 4 and 5
    key_slots = torch.tensor([0, 1, 2, 3, 4, 5, 4, 5])
    key_ok = torch.tensor([[False, True, True, True, False, False, True, True]])
    allowed = attention_mask(key_slots, key_ok, torch.tensor([4, 5]), 3, torch.float32)[0, 0] == 0
    assert allowed.tolist() == [[False, False, True, True, False, False, True, False],
                                [False, False, False, True, False, False, True, True]]


def test_padding_query_sees_only_itself_even_outside_any_window():
    valid = torch.tensor([[False, False, True, True]])
    allowed = sequence_mask(valid, 4, 2, torch.float32)[0, 0] == 0
    assert allowed[0].tolist() == [True, False, False, False] and allowed[1].tolist() == [False, True, False, False]
    assert allowed[3].tolist() == [False, False, True, True]


def test_rotary_names_per_kind():
    assert rotary_names(None) == ("rotary_cos", "rotary_sin")
    assert rotary_names("local") == ("rotary_cos_local", "rotary_sin_local")


def test_length_dependent_rope_is_refused_with_the_reason():
    model = load_model("tiny-phi3", random_weights=True).model
    model.model.rotary_emb.rope_type = "longrope"
    with pytest.raises(UnsupportedModelError, match="'longrope' changes its frequencies with the sequence length"):
        architecture_for(model)


def test_bidirectional_gemma3_is_refused():
    model = load_model("tiny-gemma3", random_weights=True).model
    model.config.use_bidirectional_attention = True
    with pytest.raises(UnsupportedModelError, match="bidirectional attention"):
        architecture_for(model)
