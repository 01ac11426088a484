"""What a latency measurement produces (:class:`LatencyResult`) and what it times
(:class:`Prepared`): plain data shared by the runtimes, the measurement service and the cache."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
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
        return asdict(self)

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
        batch: The timed input batch (``target.batch_size`` rows).
        onnx: The exported ONNX model (``onnxruntime`` runtime, local or remote).
        module: The baked eager module (``torch`` runtime).
        key: Latency-cache key (architecture, precision, target, measuring machine), or None
            when the model has no ONNX form to derive it from.
    """

    batch: Any  # a tensor, a tuple or a dict of tensors (autocompress._inputs)
    onnx: bytes | None = None
    module: nn.Module | None = None
    key: str | None = None
