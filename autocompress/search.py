"""The search: Ray Tune trials, sampled by Optuna (multi-objective), logged to MLflow.

The driver loads the task once (the baseline comes from the cache), measures the baseline,
and ships task and search space to the trials through Ray's object store. Each trial turns
its sampled parameters into a :class:`~autocompress.plan.Plan`, compresses, fine-tunes
(reporting the metric per epoch), measures on the target and returns its plan and weights as
a checkpoint. A driver-side Ray Tune callback is the only MLflow writer
(:mod:`autocompress.tracking`). The Optuna study lives in an SQLite file next to the MLflow
store, so the front can be read back and a search resumed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from autocompress.config import Experiment
from autocompress.space import ResolvedSpace
from autocompress.tracking import SearchTracker

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


@dataclass
class SearchResult:
    """The outcome of a search.

    Attributes:
        experiment: The experiment that ran.
        parent_run_id: The MLflow parent run.
        baseline: The uncompressed model's metrics.
        trials: One row per trial (see :meth:`SearchTracker.table`).
        front: The Pareto-optimal feasible trials.
        study_storage: Optuna storage URL; the study is named ``study_name``.
        study_name: The Optuna study.
    """

    experiment: Experiment
    parent_run_id: str
    baseline: dict[str, float]
    trials: pd.DataFrame
    front: pd.DataFrame
    study_storage: str
    study_name: str


def study_storage_url(tracking_uri: str) -> str:
    """The Optuna storage beside the MLflow store: ``optuna.db`` in the same directory for a
    ``sqlite:///`` store, else ``.autocompress/optuna.db`` in the working directory."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return f"sqlite:///{db.parent / 'optuna.db'}"
    Path(".autocompress").mkdir(exist_ok=True)
    return f"sqlite:///{Path('.autocompress') / 'optuna.db'}"


class _DefineByRun:
    """Optuna define-by-run space for ``OptunaSearch``: samples every knob of the plan."""

    def __init__(self, space: ResolvedSpace) -> None:
        self.space = space

    def __call__(self, trial: Any) -> None:
        self.space.suggest(trial)


class _AccuracyDropConstraint:
    """Optuna ``constraints_func``: feasible iff ``baseline - accuracy <= max_drop``."""

    def __init__(self, index: int, baseline: float, max_drop: float) -> None:
        self.index, self.baseline, self.max_drop = index, baseline, max_drop

    def __call__(self, trial: Any) -> list[float]:
        if not trial.values:
            return [1.0]
        return [self.baseline - trial.values[self.index] - self.max_drop]


def make_sampler(exp: Experiment, baseline_accuracy: float):
    """The Optuna sampler named in ``search.sampler``, seeded, with the accuracy constraint."""
    import optuna

    s = exp.search
    constraint = None
    if exp.constraints.max_accuracy_drop is not None and "accuracy" in exp.metrics:
        constraint = _AccuracyDropConstraint(exp.metrics.index("accuracy"), baseline_accuracy,
                                             exp.constraints.max_accuracy_drop)
    if s.sampler == "nsga2":
        # The default population (50) would make a typical 16-64 trial search purely random.
        population = max(4, min(50, s.trials // 3))
        return optuna.samplers.NSGAIISampler(population_size=population, seed=s.seed,
                                             constraints_func=constraint)
    if s.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=s.seed, multivariate=True,
                                          n_startup_trials=max(4, min(10, s.trials // 3)),
                                          constraints_func=constraint)
    return optuna.samplers.RandomSampler(seed=s.seed)


def _searcher_class():
    from ray.tune.search.optuna import OptunaSearch

    class Searcher(OptunaSearch):
        """OptunaSearch that tells Optuna a failed trial FAILED.

        Ray's OptunaSearch passes the last (per-epoch) result of an errored multi-objective
        trial as a list of Nones, which Optuna rejects, leaving the trial RUNNING in the study.
        """

        def on_trial_complete(self, trial_id: str, result: dict | None = None,
                              error: bool = False) -> None:
            metrics = self.metric if isinstance(self.metric, list) else [self.metric]
            if error or not result or any(result.get(m) is None for m in metrics):
                result, error = None, True
            super().on_trial_complete(trial_id, result, error)

    return Searcher


def _trainable(config: dict, *, task: Any, space: ResolvedSpace, exp: Experiment,
               baseline: dict[str, float]) -> None:
    """One Ray Tune trial: plan -> compress -> fine-tune (reports per epoch) -> measure."""
    import torch
    from ray import tune

    from autocompress.compress.deploy import bake
    from autocompress.trial import run_trial

    torch.set_num_threads(max(1, int(exp.search.cpus_per_trial)))
    warnings.filterwarnings("ignore")
    plan = space.plan_from_params(config)

    def on_epoch(epoch: int, metric: float) -> None:
        tune.report({"epoch": epoch + 1, "epoch_accuracy": metric})

    result = run_trial(task, plan, exp.finetune, exp.target, on_epoch=on_epoch,
                       seed=exp.search.seed or 0)
    metrics = result.metrics.to_dict()
    relative = {
        "compression_ratio": baseline["size_bytes"] / metrics["size_bytes"],
        "speedup": baseline["latency_ms"] / metrics["latency_ms"],
        "accuracy_drop": baseline["accuracy"] - metrics["accuracy"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "plan.json").write_text(plan.to_json(indent=2))
        torch.save(bake(result.model).state_dict(), out / "model.pt")
        (out / "metrics.json").write_text(json.dumps({**metrics, **relative}, indent=2))
        tune.report({**metrics, **relative, "epochs": len(result.history), "final": True,
                     "summary": plan.summary(), "trial_seconds": result.seconds},
                    checkpoint=tune.Checkpoint.from_directory(tmp))


def _callback(tracker: SearchTracker):
    from ray.tune import Callback

    class MlflowTrialCallback(Callback):
        """Forwards Ray Tune trial events to the (single, driver-side) MLflow writer."""

        def on_trial_start(self, iteration, trials, trial, **info):
            tracker.trial_started(trial.trial_id, trial.config)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if not result.get("final") and "epoch_accuracy" in result:
                tracker.trial_epoch(trial.trial_id, int(result["epoch"]), result["epoch_accuracy"])

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            if not result.get("final"):
                tracker.trial_failed(trial.trial_id, "trial ended without a final result")
                return
            ckpt = trial.checkpoint
            if ckpt is None:
                tracker.trial_finished(trial.trial_id, result, result.get("summary", ""))
                return
            with ckpt.as_directory() as d:
                tracker.trial_finished(trial.trial_id, result, result.get("summary", ""), Path(d))

        def on_trial_error(self, iteration, trials, trial, **info):
            error = trial.error_file and Path(trial.error_file).read_text(errors="replace")
            tracker.trial_failed(trial.trial_id, error or "trial failed")

    return MlflowTrialCallback()


def run_search(exp: Experiment, *, tracking_uri: str = DEFAULT_TRACKING_URI,
               address: str | None = None, num_cpus: int | None = None, resume: bool = False,
               echo: Callable[[str], None] | None = None) -> SearchResult:
    """Runs the search of ``exp`` and returns its trials and Pareto front.

    Args:
        exp: The validated experiment.
        tracking_uri: MLflow tracking URI (any MLflow URI, e.g. ``http://host:5000``).
        address: Ray cluster address (``auto``, ``ray://...``); None starts a local Ray.
        num_cpus: CPUs of the local Ray (default: enough for ``concurrency`` trials).
        resume: Continue the latest search of ``exp.name`` (same parent run, same Optuna
            study) until it has ``search.trials`` finished trials.
        echo: Progress output; default prints to stderr.

    Raises:
        ConfigError: Bad task or search space; with ``resume``, no search to resume or an
            experiment that changed since the search started.
        KeyboardInterrupt: The search was interrupted (Ctrl-C); finished trials are kept and
            ``resume=True`` continues it.
    """
    import optuna
    import ray
    from ray import tune

    from autocompress.layers import find_layers
    from autocompress.tasks import load_task

    echo = echo or (lambda msg: print(f"autocompress: {msg}", file=sys.stderr, flush=True))
    task = load_task(exp.task, seed=exp.search.seed or 0)
    space = exp.search_space.resolve(find_layers(task.model, task.example_inputs))
    echo(f"task {task.name}: {len(space.layers)} layers, {len(space.params())} search parameters")
    tracker, storage, study_name = (_resume(exp, tracking_uri, echo) if resume
                                    else _start(exp, task, tracking_uri, echo))
    baseline = tracker.baseline
    remaining = exp.search.trials - tracker.finished_count()
    echo(f"MLflow: {tracking_uri}, experiment {exp.name!r}, parent run {tracker.parent_run_id}")
    if remaining <= 0:
        echo(f"the search already has {tracker.finished_count()} finished trials; nothing to do")
        tracker.finish("FINISHED")
        return SearchResult(exp, tracker.parent_run_id, baseline, tracker.table(), tracker.front(),
                            storage, study_name)

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # per-epoch reports
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "100")
    started_ray = not ray.is_initialized()
    if started_ray:
        cpus = num_cpus or max(os.cpu_count() or 1,
                               int(exp.search.concurrency * exp.search.cpus_per_trial + 0.999))
        # Trials must import the user's task module as the driver did (cwd, PYTHONPATH).
        path = os.pathsep.join(p for p in [os.getcwd(), *sys.path] if p and Path(p).is_dir())
        ray.init(address=address, num_cpus=None if address else cpus, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.ERROR, configure_logging=True,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
    status = "KILLED"
    ended_before = tracker.ended_count()
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warm = exp.search.warm_start and not tracker.trials
        searcher = _searcher_class()(
            space=_DefineByRun(space), metric=exp.metrics, mode=exp.modes,
            sampler=make_sampler(exp, baseline["accuracy"]), study_name=study_name,
            points_to_evaluate=[space.warm_start_params()] if warm else None,
            storage=optuna.storages.RDBStorage(storage),
        )
        trainable = tune.with_resources(
            tune.with_parameters(_trainable, task=task, space=space, exp=exp, baseline=baseline),
            {"cpu": exp.search.cpus_per_trial},
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=remaining,
                                        max_concurrent_trials=exp.search.concurrency),
            run_config=tune.RunConfig(
                name=f"{study_name}-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=str(Path(".autocompress/ray").resolve()),
                callbacks=[_callback(tracker)], verbose=0,
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
        echo(f"searching: {remaining} trials, {exp.search.concurrency} at a time, "
             f"sampler {exp.search.sampler}")
        tuner.fit()
        if tracker.ended_count() - ended_before < remaining:
            raise KeyboardInterrupt  # Ray Tune caught Ctrl-C and stopped early
        status = "FINISHED"
    except KeyboardInterrupt:
        where = f" {exp.path}" if exp.path else ""
        echo(f"interrupted: {tracker.finished_count()} of {exp.search.trials} trials finished and "
             f"kept. Resume with: autocompress search{where} --resume")
        raise
    finally:
        tracker.finish(status)
        if started_ray:
            ray.shutdown()
    return SearchResult(exp, tracker.parent_run_id, baseline, tracker.table(), tracker.front(),
                        storage, study_name)


def _start(exp: Experiment, task: Any, tracking_uri: str,
           echo: Callable[[str], None]) -> tuple[SearchTracker, str, str]:
    """Measures the baseline and opens a new parent run and a new Optuna study."""
    from autocompress.measure import machine_facts, measure

    echo(f"measuring the baseline on {exp.target.runtime}/{exp.target.device}")
    baseline = measure(task.model, task, exp.target).to_dict()
    echo(f"baseline: accuracy {baseline['accuracy']:.4f}, size {baseline['size_bytes'] / 1024:.1f} "
         f"KiB, latency {baseline['latency_ms']:.4f} ms")
    tracker = SearchTracker.start(
        tracking_uri, exp.name, exp.to_dict(), baseline,
        [(o.metric, str(o.mode)) for o in exp.objectives],
        max_accuracy_drop=exp.constraints.max_accuracy_drop, facts=machine_facts(), echo=echo,
        total=exp.search.trials,
    )
    storage = study_storage_url(tracking_uri)
    study_name = f"{exp.name}-{tracker.parent_run_id}"
    tracker.client.set_tag(tracker.parent_run_id, "autocompress.study", f"{storage}#{study_name}")
    return tracker, storage, study_name


# Keys whose change makes finished trials incomparable with new ones.
_RESUME_KEYS = ("task", "search_space", "objectives", "target", "finetune", "constraints")


def _resume(exp: Experiment, tracking_uri: str,
            echo: Callable[[str], None]) -> tuple[SearchTracker, str, str]:
    """Reopens the latest search of ``exp.name`` and closes out what a killed driver left open."""
    import optuna
    from mlflow.tracking import MlflowClient

    from autocompress.errors import ConfigError
    from autocompress.tracking import latest_search

    client = MlflowClient(tracking_uri)
    parent = latest_search(client, exp.name)
    with tempfile.TemporaryDirectory() as tmp:
        logged = json.loads(Path(client.download_artifacts(parent.info.run_id, "experiment.json",
                                                           tmp)).read_text())
    current = json.loads(json.dumps(exp.to_dict(), default=str))
    for key in _RESUME_KEYS:
        if logged.get(key) != current.get(key):
            raise ConfigError(f"{key} changed since search {parent.info.run_id} started; resume "
                              f"needs the same {key} (or start a new search with --name)",
                              file=exp.path, key=key)
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
