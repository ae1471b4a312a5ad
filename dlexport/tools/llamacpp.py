"""llama.cpp in process (xllamacpp's ``Server``): the server the bench baseline runs, and llama.cpp's own next-token
log-probabilities on any token ids, so that its perplexity is measured on exactly the text dlexport scores.

llama.cpp's server returns log-probabilities for generated tokens only (no ``echo`` of the prompt), so a teacher-forced
score is made from two things it does return: the final hidden states of every prompt token (``/embedding`` with
pooling ``none``: the output norm, before the head) and, read from the GGUF, the head's weights. The head is
recomputed the way ggml computes it: a Q8_0 weight multiplies Q8_0-quantised activations. ``GGUFScorer.check``
compares the result with llama.cpp's own log-probabilities of its next token (``n_probs``), which it must match.
"""
from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import torch

ACTIVATIONS = {"Q8_0": "Q8_0", "Q4_0": "Q8_0", "F16": "F16", "F32": None}  # ggml's vec_dot_type per head type
CHECK_TOLERANCE = 2e-3  # max |log p| difference to llama.cpp's own, top ``n_probs`` at the last position


def open_server(gguf: Path | str, threads: int | None, context: int, *, embedding: bool = False):
    """An xllamacpp ``Server`` on ``gguf``, one slot of ``context`` tokens; with ``embedding`` it also returns
    per-token final hidden states (pooling none) on its HTTP ``/embedding`` endpoint."""
    try:
        import xllamacpp
    except ImportError as e:
        raise ImportError("llama.cpp runs need xllamacpp (prebuilt llama.cpp): `pip install dlexport[llamacpp]`") \
            from e
    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"--gguf {gguf} is not a file: give the GGUF of the same model")
    params = xllamacpp.CommonParams()
    params.model.path = str(gguf)
    params.n_ctx, params.n_parallel = context, 1
    if embedding:
        params.embedding = True
        params.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_NONE
        params.n_batch = params.n_ubatch = context  # a sequence's hidden states come from one batch
    if threads:
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads
    return xllamacpp.Server(params)


def _head(gguf: Path):
    """The GGUF's output matrix [vocab, hidden] as fp32 and the activation type ggml multiplies it with."""
    import gguf as gg
    from gguf.quants import dequantize

    tensors = {t.name: t for t in gg.GGUFReader(str(gguf)).tensors}
    t = tensors.get("output.weight") or tensors.get("token_embd.weight")  # tied embeddings: no output.weight
    if t is None or t.tensor_type.name not in ACTIVATIONS:
        kind = t.tensor_type.name if t is not None else "no output/token_embd tensor"
        raise ValueError(f"{gguf}: head {kind} is not one whose ggml product is reproduced here "
                         f"({', '.join(ACTIVATIONS)}): score a GGUF with such a head")
    return dequantize(t.data, t.tensor_type).astype(np.float32), ACTIVATIONS[t.tensor_type.name]


class GGUFScorer:
    """llama.cpp's next-token logits for token ids: ``logits(ids [batch, tokens]) -> [batch, tokens, vocab]``."""

    def __init__(self, gguf: Path | str, *, vocab_size: int, threads: int | None = None, context: int = 512):
        self.gguf = Path(gguf)
        self.server = open_server(self.gguf, threads, context, embedding=True)
        weight, self.activations = _head(self.gguf)
        if weight.shape[0] != vocab_size:
            raise ValueError(f"{self.gguf} has {weight.shape[0]} tokens, the export {vocab_size}: give the GGUF of the "
                             "same model")
        self.weight = torch.from_numpy(weight)
        self.context = context
        self.info = {"gguf": str(self.gguf.resolve()), "head_activations": self.activations}

    def _hidden(self, ids: list[int]) -> np.ndarray:
        if len(ids) > self.context:
            raise ValueError(f"{len(ids)} tokens do not fit llama.cpp's context of {self.context}")
        req = urllib.request.Request(self.server.listening_address + "/embedding", json.dumps({"content": ids}).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as r:
            (out,) = json.loads(r.read())
        hidden = np.asarray(out["embedding"], np.float32)
        if hidden.shape[0] != len(ids):
            raise RuntimeError(f"llama.cpp returned {hidden.shape[0]} hidden states for {len(ids)} tokens")
        return hidden

    def _logits(self, hidden: np.ndarray) -> torch.Tensor:
        if self.activations == "F16":
            hidden = hidden.astype(np.float16).astype(np.float32)
        elif self.activations:
            from gguf import GGMLQuantizationType
            from gguf.quants import dequantize, quantize

            kind = GGMLQuantizationType[self.activations]
            hidden = dequantize(quantize(hidden, kind), kind)
        return torch.from_numpy(np.ascontiguousarray(hidden)) @ self.weight.T

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of every position; the first call first checks its first row (``check``)."""
        if "check_max_abs_logprob_diff" not in self.info:
            self.info["check_max_abs_logprob_diff"] = round(self.check(ids[0].tolist()), 6)
        return torch.stack([self._logits(self._hidden(row.tolist())) for row in ids])

    def check(self, ids: list[int], n_probs: int = 8) -> float:
        """max |log p| difference between these logits and llama.cpp's own log-probabilities of its top ``n_probs``
        next tokens after ``ids``; refuses above ``CHECK_TOLERANCE``."""
        out = self.server.handle_completions({"prompt": list(ids), "max_tokens": 1, "temperature": 0,
                                              "n_probs": n_probs, "cache_prompt": False})
        if "error" in out:
            raise RuntimeError(f"llama.cpp: {out['error'].get('message')}")
        (first,) = out["choices"][0]["logprobs"]["content"]
        ours = torch.log_softmax(self._logits(self._hidden(list(ids)))[-1].double(), -1)
        diff = max(abs(float(ours[t["id"]]) - t["logprob"]) for t in first["top_logprobs"])
        if diff > CHECK_TOLERANCE:
            raise RuntimeError(f"the head recomputed from {self.gguf} differs from llama.cpp's own log-probabilities "
                               f"by {diff:.3g} (> {CHECK_TOLERANCE}): this GGUF is not scored faithfully here")
        return diff
