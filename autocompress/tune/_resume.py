"""Starting a new search's parent run and study, or reopening an interrupted one."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autocompress.config import Experiment
from autocompress.tracking import SearchTracker
from autocompress.tune._result import study_storage_url


def _start(exp: Experiment, task: Any, tracking_uri: str, echo: Callable[[str], None],
           measurer: Any, study_storage: str | None = None) -> tuple[SearchTracker, str, str]:
    """Measures the baseline (with ``measurer``, the search's measurement service) and opens a
    new parent run and a new Optuna study (in ``study_storage``, default beside the store)."""
    from autocompress.finetune import distill_loss_name
    from autocompress.measure import machine_facts, measure
    from autocompress.measure.latency import target_facts
    from autocompress.measure.runtimes import get_runtime

    echo(f"measuring the baseline on {exp.target.runtime}/{exp.target.device}")
    measured = measure(task.model, task, exp.target, measurer.reference)
    baseline = measured.to_dict()
    baseline.pop("latency_cache_hit", None)
    echo(f"baseline: accuracy {baseline['accuracy']:.4f}, size {baseline['size_bytes'] / 1024:.1f} "
         f"KiB, latency {baseline['latency_ms']:.4f} ms")
    tracker = SearchTracker.start(
        tracking_uri, exp.name, exp.to_dict(), baseline,
        [(o.metric, str(o.mode)) for o in exp.objectives],
        max_accuracy_drop=exp.constraints.max_accuracy_drop,
        facts={**machine_facts(), **target_facts(exp.target),
               "baseline.latency_measured_at": _when(measured.latency),
               "target.integer_kernels": get_runtime(exp.target).integer_kernels(exp.target) or "yes",
               "finetune.distill_loss": distill_loss_name(exp.finetune, task)},
        echo=echo, total=exp.search.trials,
    )
    storage = study_storage or study_storage_url(tracking_uri)
    study_name = f"{exp.name}-{tracker.parent_run_id}"
    tracker.client.set_tag(tracker.parent_run_id, "autocompress.study", f"{storage}#{study_name}")
    return tracker, storage, study_name



def _when(latency: Any) -> str:
    """When a latency was timed, as a UTC timestamp ("" if unknown)."""
    import time

    at = getattr(latency, "measured_at", 0.0)
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at)) if at else ""


# Keys whose change makes finished trials incomparable with new ones.
_RESUME_KEYS = ("task", "search_space", "objectives", "target", "finetune", "constraints")


def _with_defaults(key: str, logged: Any) -> Any:
    """A logged settings section with the defaults of settings added since it was logged (a
    search started by an older version resumes unless a setting really changed)."""
    from autocompress.config import Constraints
    from autocompress.finetune import FinetuneConfig
    from autocompress.measure.target import Target

    settings = {"target": Target, "finetune": FinetuneConfig, "constraints": Constraints}
    if key not in settings or not isinstance(logged, dict):
        return logged
    return {**settings[key]().to_dict(), **logged}



def _resumable(exp: Experiment, tracking_uri: str) -> Any:
    """The parent run of the latest search of ``exp.name``, checked for resuming; reads only.

    Raises:
        ConfigError: No store, no earlier search of the experiment, or an experiment that
            changed since that search started.
    """
    from autocompress._errors import ConfigError
    from autocompress.tracking import latest_search, open_store

    try:
        client = open_store(tracking_uri, must_exist=True)
        parent = latest_search(client, exp.name)
    except ConfigError:
        raise ConfigError(f"no earlier search of experiment {exp.name!r} in {tracking_uri} to "
                          f"resume; start one without --resume", key="--resume") from None
    with tempfile.TemporaryDirectory() as tmp:
        logged = json.loads(Path(client.download_artifacts(parent.info.run_id, "experiment.json",
                                                           tmp)).read_text())
    current = json.loads(json.dumps(exp.to_dict(), default=str))
    for key in _RESUME_KEYS:
        if _with_defaults(key, logged.get(key)) != current.get(key):
            raise ConfigError(f"{key} changed since search {parent.info.run_id} started; resume "
                              f"needs the same {key} (or start a new search with --name)",
                              file=exp.path, key=key)
    return parent



def _reopen(exp: Experiment, tracking_uri: str, parent: Any,
            echo: Callable[[str], None]) -> tuple[SearchTracker, str, str]:
    """Reopens the search of ``parent`` and closes out what a killed driver left open."""
    import optuna

    storage, _, study_name = parent.data.tags["autocompress.study"].partition("#")
    study = optuna.load_study(study_name=study_name, storage=storage)
    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in stale:  # left RUNNING by a killed driver
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    tracker = SearchTracker.resume(
        tracking_uri, parent.info.run_id, [(o.metric, str(o.mode)) for o in exp.objectives],
        max_accuracy_drop=exp.constraints.max_accuracy_drop, echo=echo, total=exp.search.trials)
    echo(f"resuming search {parent.info.run_id}: {tracker.finished_count()} trials finished, "
         f"{len(stale)} interrupted trials closed")
    return tracker, storage, study_name
