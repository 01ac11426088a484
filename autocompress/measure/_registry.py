"""The metric registry: every metric autocompress produces, declared once.

A :class:`MetricSpec` says what a metric is (direction, unit, description), who produces it
(``measure``: :class:`~autocompress.measure.Metrics` of a model; ``relative``: computed
against the baseline's metrics; ``trial``: the trial's own bookkeeping), whether it may be a
search objective, and how it is shown (Pareto plots, front tables). Objectives, MLflow logging,
the plots, the command line's tables and the report all read this table, at call time (a metric
registered after import is an objective, a logged metric and a ``--help`` entry alike); a name
that is not here is not a metric. A new metric is one entry here plus its producer (a ``Metrics`` field, a
``relative`` rule, or a key the trial reports); a test checks that every entry is produced.

Torch-free: reading a config does not import torch.

Example:
    >>> METRICS.get("latency_ms").direction
    'min'
    >>> relative_metrics({"size_bytes": 100}, {"size_bytes": 400})["compression_ratio"]
    4.0
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

from autocompress._registry import Registry

__all__ = ["METRICS", "METRIC_TABLE", "OBJECTIVES", "TRIAL_METRICS", "MetricSpec", "front_columns",
           "get_metric", "objective_metrics", "plotted_metrics", "register_metric",
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

    def __post_init__(self) -> None:
        if self.direction not in ("max", "min"):
            raise ValueError(f"metric {self.name!r}: direction={self.direction!r}; allowed: max, min")
        if self.producer not in PRODUCERS:
            raise ValueError(f"metric {self.name!r}: producer={self.producer!r}; allowed: {PRODUCERS}")
        if (self.producer == "relative") != (self.relative is not None):
            raise ValueError(f"metric {self.name!r}: a relative metric needs relative=(metric, kind)")


METRICS: Registry[MetricSpec] = Registry("metric")
METRIC_TABLE = METRICS  # the older name of the same registry


def register_metric(spec: MetricSpec) -> MetricSpec:
    """Adds ``spec`` to the registry.

    Raises:
        ValueError: A metric of that name is already registered.
    """
    return METRICS.register(spec.name, spec)


def get_metric(name: str, *, file: Any = None, key: str | None = None) -> MetricSpec:
    """The spec of metric ``name``.

    Raises:
        UnknownNameError: Unknown name (a KeyError; the message has the closest and the allowed).
    """
    return METRICS.get(name, file=file, key=key)


def objective_metrics() -> dict[str, str]:
    """Metrics a search may optimize, with their direction (read now)."""
    return {m.name: m.direction for m in METRICS.values() if m.objective}


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
        return objective_metrics()[name]

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
        return name in METRICS

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
        if key not in baseline:
            out[m.name] = None
        elif kind == "ratio":
            out[m.name] = baseline[key] / metrics[key]
        else:
            out[m.name] = baseline[key] - metrics[key]
    return out


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
