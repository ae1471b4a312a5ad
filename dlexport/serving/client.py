"""Talking to a served dlexport model with ``tritonclient`` (HTTP or gRPC): one request, or a token stream.

The request layout is repository.py's; this is what the tests, the benchmark and the README snippet use.
"""
from __future__ import annotations

import queue
from dataclasses import dataclass

import numpy as np

from ..errors import UnavailableError


def _module(protocol: str):
    try:
        if protocol == "http":
            import tritonclient.http as m
        elif protocol == "grpc":
            import tritonclient.grpc as m
        else:
            raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
    except ImportError as e:
        raise UnavailableError(f"tritonclient is not installed ({e}): pip install 'dlexport[serve]'") from None
    return m


def connect(url: str, protocol: str = "http", **kw):
    """A ``tritonclient`` InferenceServerClient for ``host:port``."""
    return _module(protocol).InferenceServerClient(url, **kw)


@dataclass
class Reply:
    text: str
    tokens: list[int]
    layers_executed: int
    mean_layers: float


def inputs(protocol: str, prompt, max_new_tokens: int | None = None, *, plan: str | None = None,
           strategy: str | None = None, temperature: float | None = None, top_k: int | None = None,
           top_p: float | None = None, seed: int | None = None, lookup: int | None = None) -> list:
    """The request's input tensors: ``prompt`` is text or a list of token ids; unset fields take the server's
    defaults (the folder's default plan, plain greedy decoding, the repository's max_new_tokens)."""
    m = _module(protocol)
    tensors = []

    def add(name, value, triton):
        t = m.InferInput(name, list(value.shape), triton)
        t.set_data_from_numpy(value)
        tensors.append(t)

    if isinstance(prompt, str):
        add("text", np.array([[prompt.encode()]], dtype=np.object_), "BYTES")
    else:
        add("input_ids", np.array([list(prompt)], dtype=np.int64), "INT64")
    for name, value, dtype, triton in (("max_new_tokens", max_new_tokens, np.int32, "INT32"),
                                       ("temperature", temperature, np.float32, "FP32"),
                                       ("top_k", top_k, np.int32, "INT32"), ("top_p", top_p, np.float32, "FP32"),
                                       ("seed", seed, np.int64, "INT64"), ("lookup", lookup, np.int32, "INT32")):
        if value is not None:
            add(name, np.array([[value]], dtype=dtype), triton)
    for name, value in (("plan", plan), ("strategy", strategy)):
        if value is not None:
            add(name, np.array([[value.encode()]], dtype=np.object_), "BYTES")
    return tensors


def generate(client, prompt, max_new_tokens: int | None = None, *, model: str = "dlexport", **fields) -> Reply:
    """One request, the whole answer (a model written without --streaming)."""
    protocol = "grpc" if type(client).__module__.startswith("tritonclient.grpc") else "http"
    result = client.infer(model, inputs(protocol, prompt, max_new_tokens, **fields))
    text = result.as_numpy("text_output").reshape(-1)[0]
    return Reply(text.decode() if isinstance(text, bytes) else str(text),
                 result.as_numpy("output_ids").reshape(-1).tolist(),
                 int(result.as_numpy("layers_executed").reshape(-1)[0]),
                 float(result.as_numpy("mean_layers").reshape(-1)[0]))


def stream(client, prompt, max_new_tokens: int | None = None, *, model: str = "dlexport", timeout: float = 120.0,
           **fields):
    """Yield ``Reply`` per token from a model written with --streaming (gRPC client only). Stopping the iteration
    early closes the stream: the server sees the request cancelled and stops generating for it."""
    replies: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        client.async_stream_infer(model, inputs("grpc", prompt, max_new_tokens, **fields),
                                  enable_empty_final_response=True)
        while True:
            result, error = replies.get(timeout=timeout)
            if error is not None:
                raise error
            response = result.get_response()
            if response.parameters.get("triton_final_response") and response.parameters[
                    "triton_final_response"].bool_param and not response.outputs:
                return
            text = result.as_numpy("text_output").reshape(-1)[0]
            yield Reply(text.decode() if isinstance(text, bytes) else str(text),
                        result.as_numpy("output_ids").reshape(-1).tolist(),
                        int(result.as_numpy("layers_executed").reshape(-1)[0]),
                        float(result.as_numpy("mean_layers").reshape(-1)[0]))
    finally:
        client.stop_stream(cancel_requests=True)
