"""run: generate with a plan through the stitched runtime."""
from __future__ import annotations

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
    p.add_argument("--threads", type=int)
    p.add_argument("--profile", action="store_true", help="time every subgraph call (synchronised)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ..runtime import Runtime, Sampling, load_plan

    runtime = Runtime.load(args.dir, device=args.device, threads=args.threads)
    plan = load_plan(args.plan, runtime.manifest) if args.plan else None
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    events = runtime.stream(args.prompt, args.max_new_tokens, plan, sampling=sampling, profile=args.profile)
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


def _summary(result) -> None:
    exits = sum(1 for s in result.steps if s.exit_layer is not None)
    print(f"\n[{result.plan}] {result.new_tokens} tokens x {len(result.tokens)} prompt(s): "
          f"{result.tokens_per_s:.1f} tokens/s, prefill {result.prefill_s * 1e3:.0f} ms, "
          f"mean layers per token {result.mean_layers:.1f}, early exits {exits}", file=sys.stderr)
    if result.timings_ms:
        top = sorted(result.timings_ms.items(), key=lambda kv: -kv[1])[:5]
        print("  slowest subgraphs (ms total): " + ", ".join(f"{k} {v:.1f}" for k, v in top), file=sys.stderr)
