"""Quantization: symmetric weights at 2-8 bits (uniform or power-of-two levels, one scale per
output channel or, ``group_size``, per output channel and group of input columns) or
fp16/bf16 weights, 8-bit activations. Integer weights are rounded to nearest (``quantizer:
rtn``), with GPTQ's error compensation (``gptq``, :mod:`~autocompress.compress._gptq`) or
after AWQ's input scaling (``awq``).

During fine-tuning weights are fake-quantized with a straight-through estimator
(:mod:`~autocompress.compress.formats` says what each format's values are); the deployable
form (:func:`autocompress.onnxgraph.export_onnx`) stores integer levels that fit int8 as int8
with one fp32 scale per output channel, fp16/bf16 weights as 16-bit initializers.
Activations, where the plan quantizes them, are uint8 per tensor on the input of every
weight-bearing module of the layer (both factors of a low-rank one), and the layer runs on
ONNX Runtime's integer kernels (:mod:`autocompress.onnxgraph._ort_quant`):

- ``act_bits: 8`` (static): a fixed range, first the min/max over calibration batches
  (:func:`calibrate`), then an EMA while fine-tuning; deployed as a QDQ graph that ONNX Runtime
  runs on QLinearConv / QLinearMatMul with exactly that range and our weight scales.
- ``act_bits: "dynamic"`` (``bits: 8``, a Linear): each input's own range at run time,
  ``ActFakeQuant(dynamic=True)``, deployed as ONNX Runtime's dynamic quantization
  (DynamicQuantizeLinear + MatMulInteger, fused into DynamicQuantizeMatMul).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from autocompress._inputs import run
from autocompress.compress._awq import scale_inputs
from autocompress.compress._calibration import Calibration, calibration_problem
from autocompress.compress._gptq import gptq_round
from autocompress.compress._knob_values import GROUP_SIZES, QUANTIZERS, integer_bits
from autocompress.compress._layers import LayerInfo, Refusal
from autocompress.compress._modules import (
    ActFakeQuant,
    act_quant_pre_hook,
    leaves,
    weight_compression,
)
from autocompress.compress._plan import Plan
from autocompress.compress._registry import pure, register_method

_DYNAMIC_KINDS = ("Linear", "Conv1D")  # Hugging Face's Conv1D becomes a Linear (conv1d.py)


def _limits(model: nn.Module, example_inputs: Any, layers: list[LayerInfo]) -> dict[str, list[Refusal]]:
    """What quantization refuses per layer: activation quantization of an embedding's indices
    and dynamic activations outside Linear layers; the calibrated quantizers where the
    calibration cannot describe the layer's inputs (an embedding, a grouped conv); group sizes
    larger than the layer's input width (a width that is not a multiple leaves a short last
    group, which the formats and ONNX Runtime's block-wise kernels take: SmolLM2's 576 columns
    are 4.5 groups of 128). A calibration too small for a layer's width is refused
    at resolution from ``search.calibration_samples`` (``describe_layers``); a smaller one
    passed to ``apply`` still runs GPTQ on the dampened Hessian, with a logged warning."""
    out: dict[str, list[Refusal]] = {}
    for la in layers:
        refusals = out.setdefault(la.name, [])
        if la.type == "Embedding":
            refusals.append(Refusal("act_bits", None, "its inputs are indices, not activations"))
        elif la.type not in _DYNAMIC_KINDS:
            refusals.append(Refusal("act_bits", "dynamic", "dynamic activation quantization is "
                                    "deployed as ONNX Runtime's integer MatMul, for Linear "
                                    "layers only"))
        # Hugging Face's Conv1D becomes a Linear before the methods run (conv1d.py).
        problem = None if la.type == "Conv1D" else calibration_problem(model.get_submodule(la.name))
        if problem is not None:
            refusals += [Refusal("quantizer", q, f"{q} calibrates on the layer's inputs: {problem}")
                         for q in QUANTIZERS if q != "rtn"]
        width = la.shape[0] if la.type == "Conv1D" else math.prod(la.shape[1:])
        refusals += [Refusal("group_size", g, f"its input width {width} is smaller than {g}")
                     for g in GROUP_SIZES if width < g]
    return {name: refusals for name, refusals in out.items() if refusals}


@register_method("quantize", order=30, limits=_limits, calibrated=True)
def _quantize(model: nn.Module, plan: Plan, example_inputs: Any, calibration: Calibration) -> None:
    integer = {n: lp for n, lp in plan.active().items() if integer_bits(lp.bits)}
    awq = {n: lp for n, lp in integer.items() if lp.quantizer == "awq"}
    if awq:  # per-input-channel scales, before the weights are quantized
        scale_inputs(model, awq, calibration)
    for name, lp in plan.active().items():
        if lp.bits is not None:
            for leaf in leaves(model, name):
                wc = weight_compression(leaf)
                wc.bits, wc.scheme = lp.bits, lp.scheme
                wc.group_size = lp.group_size
    gptq = {n: lp for n, lp in integer.items() if lp.quantizer == "gptq"}
    if gptq:  # the weights moved onto their grid with error compensation
        gptq_round(model, gptq, calibration)
    for name, lp in plan.active().items():
        if lp.act_bits is not None:
            for leaf in leaves(model, name):
                _add_act_quant(leaf, ActFakeQuant(8, dynamic=lp.act_bits == "dynamic"))
    if any(lp.act_bits == 8 for lp in plan.active().values()):
        calibrate(model, [example_inputs])  # usable before calibrate() sees more batches


def _add_act_quant(leaf: nn.Module, quant: ActFakeQuant) -> None:
    leaf.act_quant = quant.to(next(leaf.parameters()).device)
    leaf.register_forward_pre_hook(act_quant_pre_hook)


def calibrate(model: nn.Module, batches: Iterable[Any]) -> int:
    """Sets the range of every static activation quantizer (``act_bits: 8``) to the min/max of
    its inputs over ``batches`` (input batches of the task's form), as post-training
    quantization calibrates; fine-tuning then tracks the range with an EMA.

    Only the observers run in training mode, so BatchNorm statistics are left alone.

    Returns:
        The number of quantizers calibrated (0: the model has none, nothing was run).
    """
    quants = [m for m in model.modules() if isinstance(m, ActFakeQuant) and not m.dynamic]
    if not quants:
        return 0
    was_training = model.training
    model.eval()
    for q in quants:
        q.initialized.fill_(False)
        q.calibrating = True
        q.train()
    try:
        with torch.no_grad():
            for batch in batches:
                run(model, batch)
    finally:
        for q in quants:
            q.calibrating = False
        model.train(was_training)
    return len(quants)


apply = pure("quantize")
