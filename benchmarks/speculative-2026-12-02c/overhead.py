"""Wall time per decode token against the engine calls' time in it (profile=True), plain and prefix-3 on llama-quiet.

    python benchmarks/speculative-2026-12-02c/overhead.py /tmp/dlx/llama-quiet

Decode = after the prefill; the prefill's engine time is taken from a 1-token generation of the same prompt.
"""
import sys, torch
from dlexport.runtime import Runtime, Plan
from dlexport.runtime.plan import Draft
from dlexport.tools.prompts import prose_prompts
rt = Runtime.load(sys.argv[1], threads=1)
plan = Plan.full(rt.manifest)
prompts = prose_prompts(6, 32, rt.tokenizer, rt.manifest.arch["vocab_size"])
cfgs = {"plain": {}, "prefix-3": dict(strategy="speculative", draft=Draft((0, 1, 2), 4, False), memory=False)}
for c in cfgs.values(): rt.generate([prompts[0]["ids"]], 4, plan, stop_tokens=[], **c)
res = {n: [0, 0, 0] for n in cfgs}
for p in prompts:
    pre = rt.generate([p["ids"]], 1, plan, stop_tokens=[], profile=True)
    pre_eng = sum(pre.timings_ms.values())
    for name, kw in cfgs.items():
        g = rt.generate([p["ids"]], 48, plan, stop_tokens=[], profile=True, **kw)
        r = res[name]
        r[0] += (g.total_s - g.prefill_s) * 1e3; r[1] += sum(g.timings_ms.values()) - pre_eng; r[2] += g.new_tokens - 1
for n, (wall, eng, tok) in res.items():
    print(f"{n}: wall {wall/tok:.2f} ms/token, engines {eng/tok:.2f}, other {(wall-eng)/tok:.2f} ({(wall-eng)/wall:.1%})")
