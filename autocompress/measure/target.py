"""Where and how latency is measured."""

from __future__ import annotations

from dataclasses import asdict, dataclass

DEVICES = ("cpu", "cuda", "remote")
RUNTIMES = ("onnxruntime", "torch")


@dataclass(frozen=True)
class Target:
    """The deployment target latency is measured on.

    Attributes:
        device: ``cpu``, ``cuda`` or ``remote`` (a device agent at ``url``, see
            ``autocompress.agent``; needs ``runtime: onnxruntime``).
        runtime: ``onnxruntime`` (the exported ONNX model) or ``torch`` (eager PyTorch).
        threads: Intra-op threads of the runtime, fixed for every measurement.
        batch_size: Batch size of the timed inputs.
        warmup: Untimed runs before timing.
        min_runs: Timed runs always done.
        max_runs: Upper bound on timed runs.
        budget_s: Stop timing after ``min_runs`` once this many seconds are spent.
        rel_ci: Stop timing after ``min_runs`` and ``min_time_s`` once the 95% confidence
            interval of the median is within ``±rel_ci`` of the median (0 turns this off).
        min_time_s: Time at least this long before the interval may stop timing (a smaller
            ``budget_s`` wins), so that a fast model is not judged on a few milliseconds.
        pause_training: During a search, hold back the training steps of trials on the
            measuring machine while a latency is being timed (they wait, then go on), so that
            they cannot disturb it through shared caches, memory or SMT siblings of the
            measuring core. Costs the trials that time.
        url: ``http(s)://host:port`` of the device agent (``device: remote`` only).
        token_env: Name of the environment variable holding the agent's token
            (``device: remote`` only).
    """

    device: str = "cpu"
    runtime: str = "onnxruntime"
    threads: int = 1
    batch_size: int = 1
    warmup: int = 10
    min_runs: int = 30
    max_runs: int = 100_000
    budget_s: float = 1.0
    rel_ci: float = 0.02
    min_time_s: float = 0.5
    pause_training: bool = True
    url: str | None = None
    token_env: str | None = None

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
        if (not isinstance(self.rel_ci, int | float) or isinstance(self.rel_ci, bool)
                or not 0 <= self.rel_ci < 1):
            raise ValueError(f"target.rel_ci={self.rel_ci!r}; allowed: a number >= 0 and < 1")
        if (not isinstance(self.min_time_s, int | float) or isinstance(self.min_time_s, bool)
                or not self.min_time_s >= 0):
            raise ValueError(f"target.min_time_s={self.min_time_s!r}; allowed: a number >= 0")
        if not isinstance(self.pause_training, bool):
            raise ValueError(f"target.pause_training={self.pause_training!r}; allowed: true or false")
        self._check_remote()

    def _check_remote(self) -> None:
        if self.device != "remote":
            for key in ("url", "token_env"):
                if getattr(self, key) is not None:
                    raise ValueError(f"target.{key}={getattr(self, key)!r}; allowed: only with "
                                     f"device: remote")
            return
        if self.runtime != "onnxruntime":
            raise ValueError(f"target.runtime={self.runtime!r}; allowed: ['onnxruntime'] with "
                             f"device: remote")
        url = self.url
        if (not isinstance(url, str) or not url.startswith(("http://", "https://"))
                or len(url.split("://", 1)[1].strip("/")) == 0):
            raise ValueError(f"target.url={url!r}; allowed: the agent's http://host:port "
                             f"(required with device: remote)")
        if not isinstance(self.token_env, str) or not self.token_env.strip():
            raise ValueError(f"target.token_env={self.token_env!r}; allowed: the name of an "
                             f"environment variable holding the agent's token (required with "
                             f"device: remote)")

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("url", "token_env"):  # only meaningful for device: remote
            if out[key] is None:
                del out[key]
        return out
