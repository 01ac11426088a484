"""Paired latency: a candidate timed in the same window as a reference, so that a speed-up
carries none of the machine's drift.

On a shared machine the same model times 6.4 ms in one hour and 9.4 ms in the next; dividing a
baseline timed once by candidates timed later ranks models by the hour they were timed in. So
the search times every candidate interleaved with its reference (the baseline model, kept
loaded): rounds of a block of reference runs and a block of candidate runs, the order
alternating (A B, B A, ...) so that a steady drift weighs on both alike. Each round gives the
ratio of the two blocks' medians; the **speed-up is the median of these ratios** (Ratios of
paired medians are what side-by-side benchmarks report; a median over rounds also ignores a
round that one hiccup of the machine spoiled).

The pair shares one timing budget (``TimingSettings``): ``min_runs``, ``budget_s`` and
``max_runs`` count the runs of both models (at least 6 rounds are always timed, so a
``max_runs`` below 12 is exceeded), the blocks are sized so that the first 6 rounds
fill ``min_time_s``, and timing stops early, as the unpaired protocol does, once both medians'
intervals are within ``rel_ci`` (the interval of the ratio over a few rounds is wider: asking
it to be that tight ran every MiniLM pair to the budget, twice the time of an unpaired
measurement). So pairing costs about the reference's warm-up runs.

**Drift.** The reference's block medians of the first and the second half of the rounds are
compared; when they differ by more than :data:`DRIFT_LIMIT` (the machine sped up or slowed down
while timing), or when the reference ran more than :data:`DRIFT_LIMIT` slower than it usually
does (``usual_ms``: the caller's recent measurements; another process was busy on the core,
which slows a short model and a long one unequally: a digits pair measured 0.35x instead of
0.49x under a busy loop), the pair is timed again, at most :data:`RETRIES` times, and the
steadiest attempt is kept; the result says how much the machine moved, how much slower than
usual it was, and how many times it was retimed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from autocompress.measure._timing import Timing, TimingSettings, ci_is_tight, median_ci, summarize

ROUNDS_MIN = 6  # rounds always timed (the ratio's interval needs six)
DRIFT_LIMIT = 0.10  # relative change of the reference within a measurement that retimes it
RETRIES = 2  # retimings after a drift, at most


@dataclass(frozen=True)
class PairedTiming:
    """A candidate and its reference timed in one window.

    Attributes:
        candidate: The candidate's runs.
        reference: The reference's runs, interleaved with the candidate's.
        speedup: Median over rounds of reference block median / candidate block median.
        ci_low: 95% confidence interval of that median (nan with fewer than 6 rounds).
        ci_high: Its upper end.
        rounds: Rounds timed.
        drift: ``|first half / second half - 1|`` of the reference's block medians.
        slowdown: The reference's median / its usual one - 1 (0 when no usual one is known).
        retries: Times the pair was timed again because the reference drifted or was slow.
    """

    candidate: Timing
    reference: Timing
    speedup: float
    ci_low: float
    ci_high: float
    rounds: int
    drift: float
    slowdown: float = 0.0
    retries: int = 0

    @property
    def unsteadiness(self) -> float:
        """How far the machine was from steady and usual: the larger of drift and slowdown."""
        return max(self.drift, self.slowdown)


def time_paired(run_reference: Callable[[], object], run_candidate: Callable[[], object],
                settings: TimingSettings, *, reference_warm: bool = False,
                clock: Callable[[], float] = time.perf_counter) -> PairedTiming:
    """Times the two, interleaved, by the protocol in the module docstring (``clock`` is for
    tests); one attempt, no retiming (see :func:`time_paired_steady`). ``reference_warm``:
    the reference already ran its warm-up (a loaded baseline timed before) and skips it."""
    runs = (run_reference, run_candidate)
    for _ in range(settings.warmup):
        for run in runs[1:] if reference_warm else runs:
            run()
    # One run of each sets the block length: the first ROUNDS_MIN rounds fill the minimum
    # time (the budget where there is none), as long as the unpaired protocol would time.
    once = []
    for run in runs:
        t0 = clock()
        run()
        once.append(clock() - t0)
    planned = settings.min_time_s or settings.budget_s
    block = max(1, min(int(planned / (2 * ROUNDS_MIN) / max(max(once), 1e-9)),
                       settings.max_runs // (2 * ROUNDS_MIN)))
    stopped = "max_runs"
    times: tuple[list[float], list[float]] = ([], [])
    medians: tuple[list[float], list[float]] = ([], [])
    ratios: list[float] = []
    start = clock()
    while True:
        r = len(ratios)
        for side in ((0, 1) if r % 2 == 0 else (1, 0)):
            block_times = []
            for _ in range(block):
                t0 = clock()
                runs[side]()
                block_times.append((clock() - t0) * 1e3)
            times[side].extend(block_times)
            medians[side].append(float(np.median(block_times)))
        ratios.append(medians[0][-1] / max(medians[1][-1], 1e-12))
        done = len(times[0]) + len(times[1])
        elapsed = clock() - start
        block = max(1, min(block, (settings.max_runs - done) // 2))  # max_runs bounds the pair
        if len(ratios) < ROUNDS_MIN or done < settings.min_runs:
            continue
        if done + 2 > settings.max_runs:
            break
        if elapsed > settings.budget_s:
            stopped = "budget"
            break
        if elapsed >= settings.min_time_s and all(ci_is_tight(sorted(t), settings.rel_ci)
                                                  for t in times):
            stopped = "ci"
            break
    half = len(ratios) // 2
    first, second = np.median(medians[0][:half]), max(np.median(medians[0][half:]), 1e-12)
    low, high = median_ci(sorted(ratios))
    return PairedTiming(summarize(times[1], stopped), summarize(times[0], stopped),
                        float(np.median(ratios)),
                        low, high, len(ratios), float(abs(first / second - 1)))


def time_paired_steady(run_reference: Callable[[], object], run_candidate: Callable[[], object],
                       settings: TimingSettings, *, reference_warm: bool = False,
                       usual_ms: float | None = None,
                       clock: Callable[[], float] = time.perf_counter) -> PairedTiming:
    """:func:`time_paired`, timed again (at most :data:`RETRIES` times, both warm) while the
    reference drifts, or runs slower than ``usual_ms``, by more than :data:`DRIFT_LIMIT`; the
    steadiest attempt, with the number of retimings."""

    def attempt(warm: bool) -> PairedTiming:
        t = time_paired(run_reference, run_candidate, settings, reference_warm=warm, clock=clock)
        slow = max(0.0, t.reference.latency_ms / usual_ms - 1) if usual_ms else 0.0
        return replace(t, slowdown=slow)

    best = attempt(reference_warm)
    retries = 0
    while best.unsteadiness > DRIFT_LIMIT and retries < RETRIES:
        retries += 1
        best = min(best, attempt(True), key=lambda t: t.unsteadiness)
    return replace(best, retries=retries)

