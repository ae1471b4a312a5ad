"""Closing numbers of issue 7: self-speculative decoding and per-sequence depth, measured in one interleaved run.

    python scripts/speculative_depth_bench.py --smollm2 exports/smollm2 --quiet /tmp/dlx/llama-quiet \
        --out benchmarks/speculative-$(date -u +%Y-%m-%d)

1. Speculative: on SmolLM2-135M and on the synthetic best case (random ``llama-quiet``: layers 3.. have their
   output projections scaled by 1e-3, exported to --quiet when missing), every prompt runs plain greedy decoding
   and each speculative configuration, in an order that rotates per prompt (interleaved, so machine load drifts
   hit all alike). Every speculative output is checked token for token against plain greedy. Reported end to end
   and for the decode phase alone, against the theoretical speedup in layer costs and the one attainable on this
   host (with a pass over k+1 positions costing what it was measured to cost against a one-token pass).
2. Per-sequence depth on SmolLM2: a ladder from single-layer ablation on README text under /usr/share/doc, then
   for each prompt the oracle (its tokens are the full model's by construction) and the prompt-agreement
   controller; agreement of the controller's output with the full model's, and the layers each used.

Prompts are real prose (/usr/share/common-licenses, read at run time by dlexport.tools.prompts). ``--sections``
runs one part (the two can run as two processes: only the speculative part measures time). Each part writes
<section>.json; README.md summarises those present in --out.
"""
from __future__ import annotations

import argparse
import gzip
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from dlexport.runtime import Plan, Runtime
from dlexport.runtime.depth import ablation_ladder, ladder_for
from dlexport.runtime.plan import Draft
from dlexport.runtime.speculative import Speculator, expected_speedup
from dlexport.tools.prompts import prose_prompts


def speculative_section(rt: Runtime, configs: dict[str, Draft | None], prompts, new_tokens: int, log) -> dict:
    plan = Plan.full(rt.manifest)
    names = list(configs)
    for draft in configs.values():  # a warm-up of each: its layer groups composed and opened, nothing learned
        rt.generate([prompts[0]["ids"]], 2, plan, stop_tokens=[],
                    **({"strategy": "speculative", "draft": draft, "memory": False} if draft else {}))
    records = {n: [] for n in names}
    for i, p in enumerate(prompts):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            draft = configs[name]
            kw = {"strategy": "speculative", "draft": draft} if draft else {}
            g = rt.generate([p["ids"]], new_tokens, plan, stop_tokens=[], **kw)
            records[name].append(g)
        plain = records["plain"][-1].tokens
        for name in names:
            if records[name][-1].tokens != plain:
                raise AssertionError(f"{name} differs from plain greedy on prompt {i}")
        log(f"  prompt {i + 1}/{len(prompts)}: " + ", ".join(f"{n} {records[n][-1].tokens_per_s:.1f}" for n in names))
    out = {}
    base = sum(g.new_tokens for g in records["plain"]) / sum(g.total_s for g in records["plain"])
    decode_base = decode_rate(records["plain"])
    ratios = {k: pass_ratio(rt, plan, prompts[0]["ids"], k + 1) for k in {d.k for d in configs.values() if d}}
    for name in names:
        gens = records[name]
        tps = sum(g.new_tokens for g in gens) / sum(g.total_s for g in gens)
        row = {"tokens_per_s": tps, "speed_vs_plain": tps / base, "decode_tokens_per_s": decode_rate(gens),
               "decode_speed_vs_plain": decode_rate(gens) / decode_base,
               "mean_layers_per_token": statistics.mean(g.mean_layers for g in gens), "identical_to_plain": True}
        draft = configs[name]
        if draft:
            spec = Speculator.for_plan(rt, plan, draft)
            ratio = ratios[draft.k]
            e = [g.extra for g in gens]
            drafted, accepted = sum(x["drafted"] for x in e), sum(x["accepted"] for x in e)
            alpha = accepted / drafted if drafted else 0.0
            row.update(draft_layers=list(draft.layers), k=draft.k, adaptive=draft.adaptive,
                       acceptance_rate=alpha, drafted=drafted,
                       mean_accepted_length=statistics.mean(x["mean_accepted_length"] for x in e),
                       switched_off=sum(1 for x in e if x["switched_off"]),
                       probes=sum(x["probes"] for x in e),
                       switch_off_message=next((x["off_message"] for x in e if x["off_message"]), ""),
                       layer_cost_speedup=statistics.mean(x["layer_cost_speedup"] for x in e),
                       draft_cost=spec.draft_cost, plan_cost=spec.plan_cost,
                       theoretical_speedup_all_accepted=expected_speedup(draft.k, 1.0, spec.draft_cost,
                                                                         spec.plan_cost),
                       predicted_speedup_at_measured_acceptance=expected_speedup(draft.k, alpha, spec.draft_cost,
                                                                                 spec.plan_cost),
                       verify_pass_ratio=ratio)
            row["attainable_speedup_all_accepted"] = attainable(row, 1.0)
        out[name] = row
    return out


def attainable(r: dict, alpha: float) -> float:
    """A run's speedup at acceptance ``alpha`` with its pass over k+1 positions costing what it was measured to:
    at the run's own acceptance, decode vs plain over this is what the machinery keeps."""
    return expected_speedup(r["k"], alpha, r["draft_cost"], r["plan_cost"],
                            verify_extra=(r["verify_pass_ratio"] - 1) / r["k"])


def decode_rate(gens) -> float:
    """Tokens/s of the decode phase alone: the tokens after the first (which the prefill gives) over the time after
    the prefill. Speculation changes only this phase; a short generation's end-to-end ratio is diluted by the
    prefill both runs share."""
    return sum(g.new_tokens - 1 for g in gens) / sum(g.total_s - g.prefill_s for g in gens)


def pass_ratio(rt: Runtime, plan: Plan, prompt: list[int], positions: int, reps: int = 40) -> float:
    """What one plan pass over ``positions`` new tokens costs against a one-token pass on this host (medians of
    interleaved timings after ``prompt``): the verification's extra cost that layer costs leave out."""
    ids = torch.tensor([prompt], device=rt.device)
    cache = rt.new_cache(plan.layers, 1, ids.shape[1] + positions)
    cache.valid[:] = True
    times = {1: [], positions: []}
    with torch.inference_mode():
        rt.run_layers(rt.embed(ids, torch.arange(ids.shape[1], device=rt.device)[None]), plan.layers, cache)
        sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
        for _ in range(reps):
            for m in times:
                for i in plan.layers:
                    cache.rollback(i, ids.shape[1])
                seg = rt.embed(ids[:, :m], torch.arange(ids.shape[1], ids.shape[1] + m, device=rt.device)[None])
                sync()
                t0 = time.perf_counter()
                rt.run_layers(seg, plan.layers, cache)
                sync()
                times[m].append(time.perf_counter() - t0)
    return statistics.median(times[positions]) / statistics.median(times[1])


def calibration_ids(tokenizer, tokens: int) -> torch.Tensor:
    """Calibration text for the ladder, disjoint from the prompts: package READMEs under /usr/share/doc."""
    texts = []
    for path in sorted(Path("/usr/share/doc").glob("*/README*.gz")):
        texts.append(gzip.open(path, "rt", errors="replace").read())
        ids = tokenizer(" ".join(" ".join(texts).split()), add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            return torch.tensor([ids[:tokens]])
    raise FileNotFoundError("not enough README text under /usr/share/doc for the ladder's calibration")


def depth_section(rt: Runtime, prompts, new_tokens: int, thresholds, log) -> dict:
    log("  ladder: single-layer ablation on /usr/share/doc README text")
    ladder, damage = ablation_ladder(rt, Plan.full(rt.manifest), calibration_ids(rt.tokenizer, 256))
    plan = Plan.skip(rt.manifest, range(rt.num_layers), ladder=ladder)
    rungs, _ = ladder_for(plan)
    source = "single-layer ablation, 256 tokens of /usr/share/doc READMEs (disjoint from the prompts)"
    per_prompt = []
    for i, p in enumerate(prompts):
        t0 = time.perf_counter()
        oracle = rt.generate([p["ids"]], new_tokens, plan, stop_tokens=[], strategy="per-sequence",
                             controller="oracle")
        row = {"prompt": i, "oracle_rung": oracle.extra["rung"], "oracle_layers": oracle.extra["rung_layers"]}
        ref = oracle.tokens[0]
        for th in thresholds:
            g = rt.generate([p["ids"]], new_tokens, plan, stop_tokens=[], strategy="per-sequence",
                            controller="prompt", threshold=th)
            out = g.tokens[0]
            prefix = next((j for j, (a, b) in enumerate(zip(out, ref)) if a != b), len(ref))
            row[f"prompt@{th}"] = {"rung": g.extra["rung"], "layers": g.extra["rung_layers"],
                                   "exact": out == ref, "prefix_agreement": prefix / len(ref),
                                   "token_agreement": sum(a == b for a, b in zip(out, ref)) / len(ref),
                                   "prefill_layers": g.extra["prefill_layers"],
                                   "prompt_agreement": g.extra["prompt_agreement"]}
        per_prompt.append(row)
        log(f"  prompt {i + 1}/{len(prompts)} ({time.perf_counter() - t0:.1f} s): oracle rung {row['oracle_rung']}, "
            + ", ".join(f"@{th} rung {row[f'prompt@{th}']['rung']}" for th in thresholds))
    summary = {"ladder": [list(r) for r in rungs], "ablation_damage": damage, "ladder_sizes": [len(r) for r in rungs], "ladder_source": source,
               "prompts": len(prompts), "new_tokens": new_tokens, "full_layers": len(plan.layers),
               "oracle": {"mean_layers": statistics.mean(r["oracle_layers"] for r in per_prompt),
                          "rung_histogram": _histogram(r["oracle_rung"] for r in per_prompt), "exact": 1.0}}
    for th in thresholds:
        rows = [r[f"prompt@{th}"] for r in per_prompt]
        summary[f"prompt@{th}"] = {
            "mean_layers": statistics.mean(r["layers"] for r in rows),
            "rung_histogram": _histogram(r["rung"] for r in rows),
            "exact": statistics.mean(r["exact"] for r in rows),
            "prefix_agreement": statistics.mean(r["prefix_agreement"] for r in rows),
            "token_agreement": statistics.mean(r["token_agreement"] for r in rows),
            "same_rung_as_oracle": statistics.mean(r["rung"] == o["oracle_rung"] for r, o in zip(rows, per_prompt)),
            "deeper_than_oracle": statistics.mean(r["rung"] > o["oracle_rung"] for r, o in zip(rows, per_prompt)),
            "mean_prefill_layer_passes": statistics.mean(r["prefill_layers"] for r in rows)}
    return {"summary": summary, "per_prompt": per_prompt}


def _histogram(values) -> dict:
    out = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items()))


def ensure_quiet(folder: Path, log) -> Path:
    if not (folder / "manifest.json").exists():
        from dlexport.exporter import export

        log(f"exporting the synthetic best case llama-quiet to {folder}")
        export("llama-quiet", folder, random_weights=True, progress=False, log=log)
    return folder


def readme(out: Path) -> str:
    """A summary table of the section files present in ``out``."""
    lines = ["# Self-speculative decoding and per-sequence depth", ""]
    if (out / "speculative.json").exists():
        results = json.loads((out / "speculative.json").read_text())
        lines += [f"Speculative: `{results['command']}` ({results['created']}; {results['machine']})", ""]
        for model, section in results["speculative"].items():
            lines += [f"## Speculative, {model} ({section['prompts']} prompts x {section['new_tokens']} new tokens, "
                      "greedy, interleaved; every output identical to plain greedy)", "",
                      "| run | tokens/s | vs plain | decode tokens/s | decode vs plain | layers/token | acceptance | "
                      "layer-cost speedup (measured) | predicted at measured acceptance | theoretical (all accepted) "
                      "| attainable here (all accepted) | attainable here at measured acceptance | switched off |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for name, r in section["runs"].items():
                if "acceptance_rate" in r:
                    lines.append(f"| {name} | {r['tokens_per_s']:.2f} | {r['speed_vs_plain']:.2f}x | "
                                 f"{r['decode_tokens_per_s']:.2f} | {r['decode_speed_vs_plain']:.2f}x | "
                                 f"{r['mean_layers_per_token']:.1f} | {r['acceptance_rate']:.2f} | "
                                 f"{r['layer_cost_speedup']:.2f}x | "
                                 f"{r['predicted_speedup_at_measured_acceptance']:.2f}x | "
                                 f"{r['theoretical_speedup_all_accepted']:.2f}x | "
                                 f"{r['attainable_speedup_all_accepted']:.2f}x "
                                 f"(pass of {r['k'] + 1}: {r['verify_pass_ratio']:.2f}x) | "
                                 f"{attainable(r, r['acceptance_rate']):.2f}x | "
                                 f"{r['switched_off']}/{section['prompts']} |")
                else:
                    lines.append(f"| {name} | {r['tokens_per_s']:.2f} | 1.00x | {r['decode_tokens_per_s']:.2f} | "
                                 f"1.00x | {r['mean_layers_per_token']:.1f} | | | | | | | |")
            lines += ["", "Decode: the tokens after the first over the time after the prefill (speculation changes "
                      "only that phase). Theoretical: layer costs (weight sizes), every draft accepted, a pass over "
                      "k+1 positions costing one pass. Attainable here: the same with the pass over k+1 positions "
                      "costing what it was measured to cost on this host (against a one-token pass, medians of "
                      "interleaved timings); at measured acceptance: that, at the run's own acceptance.", ""]
    for path in sorted(out.glob("depth*.json")):
        results = json.loads(path.read_text())
        d = results["depth"]["summary"]
        lines += [f"## Per-sequence depth, SmolLM2-135M ({d['prompts']} prompts x {d['new_tokens']} new tokens, "
                  "greedy)", "", f"`{results['command']}` ({results['created']})", "",
                  f"Ladder ({d['ladder_source']}): sizes {d['ladder_sizes']}", "",
                  "| controller | mean layers | exact match with full | prefix agreement | token agreement | "
                  "same rung as oracle | deeper than oracle | prefill layer passes |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| oracle | {d['oracle']['mean_layers']:.2f} | 1.00 | 1.00 | 1.00 | 1.00 | 0.00 | "
                  "full + every rung tried |"]
        for key, r in d.items():
            if key.startswith("prompt@"):
                lines.append(f"| {key} | {r['mean_layers']:.2f} | {r['exact']:.2f} | {r['prefix_agreement']:.2f} | "
                             f"{r['token_agreement']:.2f} | {r['same_rung_as_oracle']:.2f} | "
                             f"{r['deeper_than_oracle']:.2f} | {r['mean_prefill_layer_passes']:.1f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smollm2", type=Path, default=Path("exports/smollm2"))
    ap.add_argument("--quiet", type=Path, default=Path("/tmp/dlx/llama-quiet"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sections", nargs="+", choices=("speculative", "depth"), default=["speculative", "depth"],
                    help="each writes <section>.json; README.md summarises the ones present")
    ap.add_argument("--spec-prompts", type=int, default=8)
    ap.add_argument("--quiet-prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--depth-prompts", type=int, default=60)
    ap.add_argument("--depth-new-tokens", type=int, default=8)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.9])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (onnxruntime-gpu; see ../shared/gpu/README.md)")
    ap.add_argument("--tag", default="", help="depth results go to depth-TAG.json (e.g. for other thresholds)")
    args = ap.parse_args()

    def log(*a):
        print(*a, flush=True)

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": "python scripts/speculative_depth_bench.py " + " ".join(
                f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in vars(args).items()),
            "machine": f"{platform.machine()}, {args.threads} thread(s), "
                       + ("CPU ONNX Runtime, 2 cores shared with other jobs" if args.device == "cpu" else
                          f"ONNX Runtime on {args.device}")}
    smol = Runtime.load(args.smollm2, threads=args.threads, device=args.device)
    if "speculative" in args.sections:
        quiet = Runtime.load(ensure_quiet(args.quiet, log), threads=args.threads, device=args.device)
        n = smol.num_layers
        smol_configs = {"plain": None,
                        "prefix-12": Draft(tuple(range(12)), 4, False),
                        "prefix-12-adaptive": Draft(tuple(range(12)), 4, True),
                        "skip-even-15": Draft(tuple(range(0, n, 2)), 4, False)}
        quiet_configs = {"plain": None,
                         "prefix-3": Draft((0, 1, 2), 4, False),
                         "prefix-3-adaptive": Draft((0, 1, 2), 4, True)}
        section = dict(meta, speculative={})
        for label, rt, configs, count in (
                ("SmolLM2-135M", smol, smol_configs, args.spec_prompts),
                ("llama-quiet (synthetic best case)", quiet, quiet_configs, args.quiet_prompts)):
            prompts = prose_prompts(count, 32, rt.tokenizer, rt.manifest.arch["vocab_size"])
            log(f"speculative on {label}: {count} prompts")
            section["speculative"][label] = {"prompts": count, "new_tokens": args.new_tokens, "prompt_tokens": 32,
                                             "runs": speculative_section(rt, configs, prompts, args.new_tokens, log)}
            (args.out / "speculative.json").write_text(json.dumps(section, indent=1))
    if "depth" in args.sections:
        prompts = prose_prompts(args.depth_prompts, 32, smol.tokenizer)
        log(f"per-sequence depth on SmolLM2: {args.depth_prompts} prompts")
        section = dict(meta, depth=depth_section(smol, prompts, args.depth_new_tokens, args.thresholds, log))
        (args.out / f"depth{'-' + args.tag if args.tag else ''}.json").write_text(json.dumps(section, indent=1))
    (args.out / "README.md").write_text(readme(args.out))
    log((args.out / "README.md").read_text())


if __name__ == "__main__":
    main()
