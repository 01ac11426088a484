"""Compressed weights in an exported ONNX graph: each fp32 initializer replaced by what its
format stores, on ONNX Runtime's block-wise kernels where the format and the graph allow it
(:mod:`~autocompress.onnxgraph._nbits`), else in standard operators
(:meth:`~autocompress.compress.formats.WeightFormat.to_onnx`)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from autocompress.compress.formats import StoredWeight
from autocompress.onnxgraph._nbits import store_blockwise, use_contrib_domain
from autocompress.onnxgraph._ort_quant import match_weight

__all__ = ["store_weights"]


def store_weights(proto: onnx.ModelProto, weights: Mapping[str, StoredWeight], *,
                  contrib_ops: bool = True) -> None:
    """Replaces the fp32 initializer of every weight in ``weights`` (``{parameter name: the
    weight as stored}``) by its format's ONNX form: int8 values + DequantizeLinear for integer
    formats with per-channel scales, a 16-bit initializer + Cast for fp16/bf16, and for
    group-wise ones ONNX Runtime's ``MatMulNBits`` / ``GatherBlockQuantized`` fed by the stored
    codes (``contrib_ops``, where the weight is read by one MatMul/Gemm/Gather and the kernel
    takes its bits), else int8 codes + Cast/Mul/Reshape (opset 17 has no blocked
    DequantizeLinear).

    The exporter's constant folding renames weights and may fold BatchNorm into a conv
    (multiplying each output channel by a constant ``k``) or transpose a Linear weight, so
    initializers are matched by value (``match_weight``: ``X == W * k`` per output channel or
    ``X == W.T``). Layers with equal weights (tied weights, or copies such as
    ``nn.TransformerEncoder``'s identical initial layers) share the one initializer the exporter
    keeps for them. Scaled (integer) formats are stored first, then the others, each in module
    order: the node order of the files earlier releases wrote.

    Args:
        proto: The exported model, changed in place.
        weights: The compressed weights.
        contrib_ops: Whether ONNX Runtime's contrib operators (``com.microsoft``) may run
            them; False: standard ONNX operators only (another runtime).
    """
    todo = sorted(weights.items(), key=lambda item: not item[1].format.scaled)
    graph = proto.graph
    free = {init.name: init for init in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    stored: list[np.ndarray] = []
    for name, weight in todo:
        w = weight.dequantized()
        found = match_weight(free.values(), w)
        if found is None and any(np.array_equal(w, w0) for w0 in stored):
            continue  # the exporter keeps one initializer for equal weights: already stored
        if found is None:
            raise RuntimeError(f"compressed weight {name!r} not found in the exported ONNX graph")
        stored.append(w)
        del free[found.init.name]
        graph.initializer.remove(found.init)
        if contrib_ops and store_blockwise(graph, weight, found, name):
            continue
        inits, new_nodes = weight.format.to_onnx(weight, found, name)
        graph.initializer.extend(inits)
        nodes += new_nodes
    for i, node in enumerate(nodes):
        graph.node.insert(i, node)
    use_contrib_domain(proto)
