"""The runtime interface: how a deployable model is built, run and described on a target.

A runtime is one small class (Optuna's ``BaseSampler`` is the model: a few methods, sensible
defaults) and one line in :data:`RUNTIMES`. It serves a ``target.runtime`` name on some
``target.device`` values:

- :meth:`Runtime.check` refuses a target this machine cannot run (before anything starts);
- :attr:`Runtime.artifact` says what :func:`~autocompress.measure.latency.prepare` builds for
  it: the exported ONNX file (``onnx``) or the baked eager module (``module``);
- :meth:`Runtime.runner` turns the prepared model into a function that runs one inference, which
  the shared timing loop (:mod:`autocompress.measure._timing`) times;
- :meth:`Runtime.facts` describes the measuring machine and runtime (logged with every
  measurement and part of the latency-cache key);
- :meth:`Runtime.measure` times a prepared model; runtimes that time elsewhere (the remote
  device agent) override it.

This module is torch-free: the registry is read when a config is validated.
"""

from __future__ import annotations

import importlib
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from autocompress.measure.latency import LatencyResult, Prepared
    from autocompress.measure.target import Target

__all__ = ["RUNTIMES", "LocalRuntime", "Runtime", "RuntimeEntry", "devices_of", "get_runtime",
           "register_runtime", "runtime_names"]


class Runtime:
    """Base class of a runtime (see the module docstring)."""

    name: ClassVar[str]
    artifact: ClassVar[str] = "onnx"

    def check(self, target: Target) -> None:
        """Raises ValueError (naming the target key) if this machine cannot run ``target``."""

    def runner(self, prepared: Prepared, target: Target) -> Callable[[], object]:
        """A function that runs one inference of ``prepared.batch``."""
        raise NotImplementedError

    def facts(self, target: Target) -> dict[str, str]:
        """The measuring machine and runtime: at least ``cpu`` and ``runtime_version``."""
        raise NotImplementedError

    def cache_facts(self, target: Target) -> dict[str, str]:
        """What identifies the measuring machine in the latency-cache key (default: facts)."""
        return self.facts(target)

    def measure(self, prepared: Prepared, target: Target) -> LatencyResult:
        """Times ``prepared`` in this process by the target's timing protocol."""
        from autocompress.measure._timing import time_runs
        from autocompress.measure.latency import LatencyResult

        t = time_runs(self.runner(prepared, target), target.timing)
        facts = self.facts(target)
        return LatencyResult(t.latency_ms, t.p90_ms, t.iqr_ms, t.runs, target.runtime, target.device,
                             target.threads, target.batch_size, t.ci_low_ms, t.ci_high_ms, t.stopped,
                             facts.get("runtime_version", ""), facts.get("cpu", ""),
                             gpu=facts.get("gpu", ""))


class LocalRuntime(Runtime):
    """A runtime that times in this process, on this machine's CPU or GPU."""

    def facts(self, target: Target) -> dict[str, str]:
        from autocompress.measure._machine import gpu_name, machine_facts

        facts = machine_facts()
        out = {"cpu": facts["cpu"], "runtime_version": facts[self.name]}
        if target.device == "cuda":
            out["gpu"] = gpu_name()
        return out

    def cache_facts(self, target: Target) -> dict[str, str]:
        from autocompress.measure._machine import gpu_name, machine_facts

        facts = {**machine_facts(), "host": platform.node()}
        if target.device == "cuda":
            facts["gpu"] = gpu_name()
        return facts


@dataclass(frozen=True)
class RuntimeEntry:
    """One registered runtime.

    Attributes:
        name: The ``target.runtime`` value it serves.
        devices: The ``target.device`` values it serves.
        where: ``"module:Class"`` of its :class:`Runtime`, imported on first use.
    """

    name: str
    devices: tuple[str, ...]
    where: str

    def load(self) -> Runtime:
        module, _, cls = self.where.partition(":")
        return getattr(importlib.import_module(module), cls)()


# The runtimes, one file each. A new runtime is one file with a Runtime subclass plus one line
# here (``_torch.py`` is the smallest to copy).
RUNTIMES: list[RuntimeEntry] = [
    RuntimeEntry("onnxruntime", ("cpu", "cuda"), "autocompress.measure.runtimes._ort:OnnxRuntime"),
    RuntimeEntry("torch", ("cpu", "cuda"), "autocompress.measure.runtimes._torch:TorchRuntime"),
    RuntimeEntry("onnxruntime", ("remote",), "autocompress.measure.runtimes._remote:RemoteAgent"),
]
_LOADED: dict[tuple[str, str], Runtime] = {}


def register_runtime(name: str, devices: tuple[str, ...], where: str) -> None:
    """Registers a runtime class ``where`` (``"module:Class"``) for ``name`` on ``devices``."""
    taken = [d for e in RUNTIMES if e.name == name for d in e.devices if d in devices]
    if taken:
        raise RuntimeError(f"runtime {name!r} is already registered for devices {taken}")
    RUNTIMES.append(RuntimeEntry(name, tuple(devices), where))


def runtime_names() -> list[str]:
    """The ``target.runtime`` values, in registration order."""
    return list(dict.fromkeys(e.name for e in RUNTIMES))


def devices_of(name: str) -> list[str]:
    """The ``target.device`` values runtime ``name`` serves."""
    return [d for e in RUNTIMES if e.name == name for d in e.devices]


def get_runtime(target: Any) -> Runtime:
    """The runtime serving ``target.runtime`` on ``target.device`` (one instance per pair).

    Raises:
        ValueError: No runtime serves that pair (the message lists what does).
    """
    key = (target.runtime, target.device)
    if key not in _LOADED:
        entry = next((e for e in RUNTIMES if e.name == key[0] and key[1] in e.devices), None)
        if entry is None:
            raise ValueError(f"target.runtime={key[0]!r} with device: {key[1]}; allowed: "
                             f"{[e.name for e in RUNTIMES if key[1] in e.devices]}")
        _LOADED[key] = entry.load()
    return _LOADED[key]
