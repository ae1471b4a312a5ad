"""Per-sequence depth: each request runs one rung of a ladder of nested layer sets, chosen by a controller.

Controllers:

- ``fixed``: the rung given (``rung=i``, negative counts from the top).
- ``prompt`` (practical): during prefill, every rung from the smallest up predicts each next prompt token
  (teacher forced) and is compared with the full plan's predictions; the first rung whose agreement reaches
  ``threshold`` decodes the request, from the cache its own prefill already filled. Costs one full-plan prefill
  plus one prefill per rung tried; decoding then costs only the rung's layers.
- ``oracle`` (research, greedy only): generates with the full plan, then with each rung from the smallest up, and
  keeps the first rung whose output equals the full plan's. It shows the least depth a request could have used.

The ladder is the plan's ``ladder`` when it has one (``dlexport plan calibrate`` writes a greedy-removal ladder);
otherwise ``evenly_nested_ladder`` builds one without calibration (``ablation_ladder`` is a cheap calibrated one). The plan's own layers are always the top rung.
A batch shares one rung (every row must reach the threshold), since a layer runs for the whole batch.
"""
from __future__ import annotations

import torch

from .. import checks
from ..errors import InputError
from .decode import Strategy, run_to_end
from .plan import Plan, PlanError
from .state import DecodeState

CONTROLLERS = ("fixed", "prompt", "oracle")
DEFAULT_DROPS = (0.4, 0.25, 0.15, 0.07)


def evenly_nested_ladder(layers, drops=DEFAULT_DROPS) -> tuple[tuple[int, ...], ...]:
    """Nested rungs that drop a fraction of the interior layers (never the first or last), spread evenly.

    Interior layers are dropped in van der Corput order (1/2, 1/4, 3/4, 1/8, ...), so every prefix of the drop order
    is spread over the depth and a smaller rung's layers are always a subset of a larger one's.
    """
    layers = tuple(layers)
    interior = layers[1:-1]
    order = sorted(range(len(interior)), key=lambda i: _van_der_corput(i + 1))
    rungs = []
    for fraction in sorted(drops, reverse=True):
        dropped = {interior[i] for i in order[:round(fraction * len(interior))]}
        rung = tuple(i for i in layers if i not in dropped)
        if rung not in rungs:
            rungs.append(rung)
    return tuple(rungs)


def _van_der_corput(n: int) -> float:
    x, base = 0.0, 0.5
    while n:
        x, n, base = x + base * (n & 1), n >> 1, base / 2
    return x


def ablation_ladder(runtime, plan: Plan, ids: torch.Tensor, drops=(6, 4, 3, 2, 1)):
    """Nested rungs from single-layer ablation: each interior plan layer is skipped alone on calibration token ids
    [batch, tokens] (teacher forced), and the layers whose absence changes the fewest next-token predictions are
    dropped first. Returns (rungs smallest first, fraction of predictions each layer's absence changed)."""
    reference = _teacher_forced(runtime, plan.layers, ids)
    damage = {}
    for i in plan.layers[1:-1]:
        changed = _teacher_forced(runtime, tuple(x for x in plan.layers if x != i), ids) != reference
        damage[i] = float(changed.float().mean())
    order = sorted(damage, key=damage.get)
    rungs = tuple(tuple(x for x in plan.layers if x not in order[:d]) for d in sorted(drops, reverse=True))
    return rungs, damage


def _teacher_forced(runtime, layers, ids: torch.Tensor) -> torch.Tensor:
    batch, tokens = ids.shape
    cache = runtime.new_cache(layers, batch, tokens)
    cache.valid[:] = True
    positions = torch.arange(tokens, device=runtime.device).expand(batch, -1)
    with torch.inference_mode():
        seg = runtime.embed(ids.to(runtime.device), positions)
        runtime.run_layers(seg, layers, cache)
        return runtime.logits(seg.hidden).argmax(-1)


def ladder_for(plan: Plan) -> tuple[tuple[tuple[int, ...], ...], str]:
    """(rungs smallest first with the plan's layers on top, where they came from)."""
    rungs, source = (plan.ladder, "plan") if plan.ladder else (evenly_nested_ladder(plan.layers), "evenly nested")
    outside = sorted({i for r in rungs for i in r} - set(plan.layers))
    if outside:
        raise PlanError(f"ladder rungs run layers {outside} that the plan's 'layers' do not; the plan's layers are "
                        "the top rung, so every rung must be a subset of them")
    rungs = tuple(tuple(r) for r in rungs if tuple(r) != tuple(plan.layers))
    return rungs + (tuple(plan.layers),), source


class PerSequence(Strategy):
    """Choose one rung of the ladder for the whole request during prefill, then decode plainly on it."""

    name = "per-sequence"

    def __init__(self, runtime, plan: Plan, sampling, *, controller: str = "prompt", rung: int = -1,
                 threshold: float = 0.9):
        if controller not in CONTROLLERS:
            raise InputError(f"unknown depth controller {controller!r}; choose {', '.join(CONTROLLERS)}")
        if controller == "oracle" and not sampling.greedy:
            raise InputError("the oracle controller compares outputs token for token, so it needs greedy decoding "
                             "(temperature 0)")
        checks.integer(rung, "rung", None, None)
        checks.number(threshold, "threshold (prompt agreement a rung needs)")
        self.rungs, self.source = ladder_for(plan)
        if controller == "fixed" and not -len(self.rungs) <= rung < len(self.rungs):
            raise InputError(f"rung {rung} does not exist: this ladder has rungs 0..{len(self.rungs) - 1}")
        self.runtime, self.controller, self.rung, self.threshold = runtime, controller, rung, threshold
        self.info: dict = {}

    def prefill(self, state: DecodeState) -> tuple[DecodeState, torch.Tensor]:
        choose = {"fixed": self._fixed, "prompt": self._prompt, "oracle": self._oracle}[self.controller]
        chosen, logits, self.info = choose(state)
        return chosen, logits

    def stats(self) -> dict:
        layers = self.rungs[self.info["rung"]]
        return {**self.info, "strategy": "per-sequence", "controller": self.controller, "ladder_source": self.source,
                "ladder_sizes": [len(r) for r in self.rungs], "rung_layers": len(layers)}

    def _on_rung(self, state: DecodeState, r: int) -> DecodeState:
        layers = self.rungs[r]
        name = f"rung {r} of {len(self.rungs)} ({len(layers)}/{self.runtime.num_layers} layers)"
        return state.fork(Plan.skip(self.runtime.manifest, layers, name=name))

    def _fixed(self, state):
        r = self.rung % len(self.rungs)
        state = self._on_rung(state, r)
        return state, state.prefill(), {"rung": r}

    def _prompt(self, state):
        """The first rung whose teacher-forced prompt predictions agree with the full plan's often enough."""
        full_logits = state.prefill(every_position=True)
        reference, mask = full_logits.argmax(-1), state.valid
        agreement, prefill_layers = [], len(state.plan.layers)
        for r in range(len(self.rungs) - 1):
            rung = self._on_rung(state, r)
            logits = rung.prefill(every_position=True)
            prefill_layers += len(self.rungs[r])
            same = ((logits.argmax(-1) == reference) & mask).sum(1) / mask.sum(1)
            agreement.append(float(same.min()))
            if agreement[-1] >= self.threshold:
                return rung, logits[:, -1], {"rung": r, "prompt_agreement": agreement,
                                             "prefill_layers": prefill_layers}
        return state, full_logits[:, -1], {"rung": len(self.rungs) - 1, "prompt_agreement": agreement,
                                           "prefill_layers": prefill_layers}

    def _oracle(self, state):
        """The smallest rung whose greedy output equals the full plan's (research: it decodes every rung tried)."""
        reference = run_to_end(Strategy(), state.fork(state.plan)).tokens
        top = len(self.rungs) - 1
        chosen = next((r for r in range(top) if run_to_end(Strategy(), self._on_rung(state, r)).tokens == reference),
                      top)
        state = self._on_rung(state, chosen) if chosen < top else state
        return state, state.prefill(), {"rung": chosen, "tried": chosen + 2 if chosen < top else len(self.rungs)}
