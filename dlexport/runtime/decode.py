"""The one decode loop, and the strategies it runs.

A strategy is a small per-request object: ``prefill`` fills the cache from the prompt and returns the first logits,
``step`` emits the next tokens (one, or several for a speculative round), ``stats`` reports what it did. ``decode``
is the only loop: it picks the first token, emits through the state (one emit/stop path), and times the request.

Early exit policy (exact caches): when a token exits after layer e, the deeper layers have no key/value for its
position yet. Its hidden state is kept as *pending*; the next time a deeper layer runs, it first takes every pending
position in the same call (they join the current token as extra new tokens). Each deeper layer therefore computes
exactly the key/values the full plan would have, only later; early exit changes which token is emitted, never the
cache. With a batch, a token exits only when every row passes the criterion.
"""
from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from .sampling import pick
from .state import DecodeState, Segment, StepStats, StreamEvent


class Strategy:
    """Plain decoding: every plan layer for every token."""

    name = "plain"

    def prefill(self, state: DecodeState) -> tuple[DecodeState, torch.Tensor]:
        """Fill the cache from the prompt; return the state that decodes (a strategy may choose another plan's)
        and the last prompt position's logits [B, V]."""
        return state, state.prefill()

    def step(self, state: DecodeState) -> tuple[torch.Tensor, StepStats]:
        """Run the last emitted token; return the tokens to emit [B, n] and their statistics."""
        state.cache.new_step()
        seg = state.embed(state.last_tokens(), state.positions(state.slot))
        state.run_layers(seg, state.plan.layers)
        state.slot += 1
        return self.pick(state, state.logits(seg.hidden[:, -1:])[:, -1]), StepStats(len(state.plan.layers), None)

    @staticmethod
    def pick(state: DecodeState, logits: torch.Tensor) -> torch.Tensor:
        return pick(logits, state.sampling, state.generator)[:, None]

    def stats(self) -> dict:
        return {}


class EarlyExit(Strategy):
    """Leave after an exit layer when the plan's exit policy is confident (module docstring: pending positions)."""

    name = "early-exit"

    def __init__(self):
        self.pending: list[Segment] = []

    def step(self, state: DecodeState) -> tuple[torch.Tensor, StepStats]:
        state.cache.new_step()
        seg = state.embed(state.last_tokens(), state.positions(state.slot))
        logits, exit_layer, ran = state.run_layers(seg, state.plan.layers, pending=self.pending,
                                                   exit_policy=state.plan.exit)
        if logits is None:
            logits = state.logits(seg.hidden[:, -1:])[:, -1]
        state.slot += 1
        return self.pick(state, logits), StepStats(ran, exit_layer)


def decode(strategy: Strategy, state: DecodeState) -> Iterator[StreamEvent]:
    """Prefill, then emit until the budget or every row's stop; the last event carries the ``Generation``."""
    t0 = time.perf_counter()
    state, logits = strategy.prefill(state)
    prefill_s = time.perf_counter() - t0
    tokens, stats = strategy.pick(state, logits), StepStats(len(state.plan.layers), None)  # the prompt ran the plan
    while True:
        yield from state.emit(tokens, stats)
        if state.finished:
            break
        tokens, stats = strategy.step(state)
    yield StreamEvent(state.n, [], None, state.result(prefill_s, time.perf_counter() - t0, strategy.stats()))


def run_to_end(strategy: Strategy, state: DecodeState):
    """Decode without streaming; returns the ``Generation``."""
    for event in decode(strategy, state):
        pass
    return event.result
