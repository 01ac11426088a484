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
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Any

import numpy as np

CONFIDENCE = 0.95


@dataclass(frozen=True)
class TimingSettings:
    """The timing protocol (module docstring), shared by local measurement and the device agent.

    Attributes:
        warmup: Untimed runs before timing.
        min_runs: Timed runs always done.
        max_runs: Upper bound on timed runs.
        budget_s: Stop timing after ``min_runs`` once this many seconds are spent.
        rel_ci: Stop timing after ``min_runs`` and ``min_time_s`` once the 95% confidence
            interval of the median is within ``±rel_ci`` of the median (0 turns this off).
        min_time_s: Time at least this long before the interval may stop timing (a smaller
            ``budget_s`` wins), so that a fast model is not judged on a few milliseconds.

    Raises:
        ValueError: A setting out of range (the message names it and the allowed values).
    """

    warmup: int = 10
    min_runs: int = 30
    max_runs: int = 100_000
    budget_s: float = 1.0
    rel_ci: float = 0.02
    min_time_s: float = 0.5

    def __post_init__(self) -> None:
        for key in ("min_runs", "max_runs"):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)!r}; allowed: an integer >= 1")
        if not _is_int(self.warmup) or self.warmup < 0:
            raise ValueError(f"warmup={self.warmup!r}; allowed: an integer >= 0")
        if self.max_runs < self.min_runs:
            raise ValueError(f"max_runs={self.max_runs} < min_runs={self.min_runs}")
        if not _is_number(self.budget_s) or not self.budget_s > 0:  # "not > 0" refuses NaN
            raise ValueError(f"budget_s={self.budget_s!r}; allowed: a number > 0")
        if not _is_number(self.rel_ci) or not 0 <= self.rel_ci < 1:
            raise ValueError(f"rel_ci={self.rel_ci!r}; allowed: a number >= 0 and < 1")
        if not _is_number(self.min_time_s) or not self.min_time_s >= 0:
            raise ValueError(f"min_time_s={self.min_time_s!r}; allowed: a number >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> TimingSettings:
        """The settings named in ``data`` (other keys ignored), the rest at their defaults."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


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


def time_runs(run: Callable[[], object], settings: TimingSettings, *,
              clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Times ``run`` by the protocol in the module docstring (``clock`` is for tests).

    The interval is checked after every run up to 1000 runs, then whenever the runs grew by
    5% (sorting tens of thousands of times after every run would cost more than the runs).
    """
    warmup, min_runs, max_runs = settings.warmup, settings.min_runs, settings.max_runs
    budget_s, rel_ci, min_time_s = settings.budget_s, settings.rel_ci, settings.min_time_s
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
    return summarize(times, stopped)


def summarize(times_ms: list[float], stopped: str) -> Timing:
    """The :class:`Timing` of a series of run times (milliseconds, any order)."""
    times = sorted(times_ms)
    q25, q50, q75, q90 = np.percentile(np.asarray(times), [25, 50, 75, 90])
    lo, hi = median_ci(times)
    return Timing(float(q50), float(q90), float(q75 - q25), len(times), float(lo), float(hi), stopped)
