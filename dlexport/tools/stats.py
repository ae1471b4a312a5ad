"""Small timing helpers shared by the profiler and the benchmark: percentiles and a repeat-until-enough timer."""
from __future__ import annotations

import time
from collections.abc import Callable


def percentile(values, q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); the same definition numpy uses by default."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of an empty list")
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values) -> float:
    return percentile(values, 50.0)


def summary_ms(samples_ms) -> dict:
    return {"median_ms": median(samples_ms), "p90_ms": percentile(samples_ms, 90.0), "runs": len(samples_ms)}


def time_calls(fn: Callable[[], object], *, warmup: int = 2, min_runs: int = 5, max_runs: int = 200,
               min_seconds: float = 0.2, sync: Callable[[], None] = lambda: None) -> list[float]:
    """Per-call times in ms: ``warmup`` untimed calls, then at least ``min_runs`` and ``min_seconds`` of calls.

    Each call is synchronised (``sync``) so that an asynchronous device is timed to completion, as the runtime's
    own profiler does.
    """
    for _ in range(warmup):
        fn()
    sync()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_runs and (len(samples) < min_runs or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples
