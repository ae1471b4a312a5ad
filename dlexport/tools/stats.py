"""Percentiles shared by the profiler and the benchmark."""
from __future__ import annotations

from ..errors import InputError


def percentile(values, q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); the same definition numpy uses by default."""
    xs = sorted(values)
    if not xs:
        raise InputError("percentile of an empty list")
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values) -> float:
    return percentile(values, 50.0)


def summary_ms(samples_ms) -> dict:
    return {"median_ms": median(samples_ms), "p90_ms": percentile(samples_ms, 90.0), "runs": len(samples_ms)}
