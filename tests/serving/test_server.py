"""The served model answers exactly what the library answers, for many clients at once, and survives bad requests."""
from __future__ import annotations

import json
import random
import re
import threading
import urllib.request

import numpy as np
import pytest

from dlexport.runtime import Sampling, load_plan
from dlexport.serving.client import connect, generate, inputs

from .conftest import start_server

PROMPTS = [[random.Random(i).randrange(3, 500) for _ in range(3 + i % 7)] for i in range(16)]


@pytest.fixture(scope="module")
def server(triton_env, tiny_llama_export, served_plans, tmp_path_factory):
    s = start_server(tiny_llama_export, served_plans, tmp_path_factory.mktemp("serve") / "repo",
                     queue_delay_us=20000)
    yield s
    s.stop()


def _expected(reference, prompt, n, plan_file=None, strategy="plain", sampling=Sampling()):
    plan = load_plan(plan_file, reference.manifest) if plan_file else None
    return reference.generate([prompt], n, plan, strategy=strategy, sampling=sampling)


def _metric(server, name: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("plan,strategy", [(None, "plain"), ("skip", "plain"), ("exit", "plain"),
                                           ("spec", "speculative")])
def test_tokens_equal_generate(server, reference, served_plans, protocol, plan, strategy):
    client = connect(server.http_url if protocol == "http" else server.grpc_url, protocol)
    want = _expected(reference, PROMPTS[3], 12, served_plans.get(plan), strategy)
    got = generate(client, PROMPTS[3], 12, plan=plan, strategy=strategy)
    assert got.tokens == want.tokens[0]
    assert got.layers_executed == sum(s.layers_executed for s in want.steps)
    assert got.mean_layers == pytest.approx(want.mean_layers, rel=1e-6)
    if plan == "skip":
        assert got.mean_layers == 3
    if plan == "exit":
        assert got.mean_layers < 4, "the exit plan was meant to exit: make its threshold lower"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_prompt_lookup_requests_equal_generate(server, reference, served_plans, protocol):
    """A repetitive prompt, so that lookup rounds run (the library's tests check them against plain greedy)."""
    client = connect(server.http_url if protocol == "http" else server.grpc_url, protocol)
    prompt = PROMPTS[4] * 3
    want = reference.generate([prompt], 12, load_plan(served_plans["spec"], reference.manifest),
                              strategy="speculative", lookup=2)
    assert want.extra["lookup_rounds"] > 0
    got = generate(client, prompt, 12, plan="spec", strategy="speculative", lookup=2)
    assert got.tokens == want.tokens[0]
    assert got.layers_executed == sum(s.layers_executed for s in want.steps)


def test_seeded_sampling_equals_generate(server, reference):
    client = connect(server.grpc_url, "grpc")
    sampling = Sampling(temperature=0.9, top_p=0.9, seed=7)
    got = generate(client, PROMPTS[5], 10, temperature=0.9, top_p=0.9, seed=7)
    assert got.tokens == _expected(reference, PROMPTS[5], 10, sampling=sampling).tokens[0]


@pytest.mark.parametrize("plan", [None, "skip"])
def test_16_concurrent_clients_each_get_their_own_output(server, reference, served_plans, plan):
    want = [_expected(reference, p, 10, served_plans.get(plan)).tokens[0] for p in PROMPTS]
    batches, rows = _metric(server, "dlexport_batches_total"), _metric(server, "dlexport_batch_rows_total")
    got, start = [None] * 16, threading.Barrier(16)

    def client(i):
        c = connect(server.grpc_url if i % 2 else server.http_url, "grpc" if i % 2 else "http")
        start.wait(timeout=30)
        got[i] = generate(c, PROMPTS[i], 10, plan=plan).tokens

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == want
    merged = (_metric(server, "dlexport_batch_rows_total") - rows) / (_metric(server, "dlexport_batches_total") - batches)
    assert merged > 1.5, f"requests were not merged into batches (mean batch {merged:.2f})"


def test_per_request_layers_are_a_metric(server):
    client = connect(server.http_url, "http")
    before_tokens, before_layers = _metric(server, "dlexport_generated_tokens_total"), \
        _metric(server, "dlexport_layers_executed_total")
    got = generate(client, PROMPTS[0], 6, plan="skip")
    assert _metric(server, "dlexport_generated_tokens_total") - before_tokens == len(got.tokens)
    assert _metric(server, "dlexport_layers_executed_total") - before_layers == got.layers_executed == 3 * len(got.tokens)


BAD = [  # (description, request fields, words the error must contain)
    ("unknown plan", dict(prompt=[1, 2, 3], plan="nope"), ["unknown plan", "skip"]),
    ("negative max_new_tokens", dict(prompt=[1, 2, 3], max_new_tokens=-4), ["max_new_tokens", "-4"]),
    ("over-long prompt", dict(prompt=[5] * 300, max_new_tokens=4), ["300 tokens", "context"]),
    ("token outside the vocabulary", dict(prompt=[1, 99999]), ["99999", "vocabulary"]),
    ("text without a tokenizer", dict(prompt="hello"), ["no tokenizer", "token ids"]),
    ("unknown strategy", dict(prompt=[1, 2], strategy="magic"), ["unknown strategy"]),
    ("speculative without a draft", dict(prompt=[1, 2], strategy="speculative", plan="skip"), ["draft"]),
    ("bad temperature", dict(prompt=[1, 2], temperature=-1.0), ["temperature"]),
    ("lookup without speculation", dict(prompt=[1, 2], lookup=2), ["lookup", "speculative"]),
    ("negative lookup", dict(prompt=[1, 2], strategy="speculative", plan="spec", lookup=-1), ["lookup", "-1"]),
]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("what,fields,words", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_a_clear_error_and_the_server_keeps_serving(server, reference, protocol, what, fields,
                                                                     words):
    from tritonclient.utils import InferenceServerException

    client = connect(server.http_url if protocol == "http" else server.grpc_url, protocol)
    fields = dict(fields)
    prompt, n = fields.pop("prompt"), fields.pop("max_new_tokens", 4)
    with pytest.raises(InferenceServerException) as e:
        generate(client, prompt, n, **fields)
    for word in words:
        assert word in str(e.value), f"{what}: {e.value}"
    assert generate(client, PROMPTS[1], 5).tokens == _expected(reference, PROMPTS[1], 5).tokens[0]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_wrong_dtype_and_missing_prompt_are_refused(server, protocol):
    from tritonclient.utils import InferenceServerException

    m = __import__(f"tritonclient.{protocol}", fromlist=["InferInput"])
    client = connect(server.http_url if protocol == "http" else server.grpc_url, protocol)
    ids = m.InferInput("input_ids", [1, 3], "FP32")
    ids.set_data_from_numpy(np.array([[1, 2, 3]], dtype=np.float32))
    with pytest.raises(InferenceServerException, match="input_ids"):
        client.infer("dlexport", [ids])
    with pytest.raises(InferenceServerException, match="exactly one of 'text'"):
        client.infer("dlexport", inputs(protocol, [1, 2], 3)[1:])  # max_new_tokens only
    assert server.ready()


def test_a_bad_request_batched_with_good_ones_spoils_nothing(server, reference):
    from tritonclient.utils import InferenceServerException

    want = [_expected(reference, p, 8).tokens[0] for p in PROMPTS[:6]]
    got, start = [None] * 7, threading.Barrier(7)

    def client(i):
        c = connect(server.http_url, "http")
        start.wait(timeout=30)
        try:
            got[i] = generate(c, [5] * 300 if i == 6 else PROMPTS[i], 8).tokens
        except InferenceServerException as e:
            got[i] = str(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got[:6] == want
    assert "300 tokens" in got[6]


def test_what_speculation_learned_survives_a_restart(triton_env, tiny_llama_export, served_plans, reference,
                                                     tmp_path):
    """Each run's instance writes the learning file when it stops; the next run starts from it (its entries are
    still there after a run that added another), and a spoiled file is served around and left as it was."""
    from dlexport.runtime.speculative import LEARNING_FORMAT

    repo = tmp_path / "repo"
    learning = repo / "dlexport" / "learning.json"
    runs = [dict(plan="spec", strategy="speculative"), dict(plan="spec", strategy="speculative", lookup=2)]
    keys = []
    for fields in runs:
        s = start_server(tiny_llama_export, served_plans, repo)
        try:
            got = generate(connect(s.http_url, "http"), PROMPTS[2], 8, **fields)
            want = reference.generate([PROMPTS[2]], 8, load_plan(served_plans["spec"], reference.manifest),
                                      strategy="speculative", lookup=fields.get("lookup", 0), memory=False)
            assert got.tokens == want.tokens[0]
        finally:
            s.stop()
        data = json.loads(learning.read_text())
        assert data["format"] == LEARNING_FORMAT
        keys.append(set(data["entries"]))
    assert len(keys[0]) == 1 and keys[0] < keys[1], "the second run started from the first run's file"
    learning.write_text("{ not json")
    s = start_server(tiny_llama_export, served_plans, repo)
    try:
        assert generate(connect(s.http_url, "http"), PROMPTS[2], 4, **runs[0]).tokens == \
            reference.generate([PROMPTS[2]], 4, load_plan(served_plans["spec"], reference.manifest),
                               strategy="speculative", memory=False).tokens[0]
    finally:
        s.stop()
    assert learning.read_text() == "{ not json"
