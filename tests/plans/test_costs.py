"""Costs for predicted speedups come from the profile `dlexport profile` writes, or fall back with a reason."""
from __future__ import annotations

import pytest

from dlexport.plans.costs import costs_for
from dlexport.tools.costs import CostTable


def _entry(engine, context, ms):
    return {"engine": engine, "phase": "decode", "context": context, "median_ms": ms, "p90_ms": ms * 1.1}


def test_profile_costs_are_interpolated_at_a_typical_context(tmp_path, tiny_llama_model):
    from dlexport.plans.stack import Stack

    entries = [_entry("layer_00", 128, 1.0), _entry("layer_00", 384, 2.0),
               _entry("layer_01", 128, 3.0), _entry("layer_01", 384, 4.0),
               _entry("head", 128, 8.0), _entry("head", 384, 8.0)]
    CostTable(entries, {"device": "cpu"}).save(tmp_path / "profile.json")
    costs, note = costs_for(tmp_path, Stack(tiny_llama_model.model))
    assert note == "" and costs.unit == "ms" and "2/4 layers" in costs.source
    assert costs.layer == pytest.approx(2.5)  # mean of 1.5 and 3.5 at context 256
    assert costs.head_in_layers == pytest.approx(8.0 / 2.5)


def test_unusable_profile_falls_back_to_the_weight_estimate(tmp_path, tiny_llama_model):
    from dlexport.plans.stack import Stack

    (tmp_path / "profile.json").write_text('{"format": "something-else"}')
    costs, note = costs_for(tmp_path, Stack(tiny_llama_model.model))
    assert costs.unit == "layer" and "not a dlexport profile" in note
