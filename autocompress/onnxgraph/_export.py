"""ONNX export of a (compressed) model: the fp32 graph from ``torch.onnx``, then each
compressed weight rewritten as its format stores it (:mod:`~autocompress.onnxgraph._weights`)
and the layers with quantized activations handed to ONNX Runtime's integer kernels
(:mod:`~autocompress.onnxgraph._ort_quant`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from autocompress._inputs import as_args, input_names, run, take, tensors_of, to_numpy_feed
from autocompress.compress import bake, dynamic_layers, static_layers, stored_weights
from autocompress.onnxgraph._ort_quant import (
    StaticLayer,
    quantize_dynamic_layers,
    quantize_static_layers,
)
from autocompress.onnxgraph._weights import store_weights

__all__ = ["ONNX_OPSET", "export_onnx"]

ONNX_OPSET = 17


def export_onnx(model: nn.Module, example_inputs: Any, path: str | Path, *,
                dynamic_sequence: bool = False, calibration: Iterable[Any] | None = None,
                contrib_ops: bool = True) -> Path:
    """Writes a self-contained ONNX model; quantized weights are stored as int8 + scales.

    Weight-only quantized layers get an int8 initializer feeding a per-channel
    ``DequantizeLinear`` (ONNX Runtime folds it into fp32 at load time: size, not speed);
    pow2 weights over 4 bits, whose integers do not fit int8, stay fp32 initializers (their
    exact values). Group-wise integer weights (``group_size``) of 2, 4 or 8 bits run on ONNX
    Runtime's block-wise kernels, fed by their stored codes (``contrib_ops``): a Linear as
    ``MatMulNBits`` (its bias folded in), an embedding as ``GatherBlockQuantized``; the
    others (3/5/6/7 bits, convs, a weight read by several nodes, ``contrib_ops=False``) as
    int8 codes and their group scales feeding ``Cast``, ``Mul`` and ``Reshape``
    (:mod:`~autocompress.onnxgraph._nbits`). fp16/bf16 weights get a float16/bfloat16
    initializer feeding a ``Cast`` to float (both also folded at load time).
    A ``quantizer: awq`` layer's input scale is traced as a ``Mul`` by its ``1/s`` before the
    layer (its weight holds ``W diag(s)``).
    Layers with quantized activations are exported in fp32 without their fake-quant and then
    handed to ONNX Runtime's own tools with our numbers (:mod:`~autocompress.onnxgraph._ort_quant`):
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
        contrib_ops: Whether the graph may use ONNX Runtime's contrib operators
            (``com.microsoft``: block-wise ``MatMulNBits`` / ``GatherBlockQuantized`` kernels
            for group-wise weights); False: standard ONNX operators only (another runtime).
    """
    path = Path(path)
    baked = bake_for_export(model)
    _torch_export(baked.model, take(example_inputs, 1), path, dynamic_sequence)
    store_compressed(model, baked, path, lambda: [to_numpy_feed(b) for b in calibration or ()]
                     or [to_numpy_feed(example_inputs)], contrib_ops=contrib_ops)
    return path


@dataclass
class BakedExport:
    """A compressed model ready for ``torch.onnx``: baked (:func:`bake`), the activation
    quantizers of the layers ONNX Runtime's tools quantize removed (their ``dynamic`` and
    ``static`` names, the static ones' trained input ranges in ``acts``)."""

    model: nn.Module
    dynamic: list[str]
    static: list[str]
    acts: dict[str, Any]


def bake_for_export(model: nn.Module) -> BakedExport:
    """``model`` baked for the fp32 export that :func:`store_compressed` then rewrites."""
    baked = bake(model)
    dynamic, static = dynamic_layers(model), static_layers(model)
    acts = {name: baked.get_submodule(name).act_quant.qparams() for name in static}
    for name in dynamic + static:  # ONNX Runtime's tools add the quantization of their inputs
        baked.get_submodule(name).act_quant = nn.Identity()
    return BakedExport(baked, dynamic, static, acts)


def store_compressed(model: nn.Module, baked: BakedExport, path: Path,
                     feeds: Callable[[], list[dict[str, Any]]], *,
                     contrib_ops: bool = True) -> None:
    """Rewrites the fp32 graph at ``path`` (exported from ``baked.model``) as ``model``'s
    compression stores and runs it (:func:`export_onnx`, whose ``contrib_ops`` this takes);
    ``feeds()``: the graph's input batches that calibrate the ranges between ``act_bits: 8``
    layers (called only if any)."""
    dynamic, static = baked.dynamic, baked.static
    stored = stored_weights(model)
    if dynamic:  # first: quantize_dynamic rewrites every Gemm as MatMul + Add
        quantize_dynamic_layers(path, {name: baked.model.get_parameter(f"{name}.weight").numpy()
                                       for name in dynamic})
    if static:
        quantize_static_layers(path, {name: StaticLayer(
            baked.model.get_parameter(f"{name}.weight").numpy(), stored[f"{name}.weight"].scale,
            *baked.acts[name]) for name in static}, feeds())
    todo = {k: s for k, s in stored.items()
            if k.removesuffix(".weight") not in dynamic + static and s.format.onnx_stores(s)}
    if todo:
        proto = onnx.load(str(path))
        store_weights(proto, todo, contrib_ops=contrib_ops)
        onnx.save(proto, str(path))


def _torch_export(baked: nn.Module, inputs: Any, path: Path, dynamic_sequence: bool) -> None:
    """``torch.onnx.export`` of the baked model at one example (batch axis dynamic)."""
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


def _sequence_inputs(inputs: Any, names: list[str]) -> list[tuple[str, int]]:
    """``(name, 1)`` of integer inputs with a second axis and of inputs of the same shape."""
    tensors = dict(zip(names, tensors_of(inputs), strict=True))
    token_shapes = {tuple(t.shape) for t in tensors.values()
                    if t.dim() >= 2 and not t.is_floating_point()}
    return [(n, 1) for n, t in tensors.items() if tuple(t.shape) in token_shapes]
