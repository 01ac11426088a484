"""What a latency measurement produces (:class:`LatencyResult`) and what it times
(:class:`Prepared`): plain data shared by the runtimes, the measurement service and the cache.

A target with several workloads (sequence lengths, a decoder's prefill and decode steps:
:mod:`autocompress.measure._workloads`) is timed one workload at a time and the results
combined by :func:`combine`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from autocompress.measure._timing import Timing
    from autocompress.measure.target import Target


@dataclass(frozen=True)
class LatencyResult:
    """Timings of one model on one target, in milliseconds."""

    latency_ms: float
    p90_ms: float
    iqr_ms: float
    runs: int
    runtime: str
    device: str
    threads: int
    batch_size: int
    ci_low_ms: float = math.nan  # 95% confidence interval of the median
    ci_high_ms: float = math.nan
    stopped: str = ""  # why timing stopped: "ci", "budget" or "max_runs"
    runtime_version: str = ""
    cpu: str = ""
    cached: bool = False  # taken from the latency cache (autocompress.measure.cache)
    gpu: str = ""  # the CUDA device's name with device: cuda
    # Paired with a reference (autocompress.measure._paired; nan when timed alone): the
    # reference's time / this model's, timed interleaved; ``latency_ms`` (and p90, IQR and the
    # interval) are then on the reference's clock: its latency when it was first timed / speedup.
    speedup: float = math.nan
    reference_ms: float = math.nan  # the reference's median in the same window
    measured_ms: float = math.nan  # this model's own median in that window
    drift: float = math.nan  # how much the reference moved while timing (relative)
    slowdown: float = math.nan  # how much slower than usual the reference ran (relative)
    retries: int = 0  # times it was timed again because the reference drifted or was slow
    measured_at: float = 0.0  # when it was timed (Unix time; a cached result: when it was)
    # Several workloads (:func:`combine`): each one's median, ms, on the same clock as
    # ``latency_ms``; empty for one batch at the example's shape (left out of to_dict then).
    workloads: dict[str, float] = field(default_factory=dict)
    # The ONNX graph form timed with target.graph fused/best ("plain" or "fused"; "" with the
    # default graph: plain), the fused-op counts ("Attention=6,SkipLayerNormalization=12") and
    # why the fused graph was not used, or best's medians of both (runtimes/_ort.py).
    graph: str = ""
    fused_ops: str = ""
    graph_note: str = ""

    @property
    def paired(self) -> bool:
        return not math.isnan(self.speedup)

    def to_dict(self) -> dict:
        out = asdict(self)
        if not out["workloads"]:  # one workload: the dict (and the cache's JSON) as before
            del out["workloads"]
        return out

    @classmethod
    def of(cls, t: Timing, target: Target, facts: dict[str, str], **extra: Any) -> LatencyResult:
        """The result of timing ``t`` on ``target``, measured on the machine ``facts`` describe
        (a runtime's facts), with ``extra`` fields (the pairing's)."""
        return cls(t.latency_ms, t.p90_ms, t.iqr_ms, t.runs, target.runtime, target.device,
                   target.threads, target.batch_size, t.ci_low_ms, t.ci_high_ms, t.stopped,
                   facts.get("runtime_version", ""), facts.get("cpu", ""),
                   gpu=facts.get("gpu", ""), **extra)

    @classmethod
    def from_dict(cls, data: dict[str, Any], **changes: Any) -> LatencyResult:
        """A result from its :meth:`to_dict` (the cache's), keys it does not know left out."""
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in data.items() if k in known}, **changes})


@dataclass
class Prepared:
    """A model made ready to time on a target, without timing it yet.

    Built where the model lives (a trial); timed where the measurement runs (in-process, or
    the search's measurement service, see :mod:`autocompress.tune._service`). Picklable.

    Attributes:
        batch: The timed input batch (``target.batch_size`` rows): the first of ``feeds``.
        onnx: The exported ONNX model (``onnxruntime`` runtime, local or remote).
        module: The baked eager module (``torch`` runtime).
        key: Latency-cache key (architecture, precision, target, measuring machine), or None
            when the model has no ONNX form to derive it from.
        feeds: ``{workload: input batch}``, every batch timed
            (:mod:`~autocompress.measure._workloads`); ``{"": batch}`` for one batch. A
            runtime is given one workload at a time (:meth:`for_feed`) and times its ``batch``.
    """

    batch: Any  # a tensor, a tuple or a dict of tensors (autocompress._inputs)
    onnx: bytes | None = None
    module: nn.Module | None = None
    key: str | None = None
    feeds: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.feeds:
            self.feeds = {"": self.batch}

    @property
    def workloads(self) -> tuple[str, ...]:
        """The names of :attr:`feeds`, in order (``("",)`` for one batch)."""
        return tuple(self.feeds)

    def for_feed(self, name: str) -> Prepared:
        """This prepared model with ``feeds[name]`` as its only batch: what a runtime's
        ``runner``/``measure`` is given (a runtime times ``prepared.batch``)."""
        if name not in self.feeds:
            raise KeyError(f"workload {name!r}; allowed: {list(self.feeds)}")
        return replace(self, batch=self.feeds[name], feeds={name: self.feeds[name]})


def is_decoder(workloads: Mapping[str, Any]) -> bool:
    """Whether these are a decoder LM's workloads (a ``decode`` step among them)."""
    return "decode" in workloads


def combined_ms(medians: Mapping[str, float], aggregate: str = "mean") -> float:
    """The one latency of workloads with these medians, as :func:`combine` makes it."""
    if is_decoder(medians):
        return medians["decode"]
    values = list(medians.values())
    return max(values) if aggregate == "max" else sum(values) / len(values)


def combine(results: Mapping[str, LatencyResult], aggregate: str = "mean") -> LatencyResult:
    """One result for the workloads ``results`` (``{workload: its result}``, in order).

    One workload named ``""`` (the example's shape): its result, unchanged. A decoder's
    (:func:`is_decoder`): the ``decode`` step's result (ms per generated token). Otherwise
    ``aggregate`` (``mean`` or ``max``) over the workloads: ``max`` takes the slowest one's
    result; ``mean`` averages the times (latency, p90, IQR, interval, both paired medians),
    sums the runs and retries and takes the largest drift and slowdown. Either way
    ``workloads`` holds each one's median and ``cached`` says whether all were cache hits.
    """
    if list(results) == [""]:
        return results[""]
    medians = {name: r.latency_ms for name, r in results.items()}
    rs = list(results.values())
    cached = all(r.cached for r in rs)
    if is_decoder(results):
        return replace(results["decode"], workloads=medians, cached=cached)
    if aggregate == "max":
        return replace(max(rs, key=lambda r: r.latency_ms), workloads=medians, cached=cached)

    def mean(name: str) -> float:
        return sum(getattr(r, name) for r in rs) / len(rs)

    times = ("latency_ms", "p90_ms", "iqr_ms", "ci_low_ms", "ci_high_ms", "reference_ms",
             "measured_ms")
    out = replace(rs[0], **{name: mean(name) for name in times}, runs=sum(r.runs for r in rs),
                  retries=sum(r.retries for r in rs), drift=max(r.drift for r in rs),
                  slowdown=max(r.slowdown for r in rs),
                  measured_at=max(r.measured_at for r in rs), workloads=medians, cached=cached)
    return replace(out, speedup=out.reference_ms / out.measured_ms) if out.paired else out
