"""What one pass of the whole plan (its layer group) costs over M new positions against one, on this host.

    python benchmarks/speculative-2026-12-02c/passcost.py EXPORT [M,M,...] [ROUNDS]

A verification runs k+1 positions in one pass; the theoretical speedup in layer costs assumes that costs one
position's pass (weights read once). Timed after a 64-token prompt, every M in each round (interleaved), medians.
"""
import sys, time, statistics, torch
from dlexport.runtime import Runtime, Plan
rt = Runtime.load(sys.argv[1], threads=1)
plan = Plan.full(rt.manifest); layers = plan.layers
rt.open_groups(layers)
ids = torch.randint(0, 4000, (1, 64))
cache = rt.new_cache(layers, 1, 256); cache.valid[:] = True
rt.run_layers(rt.embed(ids, torch.arange(64)[None]), layers, cache)
Ms = [int(x) for x in sys.argv[2].split(",")] if len(sys.argv) > 2 else [1, 2, 3, 4, 5, 6, 7, 8, 9]
ts = {M: [] for M in Ms}
for r in range(int(sys.argv[3]) if len(sys.argv) > 3 else 40):
    for M in Ms:
        for i in layers: cache.length[i] = 64
        seg = rt.embed(ids[:, :M], torch.arange(64, 64 + M)[None])
        t = time.perf_counter(); rt.run_layers(seg, layers, cache); ts[M].append(time.perf_counter() - t)
base = statistics.median(ts[Ms[0]])
for M in Ms:
    m = statistics.median(ts[M]); print(f"M={M}: {m*1e3:.2f} ms  {m/base:.3f}x")
