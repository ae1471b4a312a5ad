"""Self-speculative decoding: draft with some of the plan's own layers, verify with the whole plan in one pass.

A round starts with every plan layer caching positions < t and x_t, the last emitted token, not yet run.

1. Draft: k one-token steps through the draft layers and the exit head (with the plan's calibrated
   adapter at the draft's last layer, when it has one) give d_1..d_k (q_1..q_k when sampling).
2. Verify: [x_t, d_1..d_k] run through every plan layer as k+1 new tokens in one pass, giving p_0..p_k, and
   rewrite the key/values the draft wrote. Where the plan's layers are one run that pass is one layer-group call,
   whose tap outputs also give the hidden state at any depth the online depth search scores. (Keeping the shared
   prefix's key/values and hidden states from the draft would save its layers for k tokens but split the pass in
   two sessions; on a memory-bound decode k+1 tokens cost little more than one.)
3. Accept the longest prefix d_1..d_j every row agrees with, emit it plus one more token per row (the correction,
   or the bonus token when all k agree), and roll every layer back to t+j+1 by moving its length.

One cache serves both: draft layers write provisional key/values for the drafted positions into the plan's
buffers, and verification overwrites them. A skip-set draft thus attends to the full plan's
key/values of the accepted history (as in Draft & Verify), needs no second cache and never catches up.

Greedy rounds emit argmax p_i, so the output is plain greedy decoding's. Sampling accepts d_i with probability
min(1, p/q) and otherwise draws from max(0, p - q) normalised, so each token follows the full plan's distribution.
A switched-off speculator runs the plain step itself (``Strategy.step``) and probes the draft at a bounded rate
(``Speculator``), so a request whose text turns predictable gets the draft back.
With a batch, rows accept the common prefix (a row's token at position i is decided before it is known whether
the round reaches i, so truncating at another row's rejection keeps every row's distribution exact).
Early exit is not combined with speculation: the plan's exit policy only lends its adapter to the draft head.

Where drafts come from: the draft's layers (a prefix or a skip set of the plan's, through the exit head or a cheap
draft head), moved online by the depth search (prefix drafts, ``Speculator``) or the skip-set search
(``SkipSearch``); and, with ``lookup``, the request's own text (``Lookup``), tried first. What a request learns
carries to the next request with the same plan and draft (``Speculator.resume``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checks
from .decode import Strategy
from .plan import Draft, Plan, PlanError, check_draft_head
from .sampling import Sampling, probabilities
from .state import DecodeState, StepStats


# -- the acceptance step (pure, tested on fixed distributions) -----------------------------------------------------
def accept(draft: torch.Tensor, target_logits: torch.Tensor, q: torch.Tensor | None, sampling: Sampling,
           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decide a round: draft [B, k] tokens, target_logits [B, k+1, V], q [B, k, V] draft probabilities (sampling).

    Returns (outcome [B, k+1], accepted [B, k]): outcome[:, i] is the token to emit at position i if the round
    gets there (d_i when accepted, else the correction; the last one is the bonus token).
    """
    b, k1, v = target_logits.shape
    if sampling.greedy:
        outcome = target_logits.argmax(-1)
        return outcome, draft == outcome[:, :-1]
    p = probabilities(target_logits.reshape(b * k1, v), sampling).view(b, k1, v)
    p_d = p[:, :-1].gather(-1, draft[..., None]).squeeze(-1)
    q_d = q.gather(-1, draft[..., None]).squeeze(-1)
    u = torch.rand(p_d.shape, generator=generator, device=p_d.device)
    accepted = u * q_d < p_d
    residual = (p[:, :-1] - q).clamp_(min=0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p[:, :-1])
    dist = torch.cat([residual, p[:, -1:]], dim=1).view(b * k1, v)
    fresh = torch.multinomial(dist, 1, generator=generator).view(b, k1)
    outcome = torch.cat([torch.where(accepted, draft, fresh[:, :-1]), fresh[:, -1:]], dim=1)
    return outcome, accepted


# -- cost model and adaptive draft length ---------------------------------------------------------------------------
def subgraph_costs(manifest) -> tuple[dict[int, float], float]:
    """(cost per layer, head cost) in units of the mean layer, from the exported weight sizes.

    Decoding one token is dominated by reading weights, so a subgraph's file size is its cost; SmolLM2-135M's head
    (49152 x 576) costs about 8 layers, which is what sinks its drafts.
    """
    layers = {i: _size(manifest, manifest.layer_key(i)) for i in range(manifest.num_layers)}
    mean = sum(layers.values()) / len(layers)
    if not mean:
        return {i: 1.0 for i in layers}, 1.0
    return {i: s / mean for i, s in layers.items()}, _size(manifest, "head") / mean


def _size(manifest, name: str) -> int:
    return sum(f.get("size", 0) for f in manifest.subgraph(name).get("files", ()))


def _mean_layer_size(manifest) -> float:
    return sum(_size(manifest, manifest.layer_key(i)) for i in range(manifest.num_layers)) / manifest.num_layers or 1.0


# What the weight sizes leave out, in layer units, fitted on SmolLM2-135M (CPU, 1 thread): a prefix-1 draft with a
# 821-token head at 11% acceptance predicted 1.08x from weights alone and ran at 0.99x. Each drafted token also pays
# an embed call and engine-call overheads (DRAFT_OVERHEAD), and each extra verified position makes the
# verification pass dearer (VERIFY_EXTRA, a fraction of the plan's cost). A shadow probe pays the draft-head call and
# its bookkeeping (PROBE_OVERHEAD): with every step probing, SmolLM2 ran 2.7% (one depth) and 4.6% (three depths)
# slower than plain, 1.0 and 1.8 layer units, against 0.13 and 0.4 from the head's weights.
DRAFT_OVERHEAD, VERIFY_EXTRA, PROBE_OVERHEAD = 1.0, 0.05, 1.0
LOOKUP_K = 8  # the longest prompt-lookup draft (it costs no layers; its length follows its acceptance)
# A skip-set trial's cost per extra position scored: on SmolLM2 a trial of two 29-layer sets over 8 positions took
# 2.98 plain steps (benchmarks/speculative-2026-12-02b/trialcost.py), against 2.1 at VERIFY_EXTRA.
TRIAL_EXTRA = 0.12


def estimate(hits: float, misses: float) -> float:
    """A per-token acceptance estimate from decayed evidence, with half a pseudo-count of each outcome."""
    return (hits + 0.5) / (hits + misses + 1.0)


def backoff(interval: int, base: int, cap: int) -> int:
    """The next interval after a probe or trial that found nothing: doubled from at least ``base``, at most ``cap``."""
    return min(max(interval, base) * 2, cap)


def expected_speedup(k: int, alpha: float, draft_cost: float, plan_cost: float, overhead: float = 0.0,
                     verify_extra: float = 0.0) -> float:
    """Tokens per cost relative to plain decoding, if each drafted token is accepted with probability alpha.

    A round emits (1 - alpha^(k+1)) / (1 - alpha) tokens on average and costs k drafts (each ``draft_cost`` plus
    ``overhead``) plus one verification of k+1 positions (``plan_cost`` * (1 + ``verify_extra`` * k)); plain
    decoding costs ``plan_cost`` per token.
    """
    tokens = k + 1 if alpha >= 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return tokens * plan_cost / (k * (draft_cost + overhead) + plan_cost * (1 + verify_extra * k))


@dataclass
class SkipSearch:
    """Online skip-set search for a skip-set draft (SWIFT-style), at a bounded cost.

    Every ``interval`` tokens the current set and one neighbour (a layer dropped or added, in turn, drawn by its
    own seeded generator so sampling's random stream is untouched) are scored teacher-forced on the last
    ``window`` generated positions: each runs them through its layers on the plan's key/values of the history,
    and its head token is compared with the token the plan emitted next. The two are scored on the same
    positions, so the comparison is paired; the neighbour is adopted when its predicted speedup beats the
    current set's. The interval keeps the scoring under ``budget`` of the plan's cost and doubles after each
    trial that finds nothing better (up to ``max_interval``). The output is unchanged: verification decides
    every token, and the key/values the scoring overwrites are restored.
    """

    layers: tuple[int, ...]
    plan_order: tuple[int, ...]
    set_cost: object  # layer set -> its draft cost per token (layers + draft head), in layer units
    gain: object  # (acceptance, draft cost) -> best predicted speedup
    plan_cost: float
    budget: float = 0.03
    window: int = 8
    max_interval: int = 256
    decay: float = 0.7
    margin: float = 1.02
    seed: int = 0
    trials: int = 0
    moves: int = 0

    def __post_init__(self):
        import random

        self.evidence: dict[tuple[int, ...], list[float]] = {}  # set -> decayed [hits, misses] of its trials
        self.rng = random.Random(self.seed)
        self.neighbour = self.propose()
        self.base_interval = self.interval = self._interval()
        self.next_trial = max(self.window + 1, self.interval)

    def _interval(self) -> int:
        """Tokens between trials that keep them under ``budget`` of the plan's cost."""
        if self.neighbour is None:
            return self.max_interval
        return max(1, math.ceil(self.trial_cost() / (self.budget * self.plan_cost)))

    def trial_cost(self) -> float:
        return (self.set_cost(self.layers) + self.set_cost(self.neighbour)) * (1 + TRIAL_EXTRA * self.window)

    def due(self, n: int) -> bool:
        """A trial at token index ``n``: scheduled, and ``window`` generated positions to score it on."""
        return self.neighbour is not None and n >= self.next_trial and n > self.window

    def propose(self) -> tuple[int, ...] | None:
        """The next neighbour: the current set with one layer dropped or one plan layer added (alternately)."""
        drop = self.trials % 2 == 0
        options = ([tuple(x for x in self.layers if x != i) for i in self.layers] if len(self.layers) > 1 else [])
        adds = [tuple(x for x in self.plan_order if x in self.layers or x == i) for i in self.plan_order
                if i not in self.layers]
        adds = [a for a in adds if len(a) < len(self.plan_order)]  # the whole plan is no draft
        pool = (options if drop else adds) or options or adds
        return self.rng.choice(pool) if pool else None

    def alpha(self, layers) -> float:
        return estimate(*self.evidence.get(layers, (0.0, 0.0)))

    def value(self, layers) -> float:
        return self.gain(self.alpha(layers), self.set_cost(layers))

    def scored(self, n: int, hits: dict[tuple[int, ...], float], positions: int) -> tuple[int, ...] | None:
        """Record a trial at token index ``n`` (hits per set out of ``positions``); return the set to move to."""
        self.trials += 1
        for layers, h in hits.items():
            e = self.evidence.setdefault(layers, [0.0, 0.0])
            e[0], e[1] = e[0] * self.decay + h, e[1] * self.decay + positions - h
        better = self.value(self.neighbour) > self.value(self.layers) * self.margin
        moved = self.neighbour if better else None
        if better:
            self.layers, self.moves = self.neighbour, self.moves + 1
        self.neighbour = self.propose()
        self.base_interval = self._interval()
        self.interval = self.base_interval if better else backoff(self.interval, self.base_interval, self.max_interval)
        self.next_trial = n + self.interval
        return moved


@dataclass
class Lookup:
    """Prompt lookup (Saxena 2023; Hugging Face's ``prompt_lookup_num_tokens``): the draft is what followed the latest
    earlier occurrence of the request's last ``n`` tokens in its own text (prompt and output), up to ``k`` tokens,
    at no layer cost. It pays on text that repeats itself (code, lists, quotes of the prompt), where a layer draft of
    a small model rarely agrees (SmolLM2-135M: 4-5% on such text). A round is tried when a match exists and the
    acceptance estimate predicts a gain, since a failing round costs a verification of k+1 positions; otherwise at
    most every ``interval`` tokens, which doubles after each failure (up to ``max_interval``). Its length is the one
    the estimate predicts best, up to ``k``."""

    n: int
    k: int
    plan_cost: float
    verify_extra: float = VERIFY_EXTRA
    overhead: float = DRAFT_OVERHEAD  # a round's search, bookkeeping and wider embed call, in layer units
    decay: float = 0.95  # slow: the estimate must be able to fall below a one-token lookup's break-even
    max_interval: int = 32
    hits: float = 0.0
    misses: float = 0.0
    interval: int = 1
    next_try: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def alpha(self) -> float:
        """Per-token acceptance estimate of a matched continuation, from an even prior (the first match is tried)."""
        return (self.hits + 1.0) / (self.hits + self.misses + 2.0)

    def gain(self, k: int | None = None) -> float:
        """Tokens per cost against plain decoding for a round of ``k`` (default: the best length)."""
        k = k or self.best_k()  # no layers drafted: the round's overhead is its only draft cost
        return expected_speedup(k, self.alpha, self.overhead / k, self.plan_cost, 0.0, self.verify_extra)

    def best_k(self) -> int:
        return max(range(1, self.k + 1), key=self.gain)

    def due(self, n: int) -> bool:
        return self.gain() > 1.0 or n >= self.next_try

    def continuation(self, seq: torch.Tensor, start: torch.Tensor, done: torch.Tensor, k: int) -> torch.Tensor | None:
        """Up to ``k`` tokens [B, k'] that followed the latest earlier match of each row's last ``n`` tokens in
        ``seq`` [B, L] (row b's text starts at ``start[b]``), or None when a row still running has no match."""
        length, n = seq.shape[1], self.n
        if length <= n or k < 1:
            return None
        windows = seq.unfold(1, n, 1)[:, :-1]  # every earlier window, the suffix itself left out
        where = torch.arange(length - n, device=seq.device)
        hit = (windows == seq[:, None, -n:]).all(-1) & (where >= start[:, None])
        latest = torch.where(hit, where, -1).amax(1)
        if not bool(((latest >= 0) | done).all()):
            return None
        follow = (latest + n).clamp(min=n)
        k = min(k, int(torch.where(done, length, length - follow).min()))
        return seq.gather(1, (follow[:, None] + torch.arange(k, device=seq.device)).clamp(max=length - 1))

    def update(self, n: int, k: int, j: int) -> None:
        """A lookup round at token index ``n`` drafted ``k`` tokens and accepted ``j``."""
        self.rounds, self.drafted, self.accepted = self.rounds + 1, self.drafted + k, self.accepted + j
        self.hits, self.misses = self.hits * self.decay + j, self.misses * self.decay + float(j < k)
        self.interval = 1 if self.gain() > 1.0 else backoff(self.interval, 1, self.max_interval)
        self.next_try = n + j + 1 + self.interval


@dataclass
class Speculator:
    """The draft's layers and the draft length policy of one request.

    Adaptive policy: a request starts with the draft off and *probes* it; a per-token acceptance estimate that
    forgets old evidence (``decay`` per observation) decides, through ``expected_speedup``, whether to draft and
    how far. While off, a request runs plain steps and probes at a bounded rate: every ``interval`` tokens, where
    the interval starts so that failing probes cost at most ``probe_budget`` of the plan's cost and doubles after
    each failed probe (up to ``max_interval``); a hit is followed up at the next token, to gather the evidence that
    switches the draft on. A prefix draft is probed for free of
    layers (a *shadow* probe: its hidden state is the plan's own after the prefix, so only the draft head runs and
    the token emitted is the plain step's); any other draft is probed by a one-token round.

    Online depth search (adaptive prefix drafts): the plan's own hidden state after *any* prefix is what that
    prefix draft would see, so each shadow probe and each verification also scores ``search_per_step`` other
    candidate depths with the draft head (their exact acceptance at the verified positions), and the draft moves
    to the depth with the best predicted speedup. The cost is a few draft-head calls per step, counted in the
    probe cost; the output is unchanged (verification decides every token).
    """

    layers: tuple[int, ...]
    shared: int  # plan layers the draft shares as a prefix
    k_max: int
    adaptive: bool
    draft_cost: float  # draft layers + draft head, per drafted token
    plan_cost: float  # plan layers + head, per plain token
    plan_layers: int
    probe_cost: float = 0.0  # what one probe costs beyond a plain step (the draft head, or a whole draft token)
    probe_budget: float = 0.02  # at most this fraction of the plan's cost goes to probing while off
    max_interval: int = 64
    decay: float = 0.85  # weight of older evidence per new observation
    margin: float = 1.1  # switch the draft on only when the predicted speedup exceeds this
    k: int = 0
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0
    rounds: int = 0  # rounds that drafted
    verifications: int = 0  # all steps, plain ones included
    emitted: int = 0  # tokens the steps produced
    probes: int = 0
    probe_hits: float = 0.0
    switched_on: int = 0
    switched_off: int = 0
    hits: float = 0.0  # decayed evidence behind ``alpha``
    misses: float = 0.0
    interval: int = 1
    next_probe: int = 0  # token index (tokens emitted) at which the next probe is due
    off_message: str = ""
    overhead: float = DRAFT_OVERHEAD
    verify_extra: float = VERIFY_EXTRA
    probe_overhead: float = PROBE_OVERHEAD
    head_cost: float = 0.0  # the draft head alone
    prefix_costs: tuple = ()  # cost of the plan's first d layers, for every d (depth search)
    candidates: tuple = ()  # prefix depths the online search scores (empty: no search)
    search_per_step: int = 2
    min_evidence: float = 3.0  # decayed observations a depth needs before the draft may move there
    depth_moves: int = 0
    plan_order: tuple = ()  # the plan's layers (a prefix of them is the draft)
    layer_cost: dict | None = None  # per layer, in layer units (what a moved draft costs)
    skip: SkipSearch | None = None  # the online skip-set search (adaptive skip-set drafts)
    lookup: Lookup | None = None  # prompt-lookup drafts, tried before the layer draft

    def __post_init__(self):
        self.seen = 0  # the token index of the last step (what a resuming request's schedule continues from)
        self.k = 0 if self.adaptive else self.k_max
        self.evidence = {d: [0.0, 0.0] for d in self.candidates}  # depth -> decayed [hits, misses]
        self._turn = 0
        if self.shadow:
            self.probe_cost += self.probe_overhead + (self.head_cost * self.search_per_step if self.candidates else 0.0)
        self.base_interval = self.interval = self._probe_interval()

    def _probe_interval(self) -> int:
        """Tokens between probes that keep failing probes under ``probe_budget`` of the plan's cost."""
        return max(1, math.ceil(self.probe_cost / (self.probe_budget * self.plan_cost)))

    def gain(self, k: int, alpha: float, draft_cost: float | None = None) -> float:
        return expected_speedup(k, alpha, self.draft_cost if draft_cost is None else draft_cost, self.plan_cost,
                                self.overhead, self.verify_extra)

    # -- online depth search (prefix drafts) -------------------------------------------------------------------
    def scored_depths(self) -> list[int]:
        """The other candidate depths to score this step (round-robin), besides the current one."""
        others = [d for d in self.candidates if d != len(self.layers)]
        if not others:
            return []
        picked = [others[(self._turn + i) % len(others)] for i in range(min(self.search_per_step, len(others)))]
        self._turn += len(picked)
        return picked

    def observe_depth(self, depth: int, hits: float, misses: float) -> None:
        e = self.evidence[depth]
        e[0], e[1] = e[0] * self.decay + hits, e[1] * self.decay + misses

    def _depth_gain(self, depth: int) -> float:
        return self.best_gain(estimate(*self.evidence[depth]), self.prefix_costs[depth] + self.head_cost)

    def _sync_depth(self) -> None:
        """Record the current depth's evidence, then move to the best scored depth."""
        if not self.candidates:
            return
        self.evidence[len(self.layers)] = [self.hits, self.misses]
        self.choose_depth()

    def choose_depth(self) -> None:
        """Move the draft to the scored depth with the best predicted speedup (given enough recent evidence)."""
        current = len(self.layers)
        ok = [d for d in self.candidates if sum(self.evidence[d]) >= self.min_evidence or d == current]
        best = max(ok, key=self._depth_gain)
        if best != current and self._depth_gain(best) > self._depth_gain(current) * 1.02:
            self._to_depth(best)
            self.hits, self.misses = self.evidence[best]
            self.depth_moves += 1

    def _to_depth(self, depth: int) -> None:
        self.layers, self.shared = tuple(self.plan_order[:depth]), depth
        self.draft_cost = self.prefix_costs[depth] + self.head_cost

    def set_cost(self, layers) -> float:
        """A draft through ``layers`` and the draft head, per token."""
        return sum(self.layer_cost[i] for i in layers) + self.head_cost

    def best_gain(self, alpha: float, draft_cost: float) -> float:
        return max(self.gain(n, alpha, draft_cost) for n in range(1, self.k_max + 1))

    def move_to(self, layers: tuple[int, ...]) -> None:
        """Draft with another layer set (a skip-set search move), its trial evidence the acceptance estimate."""
        self.layers, self.shared = layers, 0
        while self.shared < len(layers) and layers[self.shared] == self.plan_order[self.shared]:
            self.shared += 1
        self.draft_cost = self.probe_cost = self.set_cost(layers)
        if self.shadow:
            self.probe_cost = self.head_cost + self.probe_overhead
        self.base_interval = self._probe_interval()
        self.hits, self.misses = self.skip.evidence.get(layers, (0.0, 0.0))
        self._decide()

    def snapshot(self) -> dict:
        """What a later request resumes from (``resume``), as JSON-able data (``Runtime.save_learning``): the draft's
        layers, the decayed acceptance evidence (overall, per depth, per skip set, of prompt lookup) and the probe
        and trial schedules, as tokens still to wait."""
        snap = {"layers": list(self.layers), "hits": self.hits, "misses": self.misses, "interval": self.interval,
                "probe_in": max(0, self.next_probe - self.seen - 1),
                "depths": {str(d): list(e) for d, e in list(self.evidence.items())}}
        if self.skip is not None:
            snap["skip"] = {"layers": list(self.skip.layers), "interval": self.skip.interval,
                            "trial_in": max(0, self.skip.next_trial - self.seen - 1),
                            "sets": [[list(k), list(e)] for k, e in list(self.skip.evidence.items())]}
        if self.lookup is not None:
            snap["lookup"] = [self.lookup.hits, self.lookup.misses]
        return snap

    def resume(self, snap: dict) -> None:
        """Start from what an earlier request with the same plan and draft learned (a ``snapshot``), so that a
        stream of requests converges once instead of every request probing from scratch. The draft still starts
        switched off unless that evidence predicts a gain."""
        self.evidence.update((int(d), list(e)) for d, e in snap["depths"].items() if int(d) in self.evidence)
        skip = snap.get("skip")
        if self.skip is not None and skip is not None:
            self.skip.evidence = {tuple(k): list(e) for k, e in skip["sets"]}
            self.skip.layers, self.skip.interval = tuple(skip["layers"]), skip["interval"]
            self.skip.neighbour = self.skip.propose()
            self.skip.next_trial = max(self.skip.window + 1, skip["trial_in"])
        layers = tuple(snap["layers"])
        if layers != self.layers and self.skip is not None:
            self.move_to(layers)
        elif layers != self.layers and len(layers) in self.evidence:  # a depth the search moved to
            self._to_depth(len(layers))
        self.hits, self.misses = snap["hits"], snap["misses"]
        self.interval, self.next_probe = snap["interval"], snap["probe_in"]
        if self.lookup is not None and "lookup" in snap:
            self.lookup.hits, self.lookup.misses = snap["lookup"]
        if self.adaptive:
            self._decide()

    def blocks(self) -> list[tuple[int, ...]]:
        """The plan's layers a draft may run as its prefix, cut at the shared prefix and at every depth the search
        may move the draft to: each block runs as one layer group, so a draft at any of those depths is a chain of
        whole blocks (a block boundary costs about 0.3% of a step on SmolLM2; the same layers one by one, 10%)."""
        cuts = sorted({0, self.shared, *self.candidates})
        return [self.plan_order[a:b] for a, b in zip(cuts, cuts[1:])]

    @property
    def shadow(self) -> bool:
        """A prefix draft: probed from the plan's own hidden state after the prefix (no draft layer runs)."""
        return self.shared == len(self.layers)

    @classmethod
    def for_plan(cls, runtime, plan: Plan, draft: Draft, head_cost: float | None = None,
                 search: bool | None = None) -> Speculator:
        """``search``: the online search of an adaptive draft (a prefix draft's depth, a skip set's layers); None:
        a prefix draft's when scoring depths is cheap, every skip-set draft's; a number: the skip-set search's
        budget (``SkipSearch.budget``)."""
        missing = sorted(set(draft.layers) - set(plan.layers))
        if missing:
            raise PlanError(f"draft layers {missing} are not in the plan's layers; a self-speculative draft uses a "
                            "subset of the layers it is verified with: drop them from 'draft.layers'")
        if tuple(draft.layers) == tuple(plan.layers):
            raise PlanError("the draft runs every layer of the plan, so it cannot be cheaper than verifying: give "
                            "'draft.layers' fewer layers")
        shared = 0
        while shared < len(draft.layers) and draft.layers[shared] == plan.layers[shared]:
            shared += 1
        layer_cost, full_head = subgraph_costs(runtime.manifest)
        head_cost = full_head if head_cost is None else head_cost
        draft_cost = sum(layer_cost[i] for i in draft.layers) + head_cost
        prefix = shared == len(draft.layers)
        prefix_costs = [0.0]
        for i in plan.layers:
            prefix_costs.append(prefix_costs[-1] + layer_cost[i])
        n = len(plan.layers)
        candidates = ()
        plan_cost = sum(layer_cost[i] for i in plan.layers) + full_head
        cheap = head_cost * cls.search_per_step <= cls.probe_budget * plan_cost  # scoring depths costs <= budget
        if (cheap if search is None else search) and prefix and draft.adaptive and n > 2:
            candidates = tuple(sorted({1, 2, len(draft.layers)} | {max(1, round(n * f)) for f in
                                                                  (0.25, 0.5, 0.7, 0.8, 0.9)} - {n}))
        spec = cls(tuple(draft.layers), shared, draft.k, draft.adaptive, draft_cost, plan_cost, n,
                   probe_cost=head_cost if prefix else draft_cost, head_cost=head_cost,
                   prefix_costs=tuple(prefix_costs), candidates=candidates, plan_order=tuple(plan.layers),
                   layer_cost=layer_cost)
        if (search is not False) and not prefix and draft.adaptive:
            budget = {} if search is None or search is True else {"budget": search}
            spec.skip = SkipSearch(spec.layers, spec.plan_order, spec.set_cost, spec.best_gain, plan_cost, **budget)
        return spec

    @property
    def alpha(self) -> float:
        """Per-token acceptance estimate from recent evidence, with half a pseudo-count of each outcome."""
        return estimate(self.hits, self.misses)

    def next_k(self, n: int, remaining: int) -> int:
        """Draft length for the next step at token index ``n``: 0 for a plain step (or a shadow probe)."""
        self.seen = n
        if remaining <= 1:
            return 0
        if not self.k and self.adaptive and not self.shadow and self.probe_due(n):
            return 1  # a one-token probe round
        return min(self.k, remaining - 1)

    def probe_due(self, n: int) -> bool:
        return self.adaptive and not self.k and n >= self.next_probe

    def _observe(self, hits: float, misses: float) -> None:
        self.hits, self.misses = self.hits * self.decay + hits, self.misses * self.decay + misses

    def probed(self, n: int, hit: float) -> None:
        """A probe at token index ``n`` accepted its token with probability ``hit``; maybe move the draft's depth
        (to one scored along with it) and switch it on."""
        self.probes, self.probe_hits = self.probes + 1, self.probe_hits + hit
        self._observe(hit, 1.0 - hit)
        moves = self.depth_moves
        self._sync_depth()
        # a hit is promising when two more would predict a gain: a dear draft that agrees often but can never pay
        # (SmolLM2's 29-layer skip set: 75% of its probes hit) backs off like a failing one
        optimistic = (self.hits + 2.5) / (self.hits + self.misses + 3.0)
        promising = ((hit >= 0.5 and self.best_gain(optimistic, self.draft_cost) > self.margin)
                     or self.depth_moves > moves)  # or it moved to a depth that did
        # a promising probe is followed up at once (evidence for switching on); failures space probes out
        self.interval = 1 if promising else backoff(self.interval, self.base_interval, self.max_interval)
        self.next_probe = n + self.interval
        self._decide()

    def plain(self, tokens: int = 1) -> None:
        """A step that drafted no layers emitted ``tokens`` (more than one: a prompt-lookup round)."""
        self.verifications, self.emitted = self.verifications + 1, self.emitted + tokens

    def update(self, n: int, k: int, j: int) -> None:
        """A round at token index ``n`` drafted ``k`` tokens and accepted ``j``."""
        self.verifications, self.emitted = self.verifications + 1, self.emitted + j + 1
        self.rounds += 1
        self.drafted, self.accepted, self.rejections = self.drafted + k, self.accepted + j, self.rejections + (j < k)
        if not self.adaptive:
            return
        if not self.k:  # a one-token probe round of a skip-set draft
            self.probed(n, float(j))
            return
        self._observe(j, float(j < k))
        self._sync_depth()
        self._decide()
        if not self.k:
            self.next_probe = n + j + 1 + self.interval

    def _decide(self) -> None:
        alpha = self.alpha
        best = max(range(1, self.k_max + 1), key=lambda m: self.gain(m, alpha))
        gain = self.gain(best, alpha)
        if self.k and gain <= 1.0:
            self.k, self.switched_off = 0, self.switched_off + 1
            self.off_message = (f"speculation switched off after {self.drafted} drafted tokens: acceptance "
                                f"{alpha:.2f} with a draft costing {self.draft_cost:.1f} layer-units per token "
                                f"against {self.plan_cost:.1f} for the plan predicts {gain:.2f}x plain decoding")
        elif self.k or (gain > self.margin and self.hits + self.misses >= self.min_evidence):
            self.switched_on += not self.k
            self.k = best

    def stats(self) -> dict:
        a = self.accepted / self.drafted if self.drafted else 0.0
        spent = (self.drafted * self.draft_cost + self.verifications * self.plan_cost
                 + (self.probes * self.probe_cost if self.shadow else 0.0))
        layers = self.drafted * len(self.layers) + self.verifications * self.plan_layers
        return {"strategy": "speculative", "draft_layers": list(self.layers), "shared_prefix": self.shared,
                "rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted, "acceptance_rate": a,
                "mean_accepted_length": self.accepted / self.rounds if self.rounds else 0.0,
                "final_k": self.k, "draft_cost": self.draft_cost, "plan_cost": self.plan_cost,
                "layers_per_token": layers / self.emitted if self.emitted else None,
                "layer_cost_speedup": self.emitted * self.plan_cost / spent if spent else None,
                "expected_speedup_at_measured_acceptance": self.gain(max(self.k, 1), self.alpha)
                if self.drafted else None, "final_depth": len(self.layers), "depth_moves": self.depth_moves,
                "depths_scored": {d: round(estimate(*e), 3) for d, e in self.evidence.items() if sum(e)},
                "skip_trials": self.skip.trials if self.skip else 0, "skip_moves": self.skip.moves if self.skip else 0,
                "lookup_rounds": self.lookup.rounds if self.lookup else 0,
                "lookup_drafted": self.lookup.drafted if self.lookup else 0,
                "lookup_accepted": self.lookup.accepted if self.lookup else 0,
                "probes": self.probes, "probe_acceptance": self.probe_hits / self.probes if self.probes else None,
                "shadow_probes": self.shadow, "probe_cost": self.probe_cost, "switched_on": self.switched_on,
                "switched_off": self.switched_off, "off_message": self.off_message}


def learning_key(plan: Plan, draft: Draft, search, lookup: int) -> str:
    """What a request's learning is kept under: its plan's layers and its draft's settings, as a JSON string (the
    same in memory and in a file from ``Runtime.save_learning``)."""
    import json

    return json.dumps({"plan": list(plan.layers), "draft": draft.to_json(), "search": search, "lookup": lookup},
                      sort_keys=True)


LEARNING_FORMAT = "dlexport-speculation"


def save_learning(path: Path, manifest, snapshots: dict[str, dict]) -> None:
    """Write what the requests learned (``learning_key`` -> ``Speculator.snapshot``) to ``path`` (replacing only a
    file of this format; written atomically), for a later process to ``load_learning``."""
    from ..files import check_replaceable, write_json_atomic

    check_replaceable(path, LEARNING_FORMAT, "learning file")
    write_json_atomic(Path(path), {"format": LEARNING_FORMAT, "version": 1, "model": manifest.fingerprint,
                                   "entries": snapshots})


def load_learning(path: Path, manifest) -> dict:
    """The snapshots in a ``save_learning`` file, each checked, refused whole (naming the file) when it is not one,
    belongs to another model or holds a malformed entry."""
    from ..errors import CorruptFileError
    from ..files import read_json

    data = read_json(Path(path), "learning file")
    if data.get("format") != LEARNING_FORMAT or data.get("version") != 1:
        raise CorruptFileError(f"{path} is not a {LEARNING_FORMAT} file (version 1) written by Runtime.save_learning")
    if data.get("model") != manifest.fingerprint:
        raise CorruptFileError(f"{path} was learned on another model (fingerprint {data.get('model')!r}, this export "
                               f"{manifest.fingerprint!r}): learn on this one, or load the file with its own export")
    entries = data.get("entries")
    if not isinstance(entries, dict) or not all(_snapshot_ok(v, manifest.num_layers) for v in entries.values()):
        raise CorruptFileError(f"{path}: an entry is malformed (edited, or written by another version): recreate it")
    return entries


def _snapshot_ok(snap, num_layers: int) -> bool:
    def num(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0

    def pair(x):
        return isinstance(x, list) and len(x) == 2 and all(map(num, x))

    def layers(x):
        return (isinstance(x, list) and 0 < len(x) < num_layers and x == sorted(set(x))
                and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_layers for i in x))

    def count(x):
        return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 1 << 20

    try:
        skip, look = snap.get("skip"), snap.get("lookup")
        return (layers(snap["layers"]) and num(snap["hits"]) and num(snap["misses"]) and count(snap["interval"])
                and snap["interval"] >= 1 and count(snap["probe_in"]) and isinstance(snap["depths"], dict)
                and all(d.isdigit() and pair(e) for d, e in snap["depths"].items())
                and (skip is None or (layers(skip["layers"]) and count(skip["interval"]) and skip["interval"] >= 1
                                      and count(skip["trial_in"])
                                      and all(layers(k) and pair(e) for k, e in skip["sets"])))
                and (look is None or pair(look)))
    except (AttributeError, KeyError, TypeError, ValueError):
        return False


# -- the cheap draft head ------------------------------------------------------------------------------------------
class DraftHead:
    """The exit head over a calibrated vocabulary subset (exporter/draft_head.py), used only to draft.

    Its logits are scattered into a full-vocabulary row of -inf: greedy drafts are subset[argmax], and a sampled
    draft's q is zero outside the subset, which the acceptance rule handles exactly (those tokens come only from
    the residual distribution).
    """

    def __init__(self, runtime, path: Path):
        from ..contract import TensorSpec
        from ..engines.onnxruntime import OrtConfig, OrtEngine
        from ..exporter.draft_head import token_ids

        self.runtime, self.key = runtime, f"draft-head:{path}"
        ids = token_ids(path)
        self.ids = torch.tensor(ids, dtype=torch.int64, device=runtime.device)
        if self.key not in runtime.engines:
            dtype = runtime.manifest.dtype
            config = OrtConfig(provider="cuda" if runtime.device.type == "cuda" else "cpu",
                               device_id=runtime.device.index or 0, threads=runtime.threads)
            runtime.engines[self.key] = OrtEngine(
                self.key, path, [TensorSpec("hidden_states", ("batch", "tokens", runtime.manifest.arch["hidden_size"]),
                                            dtype)],
                [TensorSpec("logits", ("batch", "tokens", len(ids)), dtype)], config)
        self.size = path.stat().st_size

    def logits(self, hidden: torch.Tensor, timings: dict | None) -> torch.Tensor:
        """[B, T, hidden] -> [B, T, V] logits, -inf outside the subset."""
        sub = self.runtime.call(self.key, {"hidden_states": hidden.contiguous()}, timings=timings)["logits"]
        full = sub.new_full(sub.shape[:-1] + (self.runtime.manifest.arch["vocab_size"],), float("-inf"))
        return full.index_copy_(-1, self.ids, sub)


# -- the strategy -------------------------------------------------------------------------------------------------
class Speculative(Strategy):
    """Draft-and-verify rounds (module docstring); plain steps once the adaptive policy has switched the draft off."""

    name = "speculative"

    def __init__(self, runtime, plan: Plan, draft: Draft | None = None, search: bool | None = None,
                 memory: bool = True, lookup: int = 0):
        """``memory``: start from what the last request with this plan and draft learned (``Speculator.resume``);
        ``lookup``: n > 0 drafts by prompt lookup of the last n tokens first (``Lookup``), k tokens at a time."""
        draft = draft or plan.draft
        if draft is None:
            raise PlanError("strategy 'speculative' needs draft layers: give the plan a 'draft' entry or pass "
                            "draft=Draft(layers=...) (CLI: --draft-layers)")
        if not isinstance(draft, Draft):
            raise PlanError(f"draft must be a Draft(layers, k, adaptive), got {type(draft).__name__}")
        checks.layer_list(draft.layers, runtime.num_layers, "draft layers")
        self.head, self.vocab = None, runtime.manifest.arch["vocab_size"]
        head_cost = None
        if draft.head is not None:
            check_draft_head(draft)
            self.head = DraftHead(runtime, draft.head_path())
            head_cost = self.head.size / _mean_layer_size(runtime.manifest)
        if not (search is None or isinstance(search, bool) or (isinstance(search, float) and 0 < search <= 1)):
            raise PlanError(f"search must be True, False, None (automatic) or a skip-set search budget in (0, 1] "
                            f"(a share of the plan's cost), got {search!r}")
        if not isinstance(memory, bool):
            raise PlanError(f"memory must be True or False, got {memory!r}")
        checks.integer(lookup, "lookup (the n-gram a prompt-lookup draft matches)", 0, 64,
                       fix="give 0 (off) or the number of tokens to match, e.g. 3")
        self.spec = Speculator.for_plan(runtime, plan, draft, head_cost, search)
        if lookup:
            self.spec.lookup = Lookup(lookup, max(LOOKUP_K, draft.k), self.spec.plan_cost)
        if memory:  # without it a request neither reads nor leaves what requests learn
            key = learning_key(plan, draft, search, lookup)
            prior = runtime.speculators.get(key)
            snap = prior.snapshot() if prior is not None else runtime.learned.get(key)
            if snap is not None:
                self.spec.resume(snap)
            runtime.speculators[key] = self.spec
        for block in self.spec.blocks():  # the draft's runs as groups (verification runs the plan's)
            runtime.open_groups(block)
        runtime.open_groups(self.spec.layers[self.spec.shared:])

    def stats(self) -> dict:
        return self.spec.stats()

    def step(self, state: DecodeState) -> tuple[torch.Tensor, StepStats]:
        """One round: the tokens to emit [B, j+1] and the decoder layers run per emitted token."""
        spec = self.spec
        if spec.skip is not None and spec.skip.due(state.n):
            self._trial(state)
        if spec.lookup is not None and spec.lookup.due(state.n):
            cont = spec.lookup.continuation(state.text_so_far(), state.pad[:, 0],
                                            state.done, min(spec.lookup.best_k(), state.max_new_tokens - state.n - 1))
            if cont is not None:
                return self._lookup_round(state, cont)
        k = spec.next_k(state.n, state.max_new_tokens - state.n)
        if not k:
            if spec.shadow and spec.probe_due(state.n):
                return self._shadow_step(state)
            spec.plain()
            return super().step(state)  # exactly the plain step: a switched-off draft costs nothing
        state.cache.new_step()
        draft, q = self._draft(state, k)
        outcome, j = self._verify(state, draft, q)
        spec.update(state.n, k, j)
        return outcome, StepStats((k * len(spec.layers) + len(state.plan.layers)) / (j + 1), None)

    def _lookup_round(self, state: DecodeState, cont: torch.Tensor) -> tuple[torch.Tensor, StepStats]:
        """Verify a prompt-lookup draft: its q is one-hot (a deterministic draft), so sampling accepts d with
        probability p(d) and otherwise draws from p without d, the full plan's distribution either way."""
        q = None
        if not state.sampling.greedy:
            q = torch.zeros(cont.shape + (self.vocab,), dtype=torch.float32, device=cont.device)
            q.scatter_(-1, cont[..., None], 1.0)
        state.cache.new_step()
        outcome, j = self._verify(state, torch.cat([state.last_tokens(), cont], 1), q)
        self.spec.lookup.update(state.n, cont.shape[1], j)
        self.spec.plain(j + 1)
        return outcome, StepStats(len(state.plan.layers) / (j + 1), None)

    def _verify(self, state: DecodeState, draft: torch.Tensor, q: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """Verify ``draft`` [B, k+1] (the last emitted token, then k drafted ones) in one pass of the plan; return
        the tokens to emit [B, j+1] and j, the drafted tokens accepted. Every plan layer ends at t+j+1."""
        spec, cache, plan, t = self.spec, state.cache, state.plan, state.slot
        k = draft.shape[1] - 1
        for i in plan.layers:  # verification writes every position over the draft's provisional key/values
            cache.rollback(i, t)
        seg = state.embed(draft, state.positions(t, k + 1))
        taps = dict.fromkeys(spec.scored_depths())  # the depth search: other prefix drafts scored on the way
        state.run_layers(seg, plan.layers, taps=taps)
        deeper = self._tapped_logits(state, taps)
        logits = state.logits(seg.hidden)
        outcome, accepted = accept(draft[:, 1:], logits, q, state.sampling, state.generator)
        j = int((accepted | state.done[:, None]).long().cumprod(1).sum(1).min())  # stopped rows never hold back
        for d, dl in deeper.items():  # positions 0..j: their context is the accepted text
            h = float(self._accepts(state, logits[:, :j + 1], outcome[:, :j + 1], dl[:, :j + 1]).prod(1).sum())
            spec.observe_depth(d, h, j + 1 - h)
        for i in plan.layers:
            cache.rollback(i, t + j + 1)
        state.slot = t + j + 1
        return outcome[:, :j + 1], j

    def _shadow_step(self, state: DecodeState) -> tuple[torch.Tensor, StepStats]:
        """A plain step that also scores prefix drafts on the plan's own hidden states after their prefixes.

        The emitted token is the plain step's (no extra randomness is drawn). Scored: the current draft depth and
        the depth search's candidates this step; each outcome is whether that draft's token would have been
        accepted: agreement with the greedy token, or sum(min(p, q)) when sampling. A batch accepts only what every
        row accepts, so the rows' probabilities multiply.
        """
        spec, plan = self.spec, state.plan
        state.cache.new_step()
        seg = state.embed(state.last_tokens(), state.positions(state.slot))
        current = len(spec.layers)
        taps = dict.fromkeys({current, *spec.scored_depths()})
        state.run_layers(seg, plan.layers, taps=taps)  # one pass of the plan, read at each depth on the way
        drafts = {d: x[:, -1] for d, x in self._tapped_logits(state, taps).items()}
        state.slot += 1
        logits = state.logits(seg.hidden[:, -1:])[:, -1]
        tokens = self.pick(state, logits)
        hits = {d: float(self._accepts(state, logits[:, None], tokens, q[:, None]).prod(1).sum())
                for d, q in drafts.items()}
        for d, h in hits.items():
            if d != current:
                spec.observe_depth(d, h, 1.0 - h)
        spec.plain()
        spec.probed(state.n, hits[current])
        return tokens, StepStats(len(plan.layers), None)

    def _trial(self, state: DecodeState) -> None:
        """Score the skip-set search's current set and neighbour on the last ``window`` generated positions.

        Each set runs those tokens teacher-forced through its layers (every layer rolled back to the window's start,
        so it attends to the plan's key/values before it and writes its own over the window), and its draft head's
        token at each position is compared with the token the plan emitted next. The plan's key/values of the
        window are saved before and restored after, so the request goes on exactly as if nothing had run.
        """
        spec, search, cache, t = self.spec, self.spec.skip, state.cache, state.slot
        w, n = search.window, state.n
        inputs, targets = state.out[:, n - 1 - w:n - 1], state.out[:, n - w:n]
        sets = (search.layers, search.neighbour)
        touched = sorted(set(sets[0]) | set(sets[1]))
        saved = {i: (cache.key[i][:, :, t - w:t].clone(), cache.value[i][:, :, t - w:t].clone()) for i in touched}
        hits = {}
        for layers in sets:
            for i in layers:
                cache.rollback(i, t - w)
            cache.new_step()
            seg = state.embed(inputs, state.positions(t - w, w))
            state.run_layers(seg, layers)
            logits = self.draft_logits(state, seg.hidden, layers[-1], every_position=True)
            ok = (logits.argmax(-1) == targets).float()
            hits[layers] = float(torch.where(state.done[:, None], torch.ones_like(ok), ok).prod(0).sum())
        for i, (key, value) in saved.items():
            cache.key[i][:, :, t - w:t].copy_(key)
            cache.value[i][:, :, t - w:t].copy_(value)
            cache.length[i] = t
        cache.new_step()
        moved = search.scored(n, hits, w)
        if moved is not None:
            spec.move_to(moved)

    @staticmethod
    def _accepts(state: DecodeState, target: torch.Tensor, tokens: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
        """[T, B] probability that a draft with logits ``draft`` [B, T, V] has its token accepted at each position,
        given the target logits [B, T, V] and the emitted tokens [B, T] (stopped rows count as accepting)."""
        if state.sampling.greedy:
            ok = (draft.argmax(-1) == tokens).float()
        else:
            b, t, v = target.shape
            p = probabilities(target.reshape(b * t, v), state.sampling)
            q = probabilities(draft.reshape(b * t, v), state.sampling)
            ok = torch.minimum(p, q).sum(-1).view(b, t)
        return torch.where(state.done[:, None], torch.ones_like(ok), ok).T

    def _tapped_logits(self, state: DecodeState, taps: dict) -> dict:
        """Draft logits [B, T, V] at each tapped depth; with the cheap head, all depths in one call (its weights
        read once)."""
        if self.head is None or len(taps) < 2:
            return {d: self.draft_logits(state, h, state.plan.layers[d - 1], every_position=True)
                    for d, h in taps.items()}
        logits = self.head.logits(torch.cat(list(taps.values()), dim=1), state.timings)
        return dict(zip(taps, logits.split(next(iter(taps.values())).shape[1], dim=1)))

    def draft_logits(self, state: DecodeState, hidden: torch.Tensor, layer: int | None = None,
                     every_position: bool = False) -> torch.Tensor:
        """[B, V] draft logits after ``layer`` (default: the draft's last) at the last position of ``hidden``, or
        [B, T, V] at ``every_position``: the cheap draft head when the draft has one, else the exit head (through
        the plan's calibrated adapter there, if any)."""
        if self.head is not None:
            logits = self.head.logits(hidden, state.timings)
        else:
            logits = state.exit_logits(self.spec.layers[-1] if layer is None else layer, hidden)
        return logits if every_position else logits[:, -1]

    def _draft(self, state: DecodeState, k: int):
        """k one-token draft steps from the last emitted token: (tokens [B, k+1] = the last emitted then d_1..d_k,
        q: the draft's probabilities [B, k, V] when sampling, else None)."""
        spec, t = self.spec, state.slot
        tokens, qs = [state.last_tokens()], []
        for i in range(k):
            seg = state.embed(tokens[-1], state.positions(t + i))
            state.run_layers(seg, spec.layers)
            logits = self.draft_logits(state, seg.hidden[:, -1:])
            if state.sampling.greedy:
                tokens.append(logits.argmax(-1, keepdim=True))
            else:
                qs.append(probabilities(logits, state.sampling))
                tokens.append(torch.multinomial(qs[-1], 1, generator=state.generator))
        return torch.cat(tokens, dim=1), torch.stack(qs, dim=1) if qs else None
