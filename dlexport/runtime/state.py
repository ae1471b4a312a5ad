"""The state of one generation request, and what a request returns.

A ``DecodeState`` is everything one request owns: its token ids and positions, its KV cache, the tokens emitted so
far, the stop bookkeeping and (when profiling) its engine timings. The ``Runtime`` holds only loaded engines, so any
number of requests can run on one ``Runtime`` from several threads, each with its own state. Every strategy
(``runtime/decode.py``) drives a state through the same few calls: ``embed``, ``run_layers``, ``logits``, ``emit``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .plan import Plan
from .sampling import Sampling


@dataclass
class StepStats:
    layers_executed: float  # decoder layers run per emitted token (pending fills of earlier tokens not counted)
    exit_layer: int | None  # layer after which the token exited, None when it ran the whole plan


@dataclass
class StreamEvent:
    index: int  # 1-based token index; the final event repeats the last index and carries ``result``
    tokens: list[int]  # the new token of each row
    stats: StepStats | None
    result: "Generation | None"


@dataclass
class Generation:
    prompt_tokens: list[list[int]]
    tokens: list[list[int]]
    texts: list[str]
    steps: list[StepStats]
    timings_ms: dict[str, float]  # per subgraph, when profiling (synchronised per call)
    prefill_s: float
    total_s: float
    plan: str = ""
    extra: dict = field(default_factory=dict)  # strategy-specific statistics

    @property
    def new_tokens(self) -> int:
        return max((len(t) for t in self.tokens), default=0)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens * len(self.tokens) / self.total_s if self.total_s else 0.0

    @property
    def mean_layers(self) -> float:
        return sum(s.layers_executed for s in self.steps) / len(self.steps) if self.steps else 0.0


@dataclass
class Segment:
    """Hidden states of consecutive new positions (plus the embed's rotary cos/sin by name), at some depth."""

    hidden: torch.Tensor
    rotary: dict = field(default_factory=dict)
    frontier: int = -1  # index into the plan's layers of the last layer applied

    def prepend(self, older: "Segment") -> None:
        self.hidden = torch.cat([older.hidden, self.hidden], dim=1)
        self.rotary = {k: torch.cat([older.rotary[k], v], dim=1) for k, v in self.rotary.items()}

    def clone(self, frontier: int | None = None) -> "Segment":
        return Segment(self.hidden.clone(), {k: v.clone() for k, v in self.rotary.items()},
                       self.frontier if frontier is None else frontier)

    @staticmethod
    def cat(parts: list["Segment"]) -> "Segment":
        """Consecutive segments as one (oldest first)."""
        return Segment(torch.cat([p.hidden for p in parts], dim=1),
                       {k: torch.cat([p.rotary[k] for p in parts], dim=1) for k in parts[0].rotary})


class DecodeState:
    """One request: ids [B, T] left-padded with ``valid`` marking real tokens, the plan it runs, its cache."""

    def __init__(self, runtime, ids: torch.Tensor, valid: torch.Tensor, plan: Plan, sampling: Sampling, stops: set,
                 max_new_tokens: int, timings: dict[str, float] | None = None):
        self.runtime, self.plan, self.sampling, self.stops = runtime, plan, sampling, stops
        self.max_new_tokens, self.timings = max_new_tokens, timings  # timings: None unless profiling
        dev = runtime.device
        self.ids, self.valid = ids.to(dev), valid.to(dev)
        self.batch, prompt_len = self.ids.shape
        self.cache = runtime.new_cache(plan.layers, self.batch, runtime.check_length(prompt_len, max_new_tokens))
        self.cache.valid[:, :prompt_len] = self.valid
        self.cache.valid[:, prompt_len:] = True
        self.pad = (~self.valid).sum(1, keepdim=True)
        self.slot = prompt_len  # slot of the last emitted token, which no layer has run yet
        self.generator = sampling.generator(dev)
        self.text = torch.zeros(self.batch, prompt_len + max_new_tokens, dtype=torch.int64, device=dev)
        self.text[:, :prompt_len] = self.ids  # prompt, then the output: a request's whole text, with no copy per step
        self.out = self.text[:, prompt_len:]
        self.done = torch.zeros(self.batch, dtype=torch.bool, device=dev)
        self.stop_ids = torch.tensor(sorted(stops), dtype=torch.int64, device=dev) if stops else None
        self.steps: list[StepStats] = []
        self.n = 0  # tokens emitted

    def fork(self, plan: Plan) -> "DecodeState":
        """The same request under another plan, with a fresh cache (per-sequence depth tries rungs this way)."""
        return DecodeState(self.runtime, self.ids, self.valid, plan, self.sampling, self.stops, self.max_new_tokens,
                           self.timings)

    # -- engine calls on this request's cache, timed into its own timings ------------------------------------------
    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> Segment:
        return self.runtime.embed(ids, positions, self.timings)

    def run_layers(self, seg: Segment, layers, **kw):
        return self.runtime.run_layers(seg, layers, self.cache, timings=self.timings, **kw)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head at every position of ``hidden``: [B, T, V]."""
        return self.runtime.logits(hidden, self.timings)

    def exit_logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, V] at an exit after ``layer``, through the plan's calibrated adapter there when it has one."""
        return self.runtime.exit_logits(layer, hidden, self.plan.exit, self.timings)

    def prefill(self, every_position: bool = False) -> torch.Tensor:
        """Run the whole prompt through the plan; return the last position's logits [B, V], or with
        ``every_position`` the logits at every prompt position [B, T, V] (teacher-forced predictions)."""
        self.cache.new_step()
        seg = self.embed(self.ids, self.positions(0, self.ids.shape[1]))
        self.run_layers(seg, self.plan.layers)
        return self.logits(seg.hidden) if every_position else self.logits(seg.hidden[:, -1:])[:, -1]

    # -- positions, emitted tokens and stops -----------------------------------------------------------------------
    def positions(self, slot: int, tokens: int = 1) -> torch.Tensor:
        return (torch.arange(slot, slot + tokens, device=self.runtime.device)[None] - self.pad).clamp_(min=0)

    def text_so_far(self) -> torch.Tensor:
        """[B, T + n]: the (left-padded) prompt and the tokens emitted so far, a view."""
        return self.text[:, :self.ids.shape[1] + self.n]

    def last_tokens(self) -> torch.Tensor:
        return self.out[:, self.n - 1:self.n]

    def emit(self, tokens: torch.Tensor, stats: StepStats):
        """Record emitted tokens [B, n] in order; yield one event each; stop at the budget or when every row stopped."""
        for i in range(tokens.shape[1]):
            token = torch.where(self.done, torch.full_like(tokens[:, i], self.runtime.pad_id), tokens[:, i])
            self.out[:, self.n] = token
            self.n += 1
            self.steps.append(stats)
            if self.stop_ids is not None:
                self.done |= torch.isin(token, self.stop_ids)
            yield StreamEvent(self.n, token.tolist(), stats, None)
            if self.finished:
                return

    @property
    def finished(self) -> bool:
        return self.n >= self.max_new_tokens or bool(self.done.all())

    def result(self, prefill_s: float, total_s: float, extra: dict) -> Generation:
        prompt_rows = [r[v].tolist() for r, v in zip(self.ids.cpu(), self.valid.cpu())]
        rows = []
        for r in self.out[:, :self.n].cpu().tolist():
            cut = next((j + 1 for j, t in enumerate(r) if t in self.stops), len(r))
            rows.append(r[:cut])
        tok = self.runtime.tokenizer
        texts = [tok.decode(r, skip_special_tokens=True) if tok else "" for r in rows]
        plan = self.plan.name or f"{len(self.plan.layers)}/{self.runtime.num_layers} layers"
        return Generation(prompt_rows, rows, texts, self.steps, dict(self.timings or {}), prefill_s, total_s, plan,
                          dict(extra))

