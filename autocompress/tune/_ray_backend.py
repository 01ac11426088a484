"""The Ray Tune backend: trials in parallel, on this machine or a cluster, sampled by Ray's
``OptunaSearch`` (with the constraint and pruning fixes below), logged by a driver-side Ray
Tune callback.

Each trial runs :func:`~autocompress.tune._trial.search_trial` in a Ray worker and sends its
events as Ray Tune reports (:mod:`autocompress.tune._events`) and its artifacts through the
search's artifact inbox (no checkpoint, so trials on other nodes need no shared disk). The
Optuna study lives in its own storage, so a search can be resumed.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

from autocompress._errors import root_cause, root_cause_of_text
from autocompress.config import Experiment
from autocompress.tune._backend import BACKENDS, Echo, SearchJob
from autocompress.tune._events import EpochReport, TrialFinished, TrialPruned, from_report, record, to_report
from autocompress.tune._ray import (
    _artifact_inbox,
    _check_address,
    _connect_ray,
    _measurement_service,
    _recovery_book,
)
from autocompress.tune._samplers import VALUES_ATTR, SamplerFactory, _DefineByRun

ERROR_FILE = "error.txt"  # a failed trial's artifact: its root cause, then the traceback


@BACKENDS.register("ray")
class RayBackend:
    """Ray Tune: ``search.concurrency`` trials at a time, on a local Ray or the cluster at
    ``address`` (the driver, this process, must run on one of its nodes).

    Args:
        address: ``auto``, ``HOST:PORT`` or None (a new local Ray).
        num_cpus: CPUs of the local Ray (default: enough for ``concurrency`` trials).
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        self.address, self.num_cpus = address, num_cpus
        self.started_ray = False
        self.service: Any = None
        self.reserved: Any = None
        self.affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None

    def check(self, exp: Experiment) -> None:
        """Refuses an address that cannot work (before anything starts)."""
        _check_address(self.address)

    def start(self, exp: Experiment, echo: Echo) -> Any:
        """Starts (or joins) Ray and the measurement service; returns its measurer."""
        from autocompress.tune._service import ServiceMeasurer

        os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # per-epoch reports
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "100")
        self.started_ray = _connect_ray(exp, self.address, self.num_cpus)
        _check_gpus(exp)
        self.service, self.reserved = _measurement_service(exp, echo)
        return ServiceMeasurer(self.service)

    def run(self, job: SearchJob, echo: Echo) -> None:
        """Runs ``job``'s trials with a Ray Tune ``Tuner``."""
        import ray
        from ray import tune

        exp = job.exp
        if self.address:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            echo(f"Ray cluster at {self.address}: {len(nodes)} nodes, "
                 f"{ray.cluster_resources().get('CPU', 0):g} CPUs")
        searcher = _searcher_class()(
            space=_DefineByRun(job.space), metric=exp.metrics, mode=exp.modes,
            sampler=job.sampler, study_name=job.study_name,
            points_to_evaluate=job.first or None, storage=job.storage, trials=job.remaining)
        inbox = _artifact_inbox()
        trainable = tune.with_resources(
            tune.with_parameters(_trainable, trial=job.trial, task=job.task, space=job.space, exp=exp,
                                 baseline=job.baseline, inbox=inbox, book=_recovery_book(),
                                 service=self.service, reserved=self.reserved),
            {"cpu": exp.search.cpus_per_trial,
             **({"gpu": exp.search.gpus_per_trial} if exp.search.gpus_per_trial > 0 else {})})
        tuner = tune.Tuner(
            trainable,
            # Reused trial processes skip seconds of start-up (Python, torch) per trial; each
            # trial still seeds its own randomness (finetune), so results do not depend on it.
            # The searcher ends the search once `remaining` trials ended; pruned ones are
            # replaced, up to `cap` trials in all.
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=job.cap,
                                        max_concurrent_trials=exp.search.concurrency,
                                        reuse_actors=True),
            run_config=tune.RunConfig(
                name=f"{job.study_name}-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=str(Path(".autocompress/ray").resolve()),
                callbacks=[_callback(job.tracker, inbox)], verbose=0,
                failure_config=tune.FailureConfig(max_failures=0)))
        echo(f"searching: {job.remaining} trials, {exp.search.concurrency} at a time, "
             f"sampler {exp.search.sampler}")
        tuner.fit()

    def close(self) -> None:
        """Stops the measurement service and the Ray this backend started."""
        import ray

        from autocompress.tune._service import pin, stop_service

        if self.service is not None:
            stop_service(self.service)  # on a cluster that outlives the search, free its CPU
        if self.started_ray:
            ray.shutdown()
        if self.affinity is not None:
            pin(self.affinity)  # the driver was kept off the measurement core during the search


def _check_gpus(exp: Experiment) -> None:
    """Refuses ``search.gpus_per_trial`` that Ray's GPUs cannot serve (after Ray started).

    A trial waits for its GPU forever where Ray has none, so this is an error, not a wait;
    with ``target.device: cuda`` the measurement service holds one GPU of its own.
    """
    import ray

    from autocompress._errors import ConfigError

    gpus = exp.search.gpus_per_trial
    if not gpus > 0:
        return
    have = ray.cluster_resources().get("GPU", 0)
    service = 1 if exp.target.device == "cuda" else 0
    if have < gpus + service:
        held = " (one of them for the latency measurements of target.device 'cuda')" if service else ""
        raise ConfigError(f"gpus_per_trial={gpus:g} needs {gpus + service:g} GPUs{held} but Ray "
                          f"sees {have:g} (check CUDA_VISIBLE_DEVICES and torch.cuda, or start "
                          f"Ray with --num-gpus); allowed: 0 (fine-tune on the CPU)",
                          file=exp.path, key="search.gpus_per_trial")


class _RemoteBook:
    """The search's :class:`~autocompress.tune._trial.RecoveryBook` actor, called as the book."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def largest(self, done: float) -> float | None:
        import ray

        return ray.get(self.actor.largest.remote(done))

    def record(self, checks: dict[float, float], final: float, floor: float) -> None:
        self.actor.record.remote(checks, final, floor)


def _trainable(config: dict, *, trial: Any, task: Any, space: Any, exp: Experiment,
               baseline: dict[str, float], inbox: Any, book: Any, service: Any,
               reserved: Any) -> None:
    """One Ray Tune trial: ``trial`` (:func:`~autocompress.tune._trial.search_trial`) with its
    events as reports and its artifacts through the ``inbox``. Its latency is timed by the search's
    measurement ``service``, whose core (``reserved``) it keeps off. If it fails, its root
    cause on one line, then the whole traceback, go to the driver as :data:`ERROR_FILE` in the
    ``inbox`` (Ray's own error text starts with its header and wrappers, and ends with the
    outermost exception)."""
    import ray
    import torch
    from ray import tune

    from autocompress.tune._service import ServiceMeasurer, keep_off, training_gate
    from autocompress.tune._trial import TrialContext

    trial_id = tune.get_context().get_trial_id()
    try:
        keep_off(reserved)
        torch.set_num_threads(max(1, int(exp.search.cpus_per_trial)))
        warnings.filterwarnings("ignore")
        node = f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()}"
        ctx = TrialContext(lambda event: tune.report(to_report(event)), ServiceMeasurer(service),
                           _RemoteBook(book), training_gate(reserved), node)
        event = trial(config, ctx, task=task, space=space, exp=exp, baseline=baseline)
        if isinstance(event, TrialFinished):
            # Delivered before the final report, so the driver finds them when the trial completes.
            ray.get(inbox.put.remote(trial_id, event.files))
        tune.report(to_report(event))
    except Exception as e:
        text = f"{root_cause(e)}\n\n{''.join(traceback.format_exception(e))}"
        ray.get(inbox.put.remote(trial_id, {ERROR_FILE: text.encode()}))
        raise


def _callback(tracker: Any, inbox: Any) -> Any:
    """The Ray Tune callback that hands trial events to the (single, driver-side) MLflow
    writer."""
    import ray
    from ray.tune import Callback

    from autocompress.tune._events import TrialFailed

    class MlflowTrialCallback(Callback):
        """Forwards Ray Tune trial events to the MLflow writer (:func:`record`)."""

        def on_trial_start(self, iteration, trials, trial, **info):
            tracker.trial_started(trial.trial_id, trial.config)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            event = from_report(result)
            if isinstance(event, EpochReport):
                record(tracker, trial.trial_id, event)
            elif event is not None and getattr(event, "node", ""):  # final: node only, for now
                tracker.trial_node(trial.trial_id, event.node)

        def on_trial_complete(self, iteration, trials, trial, **info):
            files = ray.get(inbox.pop.remote(trial.trial_id))
            event = from_report(trial.last_result, files)
            record(tracker, trial.trial_id,
                   event if isinstance(event, (TrialFinished, TrialPruned)) else None)

        def on_trial_error(self, iteration, trials, trial, **info):
            # A trial that raised sent its root cause and traceback (ERROR_FILE); one whose
            # process died left only Ray's error text. Its other files are dropped.
            sent = (ray.get(inbox.pop.remote(trial.trial_id)) or {}).get(ERROR_FILE)
            if sent:
                text = sent.decode(errors="replace")
                cause = text.split("\n", 1)[0]
            else:
                text = (trial.error_file and Path(trial.error_file).read_text(errors="replace")) or ""
                cause = root_cause_of_text(text)
            record(tracker, trial.trial_id, TrialFailed(cause, text or None))

    return MlflowTrialCallback()


def _searcher_class() -> type:
    import optuna
    from ray import cloudpickle
    from ray.tune.search import Searcher as RaySearcher
    from ray.tune.search.optuna import OptunaSearch

    class Searcher(OptunaSearch):
        """OptunaSearch that tells Optuna a failed trial FAILED and a pruned one PRUNED, and
        stops suggesting once ``trials`` trials have finished (pruned ones do not count: the
        search runs new trials in their place).

        Ray's OptunaSearch passes the last (per-epoch) result of an errored multi-objective
        trial as a list of Nones, which Optuna rejects, leaving the trial RUNNING in the study.

        It takes a :class:`SamplerFactory` and a storage URL instead of live objects, and
        pickles as those (plus the Optuna trial ids of the running trials): unpickling reopens
        the study from its storage and builds a fresh sampler.
        """

        def __init__(self, *args: Any, sampler: SamplerFactory, storage: str,
                     trials: int | None = None, **kwargs: Any) -> None:
            self.sampler_factory, self.storage_url = sampler, storage
            super().__init__(*args, sampler=sampler(), storage=optuna.storages.RDBStorage(storage),
                             **kwargs)
            self.wanted, self.ended, self.live = trials, 0, set()

        def __getstate__(self) -> dict[str, Any]:
            state = self.__dict__.copy()
            state.update(_sampler=None, _storage=None, _ot_study=None,
                         _ot_trials={k: t._trial_id for k, t in self._ot_trials.items()})
            return state

        def __setstate__(self, state: dict[str, Any]) -> None:
            trial_ids = state.pop("_ot_trials")
            self.__dict__.update(state)
            self._sampler = self.sampler_factory()
            self._storage = optuna.storages.RDBStorage(self.storage_url)
            self._ot_study = optuna.load_study(study_name=self._study_name, storage=self._storage,
                                               sampler=self._sampler)
            self._ot_trials = {k: optuna.Trial(self._ot_study, tid) for k, tid in trial_ids.items()}

        # Ray's own save/restore pickle ``__dict__`` directly: the live sampler with it.
        def save(self, checkpoint_path: str) -> None:
            Path(checkpoint_path).write_bytes(cloudpickle.dumps(self.__getstate__()))

        def restore(self, checkpoint_path: str) -> None:
            self.__setstate__(cloudpickle.loads(Path(checkpoint_path).read_bytes()))

        def suggest(self, trial_id: str) -> Any:
            if self.wanted is not None and self.ended + len(self.live) >= self.wanted:
                return RaySearcher.FINISHED if not self.live else None  # wait for the running
            config = super().suggest(trial_id)
            if isinstance(config, dict):
                self.live.add(trial_id)
            return config

        def on_trial_complete(self, trial_id: str, result: dict | None = None,
                              error: bool = False) -> None:
            self.live.discard(trial_id)
            if isinstance(from_report(result), TrialPruned):
                super().on_trial_complete(trial_id, None, False)  # no values, no error: PRUNED
                return
            self.ended += 1
            metrics = self.metric if isinstance(self.metric, list) else [self.metric]
            if error or not result or any(result.get(m) is None for m in metrics):
                result, error = None, True
            elif trial_id in self._ot_trials:  # for the constraint (AccuracyDropConstraint)
                self._ot_trials[trial_id].set_user_attr(VALUES_ATTR,
                                                        [float(result[m]) for m in metrics])
            super().on_trial_complete(trial_id, result, error)

    return Searcher
