"""Experiment files: what to compress, how to search, and what to measure.

An experiment file is YAML::

    name: digits-cnn                 # MLflow experiment name (required)
    task: digits                     # built-in task, or "package.module:function" (required)
    search_space: ../search_spaces/default.yaml   # relative to this file, or inline (required)
    objectives:                      # 1 to 3, no duplicates (required)
      - {metric: accuracy, mode: max}   # accuracy, latency_ms, size_bytes, params, macs
      - {metric: latency_ms, mode: min} # mode may be left out; it is fixed per metric
    target: {device: cpu, runtime: onnxruntime, threads: 1, batch_size: 1}   # Target fields
    search: {sampler: mutation, trials: 32, concurrency: 2, seed: 0, cpus_per_trial: 1}
    finetune: {epochs: 2, lr: 0.001, distill: true}   # FinetuneConfig fields
    constraints: {max_accuracy_drop: 0.05}            # optional
    tracking_uri: sqlite:///mlflow.db                 # optional; the CLI has a default

Every section maps onto a dataclass that validates itself; :func:`load_experiment` turns
their ``ValueError`` into a :class:`~autocompress.errors.ConfigError` naming the file and key.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from autocompress._errors import ConfigError, did_you_mean
from autocompress.config._checks import (
    build,
    check_keys,
    check_type,
    construct,
    hints,
    is_file,
    is_int,
    is_number,
    type_name,
)
from autocompress.config._samplers import SAMPLERS
from autocompress.config._space import SearchSpace, load_search_space
from autocompress.config._yaml import read_yaml
from autocompress.finetune import FinetuneConfig
from autocompress.measure import OBJECTIVES, objective_patterns
from autocompress.measure.target import Target

__all__ = [
    "METRICS",
    "SAMPLERS",
    "Constraints",
    "Experiment",
    "Objective",
    "SearchSettings",
    "load_experiment",
]

EXPERIMENT_VERSION = 1
# Objective metrics and the only sensible direction for each: the metric registry, read live.
METRICS: Mapping[str, str] = OBJECTIVES
# SAMPLERS (imported above): nsga2, tpe, mutation, random and any registered later, read live.
MAX_OBJECTIVES = 3
IN_MEMORY_PREFIX = "<in-memory:"  # the logged reference of a Task object
_TASK_RE = re.compile(r"[A-Za-z_]\w*|[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
_REQUIRED = ("name", "task", "search_space", "objectives")
_TOP_KEYS = ("version", *_REQUIRED, "target", "search", "finetune", "constraints",
             "tracking_uri")


@dataclass(frozen=True)
class Objective:
    """One objective of the search.

    Attributes:
        metric: One of :data:`METRICS`.
        mode: ``max`` or ``min``; defaults to the metric's direction (the opposite is refused:
            it would search for the worst models).
    """

    metric: str
    mode: str | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric={self.metric!r}{did_you_mean(self.metric, METRICS)}; "
                             f"allowed: {list(METRICS)} or per workload: "
                             f"{list(objective_patterns())}")
        natural = METRICS[self.metric]
        if self.mode is None:
            object.__setattr__(self, "mode", natural)
        elif self.mode != natural:
            better = "higher" if natural == "max" else "lower"
            raise ValueError(f"mode={self.mode!r} for {self.metric}; allowed: {natural!r} "
                             f"({better} is better)")

    @property
    def direction(self) -> str:
        """Optuna's name for the mode: ``maximize`` or ``minimize``."""
        return "maximize" if self.mode == "max" else "minimize"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SearchSettings:
    """How the search runs.

    Attributes:
        sampler: Optuna sampler: ``mutation`` (the default: mutates the feasible Pareto front,
            :mod:`autocompress.tune._mutation`), ``nsga2``, ``tpe`` or ``random``.
        trials: Trials in total.
        concurrency: Trials running at the same time.
        seed: Sampler seed, or None for a random one.
        cpus_per_trial: CPUs Ray reserves per trial (fractions allowed).
        gpus_per_trial: GPUs Ray reserves per trial (fractions allowed: 0.5 runs two trials
            on one GPU); 0 (default) trains on the CPU, since Ray hides the GPUs from a trial
            that reserves none.
        warm_start: Make the first trial the search space's mildest plan with 8-bit weights
            (no pruning, no factorization), so the front starts from a known-safe model.
        backend: ``ray`` (Ray Tune: parallel, a cluster) or ``serial`` (in this process).
        calibration_samples: Training samples each trial's calibrated methods (GPTQ, AWQ,
            SparseGPT, Wanda, reconstruction, whitened low-rank) compute their statistics on.
    """

    sampler: str = "mutation"
    trials: int = 32
    concurrency: int = 1
    seed: int | None = 0
    cpus_per_trial: float = 1.0
    warm_start: bool = True
    gpus_per_trial: float = 0.0
    backend: str = "ray"
    calibration_samples: int = 256

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r}{did_you_mean(self.sampler, SAMPLERS)}; "
                             f"allowed: {list(SAMPLERS)}")
        for key in ("trials", "concurrency", "calibration_samples"):
            value = getattr(self, key)
            if not is_int(value) or value < 1:
                raise ValueError(f"{key}={value!r}; allowed: an integer >= 1")
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"seed={self.seed!r}; allowed: an integer or null")
        if not is_number(self.cpus_per_trial) or not 0 < self.cpus_per_trial < math.inf:
            raise ValueError(f"cpus_per_trial={self.cpus_per_trial!r}; allowed: a number > 0")
        if not is_number(self.gpus_per_trial) or not 0 <= self.gpus_per_trial < math.inf:
            raise ValueError(f"gpus_per_trial={self.gpus_per_trial!r}; allowed: a number >= 0")
        if not isinstance(self.warm_start, bool):
            raise ValueError(f"warm_start={self.warm_start!r}; allowed: true or false")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Constraints:
    """Limits a result must meet to be reported as a candidate.

    Attributes:
        max_accuracy_drop: Largest allowed ``baseline - compressed`` accuracy, in the metric's
            units (a fraction for the built-in tasks), or None for no limit.
    """

    max_accuracy_drop: float | None = None

    def __post_init__(self) -> None:
        value = self.max_accuracy_drop
        if value is not None and (not is_number(value) or not 0 <= value < math.inf):
            raise ValueError(f"max_accuracy_drop={value!r}; allowed: a number >= 0 or null")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Experiment:
    """A validated experiment file.

    Attributes:
        name: Experiment name (the MLflow experiment).
        task: Built-in task name or ``"package.module:function"`` (not imported here), or a
            :class:`~autocompress.Task` object (an in-memory model, from the Python API).
        search_space: The search space, not yet applied to the model's layers.
        objectives: One to three objectives.
        target: Where latency is measured.
        search: How the search runs.
        finetune: Fine-tuning after compression.
        constraints: Limits on reported results.
        tracking_uri: MLflow tracking URI, or None for the command line's default.
        path: The file the experiment was read from, if any.
    """

    name: str
    task: Any
    search_space: SearchSpace
    objectives: tuple[Objective, ...]
    target: Target = field(default_factory=Target)
    search: SearchSettings = field(default_factory=SearchSettings)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    constraints: Constraints = field(default_factory=Constraints)
    tracking_uri: str | None = None
    path: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"name={self.name!r}; allowed: a non-empty string")
        self._check_task()
        if not 1 <= len(self.objectives) <= MAX_OBJECTIVES:
            raise ValueError(f"objectives: {len(self.objectives)} given; allowed: 1 to "
                             f"{MAX_OBJECTIVES}")
        metrics = [o.metric for o in self.objectives]
        for metric in metrics:
            if metrics.count(metric) > 1:
                raise ValueError(f"objectives: metric {metric!r} is listed twice")
        if self.tracking_uri is not None and (
                not isinstance(self.tracking_uri, str) or not self.tracking_uri.strip()):
            raise ValueError(f"tracking_uri={self.tracking_uri!r}; allowed: a non-empty string "
                             f"or null")

    def _check_task(self) -> None:
        """A Task object, a task's name or ``"package.module:function"`` (not imported here:
        an unknown name is refused, with the closest registered one, when it is loaded)."""
        if not isinstance(self.task, str):
            from autocompress.tasks import Task

            if not isinstance(self.task, Task):
                raise ValueError(f"task={type(self.task).__name__}; allowed: an autocompress.Task, "
                                 f"a built-in task name (e.g. digits) or 'package.module:function'")
        elif not _TASK_RE.fullmatch(self.task):
            raise ValueError(f"task={self.task!r}; allowed: a built-in task name (e.g. digits) "
                             f"or 'package.module:function'")

    @property
    def task_ref(self) -> str:
        """The task as logged: its reference, or ``<in-memory:NAME>`` for a Task object (which
        cannot be loaded again from the log: pass it to ``autocompress.export(..., task=)``)."""
        return self.task if isinstance(self.task, str) else f"{IN_MEMORY_PREFIX}{self.task.name}>"

    @property
    def metrics(self) -> list[str]:
        """The objective metric names, in order (``OptunaSearch(metric=...)``)."""
        return [o.metric for o in self.objectives]

    @property
    def modes(self) -> list[str]:
        """The objective modes, in order (``OptunaSearch(mode=...)``)."""
        return [str(o.mode) for o in self.objectives]

    @property
    def directions(self) -> list[str]:
        """The objective directions for ``optuna.create_study(directions=...)``."""
        return [o.direction for o in self.objectives]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for logging; the search space is inlined, so the result loads again."""
        return {
            "version": EXPERIMENT_VERSION,
            "name": self.name,
            "task": self.task_ref,
            "search_space": self.search_space.to_dict(),
            "objectives": [o.to_dict() for o in self.objectives],
            "target": self.target.to_dict(),
            "search": self.search.to_dict(),
            "finetune": self.finetune.to_dict(),
            "constraints": self.constraints.to_dict(),
            "tracking_uri": self.tracking_uri,
        }


def load_experiment(path: str | os.PathLike, *, trials: int | None = None,
                    concurrency: int | None = None, name: str | None = None) -> Experiment:
    """Reads and validates an experiment file.

    Args:
        path: The YAML file.
        trials: Overrides ``search.trials`` (``--trials``).
        concurrency: Overrides ``search.concurrency`` (``--concurrency``).
        name: Overrides ``name`` (``--name``).

    Returns:
        The experiment, with its search space loaded (a relative ``search_space`` path is
        taken relative to the experiment file).

    Raises:
        ConfigError: The file is missing or not valid YAML, or a key is unknown, missing, of the
            wrong type or out of range; the message names the file and the dotted key. Errors
            inside a referenced search space file name that file. Bad overrides name the option.
    """
    data = read_yaml(path)
    try:
        experiment = _parse_experiment(data, Path(path))
    except ConfigError as e:
        raise e.located(path) from None
    return _override(experiment, trials=trials, concurrency=concurrency, name=name)


# --- parsing -------------------------------------------------------------------------------


def parse_experiment(data: Any, path: Path) -> Experiment:
    """Validates an experiment's mapping (a file's content, or the Python API's arguments).

    Args:
        data: The mapping, as in an experiment file; ``search_space`` may also be a
            :class:`SearchSpace` or a path object.
        path: Where relative paths are taken from (their directory).

    Raises:
        ConfigError: As :func:`load_experiment`, without a file name.
    """
    return _parse_experiment(data, path)


def _parse_experiment(data: Any, path: Path) -> Experiment:
    if data is None:
        raise ConfigError(f"empty file; expected a mapping with keys {list(_REQUIRED)}")
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping with keys {list(_REQUIRED)}, "
                          f"got {type_name(data)}")
    check_keys(data, _TOP_KEYS, "")
    for key in _REQUIRED:
        if key not in data:
            raise ConfigError(f"missing required key {key!r}", key=key)
    version = data.get("version", EXPERIMENT_VERSION)
    if version != EXPERIMENT_VERSION or isinstance(version, bool):
        raise ConfigError(f"version {version!r} is not supported; allowed: "
                          f"{EXPERIMENT_VERSION}", key="version")
    fields_ = {key: data[key] for key in ("name", "task", "tracking_uri") if key in data}
    for key, value in fields_.items():
        check_type(value, str if key == "task" else hints(Experiment)[key], key)  # a file names its task
    return construct(
        Experiment, "",
        **fields_,
        search_space=_parse_search_space(data["search_space"], path),
        objectives=_parse_objectives(data["objectives"]),
        target=build(Target, data.get("target"), "target"),
        search=build(SearchSettings, data.get("search"), "search"),
        finetune=build(FinetuneConfig, data.get("finetune"), "finetune"),
        constraints=build(Constraints, data.get("constraints"), "constraints"),
        path=path,
    )


def _parse_search_space(raw: Any, path: Path) -> SearchSpace:
    if isinstance(raw, SearchSpace):
        return raw
    if isinstance(raw, os.PathLike):
        raw = os.fspath(raw)
    if isinstance(raw, Mapping):
        return load_search_space(raw, source=str(path), key_prefix="search_space")
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError(f"expected a path to a search space file (relative to this file) or "
                          f"an inline mapping with 'layers', got {raw!r}", key="search_space")
    space_path = os.path.normpath(path.parent / os.path.expanduser(raw))
    if not is_file(space_path):
        raise ConfigError(f"search space file not found: {space_path}", key="search_space")
    return load_search_space(space_path)


def _parse_objectives(raw: Any) -> tuple[Objective, ...]:
    if not isinstance(raw, list | tuple) or not raw:
        raise ConfigError(f"expected a list of 1 to {MAX_OBJECTIVES} objectives "
                          f"{{metric, mode}}, got {raw!r}", key="objectives")
    out = []
    for i, item in enumerate(raw):
        where = f"objectives[{i}]"
        if isinstance(item, str):
            item = {"metric": item}
        out.append(build(Objective, item, where, optional=False))
    return tuple(out)


def _override(experiment: Experiment, *, trials: int | None, concurrency: int | None,
              name: str | None) -> Experiment:
    """Applies command-line overrides; errors name the option, not the file."""
    overrides: list[tuple[str, str, Any]] = [
        ("--trials", "trials", trials), ("--concurrency", "concurrency", concurrency),
        ("--name", "name", name)]
    for option, key, value in overrides:
        if value is None:
            continue
        check_type(value, str if key == "name" else int, option)
        try:
            if key == "name":
                experiment = replace(experiment, name=value)
            else:
                experiment = replace(experiment, search=replace(experiment.search, **{key: value}))
        except ValueError as e:
            raise ConfigError(str(e), key=option) from None
    return experiment


# --- checks --------------------------------------------------------------------------------


