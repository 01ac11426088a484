"""What a trial tells the search, as dataclasses: one epoch done, finished, pruned, failed.

A trial function returns a :class:`TrialFinished` or :class:`TrialPruned` and reports an
:class:`EpochReport` after each fine-tuning epoch; a backend turns an exception into a
:class:`TrialFailed`. The Ray backend sends them as Ray Tune report dicts
(:func:`to_report` / :func:`from_report`, the only code that knows those keys); every backend
hands them to the search's single MLflow writer with :func:`record`.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

# Ray Tune report keys of the trial protocol (written by to_report, read by from_report only).
_FINAL, _PRUNED, _EPOCH_METRIC = "final", "pruned", "epoch_accuracy"


@dataclass(frozen=True)
class EpochReport:
    """A fine-tuning epoch ended.

    Attributes:
        epoch: Epochs done (1 after the first; 0: right after compression, before any
            training: the post-training metric).
        accuracy: The task metric after it.
        node: Where the trial runs (host and Ray node).
    """

    epoch: int
    accuracy: float
    node: str = ""


@dataclass(frozen=True)
class TrialFinished:
    """The trial compressed, fine-tuned and measured its model.

    Attributes:
        metrics: The measured, relative and trial metrics, and ``epochs``.
        summary: The plan's summary.
        node: Where the trial ran.
        latency: The latency measurement's facts (``LatencyResult.to_dict()``).
        files: Its artifacts, ``{file name: bytes}`` (not part of a report: the Ray backend
            ships them through its artifact inbox).
    """

    metrics: dict[str, Any]
    summary: str
    node: str = ""
    latency: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict, repr=False)

    def values(self, metrics: list[str]) -> list[float] | None:
        """The objective values in the order of ``metrics``; None if one is missing."""
        if any(self.metrics.get(m) is None for m in metrics):
            return None
        return [float(self.metrics[m]) for m in metrics]


@dataclass(frozen=True)
class TrialPruned:
    """The trial was stopped early: it cannot meet the accuracy constraint.

    Attributes:
        reason: Why (see :func:`~autocompress.tune._trial.prune_reason`).
        epochs: Epochs done when it stopped (1.5: halfway through the second).
        accuracy: The task metric then.
        summary: The plan's summary.
        node: Where the trial ran.
    """

    reason: str
    epochs: float
    accuracy: float | None
    summary: str = ""
    node: str = ""


@dataclass(frozen=True)
class TrialFailed:
    """The trial raised or its process died.

    Attributes:
        error: The root cause, one line.
        details: The whole error text (traceback), or None.
    """

    error: str
    details: str | None = None


TrialEvent = Union[EpochReport, TrialFinished, TrialPruned, TrialFailed]


def to_report(event: EpochReport | TrialFinished | TrialPruned) -> dict[str, Any]:
    """``event`` as a Ray Tune report dict (without a finished trial's files)."""
    if isinstance(event, EpochReport):
        return {"epoch": event.epoch, _EPOCH_METRIC: event.accuracy, "node": event.node}
    if isinstance(event, TrialPruned):
        return {_PRUNED: True, _FINAL: True, "prune_reason": event.reason, "epoch": event.epochs,
                _EPOCH_METRIC: event.accuracy, "summary": event.summary, "node": event.node}
    return {**event.metrics, _FINAL: True, "summary": event.summary, "node": event.node,
            "latency_info": json.dumps(event.latency)}


def from_report(report: dict[str, Any] | None,
                files: dict[str, bytes] | None = None) -> TrialEvent | None:
    """The event a Ray Tune report dict holds (``files``: a finished trial's artifacts), or
    None for a report of none (e.g. Ray's own bookkeeping)."""
    report = report or {}
    if report.get(_PRUNED):
        return TrialPruned(str(report.get("prune_reason", "")), report.get("epoch", 0),
                           report.get(_EPOCH_METRIC), report.get("summary", ""),
                           str(report.get("node") or ""))
    if report.get(_FINAL):
        return TrialFinished(dict(report), report.get("summary", ""), str(report.get("node") or ""),
                             json.loads(report.get("latency_info") or "{}"), dict(files or {}))
    if _EPOCH_METRIC in report:
        return EpochReport(int(report["epoch"]), report[_EPOCH_METRIC], str(report.get("node") or ""))
    return None


def record(tracker: Any, key: str, event: TrialEvent | None) -> None:
    """Hands ``event`` of trial ``key`` to the search's MLflow writer
    (:class:`~autocompress.tracking.SearchTracker`); None: the trial ended without a final
    result (a failure)."""
    if event is None:
        tracker.trial_failed(key, "trial ended without a final result")
        return
    if isinstance(event, TrialFailed):
        tracker.trial_failed(key, event.error, details=event.details or None)
        return
    if event.node:
        tracker.trial_node(key, event.node)
    if isinstance(event, EpochReport):
        tracker.trial_epoch(key, event.epoch, event.accuracy)
    elif isinstance(event, TrialPruned):
        tracker.trial_pruned(key, event.reason, math.ceil(event.epochs), event.accuracy,
                             event.summary)
    elif not event.files:
        tracker.trial_finished(key, event.metrics, event.summary, latency=event.latency)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in event.files.items():
                (Path(tmp) / name).write_bytes(data)
            tracker.trial_finished(key, event.metrics, event.summary, Path(tmp),
                                   latency=event.latency)
