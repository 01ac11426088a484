"""The runtime interface: how a deployable model is built, run and described on a target.

A runtime is one small class (Optuna's ``BaseSampler`` is the model: a few methods, sensible
defaults) and one registration in ``RUNTIMES`` (``_table.py``). It serves a ``target.runtime`` name
on some ``target.device`` values:

- :meth:`Runtime.check` refuses a target this machine cannot run (before anything starts);
- :meth:`Runtime.integer_kernels` says whether quantized activations run on integer kernels
  there (the search leaves ``act_bits`` out where they do not);
- :attr:`Runtime.artifact` says what :func:`~autocompress.measure.latency.prepare` builds for
  it: the exported ONNX file (``onnx``) or the baked eager module (``module``);
- :meth:`Runtime.runner` turns the prepared model into a function that runs one inference of
  ``prepared.batch``, which the shared timing loop (:mod:`autocompress.measure._timing`) times.
  A target with several workloads (sequence lengths, a decoder's prefill and decode: see
  :mod:`autocompress.measure._workloads`) is timed one workload at a time: the caller hands
  the runtime ``prepared.for_feed(name)``, whose ``batch`` is that workload's, so a runtime
  needs nothing more than to run ``prepared.batch`` (with the shapes it has; the exported
  graph then has a dynamic sequence axis);
- :meth:`Runtime.facts` describes the measuring machine and runtime (logged with every
  measurement and part of the latency-cache key);
- :meth:`Runtime.measure` times a prepared model; runtimes that time elsewhere (the remote
  device agent) override it.

Torch-free at import, like the registry (``_table.py``), which is read when a config is validated.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from autocompress.measure._results import LatencyResult, Prepared
    from autocompress.measure.target import Target

__all__ = ["LocalRuntime", "RefusedPlan", "Runtime", "result_fields"]


class RefusedPlan(ValueError):
    """A runtime cannot run (or would miscompute) the graph of a plan: raised where a trial
    prepares or times it, so that trial fails with the reason and the others go on.

    Attributes:
        runtime: The ``target.runtime`` that refuses.
        where: The layer, node or operator it refuses.
        reason: Why.
    """

    def __init__(self, runtime: str, where: str, reason: str) -> None:
        self.runtime, self.where, self.reason = runtime, where, reason
        super().__init__(f"target.runtime={runtime!r} cannot run this plan: {where}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:  # Ray pickles a trial's error
        return (type(self), (self.runtime, self.where, self.reason))


def result_fields(run: Callable[[], object]) -> dict[str, Any]:
    """The ``LatencyResult`` fields a runner describes what it runs with (its
    ``result_fields`` attribute, e.g. the ONNX graph form timed); none by default."""
    return dict(getattr(run, "result_fields", None) or {})


class Runtime:
    """Base class of a runtime (see the module docstring)."""

    name: ClassVar[str]
    artifact: ClassVar[str] = "onnx"

    def check(self, target: Target) -> None:
        """Raises ValueError (naming the target key) if this machine cannot run ``target``."""

    def integer_kernels(self, target: Target) -> str | None:
        """Why quantized activations (``act_bits``) would not run on integer kernels on
        ``target``, or None when they do. The default: they do not (override to say they do).
        A search on a runtime without them leaves ``act_bits`` out of the space, with a note."""
        return f"the {self.name} runtime runs quantized models as fp32"

    def export_options(self, target: Target) -> dict[str, Any]:
        """Keyword arguments of :func:`~autocompress.onnxgraph.export_onnx` for this runtime's
        artifact (default none). A runtime that cannot run ONNX Runtime's contrib operators
        (``com.microsoft``: MatMulNBits, GatherBlockQuantized, the fused transformer ops)
        returns ``{"contrib_ops": False}``, and the weights are exported in standard ops."""
        return {}

    def runner(self, prepared: Prepared, target: Target) -> Callable[[], object]:
        """A function that runs one inference of ``prepared.batch`` (one workload's: the
        module docstring)."""
        raise NotImplementedError

    def facts(self, target: Target) -> dict[str, str]:
        """The measuring machine and runtime: at least ``cpu`` and ``runtime_version``."""
        raise NotImplementedError

    def cache_facts(self, target: Target) -> dict[str, str]:
        """What identifies the measuring machine in the latency-cache key (default: facts)."""
        return self.facts(target)

    def measure(self, prepared: Prepared, target: Target) -> LatencyResult:
        """Times ``prepared`` in this process by the target's timing protocol."""
        from autocompress.measure._results import LatencyResult
        from autocompress.measure._timing import time_runs

        run = self.runner(prepared, target)
        return LatencyResult.of(time_runs(run, target.timing), target, self.facts(target),
                                **result_fields(run))


class LocalRuntime(Runtime):
    """A runtime that times in this process, on this machine's CPU or GPU.

    Attributes:
        library: The package that runs the model, whose version in
            :func:`~autocompress.measure._machine.machine_facts` is the ``runtime_version``
            (``torch`` for both eager PyTorch and TorchScript); None: the runtime's name.
    """

    library: ClassVar[str | None] = None

    def facts(self, target: Target) -> dict[str, str]:
        from autocompress.measure._machine import gpu_name, machine_facts

        facts = machine_facts()
        out = {"cpu": facts["cpu"], "runtime_version": facts[self.library or self.name]}
        if target.device == "cuda":
            out["gpu"] = gpu_name()
        return out

    def cache_facts(self, target: Target) -> dict[str, str]:
        from autocompress.measure._machine import gpu_name, machine_facts

        facts = {**machine_facts(), "host": platform.node()}
        if target.device == "cuda":
            facts["gpu"] = gpu_name()
        return facts
