"""The metrics of one model: accuracy, size, params, MACs and measured latency."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from autocompress._inputs import take
from autocompress.compress import count_macs
from autocompress.measure._registry import relative_metrics
from autocompress.measure.latency import LatencyResult, measure_latency
from autocompress.measure.size import size_and_params
from autocompress.measure.target import Target


@dataclass(frozen=True)
class Metrics:
    """Measured metrics of one model (names are the MLflow / ``--json`` contract).

    The fields are the metric registry's ``measure`` metrics (a test checks they agree).

    Attributes:
        accuracy: The task metric on the validation data (higher is better).
        latency_ms: Median latency on the target (several workloads: their aggregate, or a
            decoder's decode step; each one's is in :meth:`to_dict`).
        latency_p90_ms: 90th percentile latency.
        latency_iqr_ms: Inter-quartile range of the latency (its spread).
        size_bytes: Bytes of the deployable artifact (see ``autocompress.measure.size``).
        params: Stored parameters.
        nonzero_params: Parameters that are not zero.
        macs: Dense multiply-accumulates of one sample.
        latency_cache_hit: 1 when the latency came from the latency cache (an earlier
            measurement of the same architecture and precision on the same target), else 0.
        latency: The whole latency measurement (protocol, runs, versions, CPU); not a metric.
    """

    accuracy: float
    latency_ms: float
    latency_p90_ms: float
    latency_iqr_ms: float
    size_bytes: int
    params: int
    nonzero_params: int
    macs: int
    latency_cache_hit: int = 0
    latency: LatencyResult | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, float]:
        """The metrics by name (``latency`` left out), then, with several workloads, each
        one's latency (``latency_<workload>_ms``, see :mod:`autocompress.measure._workloads`)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "latency"}
        workloads = self.latency.workloads if self.latency is not None else {}
        return {**out, **{f"latency_{name}_ms": ms for name, ms in workloads.items()}}

    def relative_to(self, baseline: Metrics) -> dict[str, float]:
        """``compression_ratio``, ``speedup`` and ``accuracy_drop`` against ``baseline``."""
        return relative_metrics(self.to_dict(), baseline.to_dict())  # type: ignore[return-value]


@torch.no_grad()
def top1_accuracy(model: nn.Module, loader) -> float:
    """Fraction of validation samples whose arg-max prediction is the target.

    Batches run on the model's device; their inputs may be a tensor, a tuple or a dict of
    tensors. Of an output that is a tuple or a dict (a Hugging Face ``ModelOutput``), the
    first element or value holds the logits.
    """
    from collections.abc import Mapping

    from autocompress._inputs import run, to_device

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        out = run(model, to_device(x, device))
        while isinstance(out, Mapping | tuple | list):
            out = next(iter(out.values())) if isinstance(out, Mapping) else out[0]
        y = y.to(device)
        correct += int((out.argmax(dim=-1) == y).sum())
        total += int(y.numel())
    model.train(was_training)
    return correct / max(total, 1)


Measurer = Callable[[nn.Module, torch.Tensor, Target], LatencyResult]


def measure(model: nn.Module, task, target: Target, measurer: Measurer | None = None) -> Metrics:
    """Measures ``model`` (compressed or not) on ``task``'s validation data and on ``target``.

    Args:
        measurer: Times the model (default :func:`measure_latency`, in this process; a search
            passes its measurement service, :class:`~autocompress.tune._service.ServiceMeasurer`).
    """
    accuracy = float(task.evaluate(model))
    latency = (measurer or measure_latency)(model, task.example_inputs, target)
    size, params, nonzero = size_and_params(model)
    return Metrics(
        accuracy=accuracy,
        latency_ms=latency.latency_ms,
        latency_p90_ms=latency.p90_ms,
        latency_iqr_ms=latency.iqr_ms,
        size_bytes=size,
        params=params,
        nonzero_params=nonzero,
        macs=sum(count_macs(model, take(task.example_inputs, 1)).values()),
        latency_cache_hit=int(latency.cached),
        latency=latency,
    )
