"""Where and how latency is measured."""

from __future__ import annotations

from dataclasses import asdict, dataclass

DEVICES = ("cpu", "cuda")
RUNTIMES = ("onnxruntime", "torch")


@dataclass(frozen=True)
class Target:
    """The deployment target latency is measured on.

    Attributes:
        device: ``cpu`` or ``cuda``.
        runtime: ``onnxruntime`` (the exported ONNX model) or ``torch`` (eager PyTorch).
        threads: Intra-op threads of the runtime, fixed for every measurement.
        batch_size: Batch size of the timed inputs.
        warmup: Untimed runs before timing.
        min_runs: Timed runs always done.
        max_runs: Upper bound on timed runs.
        budget_s: Stop timing after ``min_runs`` once this many seconds are spent.
    """

    device: str = "cpu"
    runtime: str = "onnxruntime"
    threads: int = 1
    batch_size: int = 1
    warmup: int = 10
    min_runs: int = 30
    max_runs: int = 300
    budget_s: float = 1.0

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"target.device={self.device!r}; allowed: {list(DEVICES)}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"target.runtime={self.runtime!r}; allowed: {list(RUNTIMES)}")
        for key in ("threads", "batch_size", "min_runs", "max_runs"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"target.{key}={value!r}; allowed: an integer >= 1")
        if not isinstance(self.warmup, int) or isinstance(self.warmup, bool) or self.warmup < 0:
            raise ValueError(f"target.warmup={self.warmup!r}; allowed: an integer >= 0")
        if self.max_runs < self.min_runs:
            raise ValueError(f"target.max_runs={self.max_runs} < min_runs={self.min_runs}")
        if (not isinstance(self.budget_s, int | float) or isinstance(self.budget_s, bool)
                or not self.budget_s > 0):  # "not > 0" also refuses NaN
            raise ValueError(f"target.budget_s={self.budget_s!r}; allowed: a number > 0")

    def to_dict(self) -> dict:
        return asdict(self)
