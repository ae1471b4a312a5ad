"""plan.json: valid plans round-trip; every malformed plan is refused with a message naming the field and the fix."""
from __future__ import annotations

import json

import pytest

from dlexport.runtime.plan import Plan, PlanError, load_plan


class _Manifest:
    fingerprint, num_layers, data = "abc123", 6, {"source": "test"}


def _plan(**overrides) -> dict:
    data = {"format": "dlexport-plan", "version": 1, "model": {"fingerprint": "abc123", "num_layers": 6},
            "layers": [0, 1, 3, 5]}
    data.update(overrides)
    return data


def _load(tmp_path, data, manifest=_Manifest()):
    path = tmp_path / "plan.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return load_plan(path, manifest)


def test_round_trip(tmp_path):
    plan = Plan.from_json(_plan(exit={"layers": [3], "criterion": "gap", "threshold": 0.4, "min_depth": 2},
                                ladder=[[0, 5], [0, 1, 5]]))
    plan.save(tmp_path / "p.json")
    assert load_plan(tmp_path / "p.json", _Manifest()) == plan
    assert plan.layers == (0, 1, 3, 5) and plan.exit.threshold == 0.4


def test_absent_layers_means_every_layer():
    data = _plan()
    del data["layers"]
    assert Plan.from_json(data).layers == tuple(range(6))


@pytest.mark.parametrize("layers, message", [
    ([0, 6], r"layer\(s\) \[6\] out of range: this model has layers 0..5"),
    ([-1, 2], r"'layers.0': -1 is less than the minimum of 0"),
    ([0, 2, 2], r"repeats layer\(s\) \[2\]"),
    ([3, 1], "not in ascending order"),
    ([], "empty"),
])
def test_bad_layer_lists(tmp_path, layers, message):
    with pytest.raises(PlanError, match=message):
        _load(tmp_path, _plan(layers=layers))


def test_exit_layer_not_executed(tmp_path):
    with pytest.raises(PlanError, match=r"'exit.layers' \[2\] are not executed"):
        _load(tmp_path, _plan(exit={"layers": [2], "criterion": "top1_prob", "threshold": 0.9}))


def test_unknown_criterion_and_field(tmp_path):
    with pytest.raises(PlanError, match=r"exit.criterion"):
        _load(tmp_path, _plan(exit={"layers": [3], "criterion": "entropy", "threshold": 0.9}))
    with pytest.raises(PlanError, match="'teleport' was unexpected.*known fields there: calibration, draft"):
        _load(tmp_path, _plan(teleport={"layers": [1]}))


def test_classifier_needs_one_weight_per_feature(tmp_path):
    exit_ = {"layers": [3], "criterion": "classifier", "threshold": 0.5,
             "classifier": {"features": ["top1_prob", "gap"], "weights": [1.0], "bias": 0.0}}
    with pytest.raises(PlanError, match="2 features but 1 weights"):
        _load(tmp_path, _plan(exit=exit_))


def test_ladder_must_be_nested(tmp_path):
    with pytest.raises(PlanError, match=r"'ladder\[1\]' does not contain 'ladder\[0\]'"):
        _load(tmp_path, _plan(ladder=[[0, 2], [0, 1, 5]]))


def test_plan_for_another_model_is_refused(tmp_path):
    other = _plan(model={"fingerprint": "fff999", "num_layers": 6, "source": "other-model"})
    with pytest.raises(PlanError, match="made for model other-model.*fingerprint fff999.*calibrate"):
        _load(tmp_path, other)


def test_version_and_malformed_json(tmp_path):
    with pytest.raises(PlanError, match="version 2 is not supported"):
        _load(tmp_path, _plan(version=2))
    with pytest.raises(ValueError, match="not valid JSON"):
        _load(tmp_path, '{"format": "dlexport-plan", ')
    with pytest.raises(PlanError, match="'model' is a required property"):
        _load(tmp_path, {"format": "dlexport-plan", "version": 1})
