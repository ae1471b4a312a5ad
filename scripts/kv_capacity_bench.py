"""Does a layer's decode cost follow the filled length or the KV buffer's capacity? One layer, both KV flavours.

Times one decode call (1 new token) of one layer through dlexport's engine interface, as the runtime makes it
(in-place layers with their present bound to the cache buffer), for each (capacity, filled) pair, in interleaved
rounds. Usage (the two exports of one model, e.g. `dlexport export --kv inplace` and `--kv portable`):

    python scripts/kv_capacity_bench.py --inplace exports/smollm2 --portable exports/smollm2-portable \
        --layer 3 --threads 1 --out benchmarks/kv-capacity-smollm2-2026-12-01
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dlexport.engines import open_engines
from dlexport.runtime.kv_cache import KVCache
from dlexport.tools.environment import describe_device, versions
from dlexport.tools.stats import median, percentile

PAIRS = [(128, 127), (512, 127), (2048, 127), (2048, 1023), (2048, 2047)]


def _call(engine, manifest, index: int, capacity: int, filled: int):
    """A closure that runs one decode step of layer ``index`` with ``filled`` of ``capacity`` slots written."""
    a = manifest.arch
    cache = KVCache([index], 1, a["num_kv_heads"], capacity, a["head_dim"], torch.float32, torch.device("cpu"))
    cache.valid[:] = True
    torch.manual_seed(0)
    cache.key[index].normal_()
    cache.value[index].normal_()
    hidden = torch.randn(1, 1, a["hidden_size"])
    inplace = manifest.kv == "inplace"
    mask = cache.filled_mask(filled, 1) if inplace else cache.mask(filled, 1)
    feeds = {"hidden_states": hidden, "attention_mask": mask,
             f"past_key_values.{index}.key": cache.key[index], f"past_key_values.{index}.value": cache.value[index]}
    if manifest.rotary:
        feeds["rotary_cos"] = torch.ones(1, 1, a["head_dim"])
        feeds["rotary_sin"] = torch.zeros(1, 1, a["head_dim"])
    out = None
    if inplace:
        feeds["past_length"] = cache.write_index(filled)
        out = {f"present.{index}.key": cache.key[index], f"present.{index}.value": cache.value[index]}
    return lambda: engine.run(feeds, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--inplace", type=Path, required=True)
    ap.add_argument("--portable", type=Path, required=True)
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=20, help="calls per (flavour, pair) per round")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    runs = {}
    for flavour, folder in (("inplace", args.inplace), ("portable", args.portable)):
        manifest, engines = open_engines(folder, threads=args.threads, layers=[args.layer])
        if manifest.kv != flavour:
            raise SystemExit(f"{folder} holds a {manifest.kv} export, not {flavour}")
        engine = engines[manifest.layer_key(args.layer)]
        for capacity, filled in PAIRS:
            runs[(flavour, capacity, filled)] = _call(engine, manifest, args.layer, capacity, filled)
    samples = {k: [] for k in runs}
    for r in range(args.rounds + 2):  # two warm-up rounds
        for key, run in runs.items():
            t0 = time.perf_counter()
            for _ in range(args.calls):
                run()
            if r >= 2:
                samples[key].append((time.perf_counter() - t0) / args.calls * 1e3)
    rows = [{"flavour": f, "capacity": c, "filled": n, "median_ms": median(v), "p90_ms": percentile(v, 90)}
            for (f, c, n), v in samples.items()]
    base = {r["flavour"]: r["median_ms"] for r in rows if r["capacity"] == 128}
    lines = [f"# Decode cost of one layer vs KV capacity and filled length ({args.inplace.name}, layer {args.layer}, "
             f"{args.threads} thread(s))", "", f"`{' '.join(['python', 'scripts/kv_capacity_bench.py', '--inplace', str(args.inplace), '--portable', str(args.portable), '--layer', str(args.layer), '--threads', str(args.threads), '--out', str(args.out)])}`", "",
             f"{args.rounds} interleaved rounds of {args.calls} calls per cell; ratios against the same flavour at "
             "capacity 128 (127 filled).", "",
             "| flavour | capacity | filled | ms / call (median / p90) | vs capacity 128 |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['flavour']} | {r['capacity']} | {r['filled']} | {r['median_ms']:.3f} / {r['p90_ms']:.3f} | "
                     f"{r['median_ms'] / base[r['flavour']]:.2f}x |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kv_capacity.json").write_text(json.dumps({
        "device": describe_device("cpu"), "versions": versions(), "layer": args.layer, "threads": args.threads,
        "rounds": args.rounds, "calls": args.calls, "rows": rows}, indent=1))
    (args.out / "kv_capacity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
