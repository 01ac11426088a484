"""The measurement service: a Ray actor pinned to a reserved core, one measurement at a time."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from autocompress.measure.latency import prepare
from autocompress.measure.target import Target
from autocompress.tune._service import (
    Reservation,
    ServiceMeasurer,
    TrainingGate,
    isolation_for,
    keep_off,
    start_service,
    stop_service,
    training_gate,
)
from tests.models import MODELS

TARGET = Target(warmup=1, min_runs=3, max_runs=8, budget_s=0.05)
TWO_CORES = hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) >= 2


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory: pytest.TempPathFactory):
    """A local Ray whose workers use a latency cache of their own."""
    import ray

    cache = tmp_path_factory.mktemp("cache") / "latency.db"
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"AUTOCOMPRESS_LATENCY_CACHE": str(cache),
                                       "PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    try:
        yield cache
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def service(ray_local):
    """One service for the module's tests (starting one takes seconds); its teardown checks
    that stopping it gives its core and CPU back."""
    import ray

    actor, reserved = start_service(TARGET)
    try:
        yield actor, reserved
    finally:
        stop_service(actor)
    assert reserved.gate_dir is None or not Path(reserved.gate_dir).exists()
    deadline = time.monotonic() + 30  # ray.kill frees the actor's CPU asynchronously
    while ray.available_resources().get("CPU", 0) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0) == pytest.approx(3)  # the reserved CPU is back


@pytest.mark.slow  # a Ray cluster with the service (make test-fast skips it)
@pytest.mark.skipif(not TWO_CORES, reason="needs two cores to reserve one")
def test_service_pins_itself_to_a_reserved_core(service) -> None:
    import ray

    actor, reserved = service
    info = ray.get(actor.info.remote())
    assert info["isolated"] and info["core"] == max(os.sched_getaffinity(0))
    assert info["affinity"] == [info["core"]]
    assert reserved == Reservation(ray.get_runtime_context().get_node_id(), info["core"],
                                   info["gate_dir"], None)
    # The reserved core's Ray CPU is taken, so no trial is scheduled onto its share.
    assert ray.available_resources().get("CPU", 0) == pytest.approx(2)


@pytest.mark.slow  # a Ray cluster with the service (make test-fast skips it)
@pytest.mark.skipif(not TWO_CORES, reason="needs two cores to reserve one")
def test_trials_keep_off_the_reserved_core(service) -> None:
    import ray

    _, reserved = service

    @ray.remote(num_cpus=1, max_calls=1)  # a fresh worker process per call
    def trial_affinity(reserved: Reservation) -> list[int]:
        keep_off(reserved)
        torch.set_num_threads(2)
        torch.ones(64, 64) @ torch.ones(64, 64)  # intra-op threads started after pinning
        return sorted(os.sched_getaffinity(0))

    affinity = ray.get(trial_affinity.remote(reserved))
    assert reserved.core not in affinity and affinity
    # A reservation on another node leaves the trial's cores alone.
    elsewhere = ray.get(trial_affinity.remote(Reservation("another-node", reserved.core)))
    assert reserved.core in elsewhere


@pytest.mark.slow  # a Ray cluster with the service (make test-fast skips it)
def test_one_measurement_per_architecture_even_when_trials_finish_together(service) -> None:
    """Two trials send the same architecture (different weights) at once: the service measures
    it once and answers the other from the cache, because it handles one call at a time."""
    import ray

    actor, _ = service
    spec = MODELS["conv2d"]
    models = [spec.build(), spec.build()]
    with torch.no_grad():
        models[1].conv1.weight.mul_(3)
    prepared = [prepare(m, spec.example_inputs(), TARGET) for m in models]
    assert prepared[0].key == prepared[1].key and prepared[0].onnx != prepared[1].onnx
    before = ray.get(actor.info.remote())
    results = ray.get([actor.measure.remote(p) for p in prepared])
    assert sorted(r.cached for r in results) == [False, True]
    assert results[0].latency_ms == results[1].latency_ms > 0
    after = ray.get(actor.info.remote())
    assert (after["measured"] - before["measured"], after["cache_hits"] - before["cache_hits"]) == (1, 1)


@pytest.mark.slow  # a Ray cluster with the service (make test-fast skips it)
def test_service_measurer_prepares_here_and_times_there(service) -> None:
    actor, _ = service
    spec = MODELS["mlp"]
    result = ServiceMeasurer(actor)(spec.build(), spec.example_inputs(), TARGET)
    assert 0 < result.latency_ms <= result.p90_ms and result.runs >= TARGET.min_runs
    assert result.runtime == "onnxruntime" and result.cpu


@pytest.mark.slow  # a Ray cluster with the service (make test-fast skips it)
def test_torch_runtime_through_the_service(service) -> None:

    target = Target(runtime="torch", warmup=1, min_runs=3, max_runs=8, budget_s=0.05)
    actor, _ = start_service(target)
    try:
        spec = MODELS["residual"]
        result = ServiceMeasurer(actor)(spec.build(), spec.example_inputs(), target)
        assert result.runtime == "torch" and result.latency_ms > 0
    finally:
        stop_service(actor)


def test_a_measurement_waits_for_running_steps_and_holds_new_ones(tmp_path: Path) -> None:
    """Two handles on the same lock files (as two processes have): the service's ``measuring``
    waits for a running step, and a step that starts during a measurement waits for its end."""
    service_side, trial_side = TrainingGate(str(tmp_path)), TrainingGate(str(tmp_path))
    events: list[str] = []

    def measure() -> None:
        with service_side.measuring():
            events.append("measure start")
            time.sleep(0.3)
            events.append("measure end")

    with trial_side.step():
        thread = threading.Thread(target=measure)
        thread.start()
        time.sleep(0.3)
        events.append("step end")
    time.sleep(0.1)  # the measurement runs now
    with trial_side.step():
        events.append("next step")
    thread.join()
    assert events == ["step end", "measure start", "measure end", "next step"]


@pytest.mark.slow  # a Ray cluster with the service (make test-fast skips it)
def test_training_gate_only_on_the_service_node(service) -> None:
    import ray

    _, reserved = service
    assert reserved.gate_dir and Path(reserved.gate_dir).is_dir()

    @ray.remote(num_cpus=1)
    def gate_kind(reserved: Reservation) -> str:
        gate = training_gate(reserved)
        return "no-op" if gate is contextlib.nullcontext else type(gate.__self__).__name__

    assert ray.get(gate_kind.remote(reserved)) == "TrainingGate"
    assert training_gate(None) is contextlib.nullcontext
    off = Reservation("another-node", reserved.core, reserved.gate_dir)
    assert ray.get(gate_kind.remote(off)) == "no-op"
    no_pause = Reservation(reserved.node_id, reserved.core, None)
    assert ray.get(gate_kind.remote(no_pause)) == "no-op"


@pytest.mark.slow  # a Ray cluster with the service (make test-fast skips it)
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_a_cuda_service_without_a_gpu_is_refused_not_left_pending(ray_local) -> None:
    with pytest.raises(RuntimeError, match="Ray sees no GPU on this node"):
        start_service(Target(device="cuda"))


@pytest.mark.slow  # a Ray cluster with the service (make test-fast skips it)
@pytest.mark.skipif(not TWO_CORES, reason="needs two cores to share")
def test_a_sharing_service_takes_no_core_and_no_ray_cpu(service) -> None:
    """``isolation="pause"``: unpinned, no Ray CPU, and a counting gate with a slot per core."""
    import ray

    actor, reserved = start_service(TARGET, "pause")
    try:
        info = ray.get(actor.info.remote())
        cores = len(os.sched_getaffinity(0))
        assert info["core"] is None and info["isolation"] == "pause" and info["isolated"]
        assert len(info["affinity"]) == cores and reserved.gate_slots == cores
        assert ray.available_resources().get("CPU", 0) == pytest.approx(2)  # only `service`'s
        spec = MODELS["mlp"]
        assert ServiceMeasurer(actor)(spec.build(), spec.example_inputs(), TARGET).latency_ms > 0
    finally:
        stop_service(actor)


@pytest.mark.parametrize(("cores", "trial_cpus", "slots"), [(2, 1, 2), (2, 2, 1), (8, 2, 4),
                                                            (8, 1.5, 4), (1, 4, 1)])
def test_a_measurement_slot_frees_a_whole_trial(monkeypatch, tmp_path: Path, cores: int,
                                                trial_cpus: float, slots: int) -> None:
    """Trials of several threads: one slot per ceil(cpus_per_trial) cores, so that the slot a
    measurement takes frees at least one core."""
    from autocompress.tune._service import MeasurementService

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix: str(tmp_path))
    threads = torch.get_num_threads()
    try:
        service = MeasurementService(TARGET, "pause", trial_cpus)  # sets the target's threads
    finally:
        torch.set_num_threads(threads)
    assert service.core is None and service.gate is not None and service.gate.slots == slots


def test_without_affinity_the_cores_are_all_the_cores(monkeypatch) -> None:
    """Where the OS cannot say which cores a process may use (macOS), the policy and the gate
    count every core, not one."""
    from autocompress.tune._service import usable_cores

    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert usable_cores() == list(range(6))
    assert isolation_for(TARGET, 6) == "pause" and isolation_for(TARGET, 4) == "core"


@pytest.mark.parametrize(("cores", "trial_cpus", "pause", "device", "expected"), [
    (8, 2, True, "cpu", "core"),     # a core to spare
    (2, 2, True, "cpu", "pause"),    # the trials take every core: share them, pause training
    (2, 1, True, "cpu", "core"),
    (2, 2, False, "cpu", "core"),    # training may not pause: only a core isolates
    (4, 6, True, "cuda", "pause"),
    (2, 1, True, "remote", "none"),
])
def test_isolation_follows_the_cores_the_trials_leave(monkeypatch, cores, trial_cpus, pause,
                                                      device, expected) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    target = Target(device=device, pause_training=pause,
                    **({"url": "http://agent:8765", "token_env": "AGENT_TOKEN"}
                       if device == "remote" else {}))
    assert isolation_for(target, trial_cpus) == expected


def test_a_counting_gate_lets_steps_run_beside_a_measurement(tmp_path: Path) -> None:
    """``slots=2`` (2 cores shared): a measurement takes the free slot without waiting for the
    running step a; a second step b then waits (both slots taken) and runs as soon as a ends,
    while the measurement still runs. Events, not sleeps, order the threads."""
    service_side = TrainingGate(str(tmp_path), slots=2)
    trial_a, trial_b = TrainingGate(str(tmp_path), slots=2), TrainingGate(str(tmp_path), slots=2)
    a_runs, release_a, measuring, end_measure, b_ran = (threading.Event() for _ in range(5))
    events: list[str] = []

    def step_a() -> None:
        with trial_a.step():
            a_runs.set()
            release_a.wait(10)
            events.append("a ends")

    def measure() -> None:
        with service_side.measuring():
            events.append("measure start")
            measuring.set()
            end_measure.wait(10)
            events.append("measure end")

    def step_b() -> None:
        with trial_b.step():
            events.append("b runs")
            b_ran.set()

    threads = [threading.Thread(target=f) for f in (step_a, measure, step_b)]
    threads[0].start()
    assert a_runs.wait(10)
    threads[1].start()
    assert measuring.wait(10), "the measurement waited for the running step"
    threads[2].start()
    assert not b_ran.wait(0.3), "a third holder while both slots were taken"
    release_a.set()
    assert b_ran.wait(10), "b did not run beside the measurement"
    end_measure.set()
    for t in threads:
        t.join(10)
    assert events == ["measure start", "a ends", "b runs", "measure end"]


def test_a_gate_without_slots_still_holds_every_step(tmp_path: Path) -> None:
    """The reserved-core policy is unchanged: while measuring, no step runs at all."""
    service_side, trial_side = TrainingGate(str(tmp_path)), TrainingGate(str(tmp_path))
    events: list[str] = []

    def step() -> None:
        with trial_side.step():
            events.append("step")

    with service_side.measuring():
        thread = threading.Thread(target=step)
        thread.start()
        time.sleep(0.3)
        events.append("measure end")
    thread.join()
    assert events == ["measure end", "step"]
