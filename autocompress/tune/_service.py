"""The measurement service: a search's latencies, timed one at a time on a core no trial uses.

(Search-only, so it lives in the search package; the Ray backend runs it as an actor, the
serial backend in-process.)

Timings taken while other trials train on the same cores are wrong (they measure the
contention, not the model). So a search starts one :class:`MeasurementService` Ray actor per
target, on the driver's node (the machine the search measures on). The actor reserves one
Ray CPU and pins itself to one physical core (the highest-numbered core it may use); trials
on that node pin themselves to the other cores (:func:`keep_off`), and so does the driver.
The actor runs one measurement at a time (a Ray actor's calls run in order), so
measurements never overlap each other either, and it consults and fills the latency cache
under that same order, so an architecture is measured once even when two trials finish it
at the same moment.

A separate core is not always enough: cores share caches and memory bandwidth, and on
machines with SMT (and on VMs whose virtual CPUs are hyperthreads of one physical core) a
busy sibling slows the measuring core down. So with ``target.pause_training`` (the default)
the service also pauses training on its node while it times: trials run every training step
and evaluation through :class:`TrainingGate`, two ``flock`` files in a directory the service
owns. The service takes the *gate* lock exclusively (no new step starts), then the *work*
lock exclusively (running steps finish), times, and releases both; a step takes the gate
shared for an instant, then holds *work* shared while it runs. Locks die with their process,
so a crashed trial never blocks the service.

Trials prepare their model where they run (export, cache key: :func:`~autocompress.measure.
latency.prepare`) and send the result to the actor through Ray; only the timing happens on the
reserved core.

A whole reserved core costs a trial's worth of CPU, which a small machine cannot spare: on 2
cores it leaves one core to two trials, and running them two at a time is then slower than
one at a time. So the search reserves a core only where one is spare (more cores than its
trials use, :func:`isolation_for`); otherwise, with ``pause_training``, the service shares
the cores (``isolation="pause"``) and the gate counts: it has ``n`` slots (the cores divided
by the CPUs of one trial), every training step holds one, and a measurement takes one of those
``n`` slots, so it has a core of its own while it times and at most ``n - 1`` steps run
beside it. The trial whose model is timed waits for the result and trains nothing meanwhile,
so with as many trials as cores no training pauses at all.

With ``device: remote`` the service forwards to the device agent (which serialises
measurements itself) and reserves no core. On a single-core node nothing can be reserved:
the service then measures unpinned and says so (``isolated`` is False in :meth:`info`).
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autocompress.measure.latency import LatencyResult, PairedMeasurer, Prepared, prepare
from autocompress.measure.target import Target


def pin(cores: set[int]) -> None:
    """Pins every thread of this process (and the threads it starts later) to ``cores``."""
    for tid in _threads():
        try:
            os.sched_setaffinity(tid, cores)
        except OSError:  # a thread that ended meanwhile
            pass
    os.sched_setaffinity(0, cores)


def usable_cores() -> list[int]:
    """The cores this process may run on (every core where the OS cannot say)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def _on_service_node(reserved: Reservation) -> bool:
    """Whether this process runs on the Ray node of the measurement service."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_node_id() == reserved.node_id


def keep_off(reserved: Reservation | None) -> None:
    """Pins this process away from ``reserved``'s core, if it runs on the reserved node."""
    if (reserved is None or reserved.core is None or not hasattr(os, "sched_setaffinity")
            or not _on_service_node(reserved)):
        return
    allowed = os.sched_getaffinity(0) - {reserved.core}
    if allowed:
        pin(allowed)


@dataclass(frozen=True)
class Reservation:
    """Where the measurement service runs.

    Attributes:
        node_id: Its Ray node.
        core: The core reserved on that node, or None.
        gate_dir: Directory of its :class:`TrainingGate` locks (``pause_training``), or None.
        gate_slots: The gate's ``slots`` (None: a measurement pauses every step).
    """

    node_id: str
    core: int | None
    gate_dir: str | None = None
    gate_slots: int | None = None


class TrainingGate:
    """Pauses training steps on one machine while the measurement service times a model.

    Picklable (holds paths; each process opens the lock files on first use). Trials use
    :meth:`step` around each training step; the service uses :meth:`measuring`.

    Two policies:

    - ``slots=None`` (the service has a core of its own): a measurement holds back *every*
      step on the machine (a busy sibling hyperthread, shared caches and memory bandwidth
      would slow the measuring core down).
    - ``slots=n`` (the service shares the machine's ``n`` cores with the trials): at most ``n``
      steps run at once, each holding one slot, and a measurement takes one slot for itself,
      so it always has a core while at most ``n - 1`` steps run beside it. A trial waiting
      for its own model's timing holds no slot, so with as many trials as cores nothing
      pauses at all.

    Args:
        directory: Where the lock files live (created by the service).
        slots: See above.
    """

    def __init__(self, directory: str, slots: int | None = None) -> None:
        self.directory = directory
        self.slots = slots
        self._fds: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory, "slots": self.slots, "_fds": {}}

    def _fd(self, name: str) -> int:
        if name not in self._fds:
            self._fds[name] = os.open(Path(self.directory) / name, os.O_RDWR | os.O_CREAT, 0o600)
        return self._fds[name]

    def _take_slot(self) -> int:
        """Locks the first free slot and returns its fd; while none is free, tries again every
        millisecond (a process cannot wait on several locks at once, and waiting on one of
        them could mean waiting for a whole measurement while another slot frees up)."""
        assert self.slots is not None
        fds = [self._fd(f"slot-{i}") for i in range(self.slots)]
        while True:
            for fd in fds:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    continue
            time.sleep(0.001)

    @contextlib.contextmanager
    def _held(self, mode: int) -> Iterator[None]:
        """Holds ``work`` in ``mode`` (``slots=None``) or one slot, entered through the gate:
        taken shared by steps (they pass unless a measurement is getting ready), exclusively
        by a measurement (no new step starts until it holds what it needs; without slots, none
        until it is done)."""
        gate = self._fd("gate")
        keep_gate = mode == fcntl.LOCK_EX and self.slots is None
        fcntl.flock(gate, fcntl.LOCK_SH if mode == fcntl.LOCK_SH else fcntl.LOCK_EX)
        try:
            if self.slots is None:
                fd = self._fd("work")
                fcntl.flock(fd, mode)
            else:
                fd = self._take_slot()
        except BaseException:
            fcntl.flock(gate, fcntl.LOCK_UN)
            raise
        if not keep_gate:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            if keep_gate:
                fcntl.flock(gate, fcntl.LOCK_UN)

    def step(self) -> contextlib.AbstractContextManager[None]:
        """Waits while a measurement runs (or, with slots, for a free slot), then holds it
        back until the step is done."""
        return self._held(fcntl.LOCK_SH)

    def measuring(self) -> contextlib.AbstractContextManager[None]:
        """Stops new steps, waits for running ones (or, with slots, for one of them), and
        holds them back until done."""
        return self._held(fcntl.LOCK_EX)


def training_gate(reserved: Reservation | None) -> Any:
    """The per-step context of a trial: the service's gate when this process runs on the
    service's node and training pauses for measurements, else a no-op."""
    if reserved is None or reserved.gate_dir is None or not _on_service_node(reserved):
        return contextlib.nullcontext
    return TrainingGate(reserved.gate_dir, reserved.gate_slots).step


ISOLATION = ("core", "pause", "none")


def isolation_for(target: Target, trial_cpus: float) -> str:
    """How the measurement service keeps training away from its timings on this node.

    ``"core"``: it reserves a core (and pauses training while it times, with
    ``pause_training``) when the cores this process may use outnumber the CPUs the trials
    take (``concurrency * cpus_per_trial``), or when training may not be paused;
    ``"pause"``: otherwise it shares the cores with the trials, and its counting training gate
    frees one for each measurement; ``"none"``: a remote target (the device agent serialises
    its measurements).
    """
    if target.device == "remote":
        return "none"
    return "core" if len(usable_cores()) > trial_cpus or not target.pause_training else "pause"


class MeasurementService:
    """Times prepared models on ``target``, one at a time, isolated from training.

    Meant to run as a Ray actor (see :func:`start_service`); the class itself is plain so that
    it can be tested in-process.

    Args:
        target: The target every measurement is for.
        isolation: ``"core"``: pin to one core of those this process may use (the
            highest-numbered) that trials keep off; ``"pause"``: no core of its own; ``"none"``:
            neither a core nor the training gate (a remote target). With ``"core"`` or
            ``"pause"`` and ``target.pause_training``, training on this node pauses while it
            times (:class:`TrainingGate`).
        trial_cpus: Threads of one trial (``cpus_per_trial``). With ``"pause"`` the gate has
            one slot per ``ceil(trial_cpus)`` cores, so a measurement's slot frees a core.
    """

    def __init__(self, target: Target, isolation: str = "core", trial_cpus: float = 1.0) -> None:
        if isolation not in ISOLATION:
            raise ValueError(f"isolation={isolation!r}; allowed: {list(ISOLATION)}")
        self.target = target
        self.isolation = isolation
        self.core: int | None = None
        self.measured = 0
        self.cache_hits = 0
        cores = usable_cores()
        if isolation == "core" and len(cores) > 1 and hasattr(os, "sched_setaffinity"):
            self.core = cores[-1]
            pin({self.core})
        self.gate: TrainingGate | None = None
        if isolation != "none" and target.pause_training:
            self.gate = TrainingGate(tempfile.mkdtemp(prefix="autocompress-gate-"),
                                     None if isolation == "core"
                                     else max(1, len(cores) // max(1, math.ceil(trial_cpus))))
        torch.set_num_threads(target.threads)
        self.timer = PairedMeasurer(target)

    def close(self) -> None:
        """Removes the gate's lock files (the service is done)."""
        if self.gate is not None:
            shutil.rmtree(self.gate.directory, ignore_errors=True)

    def info(self) -> dict[str, Any]:
        """Where the service runs: node id, reserved core, pid, current affinity, counters."""
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        return {"node_id": node, "core": self.core, "isolation": self.isolation,
                "isolated": self.core is not None or self.gate is not None,
                "gate_dir": self.gate.directory if self.gate else None,
                "gate_slots": self.gate.slots if self.gate else None, "pid": os.getpid(),
                "affinity": affinity, "measured": self.measured, "cache_hits": self.cache_hits}

    def set_reference(self, prepared: Prepared, latency_ms: float | Mapping[str, float] | None = None
                      ) -> LatencyResult | None:
        """Makes ``prepared`` (the baseline) the model every later one is timed paired with
        (:class:`~autocompress.measure.latency.PairedMeasurer`, each workload with its own);
        timed now unless its ``latency_ms`` is given (a resumed search's: its ``latency_ms``,
        or ``{workload: ms}``)."""
        return self.timer.set_reference(prepared, latency_ms, self._while_timing())

    def measure(self, prepared: Prepared, use_cache: bool = True) -> LatencyResult:
        """Times ``prepared`` paired with the reference (or takes it from the cache); one call
        at a time, with training on this node paused (``target.pause_training``)."""
        result = self.timer.measure(prepared, use_cache, self._while_timing())
        self.cache_hits += result.cached
        self.measured += not result.cached
        return result

    def _while_timing(self) -> Any:
        return self.gate.measuring if self.gate else contextlib.nullcontext


START_TIMEOUT_S = 120.0  # to get the service's CPU (and GPU) on the driver's node


def start_service(target: Target, isolation: str | None = None,
                  trial_cpus: float = 1.0) -> tuple[Any, Reservation]:
    """Starts the measurement service actor on this (the driver's) node.

    With a reserved core (``isolation="core"``, the default for a local target) the actor asks
    Ray for one CPU where the node has two or more (so no trial is scheduled onto its share; a
    local search starts Ray with one CPU more than its trials need) and none otherwise (so
    that a trial can still run there; the core is reserved by pinning alone); sharing the
    cores (``"pause"``) or measuring remotely (``"none"``, forced for ``device: remote``) it
    asks for none. With ``device: cuda`` it also takes the GPU. ``trial_cpus``: see
    :class:`MeasurementService`.

    Returns:
        The actor handle and where it runs.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    isolation = "none" if target.device == "remote" else isolation or "core"
    resources = node.get("Resources", {})
    cpus = 1 if isolation == "core" and resources.get("CPU", 0) >= 2 else 0
    gpus = 1 if target.device == "cuda" else 0
    if gpus and resources.get("GPU", 0) < 1:
        raise RuntimeError("target.device is 'cuda' but Ray sees no GPU on this node (check "
                           "CUDA_VISIBLE_DEVICES, or start Ray with --num-gpus)")
    here = NodeAffinitySchedulingStrategy(node_id, soft=False)
    actor = (ray.remote(MeasurementService)
             .options(num_cpus=cpus, num_gpus=gpus, scheduling_strategy=here, max_concurrency=1)
             .remote(target, isolation, trial_cpus))
    try:
        info = ray.get(actor.info.remote(), timeout=START_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.kill(actor)
        raise RuntimeError(f"the measurement service did not start within {START_TIMEOUT_S:.0f} s: "
                           f"this node has no free CPU{' or GPU' if gpus else ''} for it "
                           f"(free: {ray.available_resources()})") from None
    return actor, Reservation(info["node_id"], info["core"], info["gate_dir"], info["gate_slots"])


def stop_service(actor: Any) -> None:
    """Ends the service actor (and frees its reserved CPU and core), removing its lock files."""
    import ray

    try:
        ray.get(actor.close.remote(), timeout=30)
    except Exception:  # noqa: BLE001  (a dead actor has nothing left to clean)
        pass
    ray.kill(actor)


class ServiceMeasurer:
    """Measures through the service: prepares here (in the trial), times there.

    Args:
        actor: The :class:`MeasurementService` actor handle.
    """

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def __call__(self, model: nn.Module, example_inputs: Any, target: Target) -> LatencyResult:
        import ray

        return ray.get(self.actor.measure.remote(prepare(model, example_inputs, target)))

    def reference(self, model: nn.Module, example_inputs: Any, target: Target,
                  latency_ms: float | None = None) -> LatencyResult | None:
        """Makes ``model`` the service's reference (the baseline), timed now; or, given its
        ``latency_ms`` (a resumed search's logged baseline), on that clock without timing it."""
        import ray

        return ray.get(self.actor.set_reference.remote(prepare(model, example_inputs, target),
                                                       latency_ms))
