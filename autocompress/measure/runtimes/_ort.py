"""ONNX Runtime: the exported ONNX file, all graph optimizations, on the CPU or CUDA.

Int8 weights are stored as int8 + DequantizeLinear; when the model has no quantized
activations the session folds those into fp32 constants at load time
(``session.disable_quant_qdq``), which is what a weight-only int8 model costs at run time on a
CPU; with quantized activations the Q/DQ pairs stay so that ONNX Runtime can fuse them into
integer kernels, and whatever that costs is measured. Layers with dynamic activation
quantization (DynamicQuantizeLinear + MatMulInteger) run their integer kernels either way
(:func:`has_activation_quant`). The session settings are shared with the
remote device agent (:func:`session_options`), so both time the same thing.

``target.graph`` picks the graph form timed (:func:`graph_forms`): ``plain`` (as exported),
``fused`` (ONNX Runtime's transformer fusions, :func:`~autocompress.onnxgraph.fuse`, verified
against the plain graph on the timed batch, else the plain graph with the reason) or ``best``
(both timed briefly, interleaved, the faster kept). The baseline goes through the same runner
as every trial, so both are timed in the form the target asks for. The form timed and the
fused-op counts travel with the runner (:class:`FormRunner`) into the ``LatencyResult``.
Torch-free.
"""

from __future__ import annotations

import hashlib
import statistics
import time
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
        from autocompress._inputs import to_numpy_feed

        assert prepared.onnx is not None
        feed = to_numpy_feed(prepared.batch)
        forms, fields = graph_forms(prepared.onnx, feed, target.graph)
        runs = {form: _session_runner(model, feed, target) for form, model in forms.items()}
        if len(runs) == 1:
            (form, run), = runs.items()
        else:
            form, note = faster(runs)
            run = runs[form]
            fields["graph_note"] = note
        if target.graph == "plain":
            return run
        return FormRunner(run, {**fields, "graph": form})


class FormRunner:
    """A runner (one inference per call) that says which graph form it runs.

    Attributes:
        result_fields: ``LatencyResult`` fields describing it (``graph``, ``fused_ops``,
            ``graph_note``), read by :func:`~autocompress.measure.runtimes.result_fields`.
    """

    def __init__(self, run: Callable[[], object], result_fields: dict[str, str]) -> None:
        self.run = run
        self.result_fields = result_fields

    def __call__(self) -> object:
        return self.run()


def _session_runner(model: bytes, feed: dict[str, Any], target: Target) -> Callable[[], object]:
    """One inference of ``model`` on ``feed`` in a session with the timed settings."""
    import onnxruntime as ort

    # Weight-only int8: without quantized activations there is no integer kernel to fuse
    # into, so ORT folds the weight DequantizeLinear nodes into fp32 constants at load time
    # (otherwise they re-run on every inference).
    opts = session_options(target.threads, not has_activation_quant(model))
    providers = ["CUDAExecutionProvider"] if target.device == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(model, opts, providers=providers)
    names = {i.name for i in session.get_inputs()}
    feed = {k: v for k, v in feed.items() if k in names}  # fusion may drop an unused input
    return lambda: session.run(None, feed)


def graph_forms(model: bytes, feed: dict[str, Any], graph: str) -> tuple[dict[str, bytes], dict[str, str]]:
    """The graph forms to time for ``target.graph`` = ``graph`` and what to record of them.

    Returns:
        ``{form: model}`` (``plain`` and/or ``fused``) and ``LatencyResult`` fields:
        ``fused_ops`` (the fused-op counts) and ``graph_note`` (why the fused graph is not used:
        it failed to build or its outputs differ from the plain graph's on ``feed``).
    """
    if graph == "plain":
        return {"plain": model}, {}
    digest = hashlib.sha256(model)
    for name in sorted(feed):
        digest.update(name.encode() + feed[name].tobytes())
    key = f"{graph}:{digest.hexdigest()}"
    if key not in _FORMS:  # the reference's runner is made twice (timed alone, then kept)
        _FORMS[key] = _graph_forms(model, feed, graph)
        while len(_FORMS) > 2:
            _FORMS.pop(next(iter(_FORMS)))
    forms, fields = _FORMS[key]
    return dict(forms), dict(fields)


_FORMS: dict[str, tuple[dict[str, bytes], dict[str, str]]] = {}  # the last graph_forms made


def _graph_forms(model: bytes, feed: dict[str, Any], graph: str) -> tuple[dict[str, bytes], dict[str, str]]:
    """:func:`graph_forms`, made now (fused and verified)."""
    from autocompress.onnxgraph import fuse, verify_fused

    try:
        fused = fuse(model)
        reason = verify_fused(model, fused.onnx, feed)
    except Exception as e:  # the optimizer failed on this graph: time it as it is
        return {"plain": model}, {"graph_note": f"fusion failed: {type(e).__name__}: {str(e)[:300]}"}
    if reason is not None:
        return {"plain": model}, {"fused_ops": fused.summary,
                                  "graph_note": f"fused graph not used: {reason}"}
    forms = {"fused": fused.onnx} if graph == "fused" else {"plain": model, "fused": fused.onnx}
    return forms, {"fused_ops": fused.summary}


def faster(runs: dict[str, Callable[[], object]], seconds: float = 0.3,
           max_rounds: int = 500) -> tuple[str, str]:
    """The form that runs faster, timed interleaved (one run of each per round, a warm-up
    round first) until each has run ``seconds`` or ``max_rounds`` rounds; and a note with the
    medians, e.g. ``"best of plain 1.234 ms, fused 1.100 ms"``."""
    times: dict[str, list[float]] = {form: [] for form in runs}
    for run in runs.values():
        run()
    spent = dict.fromkeys(runs, 0.0)
    for _ in range(max_rounds):
        for form, run in runs.items():
            start = time.perf_counter()
            run()
            took = time.perf_counter() - start
            times[form].append(took)
            spent[form] += took
        if len(times[next(iter(runs))]) >= 5 and min(spent.values()) >= seconds:
            break
    medians = {form: statistics.median(t) * 1e3 for form, t in times.items()}
    best = min(medians, key=lambda form: medians[form])
    return best, "best of " + ", ".join(f"{form} {ms:.3f} ms" for form, ms in medians.items())
