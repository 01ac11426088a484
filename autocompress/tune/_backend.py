"""Search backends: what runs a search's trials, and the job they are given.

A backend takes a :class:`SearchJob` (the trial function, the space and Optuna study, the
budget, the resources, the MLflow writer) and runs its trials until ``remaining`` of them
ended (pruned ones replaced, up to ``cap`` in all), telling the writer every trial event
(:mod:`autocompress.tune._events`). Two are built in, in :data:`BACKENDS`:

- ``ray`` (default, :mod:`autocompress.tune._ray_backend`): Ray Tune, parallel trials, a
  cluster, resume;
- ``serial`` (:mod:`autocompress.tune._serial`): one trial after another in this process with
  Optuna's ask/tell, no Ray: for fast tests, breakpoints and notebooks.

Both keep the Optuna study in its storage, the source of truth for resume. A new backend is
one module with a class registered as ``@BACKENDS.register("name")``, declared below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from autocompress._registry import Registry
from autocompress.config import Experiment
from autocompress.tune._samplers import SamplerFactory
from autocompress.tune._trial import search_trial

Echo = Callable[[str], None]


@dataclass
class SearchJob:
    """Everything a backend needs to run a search's trials.

    Attributes:
        exp: The experiment: objectives, ``search`` budget and resources, target, fine-tuning.
        task: The loaded task.
        space: The resolved search space (its ``suggest`` samples an Optuna trial).
        baseline: The baseline's metrics.
        tracker: The search's MLflow writer (:class:`~autocompress.tracking.SearchTracker`);
            every trial event goes there, from this process only.
        storage: The Optuna storage URL.
        study_name: The Optuna study (created or reopened there).
        first: Parameters of the first trials, enqueued before the sampler's own.
        remaining: Trials to end (finished or failed); pruned ones are replaced.
        cap: Trials to start at most, pruned ones included.
        trial: The trial function (:func:`~autocompress.tune._trial.search_trial`).
    """

    exp: Experiment
    task: Any
    space: Any
    baseline: dict[str, float]
    tracker: Any
    storage: str
    study_name: str
    first: list[dict[str, Any]]
    remaining: int
    cap: int
    trial: Callable[..., Any] = search_trial

    @property
    def sampler(self) -> SamplerFactory:
        """What builds the study's sampler (picklable settings, not a live sampler)."""
        exp = self.exp
        return SamplerFactory(exp.search, tuple(exp.metrics), exp.constraints.max_accuracy_drop,
                              self.baseline["accuracy"], self.space)


class SearchBackend(Protocol):
    """Runs a search's trials. Built as ``cls(address=..., num_cpus=...)``; then
    :meth:`check` (before anything is written), :meth:`start`, :meth:`run`, and always
    :meth:`close`."""

    def check(self, exp: Experiment) -> None:
        """Refuses settings this backend cannot run (a ``ConfigError``), starting nothing."""

    def start(self, exp: Experiment, echo: Echo) -> Any:
        """Starts what the trials need; returns the measurer the baseline is timed with (a
        callable with a ``reference`` method, as the measurement service's)."""

    def run(self, job: SearchJob, echo: Echo) -> None:
        """Runs ``job``'s trials (returns when they ended, raises ``KeyboardInterrupt`` on
        Ctrl-C)."""

    def close(self) -> None:
        """Frees what :meth:`start` took; safe to call after a failed or no start."""


BACKENDS: Registry[Callable[..., SearchBackend]] = Registry("search backend", {
    "ray": "autocompress.tune._ray_backend",
    "serial": "autocompress.tune._serial",
})
