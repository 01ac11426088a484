"""The metric registry: every metric autocompress produces, declared once.

A :class:`MetricSpec` says what a metric is (direction, unit, description), who produces it
(``measure``: :class:`~autocompress.measure.Metrics` of a model; ``relative``: computed
against the baseline's metrics; ``trial``: the trial's own bookkeeping), whether it may be a
search objective, and how it is shown (Pareto plots, front tables). Objectives, MLflow logging,
the plots, the command line's tables and the report all read this table, at call time (a metric
registered after import is an objective, a logged metric and a ``--help`` entry alike); a name
that is not here is not a metric. A new metric is one entry here plus its producer (a ``Metrics`` field, a
``relative`` rule, or a key the trial reports); a test checks that every entry is produced.

A family of metrics, one per workload of the target (:mod:`autocompress.measure._workloads`:
``latency_seq32_ms``, ``latency_prefill_ms``, ``latency_decode_ms``, ...), is one entry of
:data:`METRIC_PATTERNS`: a spec named by its template (``latency_<workload>_ms``) with the
regular expression its names match (``pattern``). A name that matches is a metric like any
other (:func:`get_metric`, an objective, logged per trial and for the baseline) without being
listed among :data:`METRICS` (which every trial logs).

Torch-free: reading a config does not import torch.

Example:
    >>> METRICS.get("latency_ms").direction
    'min'
    >>> relative_metrics({"size_bytes": 100}, {"size_bytes": 400})["compression_ratio"]
    4.0
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, overload

from autocompress._registry import Registry, UnknownNameError

__all__ = ["METRICS", "METRIC_PATTERNS", "METRIC_TABLE", "OBJECTIVES", "TRIAL_METRICS",
           "MetricSpec", "front_columns", "get_metric", "logged_metrics", "match_metric",
           "objective_metrics", "objective_patterns", "plotted_metrics", "register_metric",
           "relative_metrics", "trial_metrics"]

PRODUCERS = ("measure", "relative", "trial")


@dataclass(frozen=True)
class MetricSpec:
    """One metric.

    Attributes:
        name: Its name in MLflow, ``--json`` output and objectives.
        direction: ``max`` or ``min``: which way is better.
        unit: Its unit (``""`` for a fraction or a count).
        producer: ``measure``, ``relative`` or ``trial`` (see the module docstring).
        description: One sentence for docs and help.
        label: A short label for plot axes.
        objective: Whether a search may optimize it.
        plotted: Whether the search draws a Pareto plot of accuracy against it.
        column: ``(header, format)`` of its column in front tables, or None.
        relative: For ``relative`` metrics: ``(baseline metric, "ratio" | "difference")``:
            baseline / compressed or baseline - compressed.
        pattern: For an entry of :data:`METRIC_PATTERNS`: the regular expression its names
            match, with one group that stands for ``<workload>`` in ``name`` (and in
            ``relative``'s metric).
    """

    name: str
    direction: str
    unit: str
    producer: str
    description: str
    label: str = ""
    objective: bool = False
    plotted: bool = False
    column: tuple[str, Callable[[float], str]] | None = None
    relative: tuple[str, str] | None = None
    pattern: str | None = None

    def __post_init__(self) -> None:
        if self.direction not in ("max", "min"):
            raise ValueError(f"metric {self.name!r}: direction={self.direction!r}; allowed: max, min")
        if self.producer not in PRODUCERS:
            raise ValueError(f"metric {self.name!r}: producer={self.producer!r}; allowed: {PRODUCERS}")
        if (self.producer == "relative") != (self.relative is not None):
            raise ValueError(f"metric {self.name!r}: a relative metric needs relative=(metric, kind)")


METRICS: Registry[MetricSpec] = Registry("metric")
METRIC_TABLE = METRICS  # the older name of the same registry
METRIC_PATTERNS: Registry[MetricSpec] = Registry("metric pattern")  # by template (docstring)


def register_metric(spec: MetricSpec) -> MetricSpec:
    """Adds ``spec`` to the registry.

    Raises:
        ValueError: A metric of that name is already registered.
    """
    return METRICS.register(spec.name, spec)


def get_metric(name: str, *, file: Any = None, key: str | None = None) -> MetricSpec:
    """The spec of metric ``name``: registered, or matching a pattern (:func:`match_metric`).

    Raises:
        UnknownNameError: Unknown name (a KeyError; the message has the closest, the allowed
            and the patterns).
    """
    if name in METRICS:
        return METRICS.get(name)
    matched = match_metric(name)
    if matched is None:
        error = METRICS.unknown(name, file=file, key=key)
        patterns = ", ".join(METRIC_PATTERNS.names())
        raise UnknownNameError(f"{error.args[0]}; or a metric per workload: {patterns} "
                               f"(workload: {WORKLOADS_HELP})", file=file, key=key)
    return matched


def match_metric(name: str) -> MetricSpec | None:
    """The spec of ``name`` from the first :data:`METRIC_PATTERNS` entry it matches (named
    ``name``, its ``relative`` metric named for the same workload), or None."""
    for spec in METRIC_PATTERNS.values():
        m = re.fullmatch(str(spec.pattern), name) if isinstance(name, str) else None
        if m:
            relative = spec.relative and (spec.relative[0].replace("<workload>", m.group(1)),
                                          spec.relative[1])
            return replace(spec, name=name, pattern=None, relative=relative or None)
    return None


def logged_metrics(metrics: Mapping[str, Any]) -> list[str]:
    """The names of ``metrics`` a trial (or the baseline) logs: the registered ones in
    registry order, then those matching a pattern, sorted."""
    extra = sorted(k for k in metrics if k not in METRICS and match_metric(k) is not None)
    return [k for k in METRICS.names() if k in metrics] + extra


def objective_metrics() -> dict[str, str]:
    """Metrics a search may optimize, with their direction (read now; the patterns' metrics
    are objectives too: :func:`objective_patterns`)."""
    return {m.name: m.direction for m in METRICS.values() if m.objective}


def objective_patterns() -> dict[str, str]:
    """``{template: direction}`` of the :data:`METRIC_PATTERNS` a search may optimize (e.g.
    ``latency_<workload>_ms``), for messages and help."""
    return {m.name: m.direction for m in METRIC_PATTERNS.values() if m.objective}


def _objective_direction(name: str) -> str | None:
    if name in METRICS:
        spec = METRICS.get(name)
        return spec.direction if spec.objective else None
    spec = match_metric(name)
    return spec.direction if spec is not None and spec.objective else None


def trial_metrics() -> tuple[str, ...]:
    """Every metric a finished trial logs, in registry order (read now)."""
    return METRICS.names()


def plotted_metrics() -> list[MetricSpec]:
    """Metrics the search draws a Pareto plot of accuracy against."""
    return [m for m in METRICS.values() if m.plotted]


def front_columns() -> list[tuple[str, str, Callable[[float], str]]]:
    """``(metric, header, format)`` of the metric columns of front tables, in order."""
    return [(m.name, *m.column) for m in METRICS.values() if m.column is not None]


class _Objectives(Mapping[str, str]):
    """``{objective metric: direction}``, read from the registry on every use (a live
    :func:`objective_metrics`)."""

    def __getitem__(self, name: str) -> str:
        direction = _objective_direction(name)
        if direction is None:
            raise KeyError(name)
        return direction

    def __contains__(self, name: object) -> bool:
        """Registered objectives and names matching an objective pattern (which iteration
        does not list: :func:`objective_patterns`)."""
        return isinstance(name, str) and _objective_direction(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(objective_metrics())

    def __len__(self) -> int:
        return len(objective_metrics())

    def __repr__(self) -> str:
        return repr(objective_metrics())


class _TrialMetrics(Sequence[str]):
    """Every metric name, read from the registry on every use (a live :func:`trial_metrics`)."""

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[str]: ...

    def __getitem__(self, i: Any) -> Any:
        return trial_metrics()[i]

    def __len__(self) -> int:
        return len(trial_metrics())

    def __contains__(self, name: object) -> bool:
        return name in METRICS or (isinstance(name, str) and match_metric(name) is not None)

    def __iter__(self) -> Iterator[str]:
        return iter(trial_metrics())

    def __repr__(self) -> str:
        return repr(trial_metrics())


OBJECTIVES: Mapping[str, str] = _Objectives()
TRIAL_METRICS: Sequence[str] = _TrialMetrics()


def relative_metrics(metrics: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, float | None]:
    """The ``relative`` metrics of ``metrics`` against ``baseline`` (``compression_ratio`` =
    baseline size / size, ``speedup`` = baseline latency / latency, ``accuracy_drop`` =
    baseline - accuracy); None where the baseline lacks the metric compared."""
    out: dict[str, float | None] = {}
    for m in METRIC_TABLE.values():
        if m.relative is None:
            continue
        key, kind = m.relative
        out[m.name] = _relative(metrics, baseline, key, kind)
    for p in METRIC_PATTERNS.values():  # per workload: speedup_<workload>
        source = _pattern_of(p.relative[0]) if p.relative else None
        for name in metrics:
            m = re.fullmatch(source, name) if source else None
            if m and p.relative and name in baseline:
                out[p.name.replace("<workload>", m.group(1))] = _relative(
                    metrics, baseline, name, p.relative[1])
    return out


def _relative(metrics: Mapping[str, Any], baseline: Mapping[str, Any], key: str,
              kind: str) -> float | None:
    if key not in baseline:
        return None
    if kind == "ratio":
        return baseline[key] / metrics[key]
    return baseline[key] - metrics[key]


def _pattern_of(template: str) -> str | None:
    return METRIC_PATTERNS.get(template).pattern if template in METRIC_PATTERNS else None


def _fixed(fmt: str) -> Callable[[float], str]:
    return fmt.format


for _spec in (
    MetricSpec("accuracy", "max", "", "measure", "The task's metric on the validation data "
               "(top-1 accuracy by default; higher is better).", label="accuracy",
               objective=True, column=("accuracy", _fixed("{:.4f}"))),
    MetricSpec("accuracy_drop", "min", "", "relative", "Baseline accuracy minus this model's, "
               "in the metric's units.", relative=("accuracy", "difference"),
               column=("drop", _fixed("{:+.4f}"))),
    MetricSpec("size_bytes", "min", "B", "measure", "Bytes of the deployable artifact, computed "
               "from the tensors as stored.", label="size (bytes)", objective=True, plotted=True,
               column=("size KiB", lambda v: f"{v / 1024:.1f}")),
    MetricSpec("compression_ratio", "max", "x", "relative", "Baseline size / size.",
               relative=("size_bytes", "ratio"), column=("ratio", _fixed("{:.1f}x"))),
    MetricSpec("latency_ms", "min", "ms", "measure", "Median latency on the target runtime and "
               "device, measured.", label="latency (ms)", objective=True, plotted=True,
               column=("latency ms", _fixed("{:.4f}"))),
    MetricSpec("speedup", "max", "x", "relative", "Baseline latency / latency.",
               relative=("latency_ms", "ratio"), column=("speedup", _fixed("{:.2f}x"))),
    MetricSpec("latency_p90_ms", "min", "ms", "measure", "90th percentile latency."),
    MetricSpec("latency_iqr_ms", "min", "ms", "measure", "Inter-quartile range of the latency "
               "(its spread)."),
    MetricSpec("params", "min", "", "measure", "Stored parameters.", label="params",
               objective=True),
    MetricSpec("nonzero_params", "min", "", "measure", "Parameters that are not zero."),
    MetricSpec("macs", "min", "", "measure", "Dense multiply-accumulates of one sample.",
               label="MACs", objective=True),
    MetricSpec("latency_cache_hit", "min", "", "measure", "1 when the latency came from the "
               "latency cache (same architecture, precision and target measured before)."),
    MetricSpec("finetune_seconds", "min", "s", "trial", "Wall time of the trial's fine-tuning."),
    MetricSpec("trial_seconds", "min", "s", "trial", "Wall time of the trial: compress, "
               "fine-tune, measure."),
    MetricSpec("accuracy_post_training", "max", "", "trial", "The task's metric right after "
               "compression, before fine-tuning (a trial's accuracy is never below it).",
               label="accuracy after compression"),
    MetricSpec("finetune_gain", "max", "", "trial", "What fine-tuning added: accuracy minus "
               "accuracy_post_training (0 when fine-tuning did not help)."),
):
    register_metric(_spec)

# The workloads of a target (autocompress.measure._workloads): a sequence length, a decoder's
# prefill (one per prompt length when there are several) and its decode step.
WORKLOAD = r"(seq\d+|prefill(?:_\d+)?|decode)"
WORKLOADS_HELP = "seq<n> per target.seq_len, prefill, prefill_<n>, decode"
for _spec in (
    MetricSpec("latency_<workload>_ms", "min", "ms", "measure", "Median latency of one "
               f"workload of the target ({WORKLOADS_HELP}; a decoder's decode: ms per generated "
               "token), measured.", label="latency (ms)", objective=True,
               pattern=f"latency_{WORKLOAD}_ms"),
    MetricSpec("speedup_<workload>", "max", "x", "relative", "Baseline latency / latency of "
               "one workload.", relative=("latency_<workload>_ms", "ratio"),
               pattern=f"speedup_{WORKLOAD}"),
):
    METRIC_PATTERNS.register(_spec.name, _spec)
