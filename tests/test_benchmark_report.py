"""The statistics of benchmarks/benchmark_sampling.py's report, against scipy."""

import os
import sys

import numpy as np
import pytest
import torch as th
from scipy import stats

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import benchmark_sampling  # noqa: E402
from benchmark_sampling import median_interval, paired_ratio, timed_within  # noqa: E402


@pytest.mark.parametrize("n", [5, 6, 7, 12, 20, 41])
def test_median_interval_is_the_widest_order_statistics_pair_with_enough_coverage(n):
    values = list(np.random.default_rng(n).normal(size=n))
    got = median_interval(values)
    xs = sorted(values)
    # coverage of [x_(j), x_(n-1-j)] for the median: P(j < Binomial(n, 1/2) < n - j) (scipy's cdf).
    coverage = [stats.binom.cdf(n - 1 - j, n, 0.5) - stats.binom.cdf(j, n, 0.5) for j in range(n // 2)]
    good = [j for j, c in enumerate(coverage) if c >= 0.95]
    if not good:
        assert got is None
    else:
        j = max(good)
        assert got == (xs[j], xs[n - 1 - j])


def test_paired_ratio_takes_the_median_of_the_ratios_within_each_repeat():
    timing = {"a": {
        "ours/fp32/sag": dict(per_step=[2.0, 9.0, 4.2, 2.2, 6.0, 3.9], single_run=False),
        "ours/fp32/plain": dict(per_step=[1.0, 4.0, 2.0, 1.0, 3.0, 2.0], single_run=False),
    }}
    median, interval = paired_ratio(timing, "a", "ours/fp32/sag", "ours/fp32/plain")
    assert median == pytest.approx(np.median([2.0, 2.25, 2.1, 2.2, 2.0, 1.95]))
    assert interval == (1.95, 2.25)
    timing["a"]["ours/fp32/plain"]["single_run"] = True
    assert paired_ratio(timing, "a", "ours/fp32/sag", "ours/fp32/plain") is None


def test_timed_within_leaves_out_the_first_n1_steps(monkeypatch):
    """A fake clock: steps take 5 (start-up included), 1, 2 and 3 s, and fault 10 pages per second."""
    clock = {"now": 100.0}
    monkeypatch.setattr(benchmark_sampling.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(benchmark_sampling, "page_faults", lambda: int(10 * clock["now"]))

    class FakeVariant:
        name, device = "fake", "cpu"

        def run(self, steps, on_step=None):
            for seconds in [5.0, 1.0, 2.0, 3.0][:steps]:
                clock["now"] += seconds
                on_step()
            return th.zeros(1)

    seconds, faults, each = timed_within(FakeVariant(), 1, 4)
    assert each == [5.0, 1.0, 2.0, 3.0]
    assert seconds == 6.0 and faults == 60
    assert timed_within(FakeVariant(), 2, 4)[:2] == (5.0, 50)
