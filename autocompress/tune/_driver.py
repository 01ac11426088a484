"""The search's driver: checks, the baseline and the parent run, the first trials, then a
backend runs the trials (:mod:`autocompress.tune._backend`: Ray Tune or serial).

The driver loads the task once (the baseline comes from the cache), measures the baseline
with the backend's measurement service, opens the MLflow parent run and the Optuna study
(in an SQLite file next to the MLflow store, so the front can be read back and a search
resumed), chooses ``finetune.lr: auto`` and the first trials, and hands the rest to the
backend as a :class:`~autocompress.tune._backend.SearchJob`. Each trial turns its sampled
parameters into a :class:`~autocompress.plan.Plan`, compresses, fine-tunes (reporting the
metric per epoch) and measures on the target (:func:`~autocompress.tune._trial.search_trial`);
this process is the only MLflow writer (:mod:`autocompress.tracking`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from autocompress.config import Experiment
from autocompress.tune._backend import BACKENDS, SearchBackend, SearchJob
from autocompress.tune._result import DEFAULT_TRACKING_URI, SearchResult
from autocompress.tune._resume import _reopen, _resumable, _start


@dataclass
class _Setup:
    """What a search checked and loaded before anything is written or started."""

    task: Any
    layers: list
    space: Any
    previous: Any  # the parent run to resume, or None


def run_search(exp: Experiment, *, tracking_uri: str = DEFAULT_TRACKING_URI,
               address: str | None = None, num_cpus: int | None = None, resume: bool = False,
               echo: Callable[[str], None] | None = None,
               study_storage: str | None = None) -> SearchResult:
    """Runs the search of ``exp`` on its backend (``search.backend``) and returns its trials
    and Pareto front.

    Everything that can be checked is checked before anything is written to MLflow: the task
    (imported and built), the search space against the model's layers, the backend and its
    address and, with ``resume``, the search to resume. A :class:`ConfigError` therefore
    leaves no trace.

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
        ConfigError: Bad task, search space, backend or Ray address; with ``resume``, no search
            to resume or an experiment that changed since the search started.
        KeyboardInterrupt: The search was interrupted (Ctrl-C); finished trials are kept and
            ``resume=True`` continues it.
    """
    echo = echo or (lambda msg: print(f"autocompress: {msg}", file=sys.stderr, flush=True))
    backend: SearchBackend = BACKENDS.get(exp.search.backend, file=exp.path, key="search.backend")(
        address=address, num_cpus=num_cpus)
    setup = _prepare(exp, tracking_uri, address, resume, backend, echo)
    tracker, status = None, "KILLED"
    try:
        measurer = backend.start(exp, echo)
        tracker, storage, study_name = (
            _reopen(exp, tracking_uri, setup.previous, echo) if setup.previous
            else _start(exp, setup.task, tracking_uri, echo, measurer, study_storage))
        if setup.previous:  # trials go on being timed against the baseline, on its logged clock
            measurer.reference(setup.task.model, setup.task.example_inputs, exp.target,
                               latency_ms=tracker.baseline["latency_ms"])
        echo(f"MLflow: {tracking_uri}, experiment {exp.name!r}, parent run {tracker.parent_run_id}")
        job = _job(exp, setup, tracker, storage, study_name, echo)
        exp = job.exp  # with the chosen learning rate
        if job.remaining <= 0:
            echo(f"the search already has {tracker.finished_count()} finished trials; nothing to do")
        else:
            ended_before, started_before = tracker.ended_count(), len(tracker.trials)
            backend.run(job, echo)
            if tracker.ended_count() - ended_before < job.remaining:
                if len(tracker.trials) - started_before < job.cap:
                    raise KeyboardInterrupt  # the backend caught Ctrl-C and stopped early
                echo(f"stopped after {job.cap} trials, {tracker.pruned_count()} of them pruned: "
                     f"the constraint max_accuracy_drop={exp.constraints.max_accuracy_drop} is "
                     f"rarely met in this space (narrow it, or allow a larger drop)")
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
        backend.close()
    return SearchResult(exp, tracker.parent_run_id, tracker.baseline, tracker.table(),
                        tracker.front(), storage, study_name)


def _prepare(exp: Experiment, tracking_uri: str, address: str | None, resume: bool,
             backend: SearchBackend, echo: Callable[[str], None]) -> _Setup:
    """Loads the task and resolves the space; checks the store, the backend, the target and
    the search to resume. Writes and starts nothing."""
    from autocompress._errors import ConfigError
    from autocompress.compress import describe_layers
    from autocompress.tasks import load_task
    from autocompress.tracking import check_store_driver

    check_store_driver(tracking_uri)  # e.g. mysql:// without its driver: before any training
    try:
        task = load_task(exp.task, seed=exp.search.seed or 0)
    except ConfigError as e:
        raise e.located(exp.path) from None
    layers = describe_layers(task.model, task.example_inputs, exp.search.calibration_samples,
                             blocks=True)
    space = exp.search_space.resolve(layers)
    previous = _resumable(exp, tracking_uri) if resume else None
    backend.check(exp)
    _check_target(exp)
    _check_finetune_device(exp, address, echo)
    space = _without_knobs_that_cannot_pay(space, exp, echo)  # notes after every check
    echo(f"task {task.name}: {len(space.layers)} layers, {len(space.params())} search parameters")
    for line in _limits_summary(layers, space):
        echo(line)
    return _Setup(task, layers, space, previous)


def _job(exp: Experiment, setup: _Setup, tracker: Any, storage: str, study_name: str,
         echo: Callable[[str], None]) -> SearchJob:
    """The backend's job: the learning rate chosen, the first trials not yet run, the budget
    (the trials still to end; pruned ones are replaced, up to ``cap`` trials in all)."""
    import optuna

    remaining = exp.search.trials - tracker.finished_count()
    job = SearchJob(exp, setup.task, setup.space, tracker.baseline, tracker, storage, study_name,
                    [], remaining, 4 * remaining + 8)
    if remaining <= 0:
        return job
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    job.exp = _with_chosen_lr(exp, setup.task, setup.space, tracker, echo)
    first = (first_trials(job.exp, setup.task, setup.space, setup.layers, tracker, echo)
             if exp.search.warm_start else [])
    job.first = _not_run_yet(first, storage, study_name) if tracker.trials else first
    return job


def _limits_summary(layers: list, space: Any = None) -> list[str]:
    """One line each about layers the search leaves out or knob values it never samples (of
    the knobs the resolved ``space`` searches on that layer; all of them without a space)."""
    lines = []
    unused = [la.name for la in layers if not la.used]
    if unused:
        shown = ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
        lines.append(f"not searched: {len(unused)} layer(s) the forward never runs: {shown}")
    reasons: dict[str, list[str]] = {}
    searched = None if space is None else {ls.name: set(ls.knobs) for ls in space.layers}
    for la in layers:
        knobs = None if searched is None else searched.get(la.name, set())
        for r in la.refusals if la.used else ():
            if knobs is not None and r.knob not in knobs:
                continue
            what = f"{r.knob}={r.value}" if r.value is not None else r.knob
            reasons.setdefault(f"{what} ({r.reason})", []).append(la.name)
    for what, names in reasons.items():
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        lines.append(f"never sampled: {what} on {len(names)} layer(s): {shown}")
    return lines



def first_trials(exp: Experiment, task: Any, space: Any, layers: list, tracker: Any,
                 echo: Callable[[str], None]) -> list[dict[str, Any]]:
    """The search's first trials, in order: the warm-start points, then uniform recipes and
    sensitivity-optimal allocations (:mod:`autocompress.tune._seeds`), together at most a third
    of the trials. The sensitivity profile is logged to the parent run (``sensitivity.csv``)."""
    from autocompress.compress import weight_ties
    from autocompress.tune._seeds import seed_points
    from autocompress.tune._sensitivity import profile

    points = space.warm_start_points()
    budget = max(0, exp.search.trials // 3 - len(points))
    if budget:
        sens = profile(task, space, samples=exp.search.calibration_samples, allocated_only=True,
                       echo=echo)
        if sens.cached:
            echo(f"sensitivity: {len(sens.probes)} probes from the cache")
        tracker.client.log_text(tracker.parent_run_id, sens.to_csv(), "sensitivity.csv")
        # A tied layer that follows its owner's compression costs nothing of its own.
        follows = weight_ties(task.model)
        shapes = {la.name: la.shape for la in layers if la.name not in follows}
        points += [p for p in seed_points(space, sens, shapes, budget) if p not in points]
        echo(f"first trials: {len(points)} (warm start, uniform recipes, sensitivity-optimal "
             f"allocations), then sampler {exp.search.sampler}")
    return points


CALIBRATION_LOSS = 0.1  # relative metric lost before fine-tuning by the plan lr: auto tries


def _short(text: str, width: int = 100) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _with_chosen_lr(exp: Experiment, task: Any, space: Any, tracker: Any,
                    echo: Callable[[str], None]) -> Experiment:
    """``exp`` with ``finetune.lr: auto`` replaced by the learning rate
    :func:`~autocompress.finetune.choose_lr` picks, once for every trial, on the mildest of the
    calibration plans (:func:`~autocompress.tune._seeds.calibration_points`: 4-bit weights,
    50%, 75% or 90% pruned) that loses at least ``CALIBRATION_LOSS`` of the metric before
    fine-tuning (the last otherwise): the learning rate matters for plans that fine-tuning must
    recover from. Logged to the parent run (tag ``autocompress.finetune.lr``,
    ``lr_choice.csv``). ``exp`` itself otherwise."""
    from autocompress._errors import ConfigError
    from autocompress.compress import apply
    from autocompress.compress.quantize import calibrate
    from autocompress.finetune import AUTO, LR_CANDIDATES, choose_lr
    from autocompress.tune._seeds import calibration_points

    if exp.finetune.lr != AUTO or not exp.finetune.epochs:  # nothing trains: nothing to choose
        return exp
    base = tracker.baseline["accuracy"]  # the task metric, measured with the baseline
    for point in calibration_points(space):  # the mildest that loses CALIBRATION_LOSS
        plan = space.plan_from_params(point)
        model = apply(task.model, plan, task.example_inputs)
        calibrate(model, task.calibration_batches())
        metric = float(task.evaluate(model))
        if base - metric >= CALIBRATION_LOSS * abs(base):
            break
    echo(f"finetune.lr: auto: fine-tuning {len(LR_CANDIDATES)} copies of the model compressed "
         f"by {_short(plan.summary())} (metric {base:.4f} -> {metric:.4f}), one per learning "
         f"rate {', '.join(f'{lr:g}' for lr in LR_CANDIDATES)}")
    try:
        choice = choose_lr(model, task, exp.finetune, teacher=task.model,
                           seed=exp.search.seed or 0)
    except ValueError as e:  # every candidate diverged: the user must give a rate
        raise ConfigError(str(e).removeprefix("finetune.lr='auto': "), file=exp.path,
                          key="finetune.lr") from None
    echo(f"finetune.lr: auto: {choice.summary()}")
    tracker.client.set_tag(tracker.parent_run_id, "autocompress.finetune.lr", f"{choice.lr:g}")
    rows = "\n".join(f"{lr:g},{'' if m is None else m}" for lr, m in choice.scores.items())
    tracker.client.log_text(tracker.parent_run_id, f"lr,metric\n{rows}\n", "lr_choice.csv")
    return replace(exp, finetune=replace(exp.finetune, lr=choice.lr))


def _not_run_yet(points: list[dict[str, Any]], storage: str, study_name: str) -> list[dict[str, Any]]:
    """``points`` without those the resumed study already has a trial of (in any state), so
    that no first trial runs twice."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage)
    done = [t.params for t in study.get_trials(deepcopy=False)]
    return [p for p in points if p not in done]


def _without_knobs_that_cannot_pay(space: Any, exp: Experiment, echo: Callable[[str], None]) -> Any:
    """``space`` without the knobs the knob table marks ``speed_only`` (``act_bits``) where
    they cannot pay: when no objective is ``latency_ms`` (they buy speed only: e.g. the same
    weights, 8 bytes more per layer, some accuracy), or, for ``integer_kernels`` knobs, when
    the target's runtime has no integer kernels for them (:meth:`Runtime.integer_kernels`).
    Said once per knob, with the reason."""
    from autocompress.compress import KNOB_TABLE
    from autocompress.measure.runtimes import get_runtime

    for spec in KNOB_TABLE.values():
        if not spec.speed_only or not space.sets(spec.name):
            continue
        if "latency_ms" not in exp.metrics:
            echo(f"{spec.name} left out of the search: {spec.about or spec.name} buy speed only, "
                 f"and no objective measures it (objectives: {', '.join(exp.metrics)})")
            space = space.without(spec.name)
            continue
        reason = get_runtime(exp.target).integer_kernels(exp.target) if spec.integer_kernels else None
        if reason is None:
            continue
        echo(f"{spec.name} left out of the search: {reason} (target {exp.target.runtime}/"
             f"{exp.target.device}); ONNX Runtime on a CPU runs them on integer kernels")
        space = space.without(spec.name)
    return space


def _check_finetune_device(exp: Experiment, address: str | None,
                           echo: Callable[[str], None]) -> None:
    """Refuses fine-tuning on a GPU the trials cannot have, before anything starts.

    ``finetune.device: cuda`` needs ``search.gpus_per_trial > 0`` (Ray gives GPUs only to the
    trials that reserve them) and, in a local search, a CUDA device here; a cluster's GPUs
    are counted once Ray runs (:func:`_check_gpus`).
    """
    import torch

    from autocompress._errors import ConfigError
    from autocompress.finetune import resolve_device

    ft, gpus = exp.finetune.device, exp.search.gpus_per_trial
    local = address in (None, "local") and not os.environ.get("RAY_ADDRESS")
    if ft == "cuda" and local:
        try:
            resolve_device(ft)
        except ValueError as e:
            raise ConfigError(str(e).removeprefix("finetune."), file=exp.path,
                              key="finetune.device") from None
    if ft == "cuda" and not gpus > 0:
        raise ConfigError("finetune.device is 'cuda' but no GPU is reserved for the trials; "
                          "allowed: a number > 0 (e.g. 1, or 0.25 to share a GPU among four "
                          "trials)", file=exp.path, key="search.gpus_per_trial")
    if ft == "auto" and not gpus > 0 and local and torch.cuda.is_available():
        echo("fine-tuning on the CPU: set search.gpus_per_trial (e.g. 1) to train on the GPU")


def _check_target(exp: Experiment) -> None:
    """Refuses a target this machine cannot measure on (e.g. ``device: cuda`` without CUDA)."""
    from autocompress._errors import ConfigError
    from autocompress.measure.latency import check_target

    try:
        check_target(exp.target)
    except ValueError as e:
        raise ConfigError(str(e), file=exp.path, key="target.device") from None
