"""Per-sequence depth: ladders, and the fixed, prompt and oracle controllers."""
from __future__ import annotations

import pytest
import torch

from dlexport.runtime import Plan, PlanError, Runtime, Sampling
from dlexport.runtime.depth import evenly_nested_ladder, ladder_for


def _prompts(vocab: int, lengths=(12, 7), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module", params=["tiny_llama_export", "tiny_opt_export"])
def rt(request):
    return Runtime.load(request.getfixturevalue(request.param).folder)


def test_evenly_nested_ladder_is_nested_and_keeps_the_ends():
    rungs = evenly_nested_ladder(range(30))
    assert [len(r) for r in rungs] == [19, 23, 26, 28]
    for small, big in zip(rungs, rungs[1:]):
        assert set(small) < set(big)
    assert all(r[0] == 0 and r[-1] == 29 for r in rungs)
    gaps = [b - a for a, b in zip(rungs[0], rungs[0][1:])]
    assert max(gaps) <= 2  # dropped layers are spread, not bunched


def test_ladder_comes_from_the_plan_and_ends_with_its_layers(rt):
    plan = Plan.full(rt.manifest)
    assert ladder_for(plan) == (((0, 1, 3), (0, 1, 2, 3)), "evenly nested")
    laddered = Plan.skip(rt.manifest, (0, 1, 2, 3), ladder=((0, 3), (0, 2, 3)))
    assert ladder_for(laddered) == (((0, 3), (0, 2, 3), (0, 1, 2, 3)), "plan")
    outside = Plan.skip(rt.manifest, (0, 1, 3), ladder=((0, 2),))
    with pytest.raises(PlanError, match="subset"):
        rt.generate([1, 2], 2, outside, strategy="per-sequence", controller="fixed", rung=0)


def test_fixed_rungs_equal_plain_decoding_with_that_rung(rt):
    prompts = _prompts(rt.manifest.arch["vocab_size"])
    plan = Plan.skip(rt.manifest, (0, 1, 2, 3), ladder=((0, 3), (0, 2, 3)))
    for rung, layers in enumerate([(0, 3), (0, 2, 3), (0, 1, 2, 3)]):
        plain = rt.generate(prompts, 16, Plan.skip(rt.manifest, layers), stop_tokens=[])
        got = rt.generate(prompts, 16, plan, stop_tokens=[], strategy="per-sequence", controller="fixed", rung=rung)
        assert got.tokens == plain.tokens and got.extra["rung"] == rung and got.mean_layers == len(layers)
    with pytest.raises(ValueError, match="rungs 0..2"):
        rt.generate(prompts, 2, plan, strategy="per-sequence", controller="fixed", rung=3)


def test_oracle_picks_the_smallest_rung_that_reproduces_the_full_output(rt):
    plan = Plan.skip(rt.manifest, (0, 1, 2, 3), ladder=((0, 1, 2),))
    rungs = ladder_for(plan)[0]
    vocab = rt.manifest.arch["vocab_size"]
    seen = set()
    for seed in range(12):
        prompt = _prompts(vocab, lengths=(5,), seed=seed)[0]
        full = rt.generate(prompt, 1, plan, stop_tokens=[])
        got = rt.generate(prompt, 1, plan, stop_tokens=[], strategy="per-sequence", controller="oracle")
        assert got.tokens == full.tokens
        r = got.extra["rung"]
        seen.add(r)
        for smaller in rungs[:r]:
            assert rt.generate(prompt, 1, Plan.skip(rt.manifest, smaller), stop_tokens=[]).tokens != full.tokens
    assert len(seen) > 1  # the test is only meaningful if the choice varies
    with pytest.raises(ValueError, match="greedy"):
        rt.generate(prompt, 1, plan, strategy="per-sequence", controller="oracle", sampling=Sampling(1.0, seed=0))


def test_prompt_controller_follows_its_threshold(rt):
    prompts = _prompts(rt.manifest.arch["vocab_size"])[:1]
    plan = Plan.full(rt.manifest)
    low = rt.generate(prompts, 12, plan, stop_tokens=[], strategy="per-sequence", threshold=0.0)
    assert low.extra["rung"] == 0 and len(low.extra["prompt_agreement"]) == 1
    assert low.tokens == rt.generate(prompts, 12, Plan.skip(rt.manifest, (0, 1, 3)), stop_tokens=[]).tokens
    high = rt.generate(prompts, 12, plan, stop_tokens=[], strategy="per-sequence", threshold=1.01)
    assert high.extra["rung"] == 1 and high.tokens == rt.generate(prompts, 12, plan, stop_tokens=[]).tokens
    assert 0.0 <= high.extra["prompt_agreement"][0] <= 1.0
    with pytest.raises(ValueError, match="unknown depth controller"):
        rt.generate(prompts, 2, plan, strategy="per-sequence", controller="psychic")
