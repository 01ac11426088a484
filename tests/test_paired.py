"""Paired latency (autocompress.measure._paired) on synthetic timers: a fake clock that each
run advances by its cost times the machine's current slowness, which the tests change while
timing (a machine that slows down mid-measurement)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from autocompress.measure._paired import DRIFT_LIMIT, RETRIES, time_paired, time_paired_steady
from autocompress.measure._timing import TimingSettings, time_runs
from tests.runtimes import LOCAL_RUNTIMES

SETTINGS = TimingSettings(warmup=2, min_runs=20, max_runs=5000, budget_s=1.0, rel_ci=0.01,
                          min_time_s=0.2)


class Machine:
    """A fake clock; ``slowness(now)`` scales every run's cost from that moment."""

    def __init__(self, slowness: Callable[[float], float] = lambda now: 1.0) -> None:
        self.now = 0.0
        self.slowness = slowness

    def clock(self) -> float:
        return self.now

    def model(self, cost_s: float) -> Callable[[], None]:
        def run() -> None:
            self.now += cost_s * self.slowness(self.now)
        return run


def test_a_steady_machine_gives_the_true_ratio_and_no_drift() -> None:
    m = Machine()
    t = time_paired(m.model(0.010), m.model(0.004), SETTINGS, clock=m.clock)
    assert t.speedup == pytest.approx(2.5)
    assert t.reference.latency_ms == pytest.approx(10.0) and t.candidate.latency_ms == pytest.approx(4.0)
    assert t.drift == pytest.approx(0.0) and t.rounds >= 6
    assert t.ci_low == pytest.approx(2.5) and t.ci_high == pytest.approx(2.5)
    # One shared budget: the pair's runs take about what one unpaired measurement took.
    assert m.now < 1.0 + 2 * 0.010 * 20


def test_a_machine_that_slows_down_between_measurements_keeps_the_paired_speedup() -> None:
    """The bug: a baseline timed in a fast hour divided by a candidate timed in a slow one.
    Unpaired, the speed-up carries the machine's 1.5x; paired, it does not."""
    m = Machine(lambda now: 1.0 if now < 1.5 else 1.5)
    baseline = time_runs(m.model(0.010), SETTINGS, clock=m.clock)  # in the fast hour
    assert m.now < 1.5
    m.now = 2.0  # an hour later, 1.5x slower
    candidate = time_runs(m.model(0.004), SETTINGS, clock=m.clock)
    assert baseline.latency_ms / candidate.latency_ms == pytest.approx(2.5 / 1.5)  # wrong
    paired = time_paired(m.model(0.010), m.model(0.004), SETTINGS, clock=m.clock)
    assert paired.speedup == pytest.approx(2.5)  # right


def test_a_slowdown_in_the_middle_of_a_measurement_is_seen_and_retimed() -> None:
    m = Machine(lambda now: 1.0 if now < 0.1 else 1.4)  # slows down 40% after 0.1 s
    t = time_paired_steady(m.model(0.010), m.model(0.004), SETTINGS, clock=m.clock)
    assert t.retries == 1  # the first attempt drifted; the second ran on the slow machine alone
    assert t.drift <= DRIFT_LIMIT
    assert t.speedup == pytest.approx(2.5)


def test_a_clock_that_never_moves_still_stops_at_max_runs() -> None:
    m = Machine()
    t = time_paired(m.model(0.010), m.model(0.004), SETTINGS, clock=lambda: 0.0)
    assert t.rounds >= 6 and t.reference.runs + t.candidate.runs <= SETTINGS.max_runs
    assert t.candidate.stopped == "max_runs"


def test_a_machine_that_keeps_drifting_is_retimed_a_bounded_number_of_times() -> None:
    # Slows down steadily to half its speed over 1.5 s, again and again: every attempt (about
    # 1 s: the budget, as the medians never settle) sees the machine move.
    m = Machine(lambda now: 1 + (now % 1.5) / 1.5)
    t = time_paired_steady(m.model(0.010), m.model(0.004), SETTINGS, clock=m.clock)
    assert t.retries == RETRIES and t.drift > DRIFT_LIMIT
    assert m.now < 4.0  # three attempts within their budget, not an open-ended loop
    # Each round's ratio is taken within the round, so the speed-up is still the truth.
    assert t.speedup == pytest.approx(2.5, rel=0.05)


def test_one_spoiled_round_does_not_move_the_speedup() -> None:
    m = Machine(lambda now: 20.0 if 0.30 < now < 0.31 else 1.0)  # one hiccup
    t = time_paired(m.model(0.010), m.model(0.004), SETTINGS, clock=m.clock)
    assert t.speedup == pytest.approx(2.5, rel=0.01)


# --- the measurer: a real model, paired with its baseline, and the cache of ratios ------------


@pytest.fixture
def own_cache(tmp_path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "latency_cache.db"
    monkeypatch.setenv("AUTOCOMPRESS_LATENCY_CACHE", str(path))
    return path


def _models():
    import torch

    from autocompress.compress import apply
    from autocompress.compress._plan import LayerPlan, Plan
    from tests.models import MODELS

    spec = MODELS["conv2d"]
    x = spec.example_inputs()
    torch.manual_seed(0)
    base = spec.build()
    pruned = apply(base, Plan({"conv1": LayerPlan(sparsity=0.5, structure="channel")}), x)
    return base, pruned, x


QUICK = dict(warmup=2, min_runs=6, max_runs=4000, budget_s=0.2, min_time_s=0.05)


@pytest.mark.parametrize("runtime", LOCAL_RUNTIMES)
def test_the_measurer_times_a_model_paired_with_the_baseline(own_cache, runtime: str) -> None:
    from autocompress.measure import Target
    from autocompress.measure.latency import PairedMeasurer

    base, pruned, x = _models()
    target = Target(**QUICK, runtime=runtime)
    measurer = PairedMeasurer(target)
    unpaired = measurer(pruned, x, target)  # no reference yet: timed alone
    assert not unpaired.paired
    ref = measurer.reference(base, x, target)
    assert not ref.paired and not ref.cached and measurer.reference_ms == ref.latency_ms
    same = measurer(base, x, target)  # the baseline against itself
    assert same.paired and 0.75 < same.speedup < 1.33
    result = measurer(pruned, x, target)
    assert result.paired and not result.cached
    # latency_ms is on the baseline's clock: the baseline's latency / the paired ratio.
    assert result.latency_ms == pytest.approx(ref.latency_ms / result.speedup)
    assert result.measured_ms > 0 and result.reference_ms > 0 and result.measured_at > 0
    assert result.drift >= 0 and 0 <= result.retries <= RETRIES


def test_the_cache_keeps_ratios_and_puts_a_hit_on_the_current_clock(own_cache) -> None:
    from autocompress.measure import Target
    from autocompress.measure.latency import PairedMeasurer, prepare

    base, pruned, x = _models()
    target = Target(**QUICK)
    first = PairedMeasurer(target)
    first.set_reference(prepare(base, x, target), latency_ms=2.0)
    timed = first.measure(prepare(pruned, x, target))
    assert not timed.cached and timed.latency_ms == pytest.approx(2.0 / timed.speedup)
    # Another search, another hour: its baseline timed 3 ms. The ratio comes back, on its clock.
    later = PairedMeasurer(target)
    later.set_reference(prepare(base, x, target), latency_ms=3.0)
    hit = later.measure(prepare(pruned, x, target))
    assert hit.cached and hit.speedup == timed.speedup
    assert hit.latency_ms == pytest.approx(3.0 / timed.speedup)
    assert hit.p90_ms == pytest.approx(timed.p90_ms * 1.5)
    # Against another reference the ratio means nothing: timed again.
    other = PairedMeasurer(target)
    other.set_reference(prepare(pruned, x, target), latency_ms=1.0)
    assert not other.measure(prepare(base, x, target)).cached


def test_the_baseline_is_never_taken_from_the_cache(own_cache) -> None:
    """The bug: the progress line said "measuring the baseline" and the number came from a
    measurement 40 minutes old."""
    from autocompress.measure import Target, measure_latency
    from autocompress.measure.latency import PairedMeasurer

    base, _, x = _models()
    target = Target(**QUICK)
    measure_latency(base, x, target)  # an earlier, unpaired measurement is in the cache
    assert measure_latency(base, x, target).cached
    assert not PairedMeasurer(target).reference(base, x, target).cached


def test_the_service_pairs_its_measurements(own_cache) -> None:
    from autocompress.measure import Target
    from autocompress.measure.latency import prepare
    from autocompress.tune._service import MeasurementService

    base, pruned, x = _models()
    target = Target(**QUICK, pause_training=False)
    service = MeasurementService(target, "none")
    try:
        ref = service.set_reference(prepare(base, x, target))
        result = service.measure(prepare(pruned, x, target))
        assert result.paired and result.latency_ms == pytest.approx(ref.latency_ms / result.speedup)
        assert service.set_reference(prepare(base, x, target), latency_ms=5.0) is None  # resumed
        assert service.measure(prepare(pruned, x, target)).latency_ms == pytest.approx(
            5.0 / result.speedup)  # the same ratio (cached), on the logged clock
    finally:
        service.close()


def test_a_remote_agent_is_not_paired() -> None:
    """The agent times one model per request elsewhere: nothing to interleave (its baseline
    then comes from where its trials come from, the unpaired cache)."""
    from autocompress.measure import Target
    from autocompress.measure.latency import PairedMeasurer

    remote = PairedMeasurer(Target(device="remote", url="http://127.0.0.1:1", token_env="T"))
    assert not remote.can_pair
    assert all(PairedMeasurer(Target(runtime=runtime)).can_pair for runtime in LOCAL_RUNTIMES)


def test_a_reference_slower_than_usual_is_retimed() -> None:
    """A busy core slows both models, unequally: a pair timed while the reference runs more
    than DRIFT_LIMIT slower than it usually does is timed again (at most RETRIES times)."""
    busy = Machine(lambda now: 1.3 if now < 0.4 else 1.0)  # busy for the first 0.4 s
    t = time_paired_steady(busy.model(0.010), busy.model(0.004), SETTINGS, usual_ms=10.0,
                           clock=busy.clock)
    assert t.retries >= 1 and t.slowdown <= DRIFT_LIMIT  # a later attempt ran at the usual speed
    steady = Machine(lambda now: 1.3)  # slower for good: nothing better to wait for
    t = time_paired_steady(steady.model(0.010), steady.model(0.004), SETTINGS, usual_ms=10.0,
                           clock=steady.clock)
    assert t.retries == RETRIES and t.slowdown == pytest.approx(0.3)
    assert time_paired_steady(steady.model(0.010), steady.model(0.004), SETTINGS, usual_ms=13.0,
                              clock=steady.clock).retries == 0
