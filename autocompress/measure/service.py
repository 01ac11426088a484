"""The measurement service: a search's latencies, timed one at a time on a core no trial uses.

Timings taken while other trials train on the same cores are wrong (they measure the
contention, not the model). So a search starts one :class:`MeasurementService` Ray actor per
target, on the driver's node (the machine the search measures on). The actor reserves one
Ray CPU and pins itself to one physical core (the highest-numbered core it may use); trials
on that node pin themselves to the other cores (:func:`keep_off`), and so does the driver.
The actor runs one measurement at a time (a Ray actor's calls run in order), so
measurements never overlap each other either, and it consults and fills the latency cache
under that same order, so an architecture is measured once even when two trials finish it
at the same moment.

Trials prepare their model where they run (export, cache key: :func:`~autocompress.measure.
latency.prepare`) and send the result to the actor through Ray; only the timing happens on the
reserved core.

With ``device: remote`` the service forwards to the device agent (which serialises
measurements itself) and reserves no core. On a single-core node nothing can be reserved:
the service then measures unpinned and says so (``isolated`` is False in :meth:`info`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autocompress.measure.latency import LatencyResult, Prepared, measure_prepared, prepare
from autocompress.measure.target import Target


def pin(cores: set[int]) -> None:
    """Pins every thread of this process (and the threads it starts later) to ``cores``."""
    for tid in _threads():
        try:
            os.sched_setaffinity(tid, cores)
        except OSError:  # a thread that ended meanwhile
            pass
    os.sched_setaffinity(0, cores)


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def keep_off(reserved: Reservation | None) -> None:
    """Pins this process away from ``reserved``'s core, if it runs on the reserved node."""
    if reserved is None or reserved.core is None or not hasattr(os, "sched_setaffinity"):
        return
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_node_id() != reserved.node_id:
        return
    allowed = os.sched_getaffinity(0) - {reserved.core}
    if allowed:
        pin(allowed)


@dataclass(frozen=True)
class Reservation:
    """Where the measurement service runs: a Ray node and the core reserved on it (or None)."""

    node_id: str
    core: int | None


class MeasurementService:
    """Times prepared models on ``target``, one at a time, pinned to a reserved core.

    Meant to run as a Ray actor (see :func:`start_service`); the class itself is plain so that
    it can be tested in-process.

    Args:
        target: The target every measurement is for.
        reserve: Pin to one core of those this process may use (the highest-numbered).
    """

    def __init__(self, target: Target, reserve: bool = True) -> None:
        self.target = target
        self.core: int | None = None
        self.measured = 0
        self.cache_hits = 0
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if reserve and len(cores) > 1:
            self.core = cores[-1]
            pin({self.core})
        torch.set_num_threads(target.threads)

    def info(self) -> dict[str, Any]:
        """Where the service runs: node id, reserved core, pid, current affinity, counters."""
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        return {"node_id": node, "core": self.core, "isolated": self.core is not None,
                "pid": os.getpid(), "affinity": affinity, "measured": self.measured,
                "cache_hits": self.cache_hits}

    def measure(self, prepared: Prepared, use_cache: bool = True) -> LatencyResult:
        """Times ``prepared`` (or takes it from the cache); one call at a time."""
        result = measure_prepared(prepared, self.target, use_cache)
        self.cache_hits += result.cached
        self.measured += not result.cached
        return result


def start_service(target: Target) -> tuple[Any, Reservation]:
    """Starts the measurement service actor on this (the driver's) node.

    The actor asks Ray for one CPU where the node has two or more (so no trial is scheduled
    onto its share; a local search starts Ray with one CPU more than its trials need) and none
    otherwise (so that a trial can still run there; the core is reserved by pinning alone);
    with ``device: cuda`` it also takes the GPU, with ``device: remote`` no core at all.

    Returns:
        The actor handle and where it runs.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    local = target.device != "remote"
    cpus = 1 if local and node.get("Resources", {}).get("CPU", 0) >= 2 else 0
    gpus = 1 if target.device == "cuda" else 0
    here = NodeAffinitySchedulingStrategy(node_id, soft=False)
    actor = (ray.remote(MeasurementService)
             .options(num_cpus=cpus, num_gpus=gpus, scheduling_strategy=here, max_concurrency=1)
             .remote(target, reserve=local))
    info = ray.get(actor.info.remote())
    return actor, Reservation(info["node_id"], info["core"])


class ServiceMeasurer:
    """Measures through the service: prepares here (in the trial), times there.

    Args:
        actor: The :class:`MeasurementService` actor handle.
    """

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def __call__(self, model: nn.Module, example_inputs: torch.Tensor, target: Target) -> LatencyResult:
        import ray

        return ray.get(self.actor.measure.remote(prepare(model, example_inputs, target)))
