"""The deployable form of a compressed model: weights baked, ONNX with real int8 weights.

Weight-only quantized layers are stored as int8 + per-channel scales feeding a
DequantizeLinear, fp16/bf16 weights as 16-bit initializers feeding a Cast to float
(:func:`export_onnx`). Layers whose activations are quantized too run on
ONNX Runtime's integer kernels: their graph is built by ONNX Runtime's quantization tools from
the fp32 export, with our numbers (:mod:`autocompress.compress._ort_quant`).
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn
from torch.nn.utils import parametrize

from autocompress._inputs import as_args, input_names, run, take, tensors_of, to_numpy_feed
from autocompress.compress._formats import float_bytes, quantize_weight
from autocompress.compress._modules import ActFakeQuant, WeightCompression, find_weight_compression
from autocompress.compress._ort_quant import (
    StaticLayer,
    WeightMatch,
    match_weight,
    quantize_dynamic_layers,
    quantize_static_layers,
)
from autocompress.compress._ties import stored_key

ONNX_OPSET = 17


def bake(model: nn.Module) -> nn.Module:
    """An eval-mode copy with masks and fake quantization folded into plain weights.

    The result has ordinary ``weight`` parameters (holding the masked, quantized values), so it
    can be pickled, traced and exported. Activation fake-quant stays (exported as Q/DQ), and so
    do tied weights: modules that compute one weight alike share one baked parameter.
    """
    baked = copy.deepcopy(model).eval()
    done: dict[Hashable, nn.Parameter] = {}
    for mod in baked.modules():
        if parametrize.is_parametrized(mod, "weight"):
            _unparametrize(mod, done)
    for p in baked.parameters():
        p.requires_grad_(False)
    return baked


def _unparametrize(mod: nn.Module, done: dict[Hashable, nn.Parameter]) -> None:
    """Replaces a parametrized ``weight`` by a plain parameter holding its current value, the
    one in ``done`` when another module computes the same weight (a tie; ``done`` is keyed by
    :func:`~autocompress.compress._ties.stored_key`).

    Not ``parametrize.remove_parametrizations``: it deletes the property from the dynamically
    created class, which a deep copy shares with the original model, breaking the original.
    """
    key = stored_key(mod, "weight")
    if key not in done:
        with torch.no_grad():
            done[key] = nn.Parameter(mod.weight.detach().clone())
    del mod._modules["parametrizations"]
    mod.__class__ = mod.__class__.__bases__[0]
    mod.weight = done[key]


def dynamic_layers(model: nn.Module) -> list[str]:
    """Names of the weight-bearing modules whose input has a dynamic activation quantizer
    (``act_bits: "dynamic"``): export gives them ONNX Runtime's integer MatMul."""
    return _act_quantized(model, dynamic=True)


def static_layers(model: nn.Module) -> list[str]:
    """Names of the weight-bearing modules whose input has a static (observed-range) activation
    quantizer (``act_bits: 8``): export gives them ONNX Runtime's QLinear kernels."""
    return _act_quantized(model, dynamic=False)


def _act_quantized(model: nn.Module, dynamic: bool) -> list[str]:
    return [name for name, mod in model.named_modules()
            if isinstance(q := getattr(mod, "act_quant", None), ActFakeQuant) and q.dynamic == dynamic]


def _compressed_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, WeightCompression]]:
    """``(parameter name, the weight, its WeightCompression)`` of every weight with ``bits``."""
    for name, mod in model.named_modules():
        wc = find_weight_compression(mod)
        if wc is not None and wc.bits is not None:
            yield f"{name}.weight", cast(torch.Tensor, mod.weight), wc


def quantized_weights(model: nn.Module) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{parameter name: (int32 values, fp32 per-channel scales)}`` for every weight with
    integer bits (uniform: within int8; pow2: 0 or ``±2**e``, within int8 up to 4 bits)."""
    out = {}
    for name, weight, wc in _compressed_weights(model):
        if isinstance(wc.bits, int):
            with torch.no_grad():
                q, scale = quantize_weight(weight, wc.bits, wc.scheme)
            out[name] = (q.to(torch.int32).numpy(), scale.flatten().float().numpy())
    return out


def float_weights(model: nn.Module) -> dict[str, tuple[np.ndarray, str]]:
    """``{parameter name: (fp32 values, "fp16" or "bf16")}`` for every 16-bit float weight
    (the values are exactly representable in that format)."""
    return {name: (weight.detach().float().numpy(), wc.bits)
            for name, weight, wc in _compressed_weights(model) if isinstance(wc.bits, str)}


def export_onnx(model: nn.Module, example_inputs: Any, path: str | Path, *,
                dynamic_sequence: bool = False, calibration: Iterable[Any] | None = None) -> Path:
    """Writes a self-contained ONNX model; quantized weights are stored as int8 + scales.

    Weight-only quantized layers get an int8 initializer feeding a per-channel
    ``DequantizeLinear`` (ONNX Runtime folds it into fp32 at load time: size, not speed);
    pow2 weights over 4 bits, whose integers do not fit int8, stay fp32 initializers (their
    exact values). fp16/bf16 weights get a float16/bfloat16 initializer feeding a ``Cast`` to
    float (also folded at load time).
    Layers with quantized activations are exported in fp32 without their fake-quant and then
    handed to ONNX Runtime's own tools with our numbers (:mod:`~autocompress.compress._ort_quant`):
    ``act_bits: 8`` (:func:`static_layers`) becomes a QDQ graph that runs QLinearConv /
    QLinearMatMul with the trained input ranges, ``act_bits: "dynamic"``
    (:func:`dynamic_layers`) DynamicQuantizeLinear + MatMulInteger.

    Args:
        model: The (compressed) model.
        example_inputs: A tensor, a tuple or a dict of tensors (``autocompress._inputs``);
            the ONNX inputs are named ``input`` (one tensor), ``input_<i>`` (a tuple) or by the
            dict's keys, the outputs ``output`` (one tensor) or ``output_<i>``.
        path: The file to write.
        dynamic_sequence: Also make axis 1 of integer inputs (token ids) and of the inputs of
            the same shape (attention masks) dynamic, for a deployable model; latency is timed
            at the example's shape, with only the batch axis dynamic.
        calibration: Input batches (of ``example_inputs``' form) that calibrate the ranges of
            the tensors between ``act_bits: 8`` layers (their own inputs keep the trained
            ranges); default (or when it yields nothing): ``example_inputs``. Only the ranges
            depend on them, not the graph, so latency is the same whatever they are.
    """
    path = Path(path)
    baked = bake(model)
    dynamic, static = dynamic_layers(model), static_layers(model)
    acts = {name: baked.get_submodule(name).act_quant.qparams() for name in static}
    for name in dynamic + static:  # ONNX Runtime's tools add the quantization of their inputs
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
    qweights = quantized_weights(model)
    if dynamic:  # first: quantize_dynamic rewrites every Gemm as MatMul + Add
        quantize_dynamic_layers(path, {name: baked.get_parameter(f"{name}.weight").numpy()
                                       for name in dynamic})
    if static:
        feeds = [to_numpy_feed(b) for b in calibration or ()] or [to_numpy_feed(example_inputs)]
        quantize_static_layers(path, {name: StaticLayer(
            baked.get_parameter(f"{name}.weight").numpy(), qweights[f"{name}.weight"][1],
            *acts[name]) for name in static}, feeds)
    qweights = {k: v for k, v in qweights.items()
                if k.removesuffix(".weight") not in dynamic + static and _fits_int8(v[0])}
    fweights = float_weights(model)
    if qweights or fweights:
        proto = onnx.load(str(path))
        _store_weights(proto, qweights, fweights)
        onnx.save(proto, str(path))
    return path


def _fits_int8(q: np.ndarray) -> bool:
    return q.size == 0 or int(np.abs(q).max()) <= 127


def _sequence_inputs(inputs: Any, names: list[str]) -> list[tuple[str, int]]:
    """``(name, 1)`` of integer inputs with a second axis and of inputs of the same shape."""
    tensors = dict(zip(names, tensors_of(inputs), strict=True))
    token_shapes = {tuple(t.shape) for t in tensors.values()
                    if t.dim() >= 2 and not t.is_floating_point()}
    return [(n, 1) for n, t in tensors.items() if tuple(t.shape) in token_shapes]


def _store_weights(proto: onnx.ModelProto, qweights: dict[str, tuple[np.ndarray, np.ndarray]],
                   fweights: dict[str, tuple[np.ndarray, str]]) -> None:
    """Replaces the fp32 initializer of every integer weight by int8 values + DequantizeLinear
    (:func:`_dequantized`) and of every fp16/bf16 weight by a 16-bit initializer + Cast
    (:func:`_cast`).

    The exporter's constant folding renames weights and may fold BatchNorm into a conv
    (multiplying each output channel by a constant ``k``) or transpose a Linear weight, so
    initializers are matched by value (``match_weight``: ``X == W * k`` per output channel or
    ``X == W.T``). Layers with equal weights (tied weights, or copies such as
    ``nn.TransformerEncoder``'s identical initial layers) share the one initializer the exporter
    keeps for them.
    """
    Store = Callable[[WeightMatch], tuple[list[onnx.TensorProto], list[onnx.NodeProto]]]
    todo: list[tuple[str, np.ndarray, Store]] = [
        (name, q.astype(np.float32) * _per_row(scale, q.ndim),
         functools.partial(_dequantized, name=name, q=q, scale=scale))
        for name, (q, scale) in qweights.items()]
    todo += [(name, w, functools.partial(_cast, name=name, w=w, fmt=fmt))
             for name, (w, fmt) in fweights.items()]
    graph = proto.graph
    free = {init.name: init for init in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    stored: list[np.ndarray] = []
    for name, w, store in todo:
        found = match_weight(free.values(), w)
        if found is None and any(np.array_equal(w, w0) for w0 in stored):
            continue  # the exporter keeps one initializer for equal weights: already stored
        if found is None:
            raise RuntimeError(f"compressed weight {name!r} not found in the exported ONNX graph")
        stored.append(w)
        del free[found.init.name]
        graph.initializer.remove(found.init)
        inits, new_nodes = store(found)
        graph.initializer.extend(inits)
        nodes += new_nodes
    for i, node in enumerate(nodes):
        graph.node.insert(i, node)


def _per_row(values: np.ndarray, ndim: int) -> np.ndarray:
    return values.reshape(-1, *([1] * (ndim - 1)))


def _dequantized(found: WeightMatch, *, name: str, q: np.ndarray,
                 scale: np.ndarray) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """int8 values + DequantizeLinear producing ``found``'s initializer: BN-folded, the int8
    values stay, the scale becomes ``scale * |k|`` and the sign moves into the values;
    transposed, dequantized along axis 1."""
    init = found.init.name
    if found.transposed:
        q_new, scale_new, axis = np.ascontiguousarray(q.T), scale, 1
    else:
        q_new = q * _per_row(np.where(found.k < 0, -1, 1), q.ndim)
        scale_new, axis = scale * np.abs(found.k), 0
    inits = [numpy_helper.from_array(q_new.astype(np.int8), f"{init}_quantized"),
             numpy_helper.from_array(scale_new.astype(np.float32), f"{init}_scale"),
             numpy_helper.from_array(np.zeros(scale_new.shape, np.int8), f"{init}_zero_point")]
    return inits, [helper.make_node(
        "DequantizeLinear", [f"{init}_quantized", f"{init}_scale", f"{init}_zero_point"], [init],
        name=f"{name}_dequantize", axis=axis)]


def _cast(found: WeightMatch, *, name: str, w: np.ndarray,
          fmt: str) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """A float16/bfloat16 initializer of ``w`` + Cast to float producing ``found``'s
    initializer; BN-folded (``X != W``), a Mul by the per-channel ``k`` follows, so the 16-bit
    values stay exactly the trained ones."""
    init = found.init.name
    w = np.ascontiguousarray(w.T) if found.transposed else w
    dtype = onnx.TensorProto.FLOAT16 if fmt == "fp16" else onnx.TensorProto.BFLOAT16
    inits = [helper.make_tensor(f"{init}_{fmt}", dtype, w.shape, float_bytes(w, fmt), raw=True)]
    cast = f"{init}_cast"
    if np.array_equal(numpy_helper.to_array(found.init), w):
        cast = init  # the common case: the initializer is the weight itself
    nodes = [helper.make_node("Cast", [f"{init}_{fmt}"], [cast], name=f"{name}_cast",
                              to=onnx.TensorProto.FLOAT)]
    if cast != init:
        inits.append(numpy_helper.from_array(_per_row(found.k, w.ndim).astype(np.float32),
                                             f"{init}_k"))
        nodes.append(helper.make_node("Mul", [cast, f"{init}_k"], [init], name=f"{name}_fold"))
    return inits, nodes
