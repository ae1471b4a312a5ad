"""run: generate with a plan through the stitched runtime."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("run", help="generate text through the stitched engines, following a plan")
    p.add_argument("dir", type=Path, help="export folder or engine folder")
    p.add_argument("--plan", type=Path, help="plan.json (default: every layer)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--stream", action="store_true", help="print tokens as they come (first prompt)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N], or tensorrt (ONNX Runtime's TensorRT provider)")
    p.add_argument("--threads", type=int, help="CPU threads (default: every core this process may use; see engines/threads.py)")
    p.add_argument("--profile", action="store_true", help="time every subgraph call (synchronised)")
    p.add_argument("--strategy", choices=("plain", "speculative", "per-sequence"), default="plain",
                   help="speculative: draft with some layers, verify with the plan; per-sequence: one ladder rung "
                        "per request")
    p.add_argument("--draft-layers", type=_layer_list, help="speculative draft layers, e.g. 0-11 or 0,2,4 "
                   "(default: the plan's 'draft')")
    p.add_argument("--draft-k", type=int, help="tokens drafted per round (the maximum when adaptive; default: the "
                                               "plan's draft k, else 4)")
    p.add_argument("--no-adaptive", action="store_true", help="keep the draft length fixed and never switch off")
    p.add_argument("--search-budget", type=float, help="share of the plan's cost the online skip-set search may "
                   "spend, in (0, 1] (default 0.03)")
    p.add_argument("--lookup", type=int, default=0, help="speculative: first draft by prompt lookup, matching the "
                   "last N tokens in the request's own text (0: off; e.g. 3 for code or text that quotes itself)")
    p.add_argument("--no-search", action="store_true", help="keep the draft's layers: no online depth or skip-set "
                                                             "search")
    p.add_argument("--controller", choices=("prompt", "fixed", "oracle"), default="prompt",
                   help="per-sequence: how the rung is chosen")
    p.add_argument("--rung", type=int, default=-1, help="per-sequence fixed controller: the rung (0 = smallest)")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="per-sequence prompt controller: prompt agreement a rung needs")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ..runtime import Runtime, Sampling, load_plan

    runtime = Runtime.load(args.dir, device=args.device, threads=args.threads)
    plan = load_plan(args.plan, runtime.manifest) if args.plan else None
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    events = runtime.stream(args.prompt, args.max_new_tokens, plan, sampling=sampling, profile=args.profile,
                            strategy=args.strategy, **_strategy_options(args, plan or runtime.default_plan))
    streaming = args.stream and runtime.tokenizer is not None
    first_row, shown, result = [], "", None
    if streaming:
        print(args.prompt[0], end="", flush=True)
    for event in events:
        result = event.result or result
        if streaming and event.result is None:
            first_row.append(event.tokens[0])
            text = runtime.tokenizer.decode(first_row, skip_special_tokens=True)
            print(text[len(shown):], end="", flush=True)
            shown = text
    if streaming:
        print()
    for prompt, text in list(zip(args.prompt, result.texts))[1 if streaming else 0:]:
        print(f"{prompt}{text}")
    _summary(result)
    return 0


def _layer_list(text: str) -> tuple[int, ...]:
    layers = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or not (hi or lo).isdigit() or int(hi or lo) - int(lo) > 4096:
            raise argparse.ArgumentTypeError(f"{part!r} is not a layer or a range of layers (e.g. 0-11 or 0,2,4)")
        layers += range(int(lo), int(hi or lo) + 1)
    return tuple(layers)


def _strategy_options(args, plan) -> dict:
    if args.strategy == "speculative":
        from dataclasses import replace

        from ..runtime.plan import Draft

        base = plan.draft if plan is not None else None
        layers = args.draft_layers or (base.layers if base else None)
        k = args.draft_k if args.draft_k is not None else (base.k if base else 4)
        adaptive = (base.adaptive if base else True) and not args.no_adaptive
        options = {"search": False if args.no_search else args.search_budget, "lookup": args.lookup}
        if not layers:
            return {"draft": None, **options}
        draft = replace(base, layers=layers, k=k, adaptive=adaptive) if base else Draft(layers, k, adaptive)
        return {"draft": draft, **options}
    if args.strategy == "per-sequence":
        return {"controller": args.controller, "rung": args.rung, "threshold": args.threshold}
    return {}


def _summary(result) -> None:
    exits = sum(1 for s in result.steps if s.exit_layer is not None)
    print(f"\n[{result.plan}] {result.new_tokens} tokens x {len(result.tokens)} prompt(s): "
          f"{result.tokens_per_s:.1f} tokens/s, prefill {result.prefill_s * 1e3:.0f} ms, "
          f"mean layers per token {result.mean_layers:.1f}, early exits {exits}", file=sys.stderr)
    if result.extra:
        print("  " + ", ".join(f"{k} {_fmt(v)}" for k, v in result.extra.items() if v not in ("", None)),
              file=sys.stderr)
    if result.timings_ms:
        top = sorted(result.timings_ms.items(), key=lambda kv: -kv[1])[:5]
        print("  slowest subgraphs (ms total): " + ", ".join(f"{k} {v:.1f}" for k, v in top), file=sys.stderr)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list) and v and isinstance(v[0], float):
        return "[" + ", ".join(f"{x:.2f}" for x in v) + "]"
    return str(v)
