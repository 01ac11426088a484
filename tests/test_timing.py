"""The timing protocol's stopping rule, driven by a fake clock (deterministic, no real timing)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pytest

from autocompress.measure._timing import TimingSettings, median_ci, median_ci_ranks, time_runs


class FakeRun:
    """A timed function whose n-th call "takes" ``durations_ms[n]`` on a fake clock."""

    def __init__(self, durations_ms: Iterable[float]) -> None:
        self.durations = iter(durations_ms)
        self.now = 0.0
        self.calls = 0

    def clock(self) -> float:
        return self.now

    def __call__(self) -> None:
        self.calls += 1
        self.now += next(self.durations) / 1e3


def run(durations: Iterable[float], **kw: float) -> tuple:
    fake = FakeRun(durations)
    settings = {"warmup": 0, "min_runs": 5, "max_runs": 1000, "budget_s": 1e9, "rel_ci": 0.02, **kw}
    return time_runs(fake, TimingSettings(**{"min_time_s": 0.0, **settings}), clock=fake.clock), fake


def test_ranks_match_the_binomial_table() -> None:
    # Classic values of the distribution-free 95% interval for the median.
    assert median_ci_ranks(5) is None  # 2 * 0.5**5 = 0.0625 > 0.05
    assert median_ci_ranks(6) == (1, 6)
    assert median_ci_ranks(10) == (2, 9)
    assert median_ci_ranks(20) == (6, 15)
    assert median_ci_ranks(100) == (40, 61)
    lo, hi = median_ci_ranks(2000)  # normal approximation
    assert abs(lo - (1000 - 1.96 * math.sqrt(2000) / 2)) <= 1 and hi == 2001 - lo


def test_median_ci_of_few_runs_is_nan() -> None:
    assert all(math.isnan(v) for v in median_ci([1.0, 2.0, 3.0]))
    assert median_ci(list(map(float, range(1, 11)))) == (2.0, 9.0)


def test_constant_times_stop_as_soon_as_the_interval_exists() -> None:
    t, fake = run([10.0] * 1000, min_runs=3)
    assert (t.runs, t.stopped) == (6, "ci")  # the first n with a 95% interval
    assert t.latency_ms == pytest.approx(10.0) and (t.ci_low_ms, t.ci_high_ms) == pytest.approx((10.0, 10.0))
    assert fake.calls == 6


def test_min_runs_come_first() -> None:
    t, _ = run([10.0] * 1000, min_runs=40)
    assert (t.runs, t.stopped) == (40, "ci")


def test_noisy_times_need_more_runs_the_tighter_the_target() -> None:
    noise = np.random.default_rng(0).normal(10.0, 1.0, 5000).clip(5, None)
    loose, _ = run(noise, rel_ci=0.05)
    tight, _ = run(noise, rel_ci=0.01, max_runs=5000)
    assert loose.stopped == tight.stopped == "ci"
    assert loose.runs < tight.runs
    for t, rel in ((loose, 0.05), (tight, 0.01)):
        assert t.latency_ms * (1 - rel) <= t.ci_low_ms <= t.latency_ms <= t.ci_high_ms
        assert t.ci_high_ms <= t.latency_ms * (1 + rel)


def test_max_runs_bounds_a_wide_interval() -> None:
    alternating = [1.0, 100.0] * 500  # the median never settles within 2%
    t, _ = run(alternating, max_runs=50)
    assert (t.runs, t.stopped) == (50, "max_runs")


def test_budget_stops_after_min_runs() -> None:
    alternating = [1.0, 100.0] * 500
    t, _ = run(alternating, min_runs=10, budget_s=0.2)  # ~50.5 ms per run on average
    assert t.stopped == "budget" and t.runs == 10  # 10 runs > 0.2 s already
    t, _ = run(alternating, min_runs=2, budget_s=0.2)
    assert t.stopped == "budget" and t.runs == 4  # 1+100+1 ms <= 200 ms < 1+100+1+100 ms


def test_rel_ci_zero_turns_the_rule_off() -> None:
    t, _ = run([10.0] * 1000, rel_ci=0, max_runs=30)
    assert (t.runs, t.stopped) == (30, "max_runs")


def test_warmup_is_not_timed() -> None:
    t, fake = run([1000.0] * 3 + [10.0] * 100, warmup=3)
    assert t.latency_ms == pytest.approx(10.0) and t.p90_ms == pytest.approx(10.0)
    assert fake.calls == 3 + t.runs


def test_spread_statistics() -> None:
    t, _ = run(list(map(float, range(1, 101))), rel_ci=0, max_runs=100)
    assert t.latency_ms == pytest.approx(50.5) and t.p90_ms == pytest.approx(90.1)
    assert t.iqr_ms == pytest.approx(49.5) and (t.ci_low_ms, t.ci_high_ms) == pytest.approx((40.0, 61.0))


def test_min_time_comes_before_the_interval() -> None:
    """10 ms runs: the interval is tight after 6 runs, but timing goes on for 0.2 s."""
    t, _ = run([10.0] * 1000, min_runs=3, min_time_s=0.2)
    assert t.stopped == "ci" and t.runs == 20  # 20 runs x 10 ms = 0.2 s


def test_many_runs_check_the_interval_now_and_then() -> None:
    """Past 1000 runs the interval is checked every 5% more runs, still stopping on it."""
    noise = np.random.default_rng(1).normal(10.0, 1.0, 50_000).clip(5, None)
    t, _ = run(noise, rel_ci=0.002, max_runs=50_000)
    assert t.stopped == "ci" and 1000 < t.runs < 50_000
    assert t.ci_high_ms <= t.latency_ms * 1.002 and t.ci_low_ms >= t.latency_ms * 0.998
