"""The Python API: :func:`search` and :func:`export`, what the command line runs too.

Example:
    >>> import autocompress as ac
    >>> task = ac.Task(model=net, train_loader=train, val_loader=val,  # doctest: +SKIP
    ...                example_inputs=x[:1])
    >>> result = ac.search(task, space="search_spaces/default.yaml",  # doctest: +SKIP
    ...                    objectives=["accuracy", "latency_ms", "size_bytes"], trials=24)
    >>> result.front  # doctest: +SKIP
    >>> ac.export(result.front.run_id[0], format="onnx", out="dist/", task=task)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, fields, is_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autocompress._errors import ConfigError
from autocompress.config import (
    Experiment,
    SearchSettings,
    SearchSpace,
    load_experiment,
    parse_experiment,
)

if TYPE_CHECKING:
    from autocompress.tasks import Task
    from autocompress.tune import SearchResult

__all__ = ["export", "search"]

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_OBJECTIVES = ("accuracy", "latency_ms", "size_bytes")
_SEARCH_KEYS = tuple(f.name for f in fields(SearchSettings))


def search(task: Task | str | os.PathLike | Experiment, *,
           space: str | os.PathLike | Mapping[str, Any] | SearchSpace | None = None,
           objectives: Sequence[str | Mapping[str, Any]] | None = None,
           name: str | None = None, target: Mapping[str, Any] | Any = None,
           finetune: Mapping[str, Any] | Any = None, constraints: Mapping[str, Any] | Any = None,
           tracking_uri: str | None = None, address: str | None = None, resume: bool = False,
           echo: Callable[[str], None] | None = None, **settings: Any) -> SearchResult:
    """Searches compression plans for a model; Optuna's ``study.optimize``, for compression.

    Everything an experiment file holds can be given as a keyword; the file's ``search:``
    settings (``trials``, ``concurrency``, ``sampler``, ``seed``, ``cpus_per_trial``,
    ``warm_start``, ``backend``) are keywords of their own. ``backend="serial"`` runs the
    trials one at a time in this process, without Ray (fast tests, breakpoints, notebooks);
    the default, ``"ray"``, runs them in parallel with Ray Tune.

    Args:
        task: What to compress: a :class:`~autocompress.Task` (an in-memory model; it runs
            locally and on Ray, shipped through Ray's object store), a task reference
            (``"digits"``, ``"package.module:function"``), an experiment YAML file, or an
            :class:`~autocompress.config.Experiment`. With a file or an Experiment, the
            keywords override its settings.
        space: The search space: a YAML file, a mapping (the file's content) or a
            :class:`~autocompress.config.SearchSpace`. Required unless ``task`` is an experiment.
        objectives: 1 to 3 metric names (or ``{metric, mode}`` mappings); default accuracy,
            latency and size.
        name: The MLflow experiment name; default ``"<task name>-search"``.
        target: Where latency is measured: ``{device, runtime, threads, batch_size, ...}``.
        finetune: Fine-tuning: ``{epochs, lr, distill, ...}``.
        constraints: ``{max_accuracy_drop: ...}``.
        tracking_uri: MLflow store; default the experiment's, else ``sqlite:///mlflow.db``.
        address: A Ray cluster: ``auto``, ``HOST:PORT``, or ``ray://HOST:PORT`` (Ray Client:
            the whole search runs on the cluster; needs a tracking server).
        resume: Continue the latest search of this experiment name.
        echo: Progress output; default: lines on stderr.
        **settings: ``search:`` settings, e.g. ``trials=24, concurrency=2, sampler="tpe"``,
            ``backend="serial"``.

    Returns:
        The search's result: ``front`` (a DataFrame: ``run_id``, the metrics, the plan
        ``summary``), ``trials``, ``baseline``, ``parent_run_id``.

    Raises:
        ConfigError: Bad input; the message names the keyword or key (nothing was logged).
        KeyboardInterrupt: Ctrl-C; finished trials are kept and ``resume=True`` continues.
    """
    unknown = sorted(set(settings) - set(_SEARCH_KEYS))
    if unknown:
        from autocompress._errors import did_you_mean

        allowed = ["space", "objectives", "name", "target", "finetune", "constraints",
                   "tracking_uri", "address", "resume", "echo", *_SEARCH_KEYS]
        raise ConfigError(f"unknown keyword {unknown[0]!r}{did_you_mean(unknown[0], allowed)}; "
                          f"allowed: {allowed}", key="autocompress.search")
    exp = _experiment(task, space=space, objectives=objectives, name=name, target=target,
                      finetune=finetune, constraints=constraints, tracking_uri=tracking_uri,
                      settings=settings)
    uri = tracking_uri or exp.tracking_uri or DEFAULT_TRACKING_URI
    from autocompress.tune import client_address, run_remote_search, run_search

    if client_address(address):  # ray://: the whole search runs on the cluster
        result = run_remote_search(exp, tracking_uri=uri, address=address, resume=resume, echo=echo)
    else:
        result = run_search(exp, tracking_uri=uri, address=address, resume=resume, echo=echo)
    if not isinstance(exp.task, str):
        from autocompress.tasks import remember_task

        remember_task(result.parent_run_id, exp.task)  # export() in this session needs no task=
    return result


def export(run_id: str, format: str = "onnx", out: str | os.PathLike = "dist", *,  # noqa: A002
           tracking_uri: str = DEFAULT_TRACKING_URI, register: str | None = None,
           tolerance: float | None = None, task: Task | None = None) -> dict[str, Any]:
    """Exports a trial's model, verified with its own runtime (``autocompress export``).

    Args:
        run_id: A finished trial's MLflow run id (``result.front.run_id``).
        format: ``onnx``, ``torchscript`` or ``packed``.
        out: Directory for the artifact and ``export.json``.
        tracking_uri: The MLflow store the search logged to.
        register: Also register the artifact as a new version of this registered model.
        tolerance: Largest allowed ``|exported metric - logged metric|`` (default 0.005).
        task: The search's :class:`~autocompress.Task`, needed for an in-memory task's trial
            when the search ran in another process.

    Returns:
        What ``export.json`` holds: ``path``, ``format``, the re-measured metrics and the
        logged ones (``logged_*``), the plan and the run ids.

    Raises:
        ConfigError: Unknown format or run id, or an in-memory task's trial without ``task``.
        VerificationError: The exported model's metric or size differs from the logged one
            (nothing is written).
    """
    from autocompress.deploy import DEFAULT_TOLERANCE, export_run

    return export_run(run_id, format, out, tracking_uri, register=register,
                      tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance, task=task)


def _experiment(task: Any, *, space: Any, objectives: Any, name: str | None, target: Any,
                finetune: Any, constraints: Any, tracking_uri: str | None,
                settings: dict[str, Any]) -> Experiment:
    """The :class:`Experiment` that ``search``'s arguments describe, validated."""
    given = {"target": target, "finetune": finetune, "constraints": constraints}
    if isinstance(task, Experiment) or _is_experiment_file(task):
        exp = task if isinstance(task, Experiment) else load_experiment(task)
        if space is None and objectives is None and name is None and tracking_uri is None \
                and not settings and all(v is None for v in given.values()):
            return exp
        data = exp.to_dict()
        data["task"] = "placeholder"
        if space is not None:
            data["search_space"] = space
        if objectives is not None:
            data["objectives"] = list(objectives)
        for key, value in given.items():
            if value is not None:
                data[key] = {**data[key], **_as_mapping(value)}
        data["search"] = {**data["search"], **settings}
        data["name"] = name or exp.name
        data["tracking_uri"] = tracking_uri or exp.tracking_uri
        out = parse_experiment(data, exp.path or Path.cwd() / "<arguments>")
        return replace(out, task=exp.task, path=exp.path)
    if space is None:
        raise ConfigError("give the search space: space='search_spaces/default.yaml' (a YAML "
                          "file), a mapping with 'layers', or a SearchSpace", key="space")
    task_name = task if isinstance(task, str) else getattr(task, "name", "task")
    data = {"name": name or f"{str(task_name).rpartition(':')[2]}-search",
            "task": task if isinstance(task, str) else "placeholder",
            "search_space": space, "objectives": list(objectives or DEFAULT_OBJECTIVES),
            **{k: _as_mapping(v) for k, v in given.items() if v is not None},
            "search": settings, "tracking_uri": tracking_uri}
    out = parse_experiment(data, Path.cwd() / "<arguments>")
    return replace(out, path=None) if isinstance(task, str) else replace(out, task=task, path=None)


def _is_experiment_file(task: Any) -> bool:
    return isinstance(task, os.PathLike) or (
        isinstance(task, str) and task.endswith((".yaml", ".yml")))


def _as_mapping(value: Any) -> dict[str, Any]:
    """A settings dataclass (``Target``, ``FinetuneConfig``, ...) or mapping as a dict."""
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise ConfigError(f"expected a mapping or a settings object, got {type(value).__name__}")
