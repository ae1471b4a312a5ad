"""The model as the export cut it (embed, layers, head), in PyTorch: the calibration maths runs here.

These are the very modules the ONNX subgraphs were exported from, so scores computed here are the scores the
stitched runtime would give, at PyTorch speed and without a KV cache (whole sequences, causal mask).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..contract import PAST_LENGTH, is_inplace
from ..exporter.architectures import architecture_for, sequence_mask


@dataclass
class Scores:
    """Next-token quality of some hidden states: perplexity on the text, agreement with the full model's top-1."""

    nll: float
    agreement: float
    tokens: int

    @property
    def ppl(self) -> float:
        return float(torch.tensor(self.nll).exp())

    def to_json(self) -> dict:
        return {"ppl": round(self.ppl, 4), "agreement": round(self.agreement, 5), "tokens": self.tokens}


class Stack:
    """embed / layer / head of a loaded model, over whole sequences [batch, tokens] with no past.

    Every forward runs in inference mode: calibration never needs gradients through the model.
    """

    def __init__(self, model: torch.nn.Module, chunk_tokens: int = 1024):
        self.model = model.float().eval()
        self.arch = architecture_for(model)
        self.num_layers = self.arch.numbers.num_layers
        self.hidden_size = self.arch.numbers.hidden_size
        self.embed_module = self.arch.embed_module()
        self.layer_modules = [self.arch.layer_module(i) for i in range(self.num_layers)]
        self.head_module = self.arch.head_module()
        self.chunk_tokens = chunk_tokens  # logits are [tokens, vocab]: computed a few sequences at a time
        self._masks: dict[tuple, torch.Tensor] = {}

    # -- forward pieces -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """-> (hidden, rotary extras by name) for sequences starting at position 0."""
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        return self.arch.split_embed(self.embed_module(ids, pos))

    def mask(self, tokens: int, window: int | None, past: int = 0) -> torch.Tensor:
        """Causal mask [1, 1, tokens, past + tokens] of a layer with ``window`` (None: global), no padding."""
        key = (tokens, window, past)
        if key not in self._masks:
            self._masks[key] = sequence_mask(torch.ones(1, past + tokens, dtype=torch.bool), tokens, window,
                                             torch.float32)
        return self._masks[key]

    @torch.inference_mode()
    def layer(self, i: int, hidden: torch.Tensor, extras: dict) -> torch.Tensor:
        n = self.arch.numbers
        b, t = hidden.shape[:2]
        empty = hidden.new_zeros(b, n.num_kv_heads, 0, n.head_dim)
        module = self.layer_modules[i]
        return module.step(hidden, self.mask(t, module.window).expand(b, 1, t, t), extras, empty, empty)[0]

    def run(self, hidden: torch.Tensor, extras: tuple, layers) -> torch.Tensor:
        for i in layers:
            hidden = self.layer(i, hidden, extras)
        return hidden

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head_module(hidden)

    def lm_weight(self) -> torch.Tensor:
        return self.head_module.lm_head.weight

    @torch.inference_mode()
    def pre_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the head feeds its final projection (norm, OPT's project_out): to score a vocabulary subset."""
        h = self.head_module
        if getattr(h, "norm", None) is not None:
            hidden = h.norm(hidden)
        if getattr(h, "project_out", None) is not None:
            hidden = h.project_out(hidden)
        return hidden

    # -- scoring --------------------------------------------------------------------------------------------------
    def rows(self, n_rows: int, tokens: int) -> list[slice]:
        """Slices of about ``chunk_tokens`` tokens: logits are [tokens, vocab], so they are made a chunk at a time."""
        step = max(1, self.chunk_tokens // max(tokens, 1))
        return [slice(s, s + step) for s in range(0, n_rows, step)]

    @torch.inference_mode()
    def top1(self, hidden: torch.Tensor) -> torch.Tensor:
        """Top-1 next-token prediction [batch, tokens]."""
        return torch.cat([self.logits(hidden[r]).argmax(-1) for r in self.rows(hidden.shape[0], hidden.shape[1])])

    @torch.inference_mode()
    def score(self, hidden: torch.Tensor, ids: torch.Tensor, ref_top1: torch.Tensor | None,
              vocab: torch.Tensor | None = None) -> Scores:
        """Perplexity of ``ids[:, 1:]`` and agreement with ``ref_top1`` from ``hidden`` [batch, tokens, hidden].

        With ``vocab`` (a subset of token ids that holds every target and reference token) the softmax runs over
        that subset only: an approximation used to rank candidates cheaply; reported scores use the full vocabulary.
        """
        nll, agree, count = 0.0, 0, 0
        weight = self.lm_weight()[vocab] if vocab is not None else None
        cap = getattr(self.head_module, "cap", None)  # Gemma's logit soft cap, applied to the subset's logits too
        for r in self.rows(hidden.shape[0], hidden.shape[1]):
            h = hidden[r, :-1]
            if vocab is None:
                logits = self.logits(h).float()
                targets = ids[r, 1:]
                pred = logits.argmax(-1)
            else:
                logits = self.pre_logits(h) @ weight.T
                logits = cap(logits) if cap else logits
                targets = torch.searchsorted(vocab, ids[r, 1:].contiguous())
                pred = vocab[logits.argmax(-1)]
            logp = torch.log_softmax(logits, -1)
            nll += -logp.gather(-1, targets[..., None]).sum().item()
            if ref_top1 is not None:
                agree += (pred == ref_top1[r, :-1]).sum().item()
            count += targets.numel()
        return Scores(nll / count, agree / count if ref_top1 is not None else float("nan"), count)


def vocab_subset(stack: Stack, final_hidden: torch.Tensor, ids: torch.Tensor, top_k: int = 16) -> torch.Tensor:
    """Sorted token ids: every target plus the full model's top-k at every position (for ``Stack.score``)."""
    keep = [ids.reshape(-1)]
    for r in stack.rows(final_hidden.shape[0], final_hidden.shape[1]):
        keep.append(stack.logits(final_hidden[r]).topk(top_k, dim=-1).indices.reshape(-1))
    return torch.unique(torch.cat(keep))


class ExportStack(Stack):
    """The same pieces run by an export's own ONNX graphs (ONNX Runtime, CPU, no past): scores of what ships.

    A quantised export has no PyTorch module to score, so its quality is measured on the graphs themselves; the
    scoring (``score``, ``top1``) is Stack's.
    """

    def __init__(self, folder, threads: int | None = None, chunk_tokens: int = 1024):
        from ..engines import open_engines

        self.manifest, self.engines = open_engines(folder, threads=threads)
        a = self.manifest.arch
        self.num_layers, self.hidden_size, self.chunk_tokens = a["num_layers"], a["hidden_size"], chunk_tokens
        self.kv_heads, self.head_dim = a["num_kv_heads"], a["head_dim"]
        self.head_module = None  # the head is a graph here: scored over the full vocabulary only
        self._masks: dict[tuple, torch.Tensor] = {}

    def _run(self, name: str, feeds: dict) -> list[torch.Tensor]:
        engine = self.engines[name]
        out = engine.run({k: v.contiguous() for k, v in feeds.items()})
        return [out[o.name] for o in engine.outputs]

    @torch.inference_mode()
    def embed(self, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        engine = self.engines["embed"]
        out = self._run("embed", {"input_ids": ids, "position_ids": torch.arange(ids.shape[1]).expand_as(ids)})
        return out[0], {o.name: t for o, t in zip(engine.outputs[1:], out[1:])}

    @torch.inference_mode()
    def layer(self, i: int, hidden: torch.Tensor, extras: dict) -> torch.Tensor:
        b, t = hidden.shape[:2]
        key = self.manifest.layer_key(i)
        engine = self.engines[key]
        window = (self.manifest.arch.get("layer_windows") or [None] * self.num_layers)[i]
        feeds = {"hidden_states": hidden,
                 "attention_mask": self.mask(t, window).to(hidden.dtype).expand(b, 1, t, t)}
        feeds.update((s.name, extras[s.name]) for s in engine.inputs if s.name.startswith("rotary_"))
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        if is_inplace(engine.inputs):  # a buffer of exactly the sequence, written by the layer itself
            buffers = [hidden.new_zeros(b, self.kv_heads, t, self.head_dim) for _ in range(2)]
            feeds.update({past_k: buffers[0], past_v: buffers[1], PAST_LENGTH: torch.zeros(b, dtype=torch.int64)})
            out = engine.run(feeds, {f"present.{i}.key": buffers[0], f"present.{i}.value": buffers[1]})
            return out["hidden_states_out"]
        feeds[past_k] = feeds[past_v] = hidden.new_zeros(b, self.kv_heads, 0, self.head_dim)
        return self._run(key, feeds)[0]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._run("head", {"hidden_states": hidden})[0]
