"""Share of decode time spent outside engine calls (issue 10: at most 5%).

The runtime's decode ms/token for prompt 64 / 64 new tokens, against the same engines (embedding, 30 layers, head)
called through the same engine interface with their inputs bound once, in model order, at the mean filled length
(96 slots). Interleaved four times in one process, medians. SmolLM2-135M fp32, 1 thread.

    python benchmarks/cpu-smollm2-inplace-2026-12-01/outside.py [EXPORT_DIR]   # default exports/smollm2
"""
import sys
import time

import numpy as np

from dlexport.runtime import Runtime
from dlexport.tools.profile import bound_outputs, feeds_for

rt = Runtime.load(sys.argv[1] if len(sys.argv) > 1 else "exports/smollm2", threads=1)
names = ["embed"] + [rt.manifest.layer_key(i) for i in range(rt.num_layers)] + ["head"]
feeds = {n: feeds_for(rt.engines[n], "decode", 96, rt.manifest.arch["vocab_size"]) for n in names}
outs = {n: bound_outputs(rt.engines[n], feeds[n]) for n in names}


def engines_only():
    for n in names:
        rt.engines[n].run(feeds[n], outs[n])


prompt = list(range(100, 164))
rt.generate([prompt], 8, stop_tokens=[])
engine_ms, decode_ms = [], []
for _ in range(4):
    engines_only()
    t = time.perf_counter()
    for _ in range(20):
        engines_only()
    engine_ms.append((time.perf_counter() - t) / 20 * 1e3)
    g = rt.generate([prompt], 64, stop_tokens=[])
    decode_ms.append((g.total_s - g.prefill_s) / 63 * 1e3)
e, d = np.median(engine_ms), np.median(decode_ms)
print(f"engines in sequence {e:.2f} ms, runtime decode {d:.2f} ms/token, outside engines {100 * (d - e) / d:.1f}%")
