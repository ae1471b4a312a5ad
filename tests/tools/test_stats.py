import numpy as np
import pytest

from dlexport.tools.stats import median, percentile, summary_ms, time_calls


def test_percentile_matches_numpy_linear():
    xs = [5.0, 1.0, 3.0, 2.0, 10.0, 7.5]
    for q in (0, 10, 50, 90, 100):
        assert percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    assert median([3, 1, 2]) == 2


def test_percentile_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)


def test_time_calls_runs_warmup_then_at_least_min_runs():
    calls = []
    samples = time_calls(lambda: calls.append(1), warmup=3, min_runs=4, min_seconds=0.0)
    assert len(samples) == 4 and len(calls) == 7
    assert set(summary_ms(samples)) == {"median_ms", "p90_ms", "runs"}
