"""Decoupled mode: a token per response, equal to the library's tokens; a client that leaves does not wedge it."""
from __future__ import annotations

import threading
import time

import pytest

from dlexport.serving.client import connect, stream

from .conftest import start_server
from .test_server import PROMPTS, _expected


@pytest.fixture(scope="module")
def server(triton_env, tiny_llama_export, served_plans, tmp_path_factory):
    s = start_server(tiny_llama_export, served_plans, tmp_path_factory.mktemp("serve-stream") / "repo",
                     streaming=True, queue_delay_us=20000)
    yield s
    s.stop()


@pytest.mark.parametrize("plan", [None, "exit"])
def test_streamed_tokens_equal_generate(server, reference, served_plans, plan):
    want = _expected(reference, PROMPTS[2], 12, served_plans.get(plan))
    replies = list(stream(connect(server.grpc_url, "grpc"), PROMPTS[2], 12, plan=plan))
    assert [t for r in replies for t in r.tokens] == want.tokens[0]
    assert [r.layers_executed for r in replies] == [s.layers_executed for s in want.steps]


def test_concurrent_streams_each_get_their_own_tokens(server, reference):
    want = [_expected(reference, p, 10).tokens[0] for p in PROMPTS[:4]]
    got, start = [None] * 4, threading.Barrier(4)

    def client(i):
        c = connect(server.grpc_url, "grpc")
        start.wait(timeout=30)
        got[i] = [t for r in stream(c, PROMPTS[i], 10) for t in r.tokens]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == want


@pytest.mark.parametrize("how", ["cancel", "close the connection"])
def test_a_client_leaving_mid_stream_does_not_wedge_the_instance(server, reference, how):
    client = connect(server.grpc_url, "grpc")
    tokens = stream(client, PROMPTS[4], 240)
    first = [next(tokens), next(tokens)]
    assert len(first) == 2
    if how == "cancel":
        tokens.close()  # stop_stream(cancel_requests=True)
    else:
        client.close()  # the channel goes away under the open stream
    t0 = time.monotonic()
    got = [t for r in stream(connect(server.grpc_url, "grpc"), PROMPTS[1], 6) for t in r.tokens]
    assert got == _expected(reference, PROMPTS[1], 6).tokens[0]
    assert time.monotonic() - t0 < 30
    assert server.ready()


def test_a_bad_streamed_request_gets_its_error(server):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="unknown plan"):
        list(stream(connect(server.grpc_url, "grpc"), PROMPTS[1], 6, plan="nope"))
    with pytest.raises(InferenceServerException, match="max_new_tokens"):
        list(stream(connect(server.grpc_url, "grpc"), PROMPTS[1], 0))
