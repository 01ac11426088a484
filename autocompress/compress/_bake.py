"""The deployable form of a compressed model: weights baked, ONNX with real int8 weights.

Layers with ``act_bits: "dynamic"`` are exported through ONNX Runtime's own dynamic
quantization (``onnxruntime.quantization.quantize_dynamic``), restricted to their MatMul/Gemm
nodes, with the settings that make it store exactly what fine-tuning saw (read in
``onnxruntime/quantization/`` of onnxruntime 1.32):

- ``weight_type=QInt8`` is symmetric (``BaseQuantizer.is_weight_symmetric``: signed types are)
  over ``[-127, 127]`` (``quant_utils.ONNX_INT_TYPE_SYMMETRIC_RANGE``), zero point 0
  (``compute_scale_zp``: ``round((qmin + qmax) / 2)``), scale ``max|w| / 127``, rounding half
  to even (``quantize_nparray``: ``numpy.round``); ``per_channel=True`` with the default
  ``axis=-1`` of a MatMul's ``(in, out)`` weight is one scale per output channel
  (``operators/matmul.py``). That is :func:`~autocompress.compress._modules.quantize_weight`
  at 8 bits, so re-quantizing our already-quantized fp32 weight gives back the same int8
  values.
- ``reduce_range=False`` (the default; True would quantize weights to 7 bits,
  ``ONNX_INT_TYPE_REDUCED_RANGE``). ONNX Runtime suggests it only for CPUs without VNNI, whose
  u8 x s8 kernels can saturate int16 sums.
- Activations are uint8, per tensor, computed at run time by ``DynamicQuantizeLinear`` (what
  ``ActFakeQuant(dynamic=True)`` reproduces); ``MatMulConstBOnly`` (default) leaves MatMuls
  of two activations (attention scores) alone.
- In dynamic mode the quantizer first rewrites *every* Gemm as MatMul (+ Add)
  (``ONNXModel.replace_gemm_with_matmul``), naming the MatMul ``<gemm name>_MatMul``.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn
from torch.nn.utils import parametrize

from autocompress._inputs import as_args, input_names, run, take, tensors_of
from autocompress.compress._modules import ActFakeQuant, WeightCompression, quantize_weight

ONNX_OPSET = 17


def bake(model: nn.Module) -> nn.Module:
    """An eval-mode copy with masks and fake quantization folded into plain weights.

    The result has ordinary ``weight`` parameters (holding the masked, quantized values), so it
    can be pickled, traced and exported. Activation fake-quant stays (exported as Q/DQ).
    """
    baked = copy.deepcopy(model).eval()
    for mod in baked.modules():
        if parametrize.is_parametrized(mod, "weight"):
            _unparametrize(mod)
    for p in baked.parameters():
        p.requires_grad_(False)
    return baked


def _unparametrize(mod: nn.Module) -> None:
    """Replaces a parametrized ``weight`` by a plain parameter holding its current value.

    Not ``parametrize.remove_parametrizations``: it deletes the property from the dynamically
    created class, which a deep copy shares with the original model, breaking the original.
    """
    with torch.no_grad():
        weight = mod.weight.detach().clone()
    del mod._modules["parametrizations"]
    mod.__class__ = mod.__class__.__bases__[0]
    mod.weight = nn.Parameter(weight)


def dynamic_layers(model: nn.Module) -> list[str]:
    """Names of the weight-bearing modules whose input has a dynamic activation quantizer
    (``act_bits: "dynamic"``): export gives them ONNX Runtime's integer MatMul."""
    return [name for name, mod in model.named_modules()
            if isinstance(getattr(mod, "act_quant", None), ActFakeQuant) and mod.act_quant.dynamic]


def quantized_weights(model: nn.Module) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{parameter name: (int8 values, fp32 per-channel scales)}`` for every quantized weight."""
    out = {}
    for name, mod in model.named_modules():
        if not parametrize.is_parametrized(mod, "weight"):
            continue
        wc = next((p for p in mod.parametrizations["weight"] if isinstance(p, WeightCompression)), None)
        if wc is None or wc.bits is None:
            continue
        with torch.no_grad():
            q, scale = quantize_weight(mod.weight, wc.bits)
        out[f"{name}.weight"] = (q.to(torch.int8).numpy(), scale.flatten().float().numpy())
    return out


def export_onnx(model: nn.Module, example_inputs: Any, path: str | Path, *,
                dynamic_sequence: bool = False) -> Path:
    """Writes a self-contained ONNX model; quantized weights are stored as int8 + scales.

    Each quantized weight becomes an int8 initializer feeding a per-channel
    ``DequantizeLinear``; the dense ops stay fp32 unless activations are quantized too (then
    ONNX Runtime may fuse the Q/DQ pairs into integer kernels). Layers with dynamic activation
    quantization (:func:`dynamic_layers`) are exported in fp32 without their fake-quant and then
    handed to ONNX Runtime's ``quantize_dynamic`` (see the module docstring): their MatMuls
    become DynamicQuantizeLinear + MatMulInteger with int8 weights.

    Args:
        model: The (compressed) model.
        example_inputs: A tensor, a tuple or a dict of tensors (``autocompress._inputs``);
            the ONNX inputs are named ``input`` (one tensor), ``input_<i>`` (a tuple) or by the
            dict's keys, the outputs ``output`` (one tensor) or ``output_<i>``.
        path: The file to write.
        dynamic_sequence: Also make axis 1 of integer inputs (token ids) and of the inputs of
            the same shape (attention masks) dynamic, for a deployable model; latency is timed
            at the example's shape, with only the batch axis dynamic.
    """
    path = Path(path)
    baked = bake(model)
    dynamic = dynamic_layers(model)
    for name in dynamic:  # quantize_dynamic adds the run-time quantization of their inputs
        baked.get_submodule(name).act_quant = nn.Identity()
    inputs = take(example_inputs, 1)
    names = input_names(inputs)
    with torch.no_grad():
        out = run(baked, inputs)
    outputs = ["output"] if isinstance(out, torch.Tensor) else [
        f"output_{i}" for i in range(len(out if isinstance(out, tuple | list) else out.values()))]
    axes = {name: {0: "batch"} for name in [*names, *outputs]}
    if dynamic_sequence:
        for name, axis in _sequence_inputs(inputs, names):
            axes[name][axis] = "sequence"
    # nn.TransformerEncoderLayer's eval "fast path" is one fused op that ONNX has no export for.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                baked, as_args(inputs), str(path), dynamo=False, opset_version=ONNX_OPSET,
                input_names=names, output_names=outputs, dynamic_axes=axes,
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    if dynamic:
        _quantize_dynamic(path, {name: baked.get_parameter(f"{name}.weight").numpy() for name in dynamic})
    qweights = {k: v for k, v in quantized_weights(model).items()
                if k.removesuffix(".weight") not in dynamic}
    if qweights:
        proto = onnx.load(str(path))
        _store_int8(proto, qweights)
        onnx.save(proto, str(path))
    return path


def _quantize_dynamic(path: Path, weights: dict[str, np.ndarray]) -> None:
    """Rewrites the ONNX file at ``path``: the MatMul/Gemm of each layer in ``weights``
    (``{module name: its fp32 weight, (out, in)}``) becomes ONNX Runtime's dynamic int8
    quantization; nothing else is quantized.

    Nodes are found by their weight: the exporter stores a Linear's weight as is (a Gemm with
    ``transB=1``, 2-D inputs) or transposed (a MatMul), under names that do not say which
    layer it is; the node consuming it is that layer's.

    Raises:
        RuntimeError: A layer's MatMul was not found, or ONNX Runtime did not quantize it.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(path))
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    targets: dict[str, str] = {}  # name quantize_dynamic gives the MatMul -> layer
    for layer, w in weights.items():
        found = False
        for i, node in enumerate(graph.node):
            if node.op_type not in ("MatMul", "Gemm") or node.input[1] not in inits:
                continue
            b = numpy_helper.to_array(inits[node.input[1]])
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            expected = w if trans_b else w.T  # a MatMul's B is (in, out)
            if b.shape == expected.shape and np.array_equal(b, expected):
                node.name = node.name or f"{layer}/{node.op_type}_{i}"
                # quantize_dynamic rewrites a Gemm as "<name>_MatMul" before selecting nodes.
                targets[node.name + ("_MatMul" if node.op_type == "Gemm" else "")] = layer
                found = True
        if not found:
            raise RuntimeError(f"layer {layer!r}: its MatMul was not found in the exported ONNX graph")
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "fp32.onnx")
        onnx.save(proto, source)
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # "consider pre-processing" and node notes
        try:
            quantize_dynamic(source, str(path), op_types_to_quantize=["MatMul", "Gemm"],
                             nodes_to_quantize=list(targets), per_channel=True,
                             reduce_range=False, weight_type=QuantType.QInt8)
        finally:
            logging.getLogger().setLevel(quiet)
    done = {n.name for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulInteger"}
    missed = sorted({layer for name, layer in targets.items() if f"{name}_quant" not in done})
    if missed:
        raise RuntimeError(f"ONNX Runtime's quantize_dynamic did not quantize layer(s) {missed}")


def _sequence_inputs(inputs: Any, names: list[str]) -> list[tuple[str, int]]:
    """``(name, 1)`` of integer inputs with a second axis and of inputs of the same shape."""
    tensors = dict(zip(names, tensors_of(inputs), strict=True))
    token_shapes = {tuple(t.shape) for t in tensors.values()
                    if t.dim() >= 2 and not t.is_floating_point()}
    return [(n, 1) for n, t in tensors.items() if tuple(t.shape) in token_shapes]


def _store_int8(proto: onnx.ModelProto, qweights: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Replaces the fp32 initializer of every quantized weight by int8 values + DequantizeLinear.

    The exporter's constant folding renames weights and may fold BatchNorm into a conv
    (multiplying each output channel by a constant) or transpose a Linear weight, so
    initializers are matched by value: ``X == W * k`` per output channel (BN folded; the int8
    values stay, the scale becomes ``scale * |k|`` and the sign moves into the values) or
    ``X == W.T`` (transposed; dequantized along axis 1). Layers with equal quantized weights
    (tied weights, or copies such as ``nn.TransformerEncoder``'s identical initial layers) share
    the one initializer the exporter keeps for them.
    """
    graph = proto.graph
    free = {init.name: init for init in graph.initializer}
    nodes = []
    stored: list[tuple[np.ndarray, np.ndarray]] = []
    for name, (q, scale) in qweights.items():
        found = _find_initializer(free, q, scale)
        if found is None and any(np.array_equal(q, q0) and np.array_equal(scale, s0) for q0, s0 in stored):
            continue  # the exporter keeps one initializer for equal weights: already stored
        if found is None:
            raise RuntimeError(f"quantized weight {name!r} not found in the exported ONNX graph")
        stored.append((q, scale))
        init, q_new, scale_new, axis = found
        del free[init.name]
        graph.initializer.remove(init)
        graph.initializer.extend([
            numpy_helper.from_array(q_new, f"{init.name}_quantized"),
            numpy_helper.from_array(scale_new.astype(np.float32), f"{init.name}_scale"),
            numpy_helper.from_array(np.zeros(scale_new.shape, np.int8), f"{init.name}_zero_point"),
        ])
        nodes.append(helper.make_node(
            "DequantizeLinear",
            [f"{init.name}_quantized", f"{init.name}_scale", f"{init.name}_zero_point"],
            [init.name], name=f"{name}_dequantize", axis=axis,
        ))
    for i, node in enumerate(nodes):
        graph.node.insert(i, node)


def _find_initializer(free: dict, q: np.ndarray, scale: np.ndarray):
    """The initializer holding weight ``q * scale`` (possibly BN-folded or transposed)."""
    w = q.astype(np.float32) * scale.reshape(-1, *([1] * (q.ndim - 1)))
    for init in free.values():
        if init.data_type != onnx.TensorProto.FLOAT or tuple(init.dims) not in (q.shape, q.T.shape):
            continue
        x = numpy_helper.to_array(init)
        if x.shape == q.shape:
            flat_w, flat_x = w.reshape(len(w), -1), x.reshape(len(x), -1)
            norm = (flat_w * flat_w).sum(1)
            k = np.where(norm > 0, (flat_x * flat_w).sum(1) / np.maximum(norm, 1e-30), 1.0)
            if np.allclose(flat_x, flat_w * k[:, None], rtol=1e-4, atol=1e-6 * np.abs(x).max()):
                sign = np.where(k < 0, -1, 1).astype(np.int8).reshape(-1, *([1] * (q.ndim - 1)))
                return init, q * sign, scale * np.abs(k), 0
        if q.ndim == 2 and x.shape == q.T.shape and np.allclose(x, w.T, rtol=1e-5, atol=1e-7):
            return init, np.ascontiguousarray(q.T), scale, 1
    return None
