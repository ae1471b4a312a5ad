"""The speculation section of analyze: held-out acceptance, a prediction that is the cost model's, exact outputs."""
from __future__ import annotations

import json

import pytest
import torch

from dlexport.plans.analyze import analyze
from dlexport.plans.calibrate import open_export
from dlexport.plans.draft import DraftSearch
from dlexport.plans.speculation import repeated, speculation, verdict
from dlexport.plans.text import load_splits
from dlexport.runtime.speculative import DRAFT_OVERHEAD, VERIFY_EXTRA, expected_speedup, subgraph_costs


@pytest.fixture
def opened(tiny_llama_export, tiny_llama_model, small_text):
    o = open_export(tiny_llama_export.folder, tiny_llama_model)
    splits = load_splits(o.tokenizer, small_text.sizes(), small_text.seq_len, None, 0, o.tokenizer_name)
    return o, splits["calibration"], splits["evaluation"]


def test_repeated_quotes_the_passage():
    rows = torch.arange(20).view(2, 10)
    r = repeated(rows, 4)
    assert r.tolist()[0] == [0, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4]
    assert r.shape == (2, 13)


def test_full_depth_is_accepted_always_and_prefix_scores_agree(opened):
    o, fit, held = opened
    n = o.stack.num_layers
    every = DraftSearch(o.stack, o.manifest, fit, 1.0, 4)  # a draft head with every token the model chose on fit
    assert every.acceptance(range(n), fit)[0] == 1.0  # the full depth agrees with itself
    search = DraftSearch(o.stack, o.manifest, fit, 0.9, 4)
    alpha, _, ref = search.acceptance(range(n), held)  # ... except where its token is outside the draft head's
    assert alpha == pytest.approx(float(torch.isin(ref, search.vocab).double().mean())) and alpha < 1.0
    again = search.rescore(fit, slice(None))
    for depth in range(1, n):  # one pass over all prefixes == the search's own prefix scores == a direct run
        layers = tuple(range(depth))
        assert again[layers] == pytest.approx(search.candidates[layers]["acceptance"])
        assert search.acceptance(layers, fit)[0] == pytest.approx(again[layers])
    assert len({round(v, 6) for v in again.values()}) > 1  # depths differ: the scores are not a constant


def test_section_predicts_with_the_runtime_cost_model_and_measures_exactly(opened, tiny_llama_export):
    o, fit, held = opened
    sec = speculation(o, tiny_llama_export.folder, fit, held, budget_s=2.0, prompts=2, prompt_tokens=8,
                      new_tokens=8, progress=False, log=lambda *a: None)
    layer_cost, head_cost = subgraph_costs(o.manifest)
    plan_cost = sum(layer_cost.values()) + head_cost
    assert sec["cost_model"]["plan_cost"] == pytest.approx(plan_cost, abs=1e-3)
    draft_head = head_cost * sec["vocabulary"]["tokens"] / o.manifest.arch["vocab_size"]
    assert [r["text"] for r in sec["kinds"]] == ["prose", "repetitive"]
    for r in sec["kinds"]:
        assert 0.0 <= r["acceptance"] <= 1.0 and 0.0 <= r["acceptance_fit"] <= 1.0
        assert 1 <= r["k"] <= 4 and 0 < len(r["layers"]) < o.stack.num_layers
        cost = sum(layer_cost[i] for i in r["layers"]) + draft_head
        want = expected_speedup(r["k"], r["acceptance"], cost, plan_cost, DRAFT_OVERHEAD, VERIFY_EXTRA)
        assert r["predicted_speedup"] == pytest.approx(want, abs=1e-3)
        m = r["measured"]
        assert m["identical"] and m["fixed"]["drafted"] > 0 and m["fixed"]["speedup"] > 0
        f = m["fixed"]
        assert f["predicted_at_run_acceptance"] == pytest.approx(expected_speedup(
            r["k"], f["acceptance"], cost, plan_cost, DRAFT_OVERHEAD, VERIFY_EXTRA), abs=1e-3)
        assert m["adaptive"]["drafted"] + m["adaptive"]["probes"] > 0
        assert m["lookup"]["speedup"] > 0 and "rounds" in m["lookup"]
    assert sec["measured"]["identical"] and "identical to plain greedy" in sec["verdict"]


def test_verdict_follows_the_held_out_prediction():
    row = {"text": "prose", "kind": "prefix", "layers": [0], "k": 2, "acceptance": 0.5, "predicted_speedup": 1.3}
    sec = {"kinds": [row], "measured": None}
    assert "it pays" in verdict(sec, 4)
    row["predicted_speedup"] = 0.99
    assert "breaks even" in verdict(sec, 4)
    row["predicted_speedup"] = 0.8
    row["measured"] = {"fixed": {"speedup": 1.1, "acceptance": 0.6, "predicted_at_run_acceptance": 1.08},
                       "adaptive": {"speedup": 1.0}, "lookup": {"speedup": 1.2}, "identical": True}
    sec["measured"] = {"identical": False}  # a lucky short run does not overrule thousands of held-out positions
    assert "does not pay" in verdict(sec, 4) and "1.08x predicted at the run's 60% acceptance" in verdict(sec, 4)
    assert "1.20x adaptive with prompt lookup" in verdict(sec, 4)
    assert "DIFFERED" in verdict(sec, 4)


def test_only_speculation_without_measuring(tiny_opt_export, tiny_opt_model, small_text, tmp_path):
    report = analyze(tiny_opt_export.folder, tmp_path, text=small_text, adapter_seqs=8, draft_budget_s=1.0,
                     measure=False, only="speculation", loaded=tiny_opt_model, progress=False, log=lambda *a: None)
    data = json.loads((tmp_path / "report.json").read_text())
    assert "skip" not in data and data["speculation"]["measured"] is None
    assert all(r.get("measured") is None for r in data["speculation"]["kinds"])
    md = (tmp_path / "report.md").read_text()
    assert "## Self-speculation" in md and "not measured" in md and report["recommendation"] == [
        data["speculation"]["verdict"]]
    assert not (tmp_path / "analyze.png").exists()
    with pytest.raises(Exception, match="only="):
        analyze(tiny_opt_export.folder, tmp_path, text=small_text, only="oracle", loaded=tiny_opt_model)
