"""OpenVINO: the exported ONNX file, compiled for the CPU by ``openvino.Core``.

The graph is exported in standard ONNX operators only (``export_options``: no
``com.microsoft`` contrib operators, which OpenVINO does not read) and compiled with settings
that run it as exported and as ONNX Runtime is timed (:func:`compile_config`): ``threads``
inference threads, one stream, the latency hint, fp32 inference precision (OpenVINO's default
on a CPU with AMX is bf16: 1.6x faster on a 768-wide MLP, 7e-4 off its fp32 outputs), no
dynamic quantization of activations (its default quantizes the inputs of int8-weight MatMuls
per group of 32 at run time), no CPU pinning (ONNX Runtime pins none either). The model is
reshaped to the timed batch's shapes, so OpenVINO compiles static-shape kernels, as a
deployment at that shape would.

What OpenVINO 2026.4 makes of our plans, measured on a 2-core AMX/VNNI Xeon
(``tests/test_openvino.py`` runs each plan family on both runtimes; README has the table):

- ``act_bits: 8`` (QuantizeLinear/DequantizeLinear around a layer) runs on its u8/i8
  integer kernels (``FullyConnected``/``Convolution`` with u8 runtime precision), 2-2.2x
  faster than fp32 on a 768-wide MLP and a 64/128-channel CNN at 1 thread: so
  :meth:`integer_kernels` says yes and a search keeps ``act_bits``.
- ``act_bits: "dynamic"`` (DynamicQuantizeLinear + MatMulInteger) runs, and matches PyTorch,
  but on fp32 ``FullyConnected`` kernels, 1.4x slower than the same layers in fp32 (ONNX
  Runtime: 2.8x faster): measured as it is, so a search finds it slow here.
- int8/int4/pow2 weights (int8 + DequantizeLinear, or Cast/Mul/Reshape for groups) are
  compressed-weight ``FullyConnected`` kernels (i8 weights, fp32 arithmetic), about as fast
  as fp32; fp16/bf16 weights are folded to fp32 constants.

Graphs OpenVINO cannot run raise :class:`~autocompress.measure.runtimes._base.RefusedPlan`
when the trial prepares its timing (:func:`refusal` before compiling; the compiler's own
error otherwise), so that trial fails with the reason and the others go on. Torch-free.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from autocompress.measure.runtimes._base import LocalRuntime, RefusedPlan

if TYPE_CHECKING:
    from autocompress.measure._results import Prepared
    from autocompress.measure.target import Target

__all__ = ["INSTALL", "OpenVinoRuntime", "compile_config", "compile_onnx", "refusal"]

INSTALL = "pip install 'autocompress[openvino]' (or pip install openvino)"


def _openvino() -> Any:
    """The ``openvino`` module, or a ValueError naming ``target.runtime`` and the install."""
    try:
        import openvino
    except ImportError as e:
        raise ValueError(f"target.runtime='openvino': the openvino package is not installed "
                         f"({e}); install it with {INSTALL}") from None
    return openvino


def compile_config(threads: int) -> dict[str, Any]:
    """The ``compile_model`` properties of every timed model (see the module docstring)."""
    ov = _openvino()
    props, hint = ov.properties, ov.properties.hint
    return {props.inference_num_threads: threads, props.num_streams: 1,
            hint.performance_mode: hint.PerformanceMode.LATENCY,
            hint.execution_mode: hint.ExecutionMode.ACCURACY,
            hint.inference_precision: ov.Type.f32,
            hint.dynamic_quantization_group_size: 0,
            hint.enable_cpu_pinning: False, hint.enable_hyper_threading: False}


def refusal(model: bytes) -> RefusedPlan | None:
    """Why OpenVINO cannot run the ONNX ``model`` as exported, found without compiling it, or
    None: a Quantize/DequantizeLinear with a non-finite or zero scale (a calibrated range that
    overflows float32, e.g. around a transformer's additive attention mask of -3.4e38), which
    OpenVINO turns into NaN outputs (ONNX Runtime saturates it)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(model).graph
    scales = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[1] in scales:
            scale = numpy_helper.to_array(scales[node.input[1]])
            if not (np.isfinite(scale).all() and (scale != 0).all()):
                return RefusedPlan("openvino", f"{node.op_type} {node.name or node.input[0]!r}",
                                   f"its scale is {scale.ravel()[:4].tolist()} (the calibrated "
                                   f"range of {node.input[0]!r} overflows float32); OpenVINO "
                                   f"computes NaN there")
    return None


def _compiler_error(error: Exception) -> RefusedPlan:
    """OpenVINO's compile error as a refusal: the node it names and its innermost message."""
    lines = [ln.strip() for ln in str(error).splitlines()
             if ln.strip() and not ln.startswith("Exception from")]
    text = " ".join(lines) or type(error).__name__
    node = re.search(r"node: (\S+ \S+)|Failed operations detailed log: -- (\S+)", text)
    where = next((g for g in node.groups() if g), "") if node else ""
    return RefusedPlan("openvino", where or "the graph",
                       f"OpenVINO cannot read or compile it: {text[:400]}")


def compile_onnx(model: bytes, shapes: dict[str, tuple[int, ...]], threads: int) -> Any:
    """``model`` (ONNX bytes) reshaped to ``shapes`` and compiled for the CPU.

    Raises:
        RefusedPlan: OpenVINO cannot read or compile it, or :func:`refusal` says it would
            compute something else.
    """
    ov = _openvino()
    refused = refusal(model)
    if refused is not None:
        raise refused
    core = ov.Core()
    try:
        graph = core.read_model(model)
        names = {name for port in graph.inputs for name in port.get_names()}
        graph.reshape({name: ov.PartialShape(list(shape)) for name, shape in shapes.items()
                       if name in names})
        return core.compile_model(graph, "CPU", compile_config(threads))
    except RuntimeError as e:
        raise _compiler_error(e) from None


class OpenVinoRuntime(LocalRuntime):
    """The exported ONNX model compiled by OpenVINO for the CPU (see the module docstring)."""

    name = "openvino"
    artifact = "onnx"
    library = "openvino"

    def check(self, target: Target) -> None:
        _openvino()
        if target.device != "cpu":
            raise ValueError(f"target.device={target.device!r} with runtime openvino: it is timed "
                             f"on this machine's CPU only; allowed: ['cpu']")
        if target.graph != "plain":
            raise ValueError(f"target.graph={target.graph!r} with runtime openvino: the fused "
                             f"graph forms are ONNX Runtime's own operators; allowed: ['plain']")

    def integer_kernels(self, target: Target) -> str | None:
        return None  # QDQ layers run on u8/i8 FullyConnected/Convolution (module docstring)

    def export_options(self, target: Target) -> dict[str, Any]:
        return {"contrib_ops": False}

    def runner(self, prepared: Prepared, target: Target) -> Callable[[], object]:
        from autocompress._inputs import to_numpy_feed

        assert prepared.onnx is not None
        feed = to_numpy_feed(prepared.batch)
        compiled = compile_onnx(prepared.onnx, {k: v.shape for k, v in feed.items()},
                                target.threads)
        request = compiled.create_infer_request()
        names = {name for port in compiled.inputs for name in port.get_names()}
        feed = {k: v for k, v in feed.items() if k in names}  # the exporter drops unused inputs

        def run() -> object:
            request.infer(feed)
            return [request.get_output_tensor(i).data for i in range(len(compiled.outputs))]

        return run

    def facts(self, target: Target) -> dict[str, str]:
        from autocompress.measure._machine import cpu_model, library_version

        return {"cpu": cpu_model(), "runtime_version": library_version("openvino")}

    def cache_facts(self, target: Target) -> dict[str, str]:
        from autocompress.measure._machine import library_version

        return {**super().cache_facts(target), "openvino": library_version("openvino")}

