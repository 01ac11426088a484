"""Latency of the deployable model, measured on the target runtime.

Protocol: build the deployable artifact (ONNX file for ``onnxruntime``, baked eager module
for ``torch``), fix the runtime's intra-op threads to ``target.threads``, run ``warmup``
untimed inferences on a batch of ``target.batch_size``, then time single inferences with
``time.perf_counter`` until ``min_runs`` are done and either the 95% confidence interval of
the median is within ``±target.rel_ci`` of the median or ``budget_s`` is spent, never more
than ``max_runs`` (the loop is :func:`autocompress.measure._timing.time_runs`, shared with the
remote device agent). The median is reported as ``latency_ms``; p90, the inter-quartile range
(spread), the interval, the thread count, batch size, runtime version and CPU model are
recorded with it.

With ``device: remote`` the exported ONNX model is sent to a device agent
(``autocompress agent``, see :mod:`autocompress.agent`) which runs the same protocol there.

ONNX Runtime runs the exported file with all graph optimizations. Int8 weights are stored
as int8 + DequantizeLinear; when the model has no quantized activations the session folds
those into fp32 constants at load time (``session.disable_quant_qdq``), which is what a
weight-only int8 model costs at run time on a CPU; with quantized activations the Q/DQ pairs
stay so that ORT can fuse them into integer kernels, and whatever that costs is measured.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from autocompress.compress._bake import bake, export_onnx
from autocompress.measure import cache as latency_cache
from autocompress.measure._machine import cpu_model
from autocompress.measure._timing import time_runs
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

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Prepared:
    """A model made ready to time on a target, without timing it yet.

    Built where the model lives (a trial); timed where the measurement runs (in-process, or
    the search's measurement service, see :mod:`autocompress.measure.service`). Picklable.

    Attributes:
        batch: The timed input batch (``target.batch_size`` rows).
        onnx: The exported ONNX model (``onnxruntime`` runtime, local or remote).
        module: The baked eager module (``torch`` runtime).
        key: Latency-cache key (architecture, precision, target, measuring machine), or None
            when the model has no ONNX form to derive it from.
    """

    batch: torch.Tensor
    onnx: bytes | None = None
    module: nn.Module | None = None
    key: str | None = None


def prepare(model: nn.Module, example_inputs: torch.Tensor, target: Target) -> Prepared:
    """Builds the deployable form of ``model`` for ``target`` and its latency-cache key.

    The key is derived from the exported ONNX graph with weight values left out (see
    :mod:`autocompress.measure.cache`), for the ``torch`` runtime too; a model that cannot be
    exported to ONNX is measured on ``torch`` without caching.
    """
    batch = _batch(example_inputs, target.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = export_onnx(model, example_inputs, Path(tmp) / "model.onnx")
        except Exception:
            if target.runtime == "onnxruntime":
                raise
            return Prepared(batch, module=bake(model))
        key = _cache_key(path, target)
        if target.runtime == "onnxruntime":
            return Prepared(batch, onnx=path.read_bytes(), key=key)
    return Prepared(batch, module=bake(model), key=key)


def measure_prepared(prepared: Prepared, target: Target, use_cache: bool = True,
                     while_timing: Callable[[], AbstractContextManager] = nullcontext) -> LatencyResult:
    """Times ``prepared`` on ``target`` in this process, or takes it from the latency cache.

    Args:
        use_cache: Take an earlier measurement of the same key from the cache and store this
            one there. False always measures.
        while_timing: The context the timing (not a cache hit) runs in; the measurement
            service passes its training gate.
    """
    check_target(target)
    use_cache = use_cache and prepared.key is not None
    hit = cached_result(prepared) if use_cache else None
    if hit is not None:
        return hit
    with while_timing():
        result = _time_prepared(prepared, target)
    if use_cache:
        latency_cache.store(str(prepared.key), result.to_dict())
    return result


def _time_prepared(prepared: Prepared, target: Target) -> LatencyResult:
    if prepared.module is not None:
        return _time(_torch_runner(prepared.module, prepared.batch, target), target)
    assert prepared.onnx is not None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(prepared.onnx)
        if target.device == "remote":
            return _measure_remote(path, target)
        return _time(_onnxruntime_runner(path, prepared.batch, target), target)


def cached_result(prepared: Prepared) -> LatencyResult | None:
    """The latency cache's result for ``prepared`` (``cached=True``), or None."""
    hit = latency_cache.lookup(str(prepared.key)) if prepared.key is not None else None
    if hit is None:
        return None
    known = {f.name for f in fields(LatencyResult)}
    return LatencyResult(**{**{k: v for k, v in hit.items() if k in known}, "cached": True})


def measure_latency(model: nn.Module, example_inputs: torch.Tensor, target: Target,
                    use_cache: bool = True) -> LatencyResult:
    """Times the deployable form of ``model`` on ``target`` in this process (see the module
    docstring): :func:`prepare`, then :func:`measure_prepared`.

    Args:
        use_cache: Take an earlier measurement of the same architecture and precision on the
            same target from the latency cache (``autocompress.measure.cache``), and store
            this one there. False always measures (e.g. to verify an export).
    """
    check_target(target)
    return measure_prepared(prepare(model, example_inputs, target), target, use_cache)


def check_target(target: Target) -> None:
    """Refuses a runtime/device combination this machine cannot run.

    Raises:
        ValueError: ``device: cuda`` without a CUDA device (``torch``) or without ONNX
            Runtime's CUDA execution provider (``onnxruntime``); the message names the key.
    """
    if target.device != "cuda":
        return
    if target.runtime == "torch" and not torch.cuda.is_available():
        raise ValueError("target.device='cuda' with runtime torch: torch sees no CUDA device here "
                         f"(torch {torch.__version__}); allowed here: ['cpu', 'remote']")
    if target.runtime == "onnxruntime":
        import onnxruntime as ort

        providers = ort.get_available_providers()
        if "CUDAExecutionProvider" not in providers:
            raise ValueError(f"target.device='cuda' with runtime onnxruntime: this onnxruntime has no "
                             f"CUDAExecutionProvider (it has {providers}; install onnxruntime-gpu); "
                             f"allowed here: ['cpu', 'remote']")


def _cache_key(path: Path, target: Target) -> str:
    """Structure of the exported graph (not its weight values) + target + measuring machine."""
    if target.device == "remote":
        facts = target_facts(target)
    else:
        facts = {**machine_facts(), "host": platform.node()}
        if target.device == "cuda":
            facts["gpu"] = torch.cuda.get_device_name()
    return latency_cache.cache_key(latency_cache.graph_signature(path), target.to_dict(), facts)


def _batch(example_inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    reps = -(-batch_size // example_inputs.shape[0])
    return example_inputs.repeat(reps, *([1] * (example_inputs.dim() - 1)))[:batch_size].contiguous()


def _onnxruntime_runner(path: Path, batch: torch.Tensor, target: Target) -> Callable[[], object]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = target.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not _has_activation_quant(path):
        # Weight-only int8: without quantized activations there is no integer kernel to fuse
        # into, so let ORT fold the weight DequantizeLinear nodes into fp32 constants at load
        # time (otherwise they re-run on every inference).
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    providers = ["CUDAExecutionProvider"] if target.device == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), opts, providers=providers)
    feed = {"input": batch.numpy()}
    return lambda: session.run(None, feed)


def _has_activation_quant(path: Path) -> bool:
    import onnx

    return any(n.op_type == "QuantizeLinear" for n in onnx.load(str(path)).graph.node)


def _torch_runner(deployable: nn.Module, batch: torch.Tensor, target: Target) -> Callable[[], object]:
    device = torch.device(target.device)
    deployable = deployable.to(device).eval()
    x = batch.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    threads = target.threads

    def run() -> object:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                out = deployable(x)
            sync()
            return out
        finally:
            torch.set_num_threads(previous)

    return run


def _time(run: Callable[[], object], target: Target) -> LatencyResult:
    t = time_runs(run, warmup=target.warmup, min_runs=target.min_runs, max_runs=target.max_runs,
                  budget_s=target.budget_s, rel_ci=target.rel_ci, min_time_s=target.min_time_s)
    facts = machine_facts()
    gpu = torch.cuda.get_device_name() if target.device == "cuda" else ""
    return LatencyResult(t.latency_ms, t.p90_ms, t.iqr_ms, t.runs, target.runtime, target.device,
                         target.threads, target.batch_size, t.ci_low_ms, t.ci_high_ms, t.stopped,
                         facts[target.runtime], facts["cpu"], gpu=gpu)


@functools.cache
def machine_facts() -> dict[str, str]:
    """CPU and runtime versions, logged with every measurement."""
    import onnxruntime as ort

    return {"cpu": cpu_model(), "torch": torch.__version__, "onnxruntime": ort.__version__,
            "python": platform.python_version()}


# --- device: remote --------------------------------------------------------------------------

REMOTE_TIMEOUT_S = 300.0  # one HTTP request (upload, queueing on the agent, measuring)
REMOTE_BUSY_WAIT_S = 900.0  # how long to keep retrying while the agent answers 503 (busy)


def _agent_request(target: Target, path: str, body: bytes | None = None) -> dict:
    """One request to the agent at ``target.url``; retries while it is busy (503)."""
    token = os.environ.get(str(target.token_env), "")
    if not token:
        raise RuntimeError(f"target.token_env: environment variable {target.token_env!r} (the "
                           f"device agent's token) is not set")
    url = str(target.url).rstrip("/") + path
    deadline = time.monotonic() + REMOTE_BUSY_WAIT_S
    delay = 0.2
    while True:
        req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET",
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/octet-stream"})
        try:
            with urllib.request.urlopen(req, timeout=REMOTE_TIMEOUT_S) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("error", "")
            except (ValueError, AttributeError, OSError):
                message = ""
            if e.code == 503 and time.monotonic() < deadline:
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            raise RuntimeError(f"device agent at {target.url} answered {e.code} to {path.split('?')[0]}"
                               f": {message or e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise RuntimeError(f"cannot reach the device agent at {target.url}: {reason}") from None


@functools.lru_cache(maxsize=16)
def _remote_facts_cached(url: str, token_env: str) -> tuple[tuple[str, str], ...]:
    facts = _agent_request(Target(device="remote", url=url, token_env=token_env), "/info")
    return tuple(sorted((str(k), str(v)) for k, v in facts.items()))


def target_facts(target: Target) -> dict[str, str]:
    """Device facts of ``target``'s agent (``agent.cpu``, ...; fetched once); {} when local."""
    if target.device != "remote":
        return {}
    return {f"agent.{k}": v for k, v in _remote_facts_cached(str(target.url), str(target.token_env))}


def _measure_remote(path: Path, target: Target) -> LatencyResult:
    facts = dict(_remote_facts_cached(str(target.url), str(target.token_env)))
    fold = not _has_activation_quant(path)
    body = path.read_bytes()
    query = urllib.parse.urlencode({
        "threads": target.threads, "batch_size": target.batch_size, "warmup": target.warmup,
        "min_runs": target.min_runs, "max_runs": target.max_runs, "budget_s": target.budget_s,
        "rel_ci": target.rel_ci, "min_time_s": target.min_time_s, "fold_weight_qdq": int(fold)})
    r = _agent_request(target, f"/measure?{query}", body)
    return LatencyResult(float(r["latency_ms"]), float(r["p90_ms"]), float(r["iqr_ms"]), int(r["runs"]),
                         target.runtime, target.device, int(r["threads"]), int(r["batch_size"]),
                         float(r.get("ci_low_ms", math.nan)), float(r.get("ci_high_ms", math.nan)),
                         str(r.get("stopped", "")), facts.get("onnxruntime", ""), facts.get("cpu", ""))
