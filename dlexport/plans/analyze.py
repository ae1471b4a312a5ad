"""`dlexport analyze`: what each dynamic-depth strategy buys on one model, measured on held-out text.

One run gives: perplexity and agreement vs layers executed for greedy skip, evenly spaced skip and static early exit
(with and without calibrated exit heads); the exit-signal trade-offs (agreement vs predicted speedup, head checks
counted); the per-sequence oracle; what self-speculation buys (plans/speculation.py: the best draft, its held-out
acceptance, predicted and measured speedup); a predicted speedup per strategy; and a plain recommendation. It writes
report.md, report.json and one PNG figure (analyze.png) into one folder.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..checks import integer, number
from ..errors import InputError
from ..files import Journal, OwnedFolder, check_apart, write_json_atomic
from ..runtime.plan import load_plan
from .adapters import fit_adapters
from .calibrate import TextConfig, open_export
from .costs import costs_for
from .exits import CRITERIA, collect_signals, search
from .exits import evaluate as evaluate_policy
from .greedy import GreedyRemoval, even_layers, evaluate
from .oracle import per_sequence_oracle
from .speculation import markdown as speculation_markdown
from .speculation import speculation
from .stack import vocab_subset
from .text import load_splits

TARGETS = (0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
ACCEPTABLE_AGREEMENT = 0.9  # what the recommendation calls usable quality
WORTHWHILE_SPEEDUP = 1.05  # below this a predicted gain is within the cost model's error


def depth_grid(n: int) -> list[int]:
    """Depths reported for skip plans: every depth on small models, steps of 3 down to half on deep ones."""
    return list(range(n, 0, -1)) if n <= 12 else list(range(n, n // 2 - 1, -3))


def _ladder(o, splits, ladder_plan, out: Path, progress: bool):
    n = o.stack.num_layers
    if ladder_plan is not None:
        plan = load_plan(ladder_plan, o.manifest)
        if len(plan.ladder) != n:
            raise InputError(f"{ladder_plan} has {len(plan.ladder)} ladder rungs, not one per depth ({n}): make it "
                             "with `dlexport plan calibrate`, or leave out --plan to run greedy removal here")
        return plan.ladder, {"from": str(ladder_plan), **{k: plan.calibration.get(k) for k in ("metric", "text")}}
    ids = splits["calibration"]
    with torch.inference_mode():
        emb, extras = o.stack.embed(ids)
        vocab = vocab_subset(o.stack, o.stack.run(emb, extras, range(n)), ids)
    rescore = 6 if n > 12 else 0
    greedy = GreedyRemoval(o.stack, ids, "ppl", rescore, vocab)
    journal = Journal(out / ".greedy-progress.json", {"fingerprint": o.manifest.fingerprint, "text": splits.digest,
                                                      "rescore": rescore})
    greedy.run(journal, progress)
    journal.remove()
    return greedy.ladder(), {"from": "greedy removal in this run", "metric": "ppl", "rescore": rescore}


def analyze(export_dir, out, *, text: TextConfig = TextConfig(), ladder_plan=None, adapter_seqs: int = 64,
            profile=None, oracle_prompts: int = 16, prompt_tokens: int = 32, new_tokens: int = 24, loaded=None,
            draft_budget_s: float = 60.0, draft_seqs: int = 32, measure: bool = True, measure_prompts: int = 4,
            measure_tokens: int = 32, only: str | None = None, threads: int | None = None,
            progress: bool = True, log=print) -> dict:
    """``only="speculation"``: just the speculation section (a quick answer, or its timed part on a quiet machine).
    The draft search reads ``draft_seqs`` fitting sequences (the calibration split, then the adapter split)."""
    t0 = time.perf_counter()
    out = Path(out)
    if only not in (None, "speculation"):
        raise InputError(f"only={only!r}: the one section that runs alone is 'speculation' (or leave it out)")
    number(draft_budget_s, "--draft-budget", 0.0, None)
    integer(draft_seqs, "--draft-seqs", 1, None)
    integer(measure_prompts, "--measure-prompts", 1, None)
    integer(measure_tokens, "--measure-tokens", 2, None)
    check_apart(out, [export_dir])
    OwnedFolder.inspect(out, "analysis")
    o = open_export(export_dir, loaded)
    own = OwnedFolder.claim(out, "analysis", o.manifest.fingerprint, overwrite=None, inputs=[export_dir])
    own.add("report.json", "report.md", "analyze.png", ".greedy-progress.json")
    n = o.stack.num_layers
    costs, cost_note = costs_for(export_dir, o.stack, profile)
    splits = load_splits(o.tokenizer, text.sizes(adapter=adapter_seqs), text.seq_len, text.data or None, text.seed,
                         o.tokenizer_name)
    evals = splits["evaluation"]
    report = {
        "model": {"source": o.manifest.data.get("source"), "fingerprint": o.manifest.fingerprint, "layers": n},
        "text": {**splits.describe(), "sources": [str(p) for p in text.data] or "machine prose"},
        "costs": costs.to_json(), "cost_note": cost_note,
    }
    if only is None:
        ladder, ladder_info = _ladder(o, splits, ladder_plan, out, progress)
    fit = torch.cat([splits["calibration"], splits["adapter"]])[:draft_seqs]
    if progress:
        log(f"speculation: draft search ({draft_budget_s:.0f} s budget){', then a timed run' if measure else ''}")
    spec = speculation(o, export_dir, fit, evals, budget_s=draft_budget_s, search_seqs=min(2, len(fit)),
                       measure=measure, prompts=measure_prompts, prompt_tokens=min(prompt_tokens, text.seq_len),
                       new_tokens=measure_tokens, threads=threads, progress=progress, log=log)
    if only == "speculation":
        return _write(report | {"speculation": spec, "threads": torch.get_num_threads()}, out, t0, log)

    grid = depth_grid(n)
    sets = {f"greedy {k}": ladder[k - 1] for k in grid[1:]}
    sets.update({f"even {k}": even_layers(n, k) for k in grid[1:]})
    sets["full"] = tuple(range(n))
    held, _ = evaluate(o.stack, evals, sets, progress=progress)
    full = held["full"]

    adapters = fit_adapters(o.stack, splits["adapter"], range(n - 1), progress=progress)
    sig = {"raw": (collect_signals(o.stack, splits["calibration"], None, progress),
                   collect_signals(o.stack, evals, None, progress)),
           "adapters": (collect_signals(o.stack, splits["calibration"], adapters, progress),
                        collect_signals(o.stack, evals, adapters, progress))}

    skip_rows = []
    for k in grid:
        row = {"layers": k, "predicted_speedup": round(costs.speedup(n, k), 3)}
        for kind in ("greedy", "even"):
            s = full if k == n else held[f"{kind} {k}"]
            row[kind] = s.to_json()
        for kind, (_, ev) in sig.items():
            row[f"exit_{kind}"] = {"ppl": round(math.exp(float(ev.nll[k - 1])), 4),
                                   "agreement": round(float(ev.agree[k - 1].float().mean()), 5)}
        skip_rows.append(row)

    tradeoffs = []
    for kind, (cal, ev) in sig.items():
        for target in TARGETS:
            found = search(cal, costs, target)
            for criterion in CRITERIA:
                pol = found[criterion]
                if pol is None:
                    tradeoffs.append({"heads": kind, "target": target, "criterion": criterion, "reached": False})
                    continue
                h = evaluate_policy(pol, ev, costs)
                tradeoffs.append({"heads": kind, "target": target, "criterion": criterion, "reached": True,
                                  "calibration": pol.to_json(), "held_out": h.to_json()})

    with torch.inference_mode():
        oracle = per_sequence_oracle(o.stack, evals[:oracle_prompts, :prompt_tokens], ladder, new_tokens)
    oracle["predicted_speedup"] = round(costs.speedup(n, oracle["mean_layers"]), 3)

    report.update({
        "ladder": {**ladder_info, "rungs": [list(r) for r in ladder]},
        "full": full.to_json(), "skip": skip_rows, "exit_tradeoffs": tradeoffs, "oracle": oracle,
        "per_layer_agreement": {kind: [round(float(a), 4) for a in ev.agree.float().mean(1)]
                                for kind, (_, ev) in sig.items()},
        "speculation": spec, "threads": torch.get_num_threads(),
    })
    return _write(report, out, t0, log)


def _write(report: dict, out: Path, t0: float, log) -> dict:
    report["recommendation"] = recommend(report)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(out / "report.json", report)
    if "skip" in report:
        _plots(report, out)
    (out / "report.md").write_text(markdown(report))
    log(f"analysis of {report['model']['source']} written to {out} ({report['wall_s']:.0f} s)")
    return report


def _best_exit(report, heads: str, target: float):
    rows = [r for r in report["exit_tradeoffs"] if r["heads"] == heads and r["reached"]
            and r["target"] == target]
    return max(rows, key=lambda r: r["held_out"]["speedup"], default=None)


def recommend(report) -> list[str]:
    """Plain sentences from the numbers: which strategy pays on this model, and which does not."""
    if "skip" not in report:  # only the speculation section ran
        return [report["speculation"]["verdict"]]
    n, full = report["model"]["layers"], report["full"]
    lines = []
    usable = [r for r in report["skip"] if r["layers"] < n and r["greedy"]["agreement"] >= ACCEPTABLE_AGREEMENT]
    best_skip = min(usable, key=lambda r: r["layers"], default=None)
    if best_skip:
        g = best_skip["greedy"]
        lines.append(f"Static skip pays: the greedy plan with {best_skip['layers']}/{n} layers keeps "
                     f"{g['agreement']:.0%} top-1 agreement (perplexity {g['ppl']:.1f} vs {full['ppl']:.1f}) for a "
                     f"predicted {best_skip['predicted_speedup']:.2f}x; use `dlexport plan calibrate "
                     f"--target-layers {best_skip['layers']}`.")
    else:
        r = next((r for r in report["skip"] if r["layers"] < n), None)
        if r:
            lines.append(f"Static skip does not pay at {ACCEPTABLE_AGREEMENT:.0%} agreement: even the mildest "
                         f"greedy plan ({r['layers']}/{n} layers, {r['predicted_speedup']:.2f}x predicted) keeps "
                         f"{r['greedy']['agreement']:.0%} agreement (perplexity {r['greedy']['ppl']:.1f} vs "
                         f"{full['ppl']:.1f}); use it only where that loss is acceptable.")
    shallower = [r for r in report["skip"] if r["layers"] < n]
    mid = shallower[0] if shallower else None
    if mid:
        pairs = "; ".join(f"{r['layers']} layers {r['greedy']['ppl']:.1f} vs {r['even']['ppl']:.1f}"
                          for r in shallower[:3])
        lines.append(f"Choose layers by calibration, never evenly: held-out perplexity of greedy vs evenly spaced "
                     f"removal: {pairs}.")
    for heads in ("raw", "adapters"):
        e = _best_exit(report, heads, ACCEPTABLE_AGREEMENT)
        label = "with calibrated exit heads" if heads == "adapters" else "with the shared head"
        hc = report["costs"]["head_in_layers"]
        h = e["held_out"] if e else None
        if h is None or h["speedup"] < WORTHWHILE_SPEEDUP or h["agreement"] < ACCEPTABLE_AGREEMENT - 0.01:
            best = f" (best found: {h['speedup']:.2f}x at {h['agreement']:.0%} held-out agreement)" if h else ""
            lines.append(f"Early exit {label} does not pay: no policy reaches {ACCEPTABLE_AGREEMENT:.0%} agreement "
                         f"at a predicted speedup of {WORTHWHILE_SPEEDUP}x or more{best}; a head check costs "
                         f"{hc:.1f} layers.")
        else:
            lines.append(f"Early exit {label} pays: {e['criterion']} at layers {h['layers']} gives "
                         f"{h['agreement']:.0%} held-out agreement at a predicted {h['speedup']:.2f}x.")
    if mid:
        gap = mid["exit_adapters"]["agreement"] - mid["greedy"]["agreement"]
        verdict = ("calibrated exit heads are worth shipping with truncated or draft depths" if gap > 0 else
                   "the greedy skip plan is the better shallow model here")
        lines.append(f"At {mid['layers']} layers, stopping there and reading a calibrated exit head keeps "
                     f"{mid['exit_adapters']['agreement']:.0%} agreement against {mid['greedy']['agreement']:.0%} "
                     f"for the greedy skip plan: {verdict}.")
    o = report["oracle"]
    verdict = "does not pay" if o["mean_fraction"] > 0.9 else "may pay"
    lines.append(f"Per-sequence depth {verdict}: even an oracle that knows each prompt's answer needs "
                 f"{o['mean_fraction']:.1%} of the layers on average to reproduce {o['new_tokens']} greedy tokens "
                 f"({o['predicted_speedup']:.2f}x at best).")
    return lines + [report["speculation"]["verdict"]]


def markdown(report) -> str:
    m, c, t = report["model"], report["costs"], report["text"]
    if "skip" not in report:
        return "\n".join([f"# What self-speculation buys on {m['source']} ({m['layers']} layers)", "",
                          f"Held-out text: {t['tokens']['evaluation']} tokens ({t['sequences']['evaluation']} "
                          f"sequences of {t['seq_len']}); tokenizer: {t['tokenizer']}; text sha256 {t['sha256']}. "
                          "Only this section ran (`dlexport analyze --only speculation`).", ""]
                         + speculation_markdown(report["speculation"], m["layers"])
                         + [f"Measured in {report['wall_s']:.0f} s with {report['threads']} PyTorch thread(s).", ""])
    full = report["full"]
    lines = [f"# What dynamic depth buys on {m['source']} ({m['layers']} layers)", "",
             f"Held-out text: {t['tokens']['evaluation']} tokens ({t['sequences']['evaluation']} sequences of "
             f"{t['seq_len']}), calibration {t['tokens']['calibration']} tokens, adapters fitted on "
             f"{t['tokens'].get('adapter', 0)} tokens; tokenizer: {t['tokenizer']}; text sha256 {t['sha256']}. "
             f"Full model: perplexity {full['ppl']:.2f}. Costs: {c['source']} (a head call = "
             f"{c['head_in_layers']:.2f} layers). Ladder: {report['ladder']['from']}.", "",
             "## Recommendation", ""] + [f"- {s}" for s in report["recommendation"]] + [
             "", "## Quality vs layers executed (held-out)", "",
             "Agreement = share of positions whose top-1 equals the full model's. Exit at K = the head read after "
             "the first K layers (raw, and through a calibrated exit head).", "",
             "| layers | predicted speedup | greedy skip ppl / agree | even skip ppl / agree | exit at K ppl / agree "
             "| exit at K + adapter ppl / agree |", "|---|---|---|---|---|---|"]
    for r in report["skip"]:
        cells = [f"{r[k]['ppl']:.1f} / {r[k]['agreement']:.3f}" for k in ("greedy", "even", "exit_raw",
                                                                            "exit_adapters")]
        lines.append(f"| {r['layers']} | {r['predicted_speedup']:.2f}x | " + " | ".join(cells) + " |")
    lines += ["", "## Early-exit policies (chosen on calibration, reported on held-out)", "",
              "Cost per token = layers run + one head call per exit check (+ the final head when it never exits). "
              "The deeper key/values of an exited token are filled later, batched with the next token; that fill "
              "is counted as free (a bandwidth-bound decode step), so these speedups are upper bounds.", "",
              "| heads | target | criterion | exit layers | held-out agreement | exit rate | mean layers | "
              "predicted speedup |", "|---|---|---|---|---|---|---|---|"]
    for r in report["exit_tradeoffs"]:
        if not r["reached"]:
            lines.append(f"| {r['heads']} | {r['target']} | {r['criterion']} | not reached | | | | |")
            continue
        h = r["held_out"]
        lines.append(f"| {r['heads']} | {r['target']} | {r['criterion']} | {h['layers']} | {h['agreement']:.3f} | "
                     f"{h['exit_rate']:.3f} | {h['mean_layers']:.1f} | {h['speedup']:.2f}x |")
    pla = report["per_layer_agreement"]
    picks = [i for i in (10, 20, 25) if i < m["layers"] - 1] or list(range(m["layers"] - 1))
    lines += ["", "## Per-layer agreement with the final prediction (held-out)", "",
              "| layer | shared head | calibrated exit head |", "|---|---|---|"]
    lines += [f"| {i} | {pla['raw'][i]:.3f} | {pla['adapters'][i]:.3f} |" for i in picks]
    o = report["oracle"]
    lines += ["", "## Per-sequence oracle", "",
              f"{o['prompts']} held-out prompts of {o['prompt_tokens']} tokens, {o['new_tokens']} greedy tokens each: "
              f"the fewest ladder layers whose reply equals the full model's average {o['mean_layers']:.1f} of "
              f"{m['layers']} ({o['mean_fraction']:.1%}; predicted speedup at best {o['predicted_speedup']:.2f}x).",
              ""] + speculation_markdown(report["speculation"], m["layers"]) + [
              "![what dynamic depth buys](analyze.png)", "",
              f"Measured in {report['wall_s']:.0f} s with {report['threads']} PyTorch thread(s) "
              "(`dlexport analyze`).", ""]
    return "\n".join(lines)


def _plots(report, out: Path) -> None:
    """One figure (analyze.png): quality vs depth (perplexity, agreement), exit trade-offs, per-layer agreement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["skip"]
    ks = [r["layers"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    series = [("greedy", "greedy skip"), ("even", "evenly spaced skip"), ("exit_raw", "exit at K"),
              ("exit_adapters", "exit at K + adapter")]
    for key, label in series:
        axes[0, 0].plot(ks, [r[key]["ppl"] for r in rows], marker="o", label=label)
        axes[0, 1].plot(ks, [r[key]["agreement"] for r in rows], marker="o", label=label)
    axes[0, 0].set_yscale("log")
    axes[0, 0].set_ylabel("held-out perplexity")
    axes[0, 1].set_ylabel("agreement with the full model")
    for ax in axes[0]:
        ax.set_xlabel("layers executed")
        ax.invert_xaxis()
    axes[0, 1].legend()
    for heads, ls in (("raw", "-"), ("adapters", "--")):
        for criterion in CRITERIA:
            pts = [(r["held_out"]["speedup"], r["held_out"]["agreement"]) for r in report["exit_tradeoffs"]
                   if r["heads"] == heads and r["criterion"] == criterion and r["reached"]]
            if pts:
                axes[1, 0].plot(*zip(*pts), ls, marker="o", label=f"{criterion} ({heads} heads)")
    axes[1, 0].axvline(1.0, color="grey", lw=0.8)
    axes[1, 0].set_xlabel("early exit: predicted speedup (head checks counted)")
    axes[1, 0].set_ylabel("held-out agreement")
    axes[1, 0].legend(fontsize=7)
    for heads, label in (("raw", "shared head"), ("adapters", "calibrated exit head")):
        axes[1, 1].plot(range(report["model"]["layers"]), report["per_layer_agreement"][heads], marker=".",
                        label=label)
    axes[1, 1].set_xlabel("layer")
    axes[1, 1].set_ylabel("agreement with the final prediction")
    axes[1, 1].legend()
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report['model']['source']}: what dynamic depth buys (held-out text)")
    fig.tight_layout()
    fig.savefig(out / "analyze.png", dpi=100)
    plt.close(fig)
