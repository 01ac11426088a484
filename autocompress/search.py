"""The search: Ray Tune trials, sampled by Optuna (multi-objective), logged to MLflow.

The driver loads the task once (the baseline comes from the cache), measures the baseline,
and ships task and search space to the trials through Ray's object store. Each trial turns
its sampled parameters into a :class:`~autocompress.plan.Plan`, compresses, fine-tunes
(reporting the metric per epoch), measures on the target and sends its plan and weights back
to the driver through Ray (no checkpoint, so trials on other nodes of a cluster need no
shared disk). A driver-side Ray Tune callback is the only MLflow writer
(:mod:`autocompress.tracking`). The Optuna study lives in an SQLite file next to the MLflow
store, so the front can be read back and a search resumed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
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
    # Optuna 5 deprecates constraints_func for trial.set_constraint, which needs the objective
    # function that Ray's OptunaSearch owns; it still works until Optuna 7.
    warnings.filterwarnings("ignore", message=".*constraints_func.*", category=FutureWarning)
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
               baseline: dict[str, float], inbox: Any, service: Any, reserved: Any) -> None:
    """One Ray Tune trial: plan -> compress -> fine-tune (reports per epoch) -> measure.

    The trial may run on any node of a cluster: its artifacts go to the driver through Ray
    (``inbox``), not through a checkpoint on a disk the driver would have to share. Its latency
    is timed by the search's measurement ``service``, whose core (``reserved``) it keeps off.
    """
    import io

    import ray
    import torch
    from ray import tune

    from autocompress.compress.deploy import bake
    from autocompress.measure.metrics import relative_metrics
    from autocompress.measure.service import ServiceMeasurer, keep_off, training_gate
    from autocompress.trial import run_trial

    keep_off(reserved)
    torch.set_num_threads(max(1, int(exp.search.cpus_per_trial)))
    warnings.filterwarnings("ignore")
    plan = space.plan_from_params(config)
    node = f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()}"

    def on_epoch(epoch: int, metric: float) -> None:
        tune.report({"epoch": epoch + 1, "epoch_accuracy": metric, "node": node})

    result = run_trial(task, plan, exp.finetune, exp.target, on_epoch=on_epoch,
                       seed=exp.search.seed or 0, measurer=ServiceMeasurer(service),
                       step_gate=training_gate(reserved))
    metrics = result.metrics.to_dict()
    relative = relative_metrics(metrics, baseline)
    weights = io.BytesIO()
    torch.save(bake(result.model).state_dict(), weights)
    files = {"plan.json": plan.to_json(indent=2).encode(), "model.pt": weights.getvalue(),
             "metrics.json": json.dumps({**metrics, **relative}, indent=2).encode()}
    # Delivered before the final report, so the driver finds them when the trial completes.
    ray.get(inbox.put.remote(tune.get_context().get_trial_id(), files))
    latency = result.metrics.latency.to_dict() if result.metrics.latency else {}
    tune.report({**metrics, **relative, "epochs": len(result.history), "final": True,
                 "summary": plan.summary(), "trial_seconds": result.seconds, "node": node,
                 "latency_info": json.dumps(latency)})


def _artifact_inbox() -> Any:
    """An actor on the driver's node that holds each trial's artifacts until the driver logs them.

    Trials put ``{file name: bytes}`` there through Ray's object store, from whichever node
    they run on; the driver's callback pops them. The actor belongs to the driver's job and
    goes away with it.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    class ArtifactInbox:
        def __init__(self) -> None:
            self.files: dict[str, dict[str, bytes]] = {}

        def put(self, key: str, files: dict[str, bytes]) -> None:
            self.files[key] = files

        def pop(self, key: str) -> dict[str, bytes] | None:
            return self.files.pop(key, None)

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(ArtifactInbox).options(scheduling_strategy=here).remote()


def _callback(tracker: SearchTracker, inbox: Any):
    import ray
    from ray.tune import Callback

    class MlflowTrialCallback(Callback):
        """Forwards Ray Tune trial events to the (single, driver-side) MLflow writer."""

        def on_trial_start(self, iteration, trials, trial, **info):
            tracker.trial_started(trial.trial_id, trial.config)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("node"):
                tracker.trial_node(trial.trial_id, str(result["node"]))
            if not result.get("final") and "epoch_accuracy" in result:
                tracker.trial_epoch(trial.trial_id, int(result["epoch"]), result["epoch_accuracy"])

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            files = ray.get(inbox.pop.remote(trial.trial_id))
            if not result.get("final"):
                tracker.trial_failed(trial.trial_id, "trial ended without a final result")
                return
            latency = json.loads(result.get("latency_info") or "{}")
            if not files:
                tracker.trial_finished(trial.trial_id, result, result.get("summary", ""),
                                       latency=latency)
                return
            with tempfile.TemporaryDirectory() as tmp:
                for name, data in files.items():
                    (Path(tmp) / name).write_bytes(data)
                tracker.trial_finished(trial.trial_id, result, result.get("summary", ""), Path(tmp),
                                       latency=latency)

        def on_trial_error(self, iteration, trials, trial, **info):
            inbox.pop.remote(trial.trial_id)  # whatever a trial sent before failing is dropped
            error = trial.error_file and Path(trial.error_file).read_text(errors="replace")
            tracker.trial_failed(trial.trial_id, error or "trial failed")

    return MlflowTrialCallback()


def run_search(exp: Experiment, *, tracking_uri: str = DEFAULT_TRACKING_URI,
               address: str | None = None, num_cpus: int | None = None, resume: bool = False,
               echo: Callable[[str], None] | None = None,
               study_storage: str | None = None) -> SearchResult:
    """Runs the search of ``exp`` and returns its trials and Pareto front.

    Everything that can be checked is checked before anything is written to MLflow: the task
    (imported and built), the search space against the model's layers, the Ray address and,
    with ``resume``, the search to resume. A :class:`ConfigError` therefore leaves no trace.

    Args:
        exp: The validated experiment.
        tracking_uri: MLflow tracking URI (any MLflow URI, e.g. ``http://host:5000``).
        address: Ray cluster address (``auto``, ``HOST:PORT``) to run the trials on an existing
            cluster; None starts a local Ray. The driver (this process, the only MLflow writer)
            must run on a node of the cluster; trials need no shared disk.
        num_cpus: CPUs of the local Ray (default: enough for ``concurrency`` trials).
        resume: Continue the latest search of ``exp.name`` (same parent run, same Optuna
            study) until it has ``search.trials`` finished trials.
        echo: Progress output; default prints to stderr.
        study_storage: Optuna storage URL of a new search (default: :func:`study_storage_url`);
            a resumed search uses the one recorded in its parent run.

    Raises:
        ConfigError: Bad task, search space or Ray address; with ``resume``, no search to
            resume or an experiment that changed since the search started.
        KeyboardInterrupt: The search was interrupted (Ctrl-C); finished trials are kept and
            ``resume=True`` continues it.
    """
    import optuna
    import ray
    from ray import tune

    from autocompress.errors import ConfigError
    from autocompress.layers import find_layers
    from autocompress.measure.service import ServiceMeasurer, pin, stop_service
    from autocompress.tasks import load_task

    echo = echo or (lambda msg: print(f"autocompress: {msg}", file=sys.stderr, flush=True))
    try:
        task = load_task(exp.task, seed=exp.search.seed or 0)
    except ConfigError as e:
        raise e.located(exp.path) from None
    space = exp.search_space.resolve(find_layers(task.model, task.example_inputs))
    previous = _resumable(exp, tracking_uri) if resume else None
    _check_address(address)
    _check_target(exp)
    echo(f"task {task.name}: {len(space.layers)} layers, {len(space.params())} search parameters")

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # per-epoch reports
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "100")
    started_ray = _connect_ray(exp, address, num_cpus)
    tracker = None
    status = "KILLED"
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    service = None
    try:
        service, reserved = _measurement_service(exp, echo)
        measurer = ServiceMeasurer(service)
        tracker, storage, study_name = (_reopen(exp, tracking_uri, previous, echo) if previous
                                        else _start(exp, task, tracking_uri, echo, measurer,
                                                    study_storage))
        baseline = tracker.baseline
        remaining = exp.search.trials - tracker.finished_count()
        ended_before = tracker.ended_count()
        echo(f"MLflow: {tracking_uri}, experiment {exp.name!r}, parent run {tracker.parent_run_id}")
        if remaining <= 0:
            echo(f"the search already has {tracker.finished_count()} finished trials; nothing to do")
            status = "FINISHED"
            return SearchResult(exp, tracker.parent_run_id, baseline, tracker.table(),
                                tracker.front(), storage, study_name)
        if address:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            echo(f"Ray cluster at {address}: {len(nodes)} nodes, "
                 f"{ray.cluster_resources().get('CPU', 0):g} CPUs")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warm = exp.search.warm_start and not tracker.trials
        searcher = _searcher_class()(
            space=_DefineByRun(space), metric=exp.metrics, mode=exp.modes,
            sampler=make_sampler(exp, baseline["accuracy"]), study_name=study_name,
            points_to_evaluate=[space.warm_start_params()] if warm else None,
            storage=optuna.storages.RDBStorage(storage),
        )
        inbox = _artifact_inbox()
        trainable = tune.with_resources(
            tune.with_parameters(_trainable, task=task, space=space, exp=exp, baseline=baseline,
                                 inbox=inbox, service=service, reserved=reserved),
            {"cpu": exp.search.cpus_per_trial},
        )
        tuner = tune.Tuner(
            trainable,
            # Reused trial processes skip seconds of start-up (Python, torch) per trial; each
            # trial still seeds its own randomness (finetune), so results do not depend on it.
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=remaining,
                                        max_concurrent_trials=exp.search.concurrency,
                                        reuse_actors=True),
            run_config=tune.RunConfig(
                name=f"{study_name}-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=str(Path(".autocompress/ray").resolve()),
                callbacks=[_callback(tracker, inbox)], verbose=0,
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
        done = tracker.finished_count() if tracker else 0
        echo(f"interrupted: {done} of {exp.search.trials} trials finished and kept. "
             f"Resume with: autocompress search{where} --resume")
        raise
    finally:
        if tracker is not None:
            tracker.finish(status)
        if service is not None:
            stop_service(service)  # on a cluster that outlives the search, free its CPU
        if started_ray:
            ray.shutdown()
        if affinity is not None:
            pin(affinity)  # the driver was kept off the measurement core during the search
    return SearchResult(exp, tracker.parent_run_id, baseline, tracker.table(), tracker.front(),
                        storage, study_name)


def _check_address(address: str | None) -> None:
    """Refuses a Ray address that cannot work, before anything starts.

    A ``HOST:PORT`` is probed with a plain TCP connection: Ray itself waits minutes for an
    unreachable GCS and then exits the process.
    """
    from autocompress.errors import ConfigError

    if address in (None, "auto", "local"):
        return
    assert address is not None
    if address.startswith("ray://"):
        raise ConfigError(
            f"{address!r}: run_search needs a direct Ray address (auto or HOST:PORT) on a node "
            f"of the cluster (it is the search's driver and MLflow writer); to search through "
            f"Ray Client, use the command line, which runs the whole search on the cluster: "
            f"autocompress search EXPERIMENT.yaml --address {address} --tracking-uri "
            f"http://SERVER:5000 (or autocompress.remote_search.run_remote_search)",
            key="--address")
    host, port = host_port(address)
    if not host or port is None:
        raise ConfigError(f"{address!r} is not a Ray address; allowed: auto or HOST:PORT of the "
                          f"head node (e.g. 10.0.0.1:6379)", key="--address")
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as e:
        raise ConfigError(f"cannot reach a Ray head node at {address} ({e.strerror or e}); start "
                          f"one with 'ray start --head' or give its HOST:PORT", key="--address") from None


def host_port(address: str) -> tuple[str, int | None]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as ``(host, port)``; the port is None if not a number."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else None


def _check_target(exp: Experiment) -> None:
    """Refuses a target this machine cannot measure on (e.g. ``device: cuda`` without CUDA)."""
    from autocompress.errors import ConfigError
    from autocompress.measure.latency import check_target

    try:
        check_target(exp.target)
    except ValueError as e:
        raise ConfigError(str(e), file=exp.path, key="target.device") from None


def _measurement_service(exp: Experiment, echo: Callable[[str], None]) -> tuple[Any, Any]:
    """Starts the search's measurement service and keeps this (the driver's) process off its
    core; see :mod:`autocompress.measure.service`."""
    from autocompress.measure.service import keep_off, start_service

    service, reserved = start_service(exp.target)
    keep_off(reserved)
    if exp.target.device == "remote":
        echo(f"latency: measured by the device agent at {exp.target.url}, one at a time")
    elif reserved.core is None:
        echo("latency: this node has a single core, so measurements share it with training "
             "(expect noisy timings)")
    else:
        echo(f"latency: measured one at a time on core {reserved.core}, reserved (trials and this "
             f"process run on the other cores)")
    return service, reserved


def _connect_ray(exp: Experiment, address: str | None, num_cpus: int | None) -> bool:
    """Starts a local Ray, or connects to the cluster at ``address``; True if this call did.

    Trials must import the user's task module as the driver did, on every node: the driver's
    working directory and ``sys.path`` go to the workers as ``PYTHONPATH`` (with a cluster,
    the code must be at the same paths there, or shipped with ``ray job submit --working-dir``).
    """
    import ray

    from autocompress.errors import ConfigError

    if ray.is_initialized():
        return False
    if address == "local":
        address = None
    # Without an address: a new local Ray ("local"), never one that happens to run on this
    # machine (ray.init() would join the last `ray start`ed cluster), unless RAY_ADDRESS says
    # so, as it does inside `ray job submit`.
    local = not address and not os.environ.get("RAY_ADDRESS")
    # One Ray CPU more than the trials need: the measurement service's reserved core.
    cpus = num_cpus or 1 + max(os.cpu_count() or 1,
                               int(exp.search.concurrency * exp.search.cpus_per_trial + 0.999))
    path = os.pathsep.join(p for p in [os.getcwd(), *sys.path] if p and Path(p).is_dir())
    try:
        ray.init(address="local" if local else address, num_cpus=cpus if local else None,
                 include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                 configure_logging=True, runtime_env={"env_vars": {"PYTHONPATH": path}})
    except (ConnectionError, ValueError) as e:
        if not address:
            raise
        raise ConfigError(f"cannot connect to Ray at {address!r}: {e}", key="--address") from None
    return True


def _start(exp: Experiment, task: Any, tracking_uri: str, echo: Callable[[str], None],
           measurer: Any, study_storage: str | None = None) -> tuple[SearchTracker, str, str]:
    """Measures the baseline (with ``measurer``, the search's measurement service) and opens a
    new parent run and a new Optuna study (in ``study_storage``, default beside the store)."""
    from autocompress.measure import machine_facts, measure
    from autocompress.measure.latency import target_facts

    echo(f"measuring the baseline on {exp.target.runtime}/{exp.target.device}")
    baseline = measure(task.model, task, exp.target, measurer).to_dict()
    baseline.pop("latency_cache_hit", None)
    echo(f"baseline: accuracy {baseline['accuracy']:.4f}, size {baseline['size_bytes'] / 1024:.1f} "
         f"KiB, latency {baseline['latency_ms']:.4f} ms")
    tracker = SearchTracker.start(
        tracking_uri, exp.name, exp.to_dict(), baseline,
        [(o.metric, str(o.mode)) for o in exp.objectives],
        max_accuracy_drop=exp.constraints.max_accuracy_drop,
        facts={**machine_facts(), **target_facts(exp.target)}, echo=echo, total=exp.search.trials,
    )
    storage = study_storage or study_storage_url(tracking_uri)
    study_name = f"{exp.name}-{tracker.parent_run_id}"
    tracker.client.set_tag(tracker.parent_run_id, "autocompress.study", f"{storage}#{study_name}")
    return tracker, storage, study_name


# Keys whose change makes finished trials incomparable with new ones.
_RESUME_KEYS = ("task", "search_space", "objectives", "target", "finetune", "constraints")


def _resumable(exp: Experiment, tracking_uri: str) -> Any:
    """The parent run of the latest search of ``exp.name``, checked for resuming; reads only.

    Raises:
        ConfigError: No store, no earlier search of the experiment, or an experiment that
            changed since that search started.
    """
    from autocompress.errors import ConfigError
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
        if logged.get(key) != current.get(key):
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
