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

import time

import torch

from .. import checks
from ..errors import InputError
from .plan import Plan, PlanError
from .runtime import Request
from .speculative import decode

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
        return runtime._call("head", {"hidden_states": seg.hidden})["logits"].argmax(-1)


def ladder_for(plan: Plan) -> tuple[tuple[tuple[int, ...], ...], str]:
    """(rungs smallest first with the plan's layers on top, where they came from)."""
    rungs, source = (plan.ladder, "plan") if plan.ladder else (evenly_nested_ladder(plan.layers), "evenly nested")
    outside = sorted({i for r in rungs for i in r} - set(plan.layers))
    if outside:
        raise PlanError(f"ladder rungs run layers {outside} that the plan's 'layers' do not; the plan's layers are "
                        "the top rung, so every rung must be a subset of them")
    rungs = tuple(tuple(r) for r in rungs if tuple(r) != tuple(plan.layers))
    return rungs + (tuple(plan.layers),), source


def generate_per_sequence(runtime, ids, valid, max_new_tokens: int, plan: Plan, sampling, stops, profile: bool, *,
                          controller: str = "prompt", rung: int = -1, threshold: float = 0.9):
    """Runtime.stream's body for strategy="per-sequence"."""
    if controller not in CONTROLLERS:
        raise InputError(f"unknown depth controller {controller!r}; choose {', '.join(CONTROLLERS)}")
    if controller == "oracle" and not sampling.greedy:
        raise InputError("the oracle controller compares outputs token for token, so it needs greedy decoding "
                         "(temperature 0)")
    checks.integer(rung, "rung", None, None)
    checks.number(threshold, "threshold (prompt agreement a rung needs)")
    rungs, source = ladder_for(plan)
    runtime.profile, runtime._timings = profile, {}
    t0 = time.perf_counter()
    choose = {"fixed": _fixed, "prompt": _prompt, "oracle": _oracle}[controller]
    req, first, info = choose(runtime, ids, valid, max_new_tokens, plan, sampling, stops, rungs,
                              rung=rung, threshold=threshold)
    prefill_s = time.perf_counter() - t0
    chosen = info["rung"]
    info.update(strategy="per-sequence", controller=controller, ladder_source=source,
                ladder_sizes=[len(r) for r in rungs], rung_layers=len(rungs[chosen]))
    for event in decode(req, first, None, t0, prefill_s, info):
        if event.result is not None:
            event.result.plan = f"rung {chosen} of {len(rungs)} ({len(rungs[chosen])}/{runtime.num_layers} layers)"
        yield event


def _rung_plan(runtime, plan: Plan, layers) -> Plan:
    return plan if tuple(layers) == tuple(plan.layers) else Plan.skip(runtime.manifest, layers)


def _fixed(runtime, ids, valid, n, plan, sampling, stops, rungs, *, rung, threshold):
    if not -len(rungs) <= rung < len(rungs):
        raise InputError(f"rung {rung} does not exist: this ladder has rungs 0..{len(rungs) - 1}")
    rung %= len(rungs)
    req = Request(runtime, ids, valid, _rung_plan(runtime, plan, rungs[rung]), sampling, stops, n)
    return req, req.prefill(), {"rung": rung}


def _prompt_logits(req: Request) -> torch.Tensor:
    """Prefill the request's cache and return the logits at every prompt position [B, T, V]."""
    rt = req.runtime
    req.cache.new_step()
    seg = rt.embed(req.ids, req.positions(0, req.ids.shape[1]))
    rt.run_layers(seg, req.plan.layers, req.cache)
    return rt._call("head", {"hidden_states": seg.hidden})["logits"]


def _prompt(runtime, ids, valid, n, plan, sampling, stops, rungs, *, rung, threshold):
    full = Request(runtime, ids, valid, plan, sampling, stops, n)
    full_logits = _prompt_logits(full)
    reference, mask = full_logits.argmax(-1), full.valid
    agreement = []
    for r, layers in enumerate(rungs[:-1]):
        req = Request(runtime, ids, valid, _rung_plan(runtime, plan, layers), sampling, stops, n)
        logits = _prompt_logits(req)
        same = ((logits.argmax(-1) == reference) & mask).sum(1) / mask.sum(1)
        agreement.append(float(same.min()))
        if agreement[-1] >= threshold:
            return req, logits[:, -1], {"rung": r, "prompt_agreement": agreement,
                                        "prefill_layers": len(plan.layers) + sum(map(len, rungs[:r + 1]))}
    return full, full_logits[:, -1], {"rung": len(rungs) - 1, "prompt_agreement": agreement,
                                      "prefill_layers": len(plan.layers) + sum(map(len, rungs[:-1]))}


def _oracle(runtime, ids, valid, n, plan, sampling, stops, rungs, *, rung, threshold):
    def run(layers):
        req = Request(runtime, ids, valid, _rung_plan(runtime, plan, layers), sampling, stops, n)
        first = req.prefill()
        for _ in decode(req, first, None, 0.0, 0.0, {}):
            pass
        return req.out[:, :req.n]

    reference = run(rungs[-1])
    chosen = next((r for r, layers in enumerate(rungs[:-1]) if torch.equal(run(layers), reference)), len(rungs) - 1)
    req = Request(runtime, ids, valid, _rung_plan(runtime, plan, rungs[chosen]), sampling, stops, n)
    return req, req.prefill(), {"rung": chosen, "tried": chosen + 2 if chosen < len(rungs) - 1 else len(rungs)}
