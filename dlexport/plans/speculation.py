"""What self-speculation buys on one model: the speculation section of `dlexport analyze`.

The draft comes from `plan calibrate-draft`'s search (``DraftSearch``: every prefix, then greedy layer removal for
a bounded time) on fitting text; its acceptance is then measured teacher-forced on held-out text, so the predicted
speedup is not flattered by the selection. Two kinds of text: held-out prose, and *repetitive* text (a held-out
passage quoted three times; acceptance is scored on the third copy, whose continuation the context gives away), for
which the draft is re-chosen among the prefixes and the best skip sets, on repeated fitting text. The measured part
is a short interleaved timed run of ``Runtime.generate(strategy="speculative")`` (the draft at its k, fixed;
adaptive, as deployed; and adaptive with prompt lookup first) against plain greedy on held-out prompts, every output
compared token for token.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..runtime.plan import Draft, Plan
from ..runtime.speculative import DRAFT_OVERHEAD, VERIFY_EXTRA
from .draft import HEAD_FILE, DraftSearch, choose, write_draft_head

WORTHWHILE_SPEEDUP = 1.05  # below this a gain is within the cost model's (and the timer's) error
QUOTE_START = 4  # tokens of the third copy given in a repetitive prompt; the rest is the continuation
RESCORED_SKIP_SETS = 3  # skip sets from the prose search re-scored on repetitive text
LOOKUP = 3  # the n-gram the timed run's prompt-lookup configuration matches


def repeated(rows: torch.Tensor, passage: int, copies: int = 3) -> torch.Tensor:
    """Each row's first token (the tokenizer's <bos>, where it has one) then its next ``passage`` tokens, ``copies``
    times: text whose last copy the model can read off its context."""
    return torch.cat([rows[:, :1]] + [rows[:, 1:1 + passage]] * copies, dim=1)


def speculation(o, export_dir, fit_ids: torch.Tensor, held_ids: torch.Tensor, *, budget_s: float = 60.0,
                k: int = 4, coverage: float = 0.99, search_seqs: int = 2, measure: bool = True,
                prompts: int = 4, prompt_tokens: int = 32, new_tokens: int = 32, threads: int | None = None,
                progress: bool = True, log=print) -> dict:
    """The report section: the search, and per text kind the best draft, its held-out acceptance, its k, the
    predicted speedup and (``measure``) the measured one."""
    t0 = time.perf_counter()
    search = DraftSearch(o.stack, o.manifest, fit_ids, coverage, k)
    search.remove_layers(time.perf_counter() + budget_s, search_seqs, progress, log)
    passage = min(48, held_ids.shape[1] - 1, fit_ids.shape[1] - 1)
    copy = slice(1 + 2 * passage, 3 * passage)  # positions predicting the third copy's tokens 2..passage
    rep_fit, rep_held = repeated(fit_ids[:8], passage), repeated(held_ids[:8], passage)

    prose = search.best()
    skips = sorted((s for s, v in search.candidates.items() if v["kind"] == "skip"),
                   key=lambda s: -search.candidates[s]["speedup"])[:RESCORED_SKIP_SETS]
    rep_candidates = search.rescore(rep_fit, copy, skips)
    rep = choose({s: search.score(s, a)[0] for s, a in rep_candidates.items()})

    kinds, drafts, hidden = [], {}, None
    for name, layers, fit_alpha, ids, positions in (
            ("prose", prose, search.candidates[prose]["acceptance"], held_ids, slice(None)),
            ("repetitive", rep, rep_candidates[rep], rep_held, copy)):
        alpha, h, ref = search.acceptance(layers, ids, positions)
        hidden = h[:2] if hidden is None else hidden
        _, draft_k = search.score(layers, fit_alpha)  # chosen on fitting text, as `plan calibrate-draft` does
        kinds.append({
            "text": name, "layers": list(layers), "kind": search.candidates[layers]["kind"], "k": draft_k,
            "acceptance_fit": round(fit_alpha, 4),
            "acceptance": round(alpha, 4), "vocabulary_coverage": round(float(
                torch.isin(ref[:, positions], search.vocab).double().mean()), 4),
            "draft_cost": round(search.draft_cost(layers), 4),
            "predicted_speedup": round(search.speedup(layers, alpha, draft_k), 4)})
        drafts[name] = Draft(layers, draft_k, False)
    section = {
        "search": {"budget_s": budget_s, "fit_sequences": int(fit_ids.shape[0]), "removal_steps": search.steps,
                   "skip_sets_scored": sum(v["kind"] == "skip" for v in search.candidates.values()),
                   "prefix_acceptance_fit": {str(len(s)): round(v["acceptance"], 4)
                                             for s, v in search.candidates.items() if v["kind"] == "prefix"},
                   "repetitive": {"passage_tokens": passage, "copies": 3, "fit_sequences": int(rep_fit.shape[0]),
                                  "held_out_sequences": int(rep_held.shape[0]),
                                  "candidates_scored": len(rep_candidates),
                                  "prefix_acceptance_fit": {str(len(s)): round(a, 4) for s, a in
                                                            rep_candidates.items() if s == tuple(range(len(s)))}}},
        "vocabulary": {"tokens": int(search.vocab.numel()), "of": o.manifest.arch["vocab_size"],
                       "coverage_target": coverage, "head_cost_layers": round(search.head_cost, 4),
                       "full_head_cost_layers": round(search.full_head_cost, 4)},
        "cost_model": {"plan_cost": round(search.plan_cost, 4), "overhead": DRAFT_OVERHEAD,
                       "verify_extra": VERIFY_EXTRA, "source": "exported weight sizes (runtime/speculative.py)"},
        "kinds": kinds, "measured": None,
    }
    if measure:
        prompts_by_kind = {"prose": held_ids[:prompts, :prompt_tokens],
                           "repetitive": rep_held[:prompts, :1 + 2 * passage + QUOTE_START]}
        tokens_by_kind = {"prose": new_tokens, "repetitive": min(new_tokens, passage - QUOTE_START)}
        from ..runtime import Runtime

        torch_threads = torch.get_num_threads()
        rt = Runtime.load(export_dir, threads=threads)
        torch.set_num_threads(torch_threads)  # loading gives torch the engines' count: the analysis keeps its own
        with tempfile.TemporaryDirectory(prefix="dlexport-draft-head-") as tmp:
            (Path(tmp) / HEAD_FILE).parent.mkdir()
            ref_, _ = write_draft_head(Path(export_dir), o.manifest, search.vocab, Path(tmp), hidden, rt.threads)
            for row in kinds:
                d = replace(drafts[row["text"]], head=ref_, folder=tmp)
                m = row["measured"] = timed(rt, d, prompts_by_kind[row["text"]], tokens_by_kind[row["text"]])
                if m["fixed"]["acceptance"] is not None:  # the cost model checked apart from the prompts' luck
                    m["fixed"]["predicted_at_run_acceptance"] = round(
                        search.speedup(d.layers, m["fixed"]["acceptance"], d.k), 4)
        section["measured"] = {"prompts": kinds[0]["measured"]["prompts"], "threads": kinds[0]["measured"]["threads"],
                               "identical": all(r["measured"]["identical"] for r in kinds)}
    section["verdict"] = verdict(section, o.stack.num_layers)
    section["wall_s"] = round(time.perf_counter() - t0, 1)
    return section


def timed(rt, draft: Draft, prompts: torch.Tensor, new_tokens: int) -> dict:
    """One interleaved run on the runtime ``rt``: per prompt plain greedy, the draft at fixed k, the draft adaptive,
    and adaptive with prompt lookup (``LOOKUP``) first (rotating order), after a warm-up of each; decode time only
    (the prefill is the same work for all). The adaptive drafts learn across the run's requests as they would
    deployed, from a fresh start."""
    plan = Plan.full(rt.manifest)
    adaptive = {"strategy": "speculative", "draft": replace(draft, adaptive=True)}
    configs = {"plain": {}, "fixed": {"strategy": "speculative", "draft": draft}, "adaptive": adaptive,
               "lookup": {**adaptive, "lookup": LOOKUP}}
    names = list(configs)
    for kw in configs.values():
        rt.generate([prompts[0].tolist()], 2, plan, stop_tokens=[], **kw)
    rt.speculators.clear()  # what the warm-up (or another text kind's run) learned
    runs = {n: [] for n in names}
    for i, p in enumerate(prompts.tolist()):
        for name in names[i % len(names):] + names[:i % len(names)]:
            runs[name].append(rt.generate([p], new_tokens, plan, stop_tokens=[], **configs[name]))
    decode = {n: sum(g.total_s - g.prefill_s for g in runs[n]) for n in names}
    identical = all(a.tokens == b.tokens for n in names[1:] for a, b in zip(runs["plain"], runs[n]))
    out = {"prompts": len(runs["plain"]), "prompt_tokens": int(prompts.shape[1]), "new_tokens": new_tokens,
           "threads": rt.threads, "identical": identical,
           "plain_tokens_per_s": round(len(runs["plain"]) * new_tokens / decode["plain"], 3)}
    for n in names[1:]:
        drafted = sum(g.extra["drafted"] for g in runs[n])
        out[n] = {"speedup": round(decode["plain"] / decode[n], 4), "drafted": drafted,
                  "acceptance": round(sum(g.extra["accepted"] for g in runs[n]) / drafted, 4) if drafted else None,
                  "probes": sum(g.extra["probes"] for g in runs[n])}
    looked = sum(g.extra["lookup_drafted"] for g in runs["lookup"])
    out["lookup"].update(rounds=sum(g.extra["lookup_rounds"] for g in runs["lookup"]), lookup_acceptance=round(
        sum(g.extra["lookup_accepted"] for g in runs["lookup"]) / looked, 4) if looked else None)
    return out


def verdict(section: dict, num_layers: int) -> str:
    """One sentence: per text kind whether the best draft pays. The call is the prediction at the held-out
    acceptance (thousands of positions); the short timed run checks the cost model (its speedup against the one
    predicted at the acceptance the run itself saw) and what adaptive deployment costs."""
    parts = []
    for r in section["kinds"]:
        gain = r["predicted_speedup"]
        call = ("pays" if gain >= WORTHWHILE_SPEEDUP else "breaks even" if gain >= 2 - WORTHWHILE_SPEEDUP
                else "does not pay")
        text = (f"on {r['text']} text it {call} (best draft {r['kind']} of {len(r['layers'])}/{num_layers} layers, "
                f"k {r['k']}, held-out acceptance {r['acceptance']:.0%}: predicted {gain:.2f}x")
        m = r.get("measured")
        if m:
            f = m["fixed"]
            at = (f" against {f['predicted_at_run_acceptance']:.2f}x predicted at the run's {f['acceptance']:.0%} "
                  "acceptance" if f.get("predicted_at_run_acceptance") is not None else "")
            text += (f", timed {f['speedup']:.2f}x at fixed k{at}, {m['adaptive']['speedup']:.2f}x adaptive, "
                     f"{m['lookup']['speedup']:.2f}x adaptive with prompt lookup")
        parts.append(text + ")")
    m = section["measured"]
    exact = "" if m is None else (" Speculative output was identical to plain greedy." if m["identical"] else
                                  " SPECULATIVE OUTPUT DIFFERED FROM PLAIN GREEDY: report this.")
    return "Self-speculation: " + "; ".join(parts) + "." + exact


def markdown(section: dict, num_layers: int) -> list[str]:
    v, s = section["vocabulary"], section["search"]
    lines = ["## Self-speculation (draft layers + a cheap draft head, verified by the full model)", "",
             f"Draft search (`plan calibrate-draft`'s): every prefix, then {s['removal_steps']} greedy removal "
             f"steps ({s['skip_sets_scored']} skip sets) in a {s['budget_s']:.0f} s budget, on {s['fit_sequences']} "
             f"fitting sequences; draft head: {v['tokens']} of {v['of']} tokens ({v['head_cost_layers']:.2f} "
             f"layer-units against {v['full_head_cost_layers']:.2f}). Acceptance = teacher-forced agreement of the "
             "draft's token with the full model's on held-out text; repetitive = a held-out passage of "
             f"{s['repetitive']['passage_tokens']} tokens quoted three times, scored on the third copy. Predicted "
             "speedup: expected_speedup at that acceptance and k (runtime/speculative.py's cost model).", "",
             "| text | draft layers | k | acceptance (fit / held-out) | draft-head coverage | predicted | "
             "measured fixed k | measured adaptive | measured adaptive + lookup | identical |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in section["kinds"]:
        m = r.get("measured")
        at = m["fixed"].get("predicted_at_run_acceptance") if m else None
        cells = ([f"{m['fixed']['speedup']:.2f}x" + (f" ({at:.2f}x predicted at the run's acceptance "
                                                     f"{m['fixed']['acceptance']:.3f})" if at is not None else ""),
                  f"{m['adaptive']['speedup']:.2f}x", f"{m['lookup']['speedup']:.2f}x",
                  "yes" if m["identical"] else "**NO**"]
                 if m else ["not measured"] * 3 + [""])
        lines.append(f"| {r['text']} | {r['kind']} {_span(r['layers'])} ({len(r['layers'])}/{num_layers}) | {r['k']} "
                     f"| {r['acceptance_fit']:.3f} / {r['acceptance']:.3f} | {r['vocabulary_coverage']:.3f} | "
                     f"{r['predicted_speedup']:.2f}x | " + " | ".join(cells) + " |")
    m = section["measured"]
    if m:
        runs = "; ".join(f"{r['text']}: prompts of {r['measured']['prompt_tokens']} tokens, "
                         f"{r['measured']['new_tokens']} new tokens, plain {r['measured']['plain_tokens_per_s']:.1f} "
                         "tok/s" for r in section["kinds"])
        lines += ["", f"Measured: one interleaved run of plain greedy, the draft at fixed k, the draft adaptive "
                  f"(as `plan calibrate-draft` writes it) and adaptive with prompt lookup of the last {LOOKUP} tokens "
                  f"first, {m['prompts']} held-out prompts per kind ({runs}), "
                  f"{m['threads']} thread(s); speedup = plain decode time / speculative decode time (prefill "
                  "excluded)."]
    return lines + ["", f"**{section['verdict']}**", ""]


def _span(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, start = [], None
    for a, b in zip(layers, layers[1:] + [None]):
        start = a if start is None else start
        if b != a + 1:
            out.append(f"{start}-{a}" if a > start else str(a))
            start = None
    return ",".join(out)
