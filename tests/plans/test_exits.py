import pytest
import torch

from dlexport.plans.calibrate import calibrate_exit
from dlexport.plans.costs import Costs
from dlexport.plans.exits import collect_signals, scores, simulate
from dlexport.plans.stack import Stack
from dlexport.runtime import Runtime, load_plan
from dlexport.runtime.exits import exit_score
from dlexport.runtime.plan import ExitPolicy


def test_simulation_exits_at_the_first_passing_layer():
    s = torch.tensor([[0.9, 0.1, 0.1], [0.9, 0.9, 0.1], [1.0, 1.0, 1.0]])
    agree = torch.tensor([[True, False, False], [True, True, False], [True, True, True]])
    sim = simulate(s, agree, [0, 1], torch.tensor([0.5]), Costs(1.0, 2.0, "layer", "test"), 3)
    # token 0 exits after layer 0 (1 layer + 1 check), token 1 after layer 1 (2 + 2 checks), token 2 never (3 + 3)
    assert sim["cost"].item() == pytest.approx(((1 + 2) + (2 + 4) + (3 + 6)) / 3)
    assert sim["agreement"].item() == pytest.approx(1.0)
    assert sim["exit_rate"].item() == pytest.approx(2 / 3)


def test_classifier_scores_match_the_runtime(tiny_opt_model):
    stack = Stack(tiny_opt_model.model)
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    sig = collect_signals(stack, ids)
    w, b = (3.0, 2.0, -1.0), -0.5
    mine = scores(sig, "classifier", (w, b))
    policy = ExitPolicy((1,), "classifier", 0.5, features=("top1_prob", "gap", "layer_fraction"), weights=w, bias=b)
    with torch.inference_mode():
        h, ex = stack.embed(ids)
        logits = stack.logits(stack.run(h, ex, [0, 1])[:, :-1]).reshape(-1, 512)
    assert torch.allclose(mine[1], exit_score(logits, policy, 2 / 4), atol=1e-5)


def test_exit_calibration_hits_its_target_and_runs(tiny_opt_export, tiny_opt_model, small_text, tmp_path):
    out = tmp_path / "exit.json"
    plan = calibrate_exit(tiny_opt_export.folder, out, target_agreement=0.7, head_cost=0.05, text=small_text,
                          loaded=tiny_opt_model, progress=False, log=lambda *a: None)
    assert plan.exit is not None
    chosen = plan.calibration["calibration_split"][plan.exit.criterion]
    assert chosen["agreement"] >= 0.7 and chosen["speedup"] > 1.0
    runtime = Runtime.load(tiny_opt_export.folder)
    result = runtime.generate([[5, 6, 7, 8]], 12, load_plan(out, runtime.manifest))
    assert len(result.tokens[0]) == 12


def test_exit_that_does_not_pay_is_not_planned(tiny_opt_export, tiny_opt_model, small_text, tmp_path):
    plan = calibrate_exit(tiny_opt_export.folder, tmp_path / "exit.json", target_agreement=0.99, head_cost=50.0,
                          text=small_text, loaded=tiny_opt_model, progress=False, log=lambda *a: None)
    assert plan.exit is None and plan.calibration["pays"] is False


def test_interrupted_exit_calibration_resumes(tiny_opt_export, tiny_opt_model, small_text, tmp_path, monkeypatch):
    import dlexport.plans.exits as exits

    real, state = exits.collect_signals, {"calls": 0, "stop_at": 2}

    def counting(*a, **kw):
        state["calls"] += 1
        if state["calls"] == state["stop_at"]:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(exits, "collect_signals", counting)
    out = tmp_path / "exit.json"
    kw = dict(target_agreement=0.7, head_cost=0.05, text=small_text, loaded=tiny_opt_model, progress=False,
              log=lambda *a: None)
    with pytest.raises(KeyboardInterrupt):
        calibrate_exit(tiny_opt_export.folder, out, **kw)
    state.update(calls=0, stop_at=None)
    resumed = calibrate_exit(tiny_opt_export.folder, out, **kw)
    assert state["calls"] == 1  # the calibration-split signals came from the interrupted run
    assert not (tmp_path / ".exit.json.steps").exists()
    fresh = calibrate_exit(tiny_opt_export.folder, tmp_path / "fresh.json", **kw)
    assert resumed.exit == fresh.exit
