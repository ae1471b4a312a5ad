"""Share of decode time spent outside engine calls (issue 10: at most 5%), with layer groups.

The same request (prompt 64, 64 new tokens, greedy) is run with ``profile=True``, which times every engine call
(synchronised), and a 1-token request gives the prefill's share to subtract; what the decode time holds beyond the
engine calls is the runtime's own work. Three runs, CPU, 1 thread.

    python benchmarks/cpu-smollm2-groups-2026-12-02/outside.py EXPORT
"""
import sys

from dlexport.runtime import Runtime

rt = Runtime.load(sys.argv[1], threads=1)
prompt, new = list(range(100, 164)), 64
rt.generate([prompt], 8, stop_tokens=[])
for _ in range(3):
    g = rt.generate([prompt], new, stop_tokens=[], profile=True)
    prefill = rt.generate([prompt], 1, stop_tokens=[], profile=True)
    engines = sum(g.timings_ms.values()) - sum(prefill.timings_ms.values())
    decode = (g.total_s - g.prefill_s) * 1e3
    per_token = {k: round(v / new, 2) for k, v in g.timings_ms.items()}
    print(f"decode {decode / (new - 1):.2f} ms/token, engine calls {engines / (new - 1):.2f}, "
          f"outside engines {100 * (decode - engines) / decode:.1f}%  (per engine, ms/token incl. prefill: {per_token})")
