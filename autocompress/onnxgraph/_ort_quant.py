"""Integer kernels: the exported fp32 graph handed to ONNX Runtime's own quantization tools.

Two plan values deploy a layer as an ONNX Runtime integer kernel, and both are built with
``onnxruntime.quantization`` (the well-kept library) from the fp32 export, told exactly which
nodes to quantize and with which numbers, so it stores what fine-tuning saw (read in
``onnxruntime/quantization/`` of onnxruntime 1.32):

- ``act_bits: "dynamic"`` (:func:`quantize_dynamic_layers`): ``quantize_dynamic`` on the
  layers' MatMul/Gemm nodes: DynamicQuantizeLinear + MatMulInteger, fused by the session into
  ``DynamicQuantizeMatMul``. ``weight_type=QInt8`` is symmetric over ``[-127, 127]``
  (``quant_utils.ONNX_INT_TYPE_SYMMETRIC_RANGE``), zero point 0, scale ``max|w| / 127``,
  rounding half to even; ``per_channel=True`` with the default ``axis=-1`` of a MatMul's
  ``(in, out)`` weight is one scale per output channel. That is
  :func:`~autocompress.compress.formats.quantize_weight` at 8 bits, so re-quantizing our
  already-quantized fp32 weight gives back the same int8 values. ``reduce_range=False`` (True
  would quantize weights to 7 bits; ONNX Runtime suggests it only for CPUs without VNNI).
  In dynamic mode the quantizer first rewrites *every* Gemm as MatMul (+ Add), naming the
  MatMul ``<gemm name>_MatMul``.
- ``act_bits: 8`` (:func:`quantize_static_layers`): ``quantize_static`` in QDQ format. The
  layers' Conv/MatMul/Gemm nodes get int8 weights with *our* per-channel scales (at any
  ``bits``: a 4-bit weight is its int8 values in ``[-7, 7]`` with the 4-bit scale) and uint8
  inputs with *our* trained range (``TensorQuantOverrides``), so the layer computes what
  fine-tuning computed; the tensors between them (a conv's output, a residual add, a pool)
  are quantized too, with ranges calibrated on calibration batches (MinMax), so that the
  session fuses the Q/DQ pairs into QLinearConv / QLinearMatMul / QLinearAdd kernels: a graph
  where only layer inputs are quantized runs *slower* than fp32 (the DequantizeLinear after
  each integer op costs more than it saves). Nodes of layers without ``act_bits: 8`` are
  excluded and stay fp32. Bias is int32 with scale ``input scale * weight scale``.

A ``quantizer: awq`` layer's input scale (``1/s``) is a ``Mul`` by a constant before its
MatMul/Gemm/Conv: its node is found by its (scaled) weight as any other; the static path
leaves the Mul in fp32 (it reads an fp32 constant) and quantizes its output, the layer's input,
with the trained range, as fine-tuning saw it (the scale is applied before the activation
quantizer); the dynamic path quantizes the Mul's output at run time.

Fine-tuning does not see the rounding of those intermediate tensors (8-bit, calibrated); the
export verification measures what it costs (``autocompress export`` compares the artifact's
metric with the logged one).

Nodes are found by their weight: the exporter names initializers after nothing in particular,
may fold a BatchNorm into a conv (each output channel times a constant) or transpose a Linear
weight; the node consuming a layer's weight is that layer's.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["StaticLayer", "WeightMatch", "dynamic_nodes", "match_weight", "quantize_dynamic_layers",
           "quantize_static_layers"]

_WEIGHT_OPS = ("Conv", "MatMul", "Gemm")
# quantize_static removes these after a quantized op: the output's QuantizeLinear clamps.
_ACTIVATIONS = ("Relu", "Clip")


@dataclass(frozen=True)
class WeightMatch:
    """Where a layer's weight ``w`` is in the graph: initializer ``init`` holds ``w * k`` per
    output channel (``k`` from a folded BatchNorm, else ones), transposed if ``transposed``
    (a MatMul's ``(in, out)``)."""

    init: Any  # onnx.TensorProto
    k: np.ndarray
    transposed: bool


def match_weight(inits: Iterable[Any], w: np.ndarray) -> WeightMatch | None:
    """The initializer holding weight ``w`` (``(out, in, ...)``, fp32), possibly BatchNorm-folded
    (``X == w * k`` per output channel) or transposed (``X == w.T``), or None."""
    for init in inits:
        if init.data_type != onnx.TensorProto.FLOAT or tuple(init.dims) not in (w.shape, w.T.shape):
            continue
        x = numpy_helper.to_array(init)
        if x.shape == w.shape:
            flat_w, flat_x = w.reshape(len(w), -1), x.reshape(len(x), -1)
            norm = (flat_w * flat_w).sum(1)
            k = np.where(norm > 0, (flat_x * flat_w).sum(1) / np.maximum(norm, 1e-30), 1.0)
            if np.allclose(flat_x, flat_w * k[:, None], rtol=1e-4, atol=1e-6 * np.abs(x).max()):
                return WeightMatch(init, k.astype(np.float32), False)
        if w.ndim == 2 and x.shape == w.T.shape and np.allclose(x, w.T, rtol=1e-5, atol=1e-7):
            return WeightMatch(init, np.ones(len(w), np.float32), True)
    return None


def _weight_nodes(graph: Any, layer: str, w: np.ndarray) -> tuple[WeightMatch, list[Any]]:
    """The match of ``layer``'s weight and the Conv/MatMul/Gemm nodes that read it (named if
    unnamed, so that ONNX Runtime's tools can be told about them)."""
    found = match_weight(graph.initializer, w)
    nodes = [] if found is None else [
        n for n in graph.node if n.op_type in _WEIGHT_OPS and len(n.input) > 1
        and n.input[1] == found.init.name]
    if not nodes:
        raise RuntimeError(f"layer {layer!r}: its Conv/MatMul/Gemm was not found in the exported "
                           f"ONNX graph")
    for i, node in enumerate(graph.node):
        if node in nodes and not node.name:
            node.name = f"{layer}/{node.op_type}_{i}"
    assert found is not None
    return found, nodes


@contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's tools log "consider pre-processing" and per-node notes at INFO."""
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        yield
    finally:
        logging.getLogger().setLevel(level)


def quantize_dynamic_layers(path: Path, weights: dict[str, np.ndarray]) -> None:
    """Rewrites the ONNX file at ``path``: the MatMul/Gemm of each layer in ``weights``
    (``{module name: its fp32 weight, (out, in)}``) becomes ONNX Runtime's dynamic int8
    quantization; nothing else is quantized.

    Raises:
        RuntimeError: A layer's MatMul was not found, or ONNX Runtime did not quantize it.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(path))
    targets: dict[str, str] = {}  # name quantize_dynamic gives the MatMul -> layer
    for layer, w in weights.items():
        for node in _weight_nodes(proto.graph, layer, w)[1]:
            # quantize_dynamic rewrites a Gemm as "<name>_MatMul" before selecting nodes.
            targets[node.name + ("_MatMul" if node.op_type == "Gemm" else "")] = layer
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        source = os.path.join(tmp, "fp32.onnx")
        onnx.save(proto, source)
        quantize_dynamic(source, str(path), op_types_to_quantize=["MatMul", "Gemm"],
                         nodes_to_quantize=list(targets), per_channel=True,
                         reduce_range=False, weight_type=QuantType.QInt8)
    quantized = onnx.load(str(path))
    done = {n.name for n in quantized.graph.node if n.op_type == "MatMulInteger"}
    missed = sorted({layer for name, layer in targets.items() if f"{name}_quant" not in done})
    if missed:
        raise RuntimeError(f"ONNX Runtime's quantize_dynamic did not quantize layer(s) {missed}")
    _rename_dynamic_params(quantized.graph)
    onnx.save(quantized, str(path))


def _rename_dynamic_params(graph: Any) -> None:
    """DynamicQuantizeLinear's scale and zero point outputs, ``<x>_scale``/``<x>_zero_point``,
    renamed ``<x>_dynamic_scale``/... (and the node ``<x>_QuantizeLinear`` itself):
    ``quantize_static`` names its initializers and nodes for a tensor ``x`` the same way, and a
    graph with both would have one name twice."""
    renames = {out: out.replace("_scale", "_dynamic_scale").replace("_zero_point", "_dynamic_zero_point")
               for n in graph.node if n.op_type == "DynamicQuantizeLinear" for out in n.output[1:]}
    for node in graph.node:  # and its node names (<x>_QuantizeLinear, as quantize_static's)
        if node.op_type == "DynamicQuantizeLinear":
            node.name = f"{node.name}_dynamic"
    for node in graph.node:
        for seq in (node.input, node.output):
            for i, name in enumerate(seq):
                seq[i] = renames.get(name, name)


@dataclass(frozen=True)
class StaticLayer:
    """What the graph must compute for one ``act_bits: 8`` layer.

    Attributes:
        weight: The layer's fp32 weight, ``(out, in, ...)``, already on its quantization grid
            (``q * scale``).
        scale: Its per-output-channel weight scales (``(out,)``).
        act_scale: The uint8 scale of its input (trained range).
        act_zero_point: The uint8 zero point of its input.
    """

    weight: np.ndarray
    scale: np.ndarray
    act_scale: float
    act_zero_point: int


def quantize_static_layers(path: Path, layers: dict[str, StaticLayer],
                           calibration: list[dict[str, np.ndarray]]) -> None:
    """Rewrites the ONNX file at ``path`` as ONNX Runtime's static QDQ int8 graph around the
    layers in ``layers`` (see the module docstring); other layers' nodes stay fp32.

    Args:
        path: The fp32 export (layers' activation fake-quant left out).
        layers: ``{module name: StaticLayer}``.
        calibration: Input feeds (``{input name: array}``) for the ranges of the tensors
            between quantized layers.

    Raises:
        RuntimeError: A layer's node was not found, or ONNX Runtime left it in fp32.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    proto = onnx.load(str(path))
    graph = proto.graph
    overrides: dict[str, list[dict[str, Any]]] = {}
    targets: dict[str, str] = {}  # node name -> layer
    for layer, sl in layers.items():
        found, nodes = _weight_nodes(graph, layer, sl.weight)
        scales = (sl.scale * np.abs(found.k)).astype(np.float32)
        axis = 1 if found.transposed else 0
        overrides[found.init.name] = [{"axis": axis, "scale": np.array(s, np.float32),
                                       "zero_point": np.array(0, np.int8)}
                                      for s in scales]
        for node in nodes:
            targets[node.name] = layer
            overrides[node.input[0]] = [{"scale": np.array(sl.act_scale, np.float32),
                                         "zero_point": np.array(sl.act_zero_point, np.uint8)}]
    for i, node in enumerate(graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    region = _static_region(graph, set(targets))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory() as tmp, _quiet():
        source = os.path.join(tmp, "fp32.onnx")
        onnx.save(proto, source)
        quantize_static(source, str(path), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_quantize=sorted(region),
                        extra_options={"TensorQuantOverrides": overrides, "MatMulConstBOnly": True,
                                       "WeightSymmetric": True, "ActivationSymmetric": False})
    quantized = onnx.load(str(path))
    _unquantize_exits(quantized.graph, region, {o for n in graph.node if n.op_type in _ACTIVATIONS
                                               for o in n.output})
    onnx.save(quantized, str(path))
    quantized = quantized.graph
    dq_outputs = {n.output[0] for n in quantized.node if n.op_type == "DequantizeLinear"}
    missed = sorted({layer for node in quantized.node if node.name in targets
                     and not (node.input[0] in dq_outputs and node.input[1] in dq_outputs)
                     for layer in [targets[node.name]]})
    if missed:
        raise RuntimeError(f"ONNX Runtime's quantize_static left layer(s) {missed} in fp32")


def _static_region(graph: Any, targets: set[str]) -> set[str]:
    """The nodes ``quantize_static`` may quantize: the target layers' nodes and every node
    connected to them through ops that are neither another layer (a Conv/MatMul/Gemm with a
    weight: fp32 or weight-only), nor read an fp32 constant, nor belong to a dynamic layer
    (:func:`dynamic_nodes`), so that the tensors between quantized layers (activations,
    residual adds, pools) are quantized and nothing beyond them is."""
    inits = {i.name for i in graph.initializer}
    floats = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    # Not quantized: other layers, and ops with a constant fp32 operand (a bias Add, a scaling
    # Mul), which would be rounded to 8 bits per tensor.
    blocked = dynamic_nodes(graph) | {
        n.name for n in graph.node if n.name not in targets and any(i in floats for i in n.input)}
    by_tensor: dict[str, list[Any]] = {}
    for node in graph.node:
        for t in [*node.input, *node.output]:
            if t and t not in inits:
                by_tensor.setdefault(t, []).append(node)
    region, todo = set(targets), [n for n in graph.node if n.name in targets]
    while todo:
        node = todo.pop()
        for t in [*node.input, *node.output]:
            for other in by_tensor.get(t, ()):
                if other.name not in region and other.name not in blocked:
                    region.add(other.name)
                    todo.append(other)
    return region


def dynamic_nodes(graph: Any) -> set[str]:
    """Names of the nodes of ``quantize_dynamic``'s layers: DynamicQuantizeLinear,
    MatMulInteger and the Cast/Mul/Add chain that rescales their result to fp32 (the bias)."""
    names: set[str] = set()
    produced: set[str] = set()
    for node in graph.node:  # topological order
        if node.op_type in ("DynamicQuantizeLinear", "MatMulInteger") or (
                node.op_type in ("Cast", "Mul", "Add") and any(i in produced for i in node.input)):
            names.add(node.name)
            produced.update(node.output)
    return names


def _unquantize_exits(graph: Any, region: set[str], activations: set[str]) -> None:
    """Removes the QuantizeLinear -> DequantizeLinear pair ``quantize_static`` puts on the
    result of a MatMul/Gemm that leaves the static region (a model output, a bias Add, an fp32
    layer): nothing integer reads it, so it would only round it; ONNX Runtime runs such a
    MatMul as MatMulIntegerToFloat. A Conv keeps its pair: without it the session would not
    fuse it into QLinearConv; so does a pair that took the place of a Relu/Clip (the tensor
    is named ``activations``' output): its QuantizeLinear is that activation now."""
    outputs = {o.name for o in graph.output}
    producer = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        source = producer.get(q.input[0])
        readers = consumers.get(q.output[0], [])
        if (source is None or source.op_type not in ("MatMul", "Gemm") or len(readers) != 1
                or q.input[0] in activations):
            continue
        (dq,) = readers
        if dq.op_type != "DequantizeLinear" or len(consumers.get(q.input[0], [])) != 1:
            continue
        if any(n.name in region for n in consumers.get(dq.output[0], [])):
            continue
        if dq.output[0] in outputs:  # keep the graph output's name
            source.output[list(source.output).index(q.input[0])] = dq.output[0]
        else:
            for n in consumers.get(dq.output[0], []):
                n.input[list(n.input).index(dq.output[0])] = q.input[0]
        graph.node.remove(q)
        graph.node.remove(dq)
    read = {t for n in graph.node for t in n.input}
    for init in [i for i in graph.initializer if i.name not in read]:  # the pairs' scales
        graph.initializer.remove(init)
