"""Every argument of generate/stream, Sampling, Draft and Plan is checked: a clear InputError, never a silent change
of meaning (a wrapped token id, a negative temperature) and never a raw engine error."""
from __future__ import annotations

import math

import pytest

from dlexport.errors import DlexportError, InputError
from dlexport.runtime import Plan, PlanError, Runtime, Sampling
from dlexport.runtime.plan import Draft, ExitPolicy


@pytest.fixture(scope="module")
def rt(tiny_opt_export):
    return Runtime.load(tiny_opt_export.folder)


@pytest.mark.parametrize("prompts, message", [
    (5, "prompts must be a str"),
    (b"\x01\x02", "prompts must be a str"),
    (None, "prompts must be a str"),
    ([], "no prompt given"),
    ([[]], "a prompt is empty"),
    ([-1, 5], r"prompt 0\[0\] is token id -1, outside this model's vocabulary 0..511"),
    ([5, 512], r"token id 512, outside"),
    ([5, 2.0], "token ids are integers"),
    ([5, True], "token ids are integers"),
    ([[5, 6], "text"], "token ids"),
    (["a", [5]], "mix text and token ids"),
    ("hello", "no tokenizer"),  # tiny-opt random weights has no tokenizer
])
def test_bad_prompts(rt, prompts, message):
    with pytest.raises(InputError, match=message):
        rt.generate(prompts, 2)


def test_text_that_is_not_utf8_is_refused_before_tokenizing(rt, monkeypatch):
    monkeypatch.setattr(rt, "tokenizer", lambda *a, **kw: pytest.fail("tokenized"))
    with pytest.raises(InputError, match="prompt 1 is not valid UTF-8"):
        rt.generate(["fine", "caf\udcff"], 2)  # how Python passes undecodable command-line bytes


@pytest.mark.parametrize("n", [0, -3, 1.5, "4", True, 10_000])
def test_bad_max_new_tokens(rt, n):
    with pytest.raises(InputError, match="max_new_tokens"):
        rt.generate([5, 6], n)


def test_stream_refuses_before_the_first_event(rt):
    with pytest.raises(InputError, match="max_new_tokens"):
        rt.stream([5, 6], 0)  # not only when iterated


@pytest.mark.parametrize("kw, message", [
    ({"temperature": -1.0}, "temperature is -1.0"),
    ({"temperature": math.nan}, "temperature is nan; it must be a finite number"),
    ({"temperature": math.inf}, "finite"),
    ({"temperature": 1.0, "top_p": 2.0}, r"top_p is 2.0; it must be in \(0.0, 1.0\]"),
    ({"temperature": 1.0, "top_p": 0.0}, "top_p"),
    ({"temperature": 1.0, "top_p": math.nan}, "top_p"),
    ({"temperature": 1.0, "top_k": -5}, "top_k is -5"),
    ({"temperature": 1.0, "top_k": 2.5}, "top_k must be an integer"),
    ({"temperature": 1.0, "seed": -1}, "seed is -1"),
    ({"temperature": "hot"}, "temperature must be a number"),
])
def test_bad_sampling_settings(kw, message):
    with pytest.raises(InputError, match=message):
        Sampling(**kw)


def test_valid_token_ids_of_any_integer_type_run(rt):
    import numpy as np
    import torch

    ref = rt.generate([5, 17, 301], 3, stop_tokens=[]).tokens
    assert rt.generate(np.array([5, 17, 301]), 3, stop_tokens=[]).tokens == ref
    assert rt.generate(torch.tensor([[5, 17, 301]]), 3, stop_tokens=[]).tokens == ref
    with pytest.raises(InputError, match="stop_tokens"):
        rt.generate([5, 17, 301], 3, stop_tokens=[-1])


@pytest.mark.parametrize("k", [-2, 0, 33, 2.0])
def test_draft_length_must_be_a_positive_integer(k):
    with pytest.raises(PlanError, match="draft k"):
        Draft((0, 1), k)


def test_python_plans_are_checked_by_generate(rt, tiny_opt_export):
    fp = tiny_opt_export.fingerprint
    bad = [
        (Plan(fp, 4, ()), "'layers' is empty"),
        (Plan(fp, 4, (0.0, 1.0)), r"'layers'\[0\] is float"),
        (Plan(fp, 4, (0, 4)), r"layer\(s\) \[4\] out of range"),
        (Plan(fp, 4, (2, 1)), "ascending"),
        (Plan(fp, 4, (0, 1, 2, 3), exit=ExitPolicy((1,), "gap", math.nan)), "threshold' is nan"),
        (Plan(fp, 4, (0, 1, 2, 3), exit=ExitPolicy((1,), "gap", -math.inf)), "threshold"),
        (Plan(fp, 4, (0, 1, 2, 3), exit=ExitPolicy((1,), "classifier", 0.5, features=("gap",),
                                                   weights=(math.nan,))), r"weights\[0\]' is nan"),
        (Plan(fp, 4, (0, 1, 2, 3), exit=ExitPolicy((1,), "classifier", 0.5, features=("gap",), weights=(1.0,),
                                                   bias=math.inf)), "bias' is inf"),
        (Plan(fp, 4, (0, 1, 2, 3), exit=ExitPolicy((1,), "entropy", 0.5)), "criterion"),
        (Plan(fp, 4, (0, 1, 2, 3), exit=ExitPolicy((1,), "gap", 0.5, min_depth=-1)), "min_depth"),
        (Plan(fp, 4.0, (0, 1)), "num_layers' must be an integer"),
        ("plan.json", "plan must be a Plan"),
    ]
    for plan, message in bad:
        with pytest.raises(PlanError if isinstance(plan, Plan) else InputError, match=message):
            rt.generate([5, 6], 2, plan)


def test_speculative_draft_is_checked(rt, tiny_opt_export):
    with pytest.raises(InputError, match="draft layers"):
        rt.generate([5, 6], 2, strategy="speculative", draft=Draft((0.0, 1.0)))
    with pytest.raises(InputError, match="unknown strategy"):
        rt.generate([5, 6], 2, strategy="warp")


def test_threads_and_device_are_checked(tiny_opt_export):
    for kw, message in [({"threads": 0}, "threads must be a whole number >= 1"), ({"threads": 1.5}, "threads must be a whole number >= 1"),
                        ({"device": "cuda:x"}, "GPU number"), ({"device": "tpu"}, "unknown device")]:
        with pytest.raises(DlexportError, match=message):
            Runtime.load(tiny_opt_export.folder, **kw)
