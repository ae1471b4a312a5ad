"""plan calibrate-draft: the subset draft head matches the full head on its tokens, and the plan's draft is exact."""
from __future__ import annotations

import json

import pytest
import torch

from dlexport.plans.draft import calibrate_draft, choose, vocabulary
from dlexport.runtime import Plan, PlanError, Runtime, load_plan


def test_vocabulary_covers_the_greedy_choices():
    top1 = torch.tensor([5] * 50 + [3] * 30 + [9] * 15 + [1] * 5)
    assert vocabulary(top1, 0.8).tolist() == [3, 5]
    assert vocabulary(top1, 0.95).tolist() == [3, 5, 9]
    assert vocabulary(top1, 1.0).tolist() == [1, 3, 5, 9]


def test_a_draft_that_does_not_pay_is_a_prefix():
    assert choose({(0,): 0.9, (0, 1): 0.8, (0, 2): 0.95}) == (0,)  # switched off, only a prefix probes for free
    assert choose({(0,): 0.9, (0, 2): 1.2}) == (0, 2)  # a skip set that pays wins
    assert choose({(0, 2): 0.7, (1, 2): 0.8}) == (1, 2)  # no prefix among them: the best


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_opt"])
def test_calibrated_draft_is_exact_and_its_head_checked(request, fixture, small_text, tmp_path):
    export = request.getfixturevalue(f"{fixture}_export")
    out = tmp_path / "plans" / "draft.json"
    calibrate_draft(export.folder, out, coverage=0.9, budget_s=5.0, text=small_text, search_seqs=1,
                    loaded=request.getfixturevalue(f"{fixture}_model"), progress=False, log=lambda *a: None)
    rt = Runtime.load(export.folder)
    plan = load_plan(out, rt.manifest)
    d, cal = plan.draft, plan.calibration
    assert d.head is not None and 0 < d.head.tokens < rt.manifest.arch["vocab_size"]
    assert cal["vocabulary"]["tokens"] == d.head.tokens and cal["vocabulary"]["max_abs_diff_vs_full_head"] < 1e-3
    assert cal["chosen"]["layers"] == list(d.layers) and set(cal["prefixes"]) == {"1", "2", "3"}

    prompts = [[5, 6, 7, 8, 9, 10], [11, 3, 4]]
    for batch in (1, 2):
        plain = rt.generate(prompts[:batch], 20, Plan.full(rt.manifest), stop_tokens=[])
        for adaptive in (False, True):
            draft = type(d)(d.layers, 3, adaptive, d.head, d.folder)
            spec = rt.generate(prompts[:batch], 20, plan, stop_tokens=[], strategy="speculative", draft=draft)
            assert spec.tokens == plain.tokens, (batch, adaptive)
            assert spec.extra["drafted"] + spec.extra["probes"] > 0
    fixed = rt.generate(prompts, 8, plan, stop_tokens=[], strategy="speculative",
                        draft=type(d)(d.layers, 3, False, d.head, d.folder), profile=True)
    assert any(name.startswith("draft-head:") for name in fixed.timings_ms)  # the cheap head drafted

    path = out.parent / d.head.file
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(PlanError, match="sha256"):
        load_plan(out)
    data = json.loads(out.read_text())
    data["draft"]["head"]["file"] = "../outside.onnx"
    out.write_text(json.dumps(data))
    with pytest.raises(PlanError, match="outside the plan's folder"):
        load_plan(out)
