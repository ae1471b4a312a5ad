"""Issue 15: adaptive self-speculation (cheap draft head, online searches, prompt lookup) against plain decoding.

    python scripts/speculative_probe_bench.py --export exports/smollm2 --plan PLAN.json --set prose --prompts 60 \
        --new-tokens 16 --configs plain calibrated calibrated-full-head calibrated+lookup lookup-k8 skip-search \
        --out benchmarks/speculative-2026-12-02b

Configurations (``all_configs``): the plan's calibrated draft, the same with the full head, with prompt lookup,
prefix-12 with either head, and the skip-set search from the calibration's best skip set or from every other layer.

After a warm-up of each configuration (its layer groups composed and opened), every prompt runs plain greedy
decoding and each configuration, in an order that rotates per prompt (interleaved);
every output is checked token for token against plain greedy. Prompt sets: ``prose`` (license texts,
dlexport.tools.prompts) and ``repetitive`` (code from the Python standard library, and prose passages whose start is
repeated at the end, so that the continuation is a quote of the prompt). Writes <set>.json in --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from dlexport.runtime import Plan, Runtime, load_plan
from dlexport.runtime.plan import Draft
from dlexport.tools.prompts import prose_prompts, prose_texts


def repetitive_prompts(count: int, length: int, tokenizer) -> list[list[int]]:
    """Half code (stdlib sources), half a prose passage repeated: text whose continuation is predictable."""
    import sysconfig

    out = []
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    for path in sources:
        if len(out) >= count // 2:
            break
        ids = tokenizer(path.read_text(errors="replace"), add_special_tokens=False)["input_ids"]
        if len(ids) > 4 * length:
            out.append(ids[2 * length:3 * length])  # past the module docstring
    texts = prose_texts()
    i = 0
    while len(out) < count:
        _, text = texts[i % len(texts)]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        start = (i // len(texts)) * length
        passage = ids[start:start + 3 * length // 4]
        out.append(passage + passage[:length - len(passage)])  # a passage, then its start again: it quotes on
        i += 1
    return out


def _counts(extras) -> dict:
    """How many requests ended with each draft layer set, most first."""
    return dict(Counter(",".join(map(str, x["draft_layers"])) for x in extras).most_common())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--export", type=Path, required=True)
    ap.add_argument("--plan", type=Path, required=True, help="a plan from `dlexport plan calibrate-draft`")
    ap.add_argument("--set", choices=("prose", "repetitive"), required=True)
    ap.add_argument("--prompts", type=int, default=60)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--configs", nargs="+", default=["plain", "prefix12-full-head", "prefix12-cheap-head",
                                                      "calibrated"])
    ap.add_argument("--no-memory", action="store_true",
                    help="every request starts fresh (default: it starts from what the last one learned)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rt = Runtime.load(args.export, threads=1)
    plan = load_plan(args.plan, rt.manifest)
    head = plan.draft
    full = Plan.full(rt.manifest)
    all_configs = {"plain": None,
                   "prefix12-full-head": Draft(tuple(range(12)), 4, True),
                   "prefix12-cheap-head": replace(head, layers=tuple(range(12)), k=4),
                   "calibrated": head,
                   "calibrated-full-head": replace(head, head=None),  # what the cheap draft head changes
                   # the skip-set search from the calibration's best skip set, and from every other layer
                   "skip-search": replace(head, layers=tuple(plan.calibration["best_skip_set"]["layers"]), k=4),
                   "half-skip-search": replace(head, layers=tuple(range(0, rt.num_layers, 2)), k=4),
                   "calibrated+lookup": (head, {"lookup": 3}),  # prompt lookup first, then the calibrated draft
                   "lookup-k8": (replace(head, k=8), {"lookup": 3})}
    # name -> (draft or None for plain, extra strategy options)
    configs = {n: all_configs[n] if isinstance(all_configs[n], tuple) else (all_configs[n], {}) for n in args.configs}
    if args.set == "prose":
        prompts = [p["ids"] for p in prose_prompts(args.prompts, args.prompt_tokens, rt.tokenizer)]
    else:
        prompts = repetitive_prompts(args.prompts, args.prompt_tokens, rt.tokenizer)
    names = list(configs)
    for name in names:  # a warm-up of each: its layer groups composed and opened (once per process), nothing learned
        draft, extra = configs[name]
        kw = {"strategy": "speculative", "draft": draft, "memory": False, **extra} if draft else {}
        rt.generate([prompts[0]], 2, full, stop_tokens=[], **kw)
    rec = {n: [] for n in names}
    t_start = time.perf_counter()
    for i, p in enumerate(prompts):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            draft, extra = configs[name]
            kw = {"strategy": "speculative", "draft": draft, "memory": not args.no_memory, **extra} if draft else {}
            rec[name].append(rt.generate([p], args.new_tokens, full, stop_tokens=[], **kw))
        plain = rec["plain"][-1].tokens
        bad = [n for n in names if rec[n][-1].tokens != plain]
        if bad:
            raise AssertionError(f"{bad} differ from plain greedy on prompt {i}")
    wall = time.perf_counter() - t_start
    base = sum(g.new_tokens for g in rec["plain"]) / sum(g.total_s for g in rec["plain"])
    rows = {}
    for name in names:
        gens = rec[name]
        tps = sum(g.new_tokens for g in gens) / sum(g.total_s for g in gens)
        row = {"tokens_per_s": round(tps, 3), "vs_plain": round(tps / base, 4), "identical_to_plain": True}
        draft = configs[name][0]
        if draft:
            e = [g.extra for g in gens]
            drafted, accepted = sum(x["drafted"] for x in e), sum(x["accepted"] for x in e)
            probes = sum(x["probes"] for x in e)
            row.update(draft_layers=list(draft.layers), k_max=draft.k,
                       draft_head=f"{draft.head.tokens}-token subset" if draft.head else "full",
                       draft_cost=round(e[0]["draft_cost"], 3), plan_cost=round(e[0]["plan_cost"], 3),
                       drafted=drafted, acceptance=round(accepted / drafted, 4) if drafted else None,
                       probes=probes, probe_acceptance=round(sum(x["probe_acceptance"] * x["probes"] for x in e
                                                                 if x["probes"]) / probes, 4) if probes else None,
                       requests_that_drafted=sum(1 for x in e if x["drafted"]),
                       switched_on=sum(x["switched_on"] for x in e), switched_off=sum(x["switched_off"] for x in e),
                       depth_moves=sum(x["depth_moves"] for x in e),
                       skip_trials=sum(x["skip_trials"] for x in e), skip_moves=sum(x["skip_moves"] for x in e),
                       final_draft_layers=_counts(e),
                       lookup_rounds=sum(x["lookup_rounds"] for x in e),
                       lookup_acceptance=round(sum(x["lookup_accepted"] for x in e) /
                                               max(1, sum(x["lookup_drafted"] for x in e)), 4),
                       final_depths={str(d): sum(1 for x in e if x["final_depth"] == d)
                                     for d in sorted({x["final_depth"] for x in e})})
        rows[name] = row
        print(name, row, flush=True)
    result = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv),
              "machine": f"{platform.machine()}, 1 thread, CPU ONNX Runtime, 2 cores shared (run under quiet.sh)",
              "set": args.set, "prompts": len(prompts), "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "memory": not args.no_memory, "wall_s": round(wall, 1),
              "draft_plan": {"file": str(args.plan), "calibration": plan.calibration.get("chosen"),
                             "vocabulary": plan.calibration.get("vocabulary")}, "runs": rows}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.set}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
