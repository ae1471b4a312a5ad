"""profile, bench: per-engine cost tables and interleaved end-to-end benchmarks."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from ..errors import InputError


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{text!r} is not a comma-separated list of integers (e.g. 128,512,1024)") from None
    if not values:
        raise InputError("give at least one context length")
    return values


def _command(args) -> str:
    """The bench command line with every setting spelled out, recorded with the results to reproduce them."""
    words = ["dlexport", "bench", str(args.dir)]
    for plan in args.plan:
        words += ["--plan", str(plan)]
    for other in args.compare:
        words += ["--compare", str(other)]
    for key in ("baseline", "prompt_tokens", "new_tokens", "repeats", "prompts", "threads", "threads_sweep", "device",
                "profile", "mono_dir", "gguf", "out"):
        value = getattr(args, key)
        if key == "baseline" and args.threads_sweep:
            continue  # the sweep runs the full model and the plans only
        if value is not None:
            words += ["--" + key.replace("_", "-"), str(value)]
    return shlex.join(words)


def _err(message: str) -> None:
    print(message, file=sys.stderr)


def register(sub) -> None:
    p = sub.add_parser("profile", help="latency of every engine for a prefill and a decode step per context length")
    p.add_argument("dir", type=Path, help="export folder or engine folder")
    p.add_argument("--tool", default="builtin", choices=["builtin", "trtexec"],
                   help="builtin: dlexport's engine interface (any backend); trtexec: TensorRT engines via trtexec")
    p.add_argument("--contexts", default="128,512,1024", help="comma-separated context lengths (tokens)")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N], or tensorrt")
    p.add_argument("--threads", type=int, help="builtin: CPU threads (default: every core this process may use; see engines/threads.py)")
    p.add_argument("--cuda-graph", action="store_true", help="trtexec: time with CUDA graphs (off by default)")
    p.add_argument("--out", type=Path, help="where to write profile.json (default DIR/profile.json)")
    p.set_defaults(func=_profile)

    p = sub.add_parser("bench", help="interleaved end-to-end benchmark of plans vs the full model and baselines")
    p.add_argument("dir", type=Path, help="export folder or engine folder")
    p.add_argument("--plan", type=Path, action="append", default=[], help="plan.json (repeat for several)")
    p.add_argument("--baseline", default="full,hf,onnx-mono",
                   help="comma-separated from full, hf, onnx-mono, llamacpp (needs --gguf; full always runs: "
                        "every ratio is against it)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (each runs every entry once)")
    p.add_argument("--prompts", type=int, default=3, help="distinct prose prompts, used round-robin")
    p.add_argument("--threads", type=int, help="CPU threads (default: every core this process may use; see engines/threads.py)")
    p.add_argument("--threads-sweep", help="comma-separated thread counts (e.g. 1,2,4): tokens/s of the full model "
                   "and each plan per count, one worker process per count, interleaved; writes sweep.json/md/png")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--profile", type=Path, help="profile.json to predict each run's cost from (default "
                                                 "DIR/profile.json when present)")
    p.add_argument("--mono-dir", type=Path, help="where the monolithic baseline graph is (exported there if "
                                                  "missing; default: a cache folder per model)")
    p.add_argument("--compare", type=Path, action="append", default=[],
                   help="another export or engine folder of the same model whose full depth runs alongside "
                        "(e.g. the fp32 export next to its int4 copy; repeatable)")
    p.add_argument("--gguf", type=Path, help="with --baseline llamacpp: the GGUF llama.cpp runs (pip install "
                                             "dlexport[llamacpp])")
    p.add_argument("--out", type=Path, required=True, help="folder for bench.json, bench.md and bench.png")
    p.set_defaults(func=_bench)


def _profile(args) -> int:
    from ..tools.profile import run_profile

    from ..files import check_replaceable
    from ..tools.costs import FORMAT

    out = args.out or args.dir / "profile.json"
    check_replaceable(out, FORMAT, "--out")
    table = run_profile(args.dir, tool=args.tool, contexts=_ints(args.contexts), device=args.device,
                        threads=args.threads, cuda_graph=args.cuda_graph, log=_err)
    table.save(out)
    print(table.markdown())
    for s in table.skipped:
        print(f"skipped {s['engine']} {s['phase']} {s['context']}: {s['reason']}", file=sys.stderr)
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


def _bench(args) -> int:
    from ..runtime import load_plan

    if args.threads_sweep:
        return _sweep(args)
    from ..tools.bench import folder_manifest, run_bench
    from ..tools.costs import CostTable
    from ..tools.report import markdown, write_outputs

    from ..files import OwnedFolder, check_apart

    check_apart(args.out, [args.dir])
    OwnedFolder.inspect(args.out, "bench")  # refused before the benchmark, not after it
    baselines = [b.strip() for b in args.baseline.split(",") if b.strip()]
    profile = args.profile or (args.dir / "profile.json" if (args.dir / "profile.json").exists() else None)
    manifest = folder_manifest(args.dir)
    plans = [load_plan(p, manifest) for p in args.plan]
    result = run_bench(args.dir, plans, baselines=baselines, prompt_tokens=args.prompt_tokens,
                       new_tokens=args.new_tokens, repeats=args.repeats, prompt_count=args.prompts,
                       threads=args.threads, device=args.device, profile=profile, mono_dir=args.mono_dir,
                       command=_command(args), gguf=args.gguf, compare=args.compare, log=_err)
    table = CostTable.load(profile) if profile else None
    paths = write_outputs(result, args.out, table, manifest)
    print(markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0


def _sweep(args) -> int:
    from ..errors import InputError
    from ..files import write_json_atomic
    from ..runtime import load_plan
    from ..tools.bench import folder_manifest
    from ..tools.sweep import markdown, plot, run_sweep

    if args.threads is not None:
        raise InputError("--threads and --threads-sweep exclude each other: the sweep sets the threads of each run")
    manifest = folder_manifest(args.dir)
    plans = [load_plan(p, manifest) for p in args.plan]
    sweep = run_sweep(args.dir, _ints(args.threads_sweep), plans, prompt_tokens=args.prompt_tokens,
                      new_tokens=args.new_tokens, repeats=args.repeats, prompt_count=args.prompts,
                      device=args.device, command=_command(args), log=_err)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "sweep.json", sweep)
    (args.out / "sweep.md").write_text(markdown(sweep))
    plot(sweep, args.out / "sweep.png")
    print(markdown(sweep))
    print(f"wrote {args.out}/sweep.json, sweep.md, sweep.png", file=sys.stderr)
    return 0
