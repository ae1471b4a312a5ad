"""One Runtime serving requests from several threads gives each exactly what it gets alone (issue 10).

The engines keep per-thread IO bindings and output buffers and the runtime per-thread profiling state, so
nothing of one request can leak into another's.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from dlexport.runtime import Plan, Runtime, Sampling
from dlexport.runtime.plan import ExitPolicy


@pytest.mark.parametrize("fixture", ["tiny_llama_export", "tiny_llama_portable_export"])
def test_eight_threads_equal_the_same_requests_one_at_a_time(fixture, request):
    manifest = request.getfixturevalue(fixture)
    rt = Runtime.load(manifest.folder)
    exit_plan = Plan.skip(manifest, range(4), exit=ExitPolicy((0, 1, 2), "top1_prob", 0.05))
    jobs = [dict(prompts=[[3 + i, 40, 7 * i + 1, 99][: 2 + i % 3]], max_new_tokens=10 + i,
                 plan=[None, Plan.skip(manifest, [0, 2, 3]), exit_plan][i % 3],
                 sampling=Sampling(0.8, 0, 1.0, seed=i) if i % 4 == 3 else Sampling(), profile=i % 2 == 0,
                 stop_tokens=[]) for i in range(16)]

    def run(job):
        g = rt.generate(**job)
        return g.tokens, [(s.layers_executed, s.exit_layer) for s in g.steps], sorted(g.timings_ms)

    alone = [run(j) for j in jobs]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(run, jobs))
    assert together == alone
    assert any(t for _, _, t in alone) and not all(t for _, _, t in alone)  # profiled requests only time their own
