import numpy as np
import pytest

from dlexport.tools.stats import median, percentile, summary_ms


def test_percentile_matches_numpy_linear():
    xs = [5.0, 1.0, 3.0, 2.0, 10.0, 7.5]
    for q in (0, 10, 50, 90, 100):
        assert percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    assert median([3, 1, 2]) == 2
    assert summary_ms([1.0, 2.0, 3.0]) == {"median_ms": 2.0, "p90_ms": pytest.approx(2.8), "runs": 3}


def test_percentile_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
