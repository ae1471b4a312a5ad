"""Stitched full depth with layer groups (the default), the same layers one session each (``groups=False``) and
the monolithic ONNX graph, decode ms/token, finely interleaved (one generation of each in turn, N rounds), CPU,
1 thread, greedy; tokens checked identical. Ratios are medians of per-round ratios to the monolithic graph.

    python benchmarks/cpu-smollm2-groups-2026-12-02/pair.py EXPORT [ROUNDS] [PROMPT] [NEW]
"""
import sys
import time

import numpy as np

from dlexport.runtime import Runtime
from dlexport.tools.monolithic import MonolithicModel, default_dir

export = sys.argv[1]
rounds, prompt_len, new = (int(a) for a in (sys.argv[2:] + ["12", "64", "64"][len(sys.argv) - 2:])[:3])
grouped, single = Runtime.load(export, threads=1), Runtime.load(export, threads=1, groups=False)
mono = MonolithicModel(default_dir(grouped.manifest), grouped.manifest, threads=1)
prompt = list(range(100, 100 + prompt_len))


def stitched(rt):
    g = rt.generate([prompt], new, stop_tokens=[])
    return g.tokens[0], (g.total_s - g.prefill_s) / (new - 1) * 1e3


def monolithic():
    tokens, stamps = mono.generate_timed(prompt, new)
    return tokens, (stamps[-1] - stamps[0]) / (new - 1) * 1e3


runs = {"groups": lambda: stitched(grouped), "one session per layer": lambda: stitched(single), "monolithic": monolithic}
ms = {k: [] for k in runs}
reference = None
for r in range(rounds + 1):
    for name, fn in runs.items():
        tokens, t = fn()
        reference = reference or tokens
        assert tokens == reference, f"{name} gave other tokens"
        if r:  # round 0 warms up
            ms[name].append(t)
print(f"prompt {prompt_len} / {new} new, {rounds} rounds, tokens identical")
for name, v in ms.items():
    ratio = np.median([m / x for m, x in zip(ms["monolithic"], v)])
    print(f"  {name:22s} {np.median(v):7.2f} ms/token   speed vs monolithic {ratio:.3f}x")
