"""Latency of the deployable model, measured on the target runtime.

Protocol: build the deployable artifact (ONNX file for ``onnxruntime``, baked eager module
for ``torch``), fix the runtime's intra-op threads to ``target.threads``, run ``warmup``
untimed inferences on a batch of ``target.batch_size``, then time single inferences with
``time.perf_counter`` until ``min_runs`` are done and either ``budget_s`` is spent or
``max_runs`` is reached. The median is reported as ``latency_ms``; p90 and the
inter-quartile range (spread) are recorded with it.

ONNX Runtime runs the exported file with all graph optimizations. Int8 weights are stored
as int8 + DequantizeLinear; when the model has no quantized activations the session folds
those into fp32 constants at load time (``session.disable_quant_qdq``), which is what a
weight-only int8 model costs at run time on a CPU; with quantized activations the Q/DQ pairs
stay so that ORT can fuse them into integer kernels, and whatever that costs is measured.
"""

from __future__ import annotations

import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autocompress.compress.deploy import bake, export_onnx
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

    def to_dict(self) -> dict:
        return asdict(self)


def measure_latency(model: nn.Module, example_inputs: torch.Tensor, target: Target) -> LatencyResult:
    """Times the deployable form of ``model`` on ``target`` (see the module docstring)."""
    batch = _batch(example_inputs, target.batch_size)
    if target.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("target.device is 'cuda' but no CUDA device is available")
    if target.runtime == "onnxruntime":
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(model, example_inputs, Path(tmp) / "model.onnx")
            run = _onnxruntime_runner(path, batch, target)
            return _time(run, target)
    return _time(_torch_runner(model, batch, target), target)


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


def _torch_runner(model: nn.Module, batch: torch.Tensor, target: Target) -> Callable[[], object]:
    device = torch.device(target.device)
    deployable = bake(model).to(device)
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
    for _ in range(target.warmup):
        run()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < target.max_runs:
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= target.min_runs and time.perf_counter() - start > target.budget_s:
            break
    arr = np.asarray(times)
    q25, q50, q75, q90 = np.percentile(arr, [25, 50, 75, 90])
    return LatencyResult(float(q50), float(q90), float(q75 - q25), len(times), target.runtime,
                         target.device, target.threads, target.batch_size)


def machine_facts() -> dict[str, str]:
    """CPU and runtime versions, logged with every measurement."""
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "torch": torch.__version__, "onnxruntime": ort.__version__,
            "python": platform.python_version()}
