"""Where and how latency is measured."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from autocompress._errors import did_you_mean
from autocompress.measure._timing import TimingSettings
from autocompress.measure.runtimes import RUNTIMES, devices_of, runtime_names

DEVICES = ("cpu", "cuda", "remote")
GRAPH_FORMS = ("plain", "fused", "best")
AGGREGATES = ("mean", "max")
# Keys left out of :meth:`Target.to_dict` (and so of the latency-cache key) at their default:
# a target written before they existed keys its measurements as before.
_OPTIONAL = {"url": None, "token_env": None, "seq_len": None, "context_len": None,
             "aggregate": "mean", "graph": "plain"}


@dataclass(frozen=True)
class Target:
    """The deployment target latency is measured on.

    Attributes:
        device: ``cpu``, ``cuda`` or ``remote`` (a device agent at ``url``, see
            ``autocompress.agent``; needs ``runtime: onnxruntime``).
        runtime: ``onnxruntime`` (the exported ONNX model) or ``torch`` (eager PyTorch).
        threads: Intra-op threads of the runtime, fixed for every measurement.
        batch_size: Batch size of the timed inputs.
        warmup, min_runs, max_runs, budget_s, rel_ci, min_time_s: The timing protocol
            (:class:`~autocompress.measure._timing.TimingSettings`, same defaults, same
            meaning; :attr:`timing` gives them as one object).
        pause_training: During a search, hold back the training steps of trials on the
            measuring machine while a latency is being timed (they wait, then go on), so that
            they cannot disturb it through shared caches, memory or SMT siblings of the
            measuring core. Costs the trials that time.
        url: ``http(s)://host:port`` of the device agent (``device: remote`` only).
        token_env: Name of the environment variable holding the agent's token
            (``device: remote`` only).
        seq_len: The sequence lengths latency is timed at (token inputs' axis 1, and the inputs
            of the same shape), one or several (a list in YAML; a decoder LM's prompt lengths);
            None: the example inputs' own shape. With several, ``latency_ms`` is their
            ``aggregate`` and each length is reported too.
        context_len: Decoder LMs: the tokens already in the KV cache when the time per
            generated token is measured; None: the largest ``seq_len`` (or the example's).
        aggregate: How ``latency_ms`` combines several sequence lengths: ``mean`` or ``max``.
        graph: The ONNX graph form timed and exported: ``plain`` (as exported), ``fused``
            (ONNX Runtime's transformer fusions applied offline) or ``best`` (both timed, the
            faster kept, for the baseline and every trial alike).
    """

    device: str = "cpu"
    runtime: str = "onnxruntime"
    threads: int = 1
    batch_size: int = 1
    warmup: int = TimingSettings.warmup  # one default, shared with the agent
    min_runs: int = TimingSettings.min_runs
    max_runs: int = TimingSettings.max_runs
    budget_s: float = TimingSettings.budget_s
    rel_ci: float = TimingSettings.rel_ci
    min_time_s: float = TimingSettings.min_time_s
    pause_training: bool = True
    url: str | None = None
    token_env: str | None = None
    seq_len: tuple[int, ...] | None = None
    context_len: int | None = None
    aggregate: str = "mean"
    graph: str = "plain"

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"target.device={self.device!r}; allowed: {list(DEVICES)}")
        if self.runtime not in RUNTIMES:  # the registry, read now: late registrations count
            raise ValueError(f"target.runtime={self.runtime!r}"
                             f"{did_you_mean(self.runtime, RUNTIMES)}; allowed: {runtime_names()}")
        for key in ("threads", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"target.{key}={value!r}; allowed: an integer >= 1")
        try:
            self.timing  # noqa: B018  (validates the timing settings)
        except ValueError as e:
            raise ValueError(f"target.{e}") from None
        if not isinstance(self.pause_training, bool):
            raise ValueError(f"target.pause_training={self.pause_training!r}; allowed: true or false")
        self._check_remote()
        self._check_shapes()

    def _check_shapes(self) -> None:
        lengths = self.seq_len
        if lengths is not None:
            lengths = (lengths,) if isinstance(lengths, int) and not isinstance(lengths, bool) else lengths
            if (not isinstance(lengths, list | tuple) or not lengths
                    or any(not _positive_int(n) for n in lengths)):
                raise ValueError(f"target.seq_len={self.seq_len!r}; allowed: an integer >= 1 or a "
                                 f"non-empty list of them")
            object.__setattr__(self, "seq_len", tuple(sorted(set(lengths))))
        if self.context_len is not None and not _positive_int(self.context_len):
            raise ValueError(f"target.context_len={self.context_len!r}; allowed: an integer >= 1")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"target.aggregate={self.aggregate!r}; allowed: {list(AGGREGATES)}")
        if self.graph not in GRAPH_FORMS:
            raise ValueError(f"target.graph={self.graph!r}; allowed: {list(GRAPH_FORMS)}")
        if self.graph != "plain" and (self.runtime != "onnxruntime" or self.device == "remote"):
            # the fused forms are ONNX Runtime contrib ops, made and verified in this process
            raise ValueError(f"target.graph={self.graph!r} with runtime: {self.runtime}, device: "
                             f"{self.device}; allowed: ['plain'] (the fused forms, "
                             f"{list(GRAPH_FORMS)}, need runtime: onnxruntime on device cpu or cuda)")

    def _check_remote(self) -> None:
        if self.device != "remote":
            for key in ("url", "token_env"):
                if getattr(self, key) is not None:
                    raise ValueError(f"target.{key}={getattr(self, key)!r}; allowed: only with "
                                     f"device: remote")
            return
        if self.device not in devices_of(self.runtime):
            allowed = [name for name in runtime_names() if self.device in devices_of(name)]
            raise ValueError(f"target.runtime={self.runtime!r}; allowed: {allowed} with "
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

    @property
    def timing(self) -> TimingSettings:
        """The timing protocol's settings (shared with the device agent)."""
        return TimingSettings.from_mapping({f.name: getattr(self, f.name) for f in fields(self)})

    def to_dict(self) -> dict:
        out = asdict(self)
        for key, default in _OPTIONAL.items():  # left out at their defaults (see _OPTIONAL)
            if out[key] == default:
                del out[key]
        if "seq_len" in out:
            out["seq_len"] = list(out["seq_len"])
        return out


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
