"""The timing loop shared by local measurement and the remote device agent (numpy only, no torch).

Protocol: ``warmup`` untimed runs, then timed runs (``time.perf_counter``) until at least
``min_runs`` are done and either (after at least ``min_time_s`` seconds of timing) the 95%
confidence interval of the median is within ``±rel_ci`` of the median, or ``budget_s``
seconds of timing are spent; never more than ``max_runs``. ``min_time_s`` keeps a fast model
from being judged on a few milliseconds of runs, which one hiccup of the machine (an
interrupt, a descheduled virtual CPU) would cover entirely. The interval is
distribution-free: the order statistics ``x(l) <= median <= x(n+1-l)`` with ``l`` from
the Binomial(n, 1/2) distribution (exact up to 1000 runs, normal approximation beyond).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Timing:
    """Summary of one timed series, in milliseconds."""

    latency_ms: float  # median
    p90_ms: float
    iqr_ms: float
    runs: int
    ci_low_ms: float  # 95% confidence interval of the median (nan when too few runs)
    ci_high_ms: float
    stopped: str  # "ci" | "budget" | "max_runs"


@lru_cache(maxsize=4096)
def median_ci_ranks(n: int, confidence: float = CONFIDENCE) -> tuple[int, int] | None:
    """1-based ranks ``(l, u)`` with ``P(x(l) <= median <= x(u)) >= confidence``, or None.

    None means no interval of order statistics reaches ``confidence`` (fewer than 6 runs at 95%).
    """
    if n < 1:
        return None
    alpha = (1.0 - confidence) / 2
    if n > 1000:  # normal approximation of Binomial(n, 1/2)
        z = _z(confidence)
        lo = math.floor(n / 2 - z * math.sqrt(n) / 2)
        return (lo, n + 1 - lo) if lo >= 1 else None
    # Largest l with P(B <= l - 1) <= alpha, B ~ Binomial(n, 1/2).
    log_half_n = n * math.log(0.5)
    cdf = 0.0
    lo = 0
    for k in range(n):
        cdf += math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + log_half_n)
        if cdf > alpha:
            break
        lo = k + 1
    return (lo, n + 1 - lo) if lo >= 1 else None


def _z(confidence: float) -> float:
    # Two-sided standard normal quantile by bisection on erf (no scipy on the device).
    target = confidence
    a, b = 0.0, 10.0
    for _ in range(100):
        m = (a + b) / 2
        if math.erf(m / math.sqrt(2)) < target:
            a = m
        else:
            b = m
    return (a + b) / 2


def median_ci(sorted_times: list[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Distribution-free confidence interval of the median of ``sorted_times`` (ascending)."""
    ranks = median_ci_ranks(len(sorted_times), confidence)
    if ranks is None:
        return math.nan, math.nan
    return sorted_times[ranks[0] - 1], sorted_times[ranks[1] - 1]


def ci_is_tight(sorted_times: list[float], rel_ci: float) -> bool:
    """Whether the median's confidence interval lies within ``±rel_ci`` of the median."""
    if rel_ci <= 0:
        return False
    lo, hi = median_ci(sorted_times)
    if math.isnan(lo):
        return False
    med = float(np.median(sorted_times))
    return med * (1 - rel_ci) <= lo and hi <= med * (1 + rel_ci)


def time_runs(run: Callable[[], object], *, warmup: int, min_runs: int, max_runs: int,
              budget_s: float, rel_ci: float = 0.02, min_time_s: float = 0.0,
              clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Times ``run`` by the protocol in the module docstring (``clock`` is for tests).

    The interval is checked after every run up to 1000 runs, then whenever the runs grew by
    5% (sorting tens of thousands of times after every run would cost more than the runs).
    """
    for _ in range(warmup):
        run()
    times: list[float] = []
    start = clock()
    stopped = "max_runs"
    next_check = min_runs
    while len(times) < max_runs:
        t0 = clock()
        run()
        t1 = clock()
        times.append((t1 - t0) * 1e3)
        n = len(times)
        if n < min_runs:
            continue
        if rel_ci > 0 and n >= next_check and t1 - start >= min_time_s:
            next_check = n + 1 if n < 1000 else int(n * 1.05)
            if ci_is_tight(sorted(times), rel_ci):
                stopped = "ci"
                break
        if t1 - start > budget_s:
            stopped = "budget"
            break
    times.sort()
    arr = np.asarray(times)
    q25, q50, q75, q90 = np.percentile(arr, [25, 50, 75, 90])
    lo, hi = median_ci(times)
    return Timing(float(q50), float(q90), float(q75 - q25), len(times), float(lo), float(hi), stopped)
