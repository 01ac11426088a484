"""ONNX Runtime's transformer fusions as a graph form (``target.graph: fused``).

:func:`fuse` runs ONNX Runtime's own transformer optimizer
(``onnxruntime.transformers.optimizer.optimize_model``, shipped with onnxruntime, offline) on an
exported graph: attention (``Attention``), skip/simplified LayerNorm, the embedding LayerNorm,
GELU with its bias; the fused operators are ONNX Runtime contrib ops (``com.microsoft``).
Number of heads and hidden size are detected per attention from the graph (``num_heads=0,
hidden_size=0``), so pruned heads, per-layer sizes and dropped blocks fuse alike; ``opt_level=0``
(the session optimizes the graph at load time anyway). The optimizer's model type is chosen
from the graph (:func:`model_type`), never from a model's name.

Before the optimizer, the patterns of torch's exports of transformers 5 that its attention
fusion does not know are rewritten to ones it does, computing the same thing (:func:`_normalize`):
the head count of each attention (``view(batch, seq, -1, head_size)``) written in, and for SDPA
exports the scale moved back after ``QK^T`` and the softmax's NaN guard dropped. With them the
eager and the SDPA exports of BERT both fuse fully.

Compressed graphs (int8 ``DequantizeLinear`` weights, ``DynamicQuantizeLinear`` +
``MatMulInteger``, QDQ, group-wise ``Cast``/``Mul`` weights, ``MatMulNBits``) fuse as far as the
optimizer's patterns reach: the counts (:attr:`Fused.ops`) say how far.

:func:`verify_fused` compares a fused graph's outputs with the plain graph's on a batch; a fused
graph that does not match is not used (the caller falls back to the plain form, with the reason).

Example:
    >>> fused = fuse(open("model.onnx", "rb").read())  # doctest: +SKIP
    >>> fused.summary  # doctest: +SKIP
    'Attention=6,EmbedLayerNormalization=1,SkipLayerNormalization=12'
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["FUSED_OPS", "FUSION_RTOL", "Fused", "fuse", "fused_op_counts", "model_type",
           "verify_fused"]

# The operators that say what was fused (counted in the fused graph; MatMulNBits and the
# dynamic int8 kernels are counted to show they were kept).
FUSED_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "EmbedLayerNormalization",
             "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
             "SimplifiedLayerNormalization", "LayerNormalization", "BiasGelu", "FastGelu", "Gelu",
             "RotaryEmbedding", "MatMulNBits", "DynamicQuantizeMatMul", "MatMulInteger")
# Largest relative difference (L2 norm of the difference / L2 norm of the plain output) of a
# fused graph's outputs: fp32 reassociation gives ~1e-7; int8 graphs whose rounding of an
# activation flips where a fused LayerNorm computes it in another order a few 1e-4.
FUSION_RTOL = 1e-2


@dataclass(frozen=True)
class Fused:
    """A graph after ONNX Runtime's transformer fusions.

    Attributes:
        onnx: The fused model's bytes.
        ops: ``{op_type: count}`` of :data:`FUSED_OPS` in the fused graph (non-zero only).
        model_type: The optimizer's model type it was fused as.
    """

    onnx: bytes
    ops: dict[str, int] = field(default_factory=dict)
    model_type: str = "bert"

    @property
    def summary(self) -> str:
        """The counts in one line, ``Attention=6,SkipLayerNormalization=12`` (sorted)."""
        return ",".join(f"{k}={v}" for k, v in sorted(self.ops.items()))


def fuse(model: bytes, kind: str | None = None) -> Fused:
    """ONNX Runtime's transformer fusions of ``model`` (module docstring).

    Args:
        model: An exported ONNX model (bytes).
        kind: The optimizer's model type (``bert``, ``gpt2``, ...); default :func:`model_type`.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    proto = onnx.load_from_string(model)
    _normalize(proto)
    kind = kind or model_type(proto)
    quiet = logging.getLogger().manager.disable
    logging.disable(logging.WARNING)  # the optimizer warns about every pattern it does not see
    try:  # and prints what its shape inference cannot read
        with contextlib.redirect_stdout(io.StringIO()):
            optimized = optimize_model(proto, model_type=kind, num_heads=0, hidden_size=0,
                                       opt_level=0)
    finally:
        logging.disable(quiet)
    out = optimized.model
    return Fused(out.SerializeToString(), fused_op_counts(out), kind)


def fused_op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    """``{op_type: count}`` of :data:`FUSED_OPS` in ``proto``'s graph, non-zero only."""
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type in FUSED_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def model_type(proto: onnx.ModelProto) -> str:
    """The optimizer's model type for a graph: ``gpt2`` (decoder patterns: RMSNorm as
    ``Pow``/``ReduceMean`` with no mean subtracted, or a ``Trilu`` causal mask), else ``bert``
    (encoders: BERT, RoBERTa, ``nn.TransformerEncoder``, ViT).

    Measured with onnxruntime 1.32 on Hugging Face Llama (transformers 5, no KV cache): ``gpt2``,
    ``bert`` and ``qwen3`` fuse the same RMSNorms (no attention or rotary fusion of that export),
    ``phi`` fails; ``gpt2`` is the type whose attention patterns include decoders'.
    """
    producers = {o: n for n in proto.graph.node for o in n.output}

    def rms(node: Any) -> bool:  # ReduceMean(Pow(x)) with x not a Sub (LayerNorm's x - mean)
        pow_ = producers.get(node.input[0])
        if pow_ is None or pow_.op_type != "Pow":
            return False
        before = producers.get(pow_.input[0])
        return before is None or before.op_type != "Sub"

    if any(n.op_type == "Trilu" or (n.op_type == "ReduceMean" and rms(n)) for n in proto.graph.node):
        return "gpt2"
    return "bert"


def verify_fused(plain: bytes, fused: bytes, feed: dict[str, np.ndarray],
                 rtol: float = FUSION_RTOL) -> str | None:
    """Why ``fused`` does not match ``plain`` on ``feed`` (None: it does). Both are run by ONNX
    Runtime on the CPU; each output is compared by its relative L2 difference (at most
    ``rtol``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # beside a search's other trials
    opts.log_severity_level = 3

    def run(model: bytes) -> list[Any]:
        session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        return session.run(None, {k: v for k, v in feed.items() if k in names})

    try:
        want, got = run(plain), run(fused)
    except Exception as e:  # an op the fused graph needs that this onnxruntime lacks, ...
        return f"the fused graph does not run: {type(e).__name__}: {str(e)[:300]}"
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            return f"output {i}: shape {b.shape}, plain graph {a.shape}"
        diff = float(np.linalg.norm(a - b) / max(float(np.linalg.norm(a)), 1e-12))
        if not diff <= rtol:
            return f"output {i}: relative difference {diff:.2e} > {rtol:g}"
    return None


def _normalize(proto: onnx.ModelProto) -> None:
    """Rewrites what torch's exports of transformers 5 put in the way of the optimizer's
    attention patterns, without changing what the graph computes (module docstring):
    head counts left to ``-1``, SDPA's scale split over q and k, its NaN guard after the
    softmax and its reshapes of a tensor to its own shape."""
    _resolve_head_counts(proto)
    if _fold_split_scales(proto) + _drop_nan_guards(proto):
        from onnxruntime.transformers.fusion_utils import FusionUtils
        from onnxruntime.transformers.onnx_model import OnnxModel

        model = OnnxModel(proto)  # edits proto in place
        try:
            FusionUtils(model).remove_useless_reshape_nodes()  # by symbolic shape inference
        except Exception:  # shape inference cannot read the graph: the reshapes stay
            return
        model.prune_graph()


def _fold_split_scales(proto: onnx.ModelProto) -> int:
    """``MatMul(Mul(q, a), Mul(k, b))`` with scalar constants ``a``, ``b`` (SDPA's export scales
    q and k by the square root of the softmax scale each) becomes ``Mul(MatMul(q, k), a*b)``,
    the eager pattern. Returns how many."""
    producers = {o: n for n in proto.graph.node for o in n.output}
    uses: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    folded = 0
    for node in list(proto.graph.node):
        muls = [producers.get(name) for name in node.input] if node.op_type == "MatMul" else []
        if len(muls) != 2 or any(m is None or m.op_type != "Mul" or uses[m.output[0]] != 1
                                 for m in muls):
            continue
        scales = [_constant(proto, producers, m.input[1]) for m in muls]
        if any(c is None or c.size != 1 or c.dtype != np.float32 for c in scales):
            continue
        name = f"autocompress_qk_scale_{folded}"
        proto.graph.initializer.append(numpy_helper.from_array(
            np.array(scales[0].reshape(()) * scales[1].reshape(()), dtype=np.float32), name))
        out = node.output[0]
        node.input[0], node.input[1] = muls[0].input[0], muls[1].input[0]
        node.output[0] = f"{out}_unscaled"
        at = list(proto.graph.node).index(node) + 1
        proto.graph.node.insert(at, onnx.helper.make_node(
            "Mul", [node.output[0], name], [out], name=f"{node.name}_scale"))
        for m in muls:
            proto.graph.node.remove(m)
        folded += 1
    return folded


def _drop_nan_guards(proto: onnx.ModelProto) -> int:
    """Removes ``Where(IsNaN(p), 0, p)`` after a ``Softmax`` ``p``: SDPA's export zeroes the
    rows of a query whose keys are all masked (NaN otherwise); the fused ``Attention`` masks
    with a finite value and has no such rows. Only an input with no unmasked token differs
    (and the fused graph is verified on the timed batch). Returns how many."""
    producers = {o: n for n in proto.graph.node for o in n.output}
    outputs = {o.name for o in proto.graph.output}
    dropped = 0
    for node in list(proto.graph.node):
        isnan = producers.get(node.input[0]) if node.op_type == "Where" else None
        softmax = producers.get(node.input[2]) if isnan is not None else None
        if (isnan is None or isnan.op_type != "IsNaN" or isnan.input[0] != node.input[2]
                or softmax is None or softmax.op_type != "Softmax" or node.output[0] in outputs):
            continue
        for user in proto.graph.node:
            for i, name in enumerate(user.input):
                if name == node.output[0]:
                    user.input[i] = node.input[2]
        proto.graph.node.remove(node)
        proto.graph.node.remove(isnan)
        dropped += 1
    return dropped


def _resolve_head_counts(proto: onnx.ModelProto) -> int:
    """Writes the number of heads into attention reshapes that leave it to ``-1``.

    transformers 5 views q/k/v as ``(batch, seq, -1, head_size)``; ONNX Runtime's attention
    fusion reads the head count from that shape (``Concat`` of ``[., ., heads, head_size]``)
    and gives up on ``-1`` unless one head count is given for the whole model, which pruned
    heads make wrong. The count of each reshape is its input's last dimension (from ONNX shape
    inference) / ``head_size``: the same reshape, with the value ``-1`` stood for. Returns how
    many were written.
    """
    widths = _last_dims(proto)
    producers = {o: n for n in proto.graph.node for o in n.output}
    written = 0
    for node in proto.graph.node:
        concat = producers.get(node.input[1]) if node.op_type == "Reshape" else None
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 4:
            continue
        heads, size = (_constant(proto, producers, name) for name in concat.input[2:])
        width = widths.get(node.input[0])
        if heads is None or size is None or heads.size != 1 or size.size != 1 or not width:
            continue
        head_size = int(size.reshape(-1)[0])
        if int(heads.reshape(-1)[0]) != -1 or head_size <= 0 or width % head_size:
            continue
        name = f"autocompress_num_heads_{written}"
        proto.graph.initializer.append(
            numpy_helper.from_array(np.array([width // head_size], dtype=heads.dtype), name))
        concat.input[2] = name
        written += 1
    return written


def _last_dims(proto: onnx.ModelProto) -> dict[str, int]:
    """``{tensor: static size of its last axis}`` from ONNX shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # a graph shape inference cannot read: nothing resolved
        return {}
    out = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[-1].HasField("dim_value"):
            out[vi.name] = dims[-1].dim_value
    return out


def _constant(proto: onnx.ModelProto, producers: dict[str, Any], name: str) -> np.ndarray | None:
    """The value of an initializer or ``Constant`` node output ``name``, or None."""
    for init in proto.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    node = producers.get(name)
    if node is not None and node.op_type == "Constant" and node.attribute:
        attr = node.attribute[0]
        return numpy_helper.to_array(attr.t) if attr.HasField("t") else None
    return None
