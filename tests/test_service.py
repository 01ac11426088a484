"""The measurement service: a Ray actor pinned to a reserved core, one measurement at a time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from autocompress.measure.latency import prepare
from autocompress.measure.service import Reservation, ServiceMeasurer, keep_off, start_service
from autocompress.measure.target import Target
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


@pytest.fixture
def service(ray_local):
    import ray

    actor, reserved = start_service(TARGET)
    try:
        yield actor, reserved
    finally:
        ray.kill(actor)


@pytest.mark.skipif(not TWO_CORES, reason="needs two cores to reserve one")
def test_service_pins_itself_to_a_reserved_core(service) -> None:
    import ray

    actor, reserved = service
    info = ray.get(actor.info.remote())
    assert info["isolated"] and info["core"] == max(os.sched_getaffinity(0))
    assert info["affinity"] == [info["core"]]
    assert reserved == Reservation(ray.get_runtime_context().get_node_id(), info["core"])
    # The reserved core's Ray CPU is taken, so no trial is scheduled onto its share.
    assert ray.available_resources().get("CPU", 0) == pytest.approx(2)


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


def test_service_measurer_prepares_here_and_times_there(service) -> None:
    actor, _ = service
    spec = MODELS["mlp"]
    result = ServiceMeasurer(actor)(spec.build(), spec.example_inputs(), TARGET)
    assert 0 < result.latency_ms <= result.p90_ms and result.runs >= TARGET.min_runs
    assert result.runtime == "onnxruntime" and result.cpu


def test_torch_runtime_through_the_service(service) -> None:
    import ray

    target = Target(runtime="torch", warmup=1, min_runs=3, max_runs=8, budget_s=0.05)
    actor, _ = start_service(target)
    try:
        spec = MODELS["residual"]
        result = ServiceMeasurer(actor)(spec.build(), spec.example_inputs(), target)
        assert result.runtime == "torch" and result.latency_ms > 0
    finally:
        ray.kill(actor)
