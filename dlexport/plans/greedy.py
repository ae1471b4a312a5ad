"""Static skip plans: greedy layer removal, scored on calibration text, with cached hidden states.

Greedy removal drops, at each step, the layer whose removal hurts the calibration metric least. The input of every
kept layer under the current plan is cached, so scoring the removal of kept layer j restarts from j's cached input
and runs only the layers above it. Every step is one rung of the ladder: the plans for every depth come out nested.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import InputError
from .stack import Scores, Stack

METRICS = ("ppl", "agreement")


@dataclass
class Step:
    removed: int
    kept: tuple[int, ...]
    scores: Scores  # on the calibration split (vocabulary subset), after the removal

    def to_json(self) -> dict:
        return {"removed": self.removed, "layers": len(self.kept), **self.scores.to_json()}


def _loss(s: Scores, metric: str) -> tuple:
    return (s.nll,) if metric == "ppl" else (-s.agreement, s.nll)


def even_layers(num_layers: int, keep: int) -> tuple[int, ...]:
    """The baseline: remove ``num_layers - keep`` layers at evenly spaced depths (centred in equal bands)."""
    drop = num_layers - keep
    removed = {int((i + 0.5) * num_layers / drop) for i in range(drop)} if drop > 0 else set()
    return tuple(i for i in range(num_layers) if i not in removed)


class GreedyRemoval:
    """State of one greedy run on calibration sequences ``ids``; ``run`` performs the steps, resumably."""

    def __init__(self, stack: Stack, ids: torch.Tensor, metric: str = "ppl", rescore: int = 0,
                 vocab: torch.Tensor | None = None, ref_top1: torch.Tensor | None = None):
        if metric not in METRICS:
            raise InputError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        self.stack, self.ids, self.metric, self.rescore, self.vocab = stack, ids, metric, rescore, vocab
        with torch.inference_mode():
            self.emb, self.extras = stack.embed(ids)
            self.kept = list(range(stack.num_layers))
            self.inputs, final = self._trajectory(self.emb, self.kept)
            self.ref_top1 = stack.top1(final) if ref_top1 is None else ref_top1
            self.full = stack.score(final, ids, self.ref_top1, vocab)
        self.stale: dict[int, tuple] = {}  # last loss seen for removing each layer (for rescore > 0)
        self.steps: list[Step] = []

    def _trajectory(self, hidden, layers) -> tuple[list[torch.Tensor], torch.Tensor]:
        inputs = []
        for i in layers:
            inputs.append(hidden)
            hidden = self.stack.layer(i, hidden, self.extras)
        return inputs, hidden

    def _candidates(self) -> list[int]:
        """Positions in ``kept`` to score: all of them, or (rescore=M) the M least harmful at their last scoring."""
        positions = list(range(len(self.kept)))
        if not self.rescore or not self.stale:
            return positions
        return sorted(positions, key=lambda p: self.stale[self.kept[p]])[: self.rescore]

    def _remove(self, p: int, trajectory=None) -> None:
        rest = self.kept[p + 1:]
        if trajectory is None:
            trajectory, _ = self._trajectory(self.inputs[p], rest)
        self.inputs = self.inputs[:p] + trajectory
        del self.kept[p]

    @torch.inference_mode()
    def step(self) -> Step:
        best = None
        for p in self._candidates():
            inputs, final = self._trajectory(self.inputs[p], self.kept[p + 1:])
            scores = self.stack.score(final, self.ids, self.ref_top1, self.vocab)
            loss = _loss(scores, self.metric)
            self.stale[self.kept[p]] = loss
            if best is None or loss < best[0]:
                best = (loss, p, inputs, scores)
        _, p, inputs, scores = best
        layer = self.kept[p]
        self._remove(p, inputs)
        self.stale.pop(layer, None)
        s = Step(layer, tuple(self.kept), scores)
        self.steps.append(s)
        return s

    def replay(self, removed: int, scores: Scores) -> None:
        """Redo a recorded step without scoring (resume)."""
        p = self.kept.index(removed)
        self._remove(p)
        self.steps.append(Step(removed, tuple(self.kept), scores))

    def run(self, journal=None, progress: bool = True, on_step=None) -> list[Step]:
        """Remove layers down to one; steps found in ``journal`` are replayed, new ones recorded as they finish."""
        n = self.stack.num_layers
        with torch.inference_mode():
            while journal is not None and len(self.kept) > 1 and journal.get(f"remove_{len(self.steps)}"):
                rec = journal.get(f"remove_{len(self.steps)}")
                self.replay(rec["removed"], Scores(rec["nll"], rec["agreement"], rec["tokens"]))
            bar = tqdm(total=n - 1, initial=len(self.steps), desc="greedy removal", unit="layer",
                       disable=not progress)
            while len(self.kept) > 1:
                t0 = time.perf_counter()
                s = self.step()
                if journal is not None:
                    journal.record(f"remove_{len(self.steps) - 1}", {
                        "removed": s.removed, "nll": s.scores.nll, "agreement": s.scores.agreement,
                        "tokens": s.scores.tokens, "seconds": round(time.perf_counter() - t0, 2)})
                bar.update(1)
                bar.set_postfix_str(f"-{s.removed} ppl {s.scores.ppl:.1f}")
                if on_step is not None:
                    on_step(s)
            bar.close()
        return self.steps

    def ladder(self) -> tuple[tuple[int, ...], ...]:
        """Nested plans for every depth, smallest first, ending with every layer."""
        rungs = [tuple(range(self.stack.num_layers))] + [s.kept for s in self.steps]
        return tuple(reversed(rungs))


def evaluate(stack: Stack, ids: torch.Tensor, layer_sets: dict, ref_top1: torch.Tensor | None = None,
             progress: bool = False) -> tuple[dict[str, Scores], torch.Tensor]:
    """Full-vocabulary scores of each named layer set on ``ids``; agreement is against the full model's top-1."""
    out = {}
    with torch.inference_mode():
        emb, extras = stack.embed(ids)
        if ref_top1 is None:
            ref_top1 = stack.top1(stack.run(emb, extras, range(stack.num_layers)))
        for name, layers in tqdm(layer_sets.items(), desc="held-out evaluation", disable=not progress):
            out[name] = stack.score(stack.run(emb, extras, layers), ids, ref_top1)
    return out, ref_top1
