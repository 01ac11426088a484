"""The deployable form of a compressed model: weights baked, ONNX with real int8 weights."""

from __future__ import annotations

import copy
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
from autocompress.compress._modules import WeightCompression, quantize_weight

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
    ONNX Runtime may fuse the Q/DQ pairs into integer kernels).

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
    qweights = quantized_weights(model)
    if qweights:
        proto = onnx.load(str(path))
        _store_int8(proto, qweights)
        onnx.save(proto, str(path))
    return path


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
    ``X == W.T`` (transposed; dequantized along axis 1).
    """
    graph = proto.graph
    free = {init.name: init for init in graph.initializer}
    nodes = []
    for name, (q, scale) in qweights.items():
        found = _find_initializer(free, q, scale)
        if found is None:
            raise RuntimeError(f"quantized weight {name!r} not found in the exported ONNX graph")
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
