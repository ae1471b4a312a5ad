"""Self-speculative decoding: draft with some of the plan's own layers, verify with the whole plan in one pass.

A round starts with every plan layer caching positions < t and x_t, the last emitted token, not yet run.

1. Draft: k one-token steps through the draft layers and the exit head (with the plan's calibrated
   adapter at the draft's last layer, when it has one) give d_1..d_k (q_1..q_k when sampling).
2. Verify: [x_t, d_1..d_k] run through the plan's layers as k+1 new tokens, giving p_0..p_k. The first s plan
   layers that the draft shares as a prefix already hold exact key/values for x_t..d_{k-1}, and the draft kept
   their hidden states, so only d_k still goes through them.
3. Accept the longest prefix d_1..d_j every row agrees with, emit it plus one more token per row (the correction,
   or the bonus token when all k agree), and roll every layer back to t+j+1 by moving its length.

One cache serves both: draft layers past the shared prefix write provisional key/values for the drafted positions
into the plan's buffers, and verification overwrites them. A skip-set draft thus attends to the full plan's
key/values of the accepted history (as in Draft & Verify), needs no second cache and never catches up.

Greedy rounds emit argmax p_i, so the output is plain greedy decoding's. Sampling accepts d_i with probability
min(1, p/q) and otherwise draws from max(0, p - q) normalised, so each token follows the full plan's distribution.
A switched-off speculator runs the plain step itself (``Strategy.step``) and probes the draft at a bounded rate
(``Speculator``), so a request whose text turns predictable gets the draft back.
With a batch, rows accept the common prefix (a row's token at position i is decided before it is known whether
the round reaches i, so truncating at another row's rejection keeps every row's distribution exact).
Early exit is not combined with speculation: the plan's exit policy only lends its adapter to the draft head.
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
from .state import DecodeState, Segment, StepStats


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
# verification pass dearer (VERIFY_EXTRA, a fraction of the plan's cost).
DRAFT_OVERHEAD, VERIFY_EXTRA = 1.0, 0.05


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
    head_cost: float = 0.0  # the draft head alone
    prefix_costs: tuple = ()  # cost of the plan's first d layers, for every d (depth search)
    candidates: tuple = ()  # prefix depths the online search scores (empty: no search)
    search_per_step: int = 2
    min_evidence: float = 3.0  # decayed observations a depth needs before the draft may move there
    depth_moves: int = 0
    plan_order: tuple = ()  # the plan's layers (a prefix of them is the draft)

    def __post_init__(self):
        self.k = 0 if self.adaptive else self.k_max
        self.evidence = {d: [0.0, 0.0] for d in self.candidates}  # depth -> decayed [hits, misses]
        self._turn = 0
        per_probe = self.head_cost * self.search_per_step if self.candidates else 0.0
        self.probe_cost += per_probe
        self.base_interval = self.interval = max(1, math.ceil(self.probe_cost / (self.probe_budget * self.plan_cost)))

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
        h, m = self.evidence[depth]
        alpha = (h + 0.5) / (h + m + 1.0)
        cost = self.prefix_costs[depth] + self.head_cost
        return max(self.gain(n, alpha, cost) for n in range(1, self.k_max + 1))

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
            self.layers, self.shared = tuple(self.plan_order[:best]), best
            self.draft_cost = self.prefix_costs[best] + self.head_cost
            self.hits, self.misses = self.evidence[best]
            self.depth_moves += 1

    @property
    def shadow(self) -> bool:
        """A prefix draft: probed from the plan's own hidden state after the prefix (no draft layer runs)."""
        return self.shared == len(self.layers)

    @classmethod
    def for_plan(cls, runtime, plan: Plan, draft: Draft, head_cost: float | None = None,
                 search: bool | None = None) -> Speculator:
        """``search``: online depth search; None: when the draft is an adaptive prefix and scoring is cheap."""
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
        return cls(tuple(draft.layers), shared, draft.k, draft.adaptive, draft_cost, plan_cost, n,
                   probe_cost=head_cost if prefix else draft_cost, head_cost=head_cost,
                   prefix_costs=tuple(prefix_costs), candidates=candidates, plan_order=tuple(plan.layers))

    @property
    def alpha(self) -> float:
        """Per-token acceptance estimate from recent evidence, with half a pseudo-count of each outcome."""
        return (self.hits + 0.5) / (self.hits + self.misses + 1.0)

    def next_k(self, n: int, remaining: int) -> int:
        """Draft length for the next step at token index ``n``: 0 for a plain step (or a shadow probe)."""
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
        promising = hit >= 0.5 or self.depth_moves > moves  # the draft hit, or moved to a depth that did
        # a promising probe is followed up at once (evidence for switching on); failures space probes out
        self.interval = 1 if promising else min(max(self.interval, self.base_interval) * 2, self.max_interval)
        self.next_probe = n + self.interval
        self._decide()

    def plain(self) -> None:
        self.verifications, self.emitted = self.verifications + 1, self.emitted + 1

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
                "depths_scored": {d: round((e[0] + .5) / (sum(e) + 1), 3) for d, e in self.evidence.items() if sum(e)},
                "probes": self.probes, "probe_acceptance": self.probe_hits / self.probes if self.probes else None,
                "shadow_probes": self.shadow, "probe_cost": self.probe_cost, "switched_on": self.switched_on,
                "switched_off": self.switched_off, "off_message": self.off_message}


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

    def __init__(self, runtime, plan: Plan, draft: Draft | None = None, search: bool | None = None):
        draft = draft or plan.draft
        if draft is None:
            raise PlanError("strategy 'speculative' needs draft layers: give the plan a 'draft' entry or pass "
                            "draft=Draft(layers=...) (CLI: --draft-layers)")
        if not isinstance(draft, Draft):
            raise PlanError(f"draft must be a Draft(layers, k, adaptive), got {type(draft).__name__}")
        checks.layer_list(draft.layers, runtime.num_layers, "draft layers")
        self.head = None
        head_cost = None
        if draft.head is not None:
            check_draft_head(draft)
            self.head = DraftHead(runtime, draft.head_path())
            head_cost = self.head.size / _mean_layer_size(runtime.manifest)
        if search is not None and not isinstance(search, bool):
            raise PlanError(f"search must be True, False or None (automatic), got {search!r}")
        self.spec = Speculator.for_plan(runtime, plan, draft, head_cost, search)
        s = self.spec  # its draft's runs and the verification's rest run as layer groups too (runtime.open_groups)
        for layers in (plan.layers[:s.shared], s.layers[s.shared:], plan.layers[s.shared:]):
            runtime.open_groups(layers)

    def stats(self) -> dict:
        return self.spec.stats()

    def step(self, state: DecodeState) -> tuple[torch.Tensor, StepStats]:
        """One round: the tokens to emit [B, j+1] and the decoder layers run per emitted token."""
        spec = self.spec
        k = spec.next_k(state.n, state.max_new_tokens - state.n)
        if not k:
            if spec.shadow and spec.probe_due(state.n):
                return self._shadow_step(state)
            spec.plain()
            return super().step(state)  # exactly the plain step: a switched-off draft costs nothing
        cache, plan, t = state.cache, state.plan, state.slot
        cache.new_step()
        kept, draft, q = self._draft(state, k)
        seg = state.embed(draft[:, -1:], state.positions(t + k))
        state.run_layers(seg, plan.layers[:spec.shared])
        for i in spec.layers[spec.shared:]:
            cache.rollback(i, t)
        seg = Segment.cat(kept + [seg])
        deeper, ran = {}, spec.shared
        if self.head is not None:  # depth search: deeper prefix drafts scored on the verification's own states
            for d in sorted(d for d in spec.scored_depths() if d > spec.shared):
                state.run_layers(seg, plan.layers[:d], start=ran)
                ran = d
                deeper[d] = self.head.logits(seg.hidden, state.timings)
        state.run_layers(seg, plan.layers, start=ran)
        logits = state.logits(seg.hidden)
        outcome, accepted = accept(draft[:, 1:], logits, q, state.sampling, state.generator)
        j = int((accepted | state.done[:, None]).long().cumprod(1).sum(1).min())  # stopped rows never hold back
        for d, dl in deeper.items():  # positions 0..j: their context is the accepted text
            h = float(self._accepts(state, logits[:, :j + 1], outcome[:, :j + 1], dl[:, :j + 1]).prod(1).sum())
            spec.observe_depth(d, h, j + 1 - h)
        for i in plan.layers:
            cache.rollback(i, t + j + 1)
        state.slot = t + j + 1
        spec.update(state.n, k, j)
        return outcome[:, :j + 1], StepStats((k * len(spec.layers) + len(plan.layers)) / (j + 1), None)

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
        drafts, ran = {}, 0
        for d in sorted({current, *spec.scored_depths()}):
            state.run_layers(seg, plan.layers[:d], start=ran)
            ran = d
            drafts[d] = self.draft_logits(state, seg.hidden[:, -1:], plan.layers[d - 1])
        state.run_layers(seg, plan.layers, start=ran)
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

    def draft_logits(self, state: DecodeState, hidden_last: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """[B, V] draft logits after ``layer`` (default: the draft's last): the cheap draft head when the draft has
        one, else the exit head (through the plan's calibrated adapter there, if any)."""
        if self.head is not None:
            return self.head.logits(hidden_last, state.timings)[:, -1]
        return state.exit_logits(self.spec.layers[-1] if layer is None else layer, hidden_last)

    def _draft(self, state: DecodeState, k: int):
        """k one-token draft steps from the last emitted token.

        Returns (kept: per step the segment after the shared prefix, tokens [B, k+1] = last emitted then d_1..d_k,
        q: draft probabilities [B, k, V] when sampling, else None).
        """
        spec, t = self.spec, state.slot
        tokens, kept, qs = [state.last_tokens()], [], []
        for i in range(k):
            seg = state.embed(tokens[-1], state.positions(t + i))
            state.run_layers(seg, spec.layers[:spec.shared])
            kept.append(seg.clone())
            state.run_layers(seg, spec.layers, start=spec.shared)
            logits = self.draft_logits(state, seg.hidden[:, -1:])
            if state.sampling.greedy:
                tokens.append(logits.argmax(-1, keepdim=True))
            else:
                qs.append(probabilities(logits, state.sampling))
                tokens.append(torch.multinomial(qs[-1], 1, generator=state.generator))
        return kept, torch.cat(tokens, dim=1), torch.stack(qs, dim=1) if qs else None
