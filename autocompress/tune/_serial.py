"""The serial backend: one trial after another in this process, sampled with Optuna's
ask/tell, no Ray (``ac.search(..., backend="serial")``).

The same trial function, study, sampler, first trials, pruning rule and MLflow records as the
Ray backend; only the trials run here, so a test needs no cluster, a breakpoint in a trial
stops the search, and a notebook sees its output. Latency is timed in this process, paired
with the baseline (:class:`~autocompress.tune._service.MeasurementService` without a reserved
core: nothing trains while a model is timed). The study lives in its Optuna storage, so a
search resumes as a Ray one does (and may be resumed by either backend).
"""

from __future__ import annotations

import contextlib
import socket
import traceback
import warnings
from collections.abc import Iterator
from typing import Any

from autocompress._errors import ConfigError, root_cause
from autocompress.config import Experiment
from autocompress.tune._backend import BACKENDS, Echo, SearchJob
from autocompress.tune._events import TrialFailed, TrialFinished, TrialPruned, record
from autocompress.tune._samplers import VALUES_ATTR
from autocompress.tune._trial import RecoveryBook, TrialContext


@BACKENDS.register("serial")
class SerialBackend:
    """Runs trials one at a time in this process (``search.concurrency`` is ignored).

    Args:
        address: Must be None or ``local``: the serial backend uses no cluster.
        num_cpus: Ignored (a trial trains on ``search.cpus_per_trial`` threads).
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        self.address = address
        self.service: Any = None
        self.measurer: LocalMeasurer | None = None

    def check(self, exp: Experiment) -> None:
        """Refuses a Ray address (the serial backend runs here)."""
        if self.address not in (None, "local"):
            raise ConfigError(f"address={self.address!r}: the serial backend runs the trials in "
                              f"this process; drop the address or use search.backend: ray",
                              file=exp.path, key="search.backend")

    def start(self, exp: Experiment, echo: Echo) -> Any:
        """The in-process measurement service's measurer."""
        from autocompress.tune._service import MeasurementService

        with _torch_threads(None):  # the service sets the target's threads for its timing
            self.service = MeasurementService(exp.target, "none")
        self.measurer = LocalMeasurer(self.service)
        return self.measurer

    def run(self, job: SearchJob, echo: Echo) -> None:
        """Asks the study for trials and runs them here until ``job.remaining`` ended."""
        import optuna

        exp = job.exp
        study = optuna.create_study(
            study_name=job.study_name, storage=job.storage, sampler=job.sampler(),
            directions=["maximize" if m == "max" else "minimize" for m in exp.modes],
            load_if_exists=True)
        for point in job.first:
            study.enqueue_trial(point)
        echo(f"searching: {job.remaining} trials, one at a time in this process, "
             f"sampler {exp.search.sampler}")
        book, node = RecoveryBook(), socket.gethostname()
        ended = started = 0
        while ended < job.remaining and started < job.cap:
            trial = study.ask()
            job.space.suggest(trial)
            key, params = f"serial_{trial.number:05d}", _nested(trial.params)
            job.tracker.trial_started(key, params)
            started += 1
            ctx = TrialContext(lambda event, key=key: record(job.tracker, key, event),
                               self.measurer, book, None, node)
            event = _run_one(job, params, ctx)
            record(job.tracker, key, event)
            ended += _tell(study, trial, event, exp.metrics)

    def close(self) -> None:
        """Removes the service's lock files, if it has any."""
        if self.service is not None:
            self.service.close()


def _run_one(job: SearchJob, params: dict[str, Any], ctx: TrialContext) -> Any:
    """One trial, with the threads and warnings a Ray trial has; an exception becomes a
    :class:`TrialFailed` (root cause, then the traceback)."""
    try:
        with _torch_threads(max(1, int(job.exp.search.cpus_per_trial))), warnings.catch_warnings():
            warnings.filterwarnings("ignore")
            return job.trial(params, ctx, task=job.task, space=job.space, exp=job.exp,
                             baseline=job.baseline)
    except Exception as e:  # noqa: BLE001  (a failed trial fails alone, as on Ray)
        return TrialFailed(root_cause(e),
                           f"{root_cause(e)}\n\n{''.join(traceback.format_exception(e))}")


def _tell(study: Any, trial: Any, event: Any, metrics: list[str]) -> int:
    """Tells the study how ``trial`` ended; 1 if it counts as ended (finished or failed), 0 if
    pruned (replaced by a new one)."""
    from optuna.trial import TrialState

    if isinstance(event, TrialPruned):
        study.tell(trial, state=TrialState.PRUNED)
        return 0
    values = event.values(metrics) if isinstance(event, TrialFinished) else None
    if values is None:
        study.tell(trial, state=TrialState.FAIL)
        return 1
    trial.set_user_attr(VALUES_ATTR, values)  # for the constraint (AccuracyDropConstraint)
    study.tell(trial, values)
    return 1


def _nested(params: dict[str, Any]) -> dict[str, Any]:
    """``{"layer/knob": v}`` as ``{"layer": {"knob": v}}``, the form Ray Tune hands to its
    trials (so both backends log the same parameters)."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        *path, last = name.split("/")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return out


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Torch's intra-op threads set to ``n`` (None: left as they are), restored on exit."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class LocalMeasurer:
    """Times models with a :class:`~autocompress.tune._service.MeasurementService` in this
    process, on the target's threads (the trial's own are restored after)."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def __call__(self, model: Any, example_inputs: Any, target: Any) -> Any:
        from autocompress.measure.latency import prepare

        prepared = prepare(model, example_inputs, target)
        with _torch_threads(target.threads):
            return self.service.measure(prepared)

    def reference(self, model: Any, example_inputs: Any, target: Any,
                  latency_ms: float | None = None) -> Any:
        """Makes ``model`` the reference (the baseline); see ``ServiceMeasurer.reference``."""
        from autocompress.measure.latency import prepare

        prepared = prepare(model, example_inputs, target)
        with _torch_threads(target.threads):
            return self.service.set_reference(prepared, latency_ms)
