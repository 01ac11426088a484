"""ONNX Runtime: the exported ONNX file, all graph optimizations, on the CPU or CUDA.

Int8 weights are stored as int8 + DequantizeLinear; when the model has no quantized
activations the session folds those into fp32 constants at load time
(``session.disable_quant_qdq``), which is what a weight-only int8 model costs at run time on a
CPU; with quantized activations the Q/DQ pairs stay so that ONNX Runtime can fuse them into
integer kernels, and whatever that costs is measured. Layers with dynamic activation
quantization (DynamicQuantizeLinear + MatMulInteger) run their integer kernels either way
(:func:`has_activation_quant`). The session settings are shared with the
remote device agent (:func:`session_options`), so both time the same thing. Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from autocompress.measure.runtimes._base import LocalRuntime

if TYPE_CHECKING:
    from autocompress.measure._results import Prepared
    from autocompress.measure.target import Target


def session_options(threads: int, fold_weight_qdq: bool) -> Any:
    """The ``onnxruntime.SessionOptions`` of every timed session: ``threads`` intra-op threads,
    sequential, all graph optimizations, weight DequantizeLinear folded if asked."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if fold_weight_qdq:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    return opts


def has_activation_quant(model: bytes) -> bool:
    """Whether the ONNX model quantizes activations with a fixed range (has a QuantizeLinear
    node), so that its Q/DQ pairs must stay for ONNX Runtime to fuse them.

    Dynamic quantization (``act_bits: "dynamic"``: DynamicQuantizeLinear, MatMulInteger) does
    not count: it has no DequantizeLinear, and ``session.disable_quant_qdq`` leaves it alone.
    Checked with onnxruntime 1.32 (``tests/test_dynamic_int8.py``): with the setting, the
    optimized graph still fuses DynamicQuantizeLinear + MatMulInteger + Cast + Mul into
    ``DynamicQuantizeMatMul``, and the weight-only int8 layers of the same graph are folded to
    fp32 constants as in a graph without integer ops (without it their DequantizeLinear would
    re-run on every inference).
    """
    import onnx

    return any(n.op_type == "QuantizeLinear" for n in onnx.load_from_string(model).graph.node)


class OnnxRuntime(LocalRuntime):
    """The exported ONNX model in an ``onnxruntime.InferenceSession``."""

    name = "onnxruntime"
    artifact = "onnx"

    def check(self, target: Target) -> None:
        if target.device != "cuda":
            return
        import onnxruntime as ort

        providers = ort.get_available_providers()
        if "CUDAExecutionProvider" not in providers:
            raise ValueError(f"target.device='cuda' with runtime onnxruntime: this onnxruntime has no "
                             f"CUDAExecutionProvider (it has {providers}; install onnxruntime-gpu); "
                             f"allowed here: ['cpu', 'remote']")

    def integer_kernels(self, target: Target) -> str | None:
        if target.device == "cuda":
            return ("ONNX Runtime's CUDA execution provider runs these QDQ graphs dequantized "
                    "(integer kernels there come with TensorRT)")
        return None  # QLinearConv/QLinearMatMul/MatMulInteger on the CPU (VNNI where present)

    def runner(self, prepared: Prepared, target: Target) -> Callable[[], object]:
        import onnxruntime as ort

        from autocompress._inputs import to_numpy_feed

        assert prepared.onnx is not None
        # Weight-only int8: without quantized activations there is no integer kernel to fuse
        # into, so ORT folds the weight DequantizeLinear nodes into fp32 constants at load time
        # (otherwise they re-run on every inference).
        opts = session_options(target.threads, not has_activation_quant(prepared.onnx))
        providers = ["CUDAExecutionProvider"] if target.device == "cuda" else ["CPUExecutionProvider"]
        session = ort.InferenceSession(prepared.onnx, opts, providers=providers)
        feed = to_numpy_feed(prepared.batch)
        return lambda: session.run(None, feed)
