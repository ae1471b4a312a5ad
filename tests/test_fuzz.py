"""Property-based fuzzing of every door: plans (JSON and Python objects), manifests and generate arguments.

The contract: either a dlexport error (DlexportError) or a correct result, never another exception and never a
silent change of meaning. Budgets are bounded (max_examples below) so the file runs in well under a minute.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dlexport.errors import DlexportError
from dlexport.validation import hf_greedy
from dlexport.manifest import Manifest
from dlexport.runtime import Plan, Runtime, Sampling, load_plan
from dlexport.runtime.plan import CRITERIA, FEATURES, AdapterRef, Draft, ExitPolicy

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
N = 6  # layers of the model the plans below are fuzzed against

anything = st.recursive(st.none() | st.booleans() | st.integers(-10, 10) | st.floats() | st.text(max_size=5),
                        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                                     max_size=3), max_leaves=8)


layer = st.integers(-2, N + 1) | st.floats(-1, N) | st.booleans() | st.just("1")
good_layers = st.lists(st.integers(0, N - 1), min_size=1, max_size=N, unique=True).map(sorted)
layers = st.one_of(good_layers, good_layers, st.lists(layer, max_size=8))
ladders = st.permutations(range(N)).map(lambda p: [sorted(p[:i + 1]) for i in range(N)])
FIELDS = ("format", "version", "model", "layers", "exit", "ladder", "draft", "extra")


@st.composite
def plan_json(draw) -> dict:
    """A valid plan with, two times in three, one field replaced by a near miss or by any JSON at all."""
    broken = draw(st.sampled_from((None,) * len(FIELDS) + FIELDS + FIELDS))
    plan_layers = draw(good_layers) if draw(st.booleans()) else list(range(N))
    data = {"format": "dlexport-plan", "version": 1, "model": {"fingerprint": "fp", "num_layers": N},
            "layers": plan_layers}
    if draw(st.booleans()):
        data["exit"] = {"layers": draw(st.lists(st.sampled_from(plan_layers), min_size=1, unique=True).map(sorted)),
                        "criterion": draw(st.sampled_from(CRITERIA)), "threshold": draw(st.floats(0, 1)),
                        "min_depth": draw(st.integers(0, N))}
        if data["exit"]["criterion"] == "classifier":
            features = draw(st.lists(st.sampled_from(FEATURES), min_size=1, max_size=3))
            data["exit"]["classifier"] = {"features": features, "bias": draw(st.floats(-5, 5)),
                                          "weights": draw(st.lists(st.floats(-9, 9), min_size=len(features),
                                                                   max_size=len(features)))}
    if draw(st.booleans()):
        data["ladder"] = draw(ladders)
    if draw(st.booleans()):
        data["draft"] = {"layers": draw(good_layers), "k": draw(st.integers(1, 32)), "adaptive": draw(st.booleans())}
    near_miss = {
        "format": st.just("dlexport-plans"), "version": st.sampled_from(["1", 2, 1.0, None]),
        "model": st.fixed_dictionaries({"fingerprint": st.just("fp"),
                                        "num_layers": st.sampled_from([-1, 0, 2000, 10**12, "6", 6.5])}),
        "layers": st.lists(layer, max_size=8), "exit": st.fixed_dictionaries(
            {"layers": layers, "criterion": st.sampled_from(CRITERIA + ("entropy",)),
             "threshold": st.floats(allow_nan=False) | st.integers(-2, 2)},
            optional={"min_depth": st.integers(-1, N + 1), "classifier": st.fixed_dictionaries(
                {"features": st.lists(st.sampled_from(FEATURES), max_size=3),
                 "weights": st.lists(st.floats(-1e300, 1e300), max_size=3), "bias": st.floats(-5, 5)})}),
        "ladder": st.lists(layers, max_size=4), "draft": st.fixed_dictionaries(
            {"layers": layers}, optional={"k": st.integers(-3, 40), "adaptive": anything}),
        "extra": anything}
    if broken is not None:
        data[broken if broken != "extra" else draw(st.text(max_size=6))] = draw(near_miss[broken] | anything)
    return data


def _refused(e: DlexportError) -> None:
    event(f"refused: {type(e).__name__}")  # --hypothesis-show-statistics shows how many went each way


def _assert_sound(plan: Plan) -> None:
    """What a plan that was accepted must satisfy (so acceptance never means something else)."""
    event("accepted")
    lists = [plan.layers, *plan.ladder] + ([plan.exit.layers] if plan.exit else []) + \
        ([plan.draft.layers] if plan.draft else [])
    for ls in lists:
        assert all(type(i) is int and 0 <= i < plan.num_layers for i in ls)
        assert list(ls) == sorted(set(ls))
    assert plan.layers
    if plan.exit:
        assert set(plan.exit.layers) <= set(plan.layers) and math.isfinite(plan.exit.threshold)
        assert all(math.isfinite(w) for w in (*plan.exit.weights, plan.exit.bias))
    if plan.draft:
        assert 1 <= plan.draft.k <= 32
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan


@FUZZ
@given(plan_json())
def test_plan_json(data):
    try:
        plan = Plan.from_json(data)
    except DlexportError as e:
        return _refused(e)
    _assert_sound(plan)


@FUZZ
@given(st.binary(max_size=200) | plan_json().map(lambda d: json.dumps(d).encode()))
def test_plan_files(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "plan.json"
        path.write_bytes(content)
        try:
            plan = load_plan(path)
        except DlexportError as e:
            assert str(path) in str(e) and len(str(e)) < 1024
            return _refused(e)
    _assert_sound(plan)


@FUZZ
@given(st.sampled_from([N, N, N, -1, 0, 2.0]), layers,
       st.none() | st.none() | st.builds(
           ExitPolicy, st.lists(st.integers(0, N - 1), max_size=2).map(tuple) | st.lists(layer, max_size=3).map(tuple),
           st.sampled_from(CRITERIA + ("x",)), st.floats(0, 1) | st.floats() | st.integers(-1, 2), st.integers(-1, 3),
           st.lists(st.sampled_from(FEATURES), max_size=2).map(tuple), st.lists(st.floats(), max_size=2).map(tuple),
           st.floats(-3, 3) | st.floats(),
           st.just(()) | st.lists(st.builds(AdapterRef, layer, st.text(max_size=3), st.text(max_size=3)),
                                  max_size=1).map(tuple)),
       st.none() | st.builds(lambda ls, k: (tuple(ls), k), layers, st.integers(1, 32) | st.integers(-3, 40)))
def test_python_plans(num_layers, plan_layers, exit_policy, draft):
    try:
        plan = Plan("fp", num_layers, tuple(plan_layers), exit=exit_policy,
                    draft=Draft(*draft) if draft is not None else None)
        plan.check()
    except DlexportError as e:
        return _refused(e)
    if plan.exit and plan.exit.adapters:
        return  # adapter files are checked against the folder at load time (test_files, test_adapters)
    _assert_sound(plan)


PATHS = [("architecture", "num_layers"), ("architecture", "hidden_size"), ("architecture", "vocab_size"),
         ("architecture", "num_kv_heads"), ("architecture",), ("subgraphs",), ("subgraphs", "layer_01"),
         ("subgraphs", "head", "files"), ("subgraphs", "embed", "outputs"), ("dtype",), ("fingerprint",),
         ("format_version",), ("rotary",), ("special_tokens",), ("special_tokens", "eos_token_ids"), (),
         ("source",), ("created_by",), ("validation",)] + [("opset",)] * 6  # free-text fields: may be anything


@FUZZ
@given(st.sampled_from(PATHS), st.booleans(), anything | st.integers(-5, 1 << 40))
def test_manifests(tiny_opt_export, path, delete, value):
    data = json.loads((tiny_opt_export.folder / "manifest.json").read_text())
    target = data
    for key in path[:-1]:
        target = target[key]
    if not path:
        data = value
    elif delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "manifest.json").write_text(json.dumps(data))
        try:
            m = Manifest.load(tmp)
        except DlexportError as e:
            assert "manifest.json" in str(e)
            return _refused(e)
    event("accepted")
    a = m.arch  # everything downstream may rely on it
    assert sorted(k for k in m.data["subgraphs"] if k.startswith("layer_")) == \
        [m.layer_key(i) for i in range(a["num_layers"])]
    assert m.subgraph("head")["outputs"][0]["shape"][-1] == a["vocab_size"]


@pytest.fixture(scope="module")
def rt(tiny_opt_export):
    return Runtime.load(tiny_opt_export.folder)


token = st.integers(-3, 515) | st.floats(0, 10) | st.booleans() | st.text(max_size=2)
row = st.lists(st.integers(0, 511), min_size=1, max_size=6)
prompts = st.one_of(row, row, st.lists(row, min_size=1, max_size=3), st.lists(token, max_size=4),
                    st.lists(st.lists(token, max_size=4), max_size=3), anything, st.binary(max_size=4))


@FUZZ
@given(prompts, st.one_of(st.integers(1, 6), st.integers(1, 6), st.integers(-2, 0), st.floats(-1, 4), st.none()),
       st.none() | st.fixed_dictionaries({}, optional={
           "temperature": st.floats(0, 2) | st.floats() | st.integers(-1, 2),
           "top_k": st.integers(0, 600) | st.integers(-2, 0) | st.floats(0, 3),
           "top_p": st.floats(0.01, 1) | st.floats() | st.integers(-1, 2),
           "seed": st.integers(0, 3) | st.integers(-2, -1) | st.floats(0, 1)}))
def test_generate_arguments(rt, tiny_opt_model, prompt, max_new_tokens, sampling_kw):
    try:
        sampling = Sampling(**sampling_kw) if sampling_kw is not None else Sampling()
        out = rt.generate(prompt, max_new_tokens, sampling=sampling, stop_tokens=[])
    except DlexportError as e:
        return _refused(e)
    event("accepted")
    rows = prompt if prompt and isinstance(prompt[0], list) else [prompt]
    assert len(out.tokens) == len(rows)
    assert all(len(r) == max_new_tokens and all(0 <= t < 512 for t in r) for r in out.tokens)
    if sampling.greedy and len(rows) == 1:
        assert out.tokens[0] == hf_greedy(tiny_opt_model.model, rows[0], max_new_tokens)  # correct, not just valid
