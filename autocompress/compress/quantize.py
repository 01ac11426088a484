"""Quantization: per-output-channel symmetric weights at 2-8 bits, 8-bit activations.

During fine-tuning weights are fake-quantized with a straight-through estimator; the
deployable form (:func:`autocompress.compress.deploy.export_onnx`) stores them as int8 with
one fp32 scale per output channel. With ``act_bits: 8`` the layer's input is fake-quantized to
uint8 with an EMA-observed range, exported as QuantizeLinear/DequantizeLinear.

With ``act_bits: "dynamic"`` (and ``bits: 8``, on a Linear) the layer is deployed as ONNX
Runtime's dynamic quantization: int8 weights, activations quantized per tensor at run time
(DynamicQuantizeLinear + MatMulInteger, fused into DynamicQuantizeMatMul), so the CPU runs an
integer kernel. Fine-tuning sees the same numbers: the input of every weight-bearing module of
the layer (both factors of a low-rank one, as ONNX Runtime quantizes both MatMuls) goes
through ``ActFakeQuant(dynamic=True)``, and ``bits: 8`` weights are already what ONNX Runtime's
``quantize_dynamic(per_channel=True, weight_type=QInt8)`` stores (see ``_bake.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autocompress._inputs import run
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
    out: dict[str, list[Refusal]] = {}
    for la in layers:
        if la.type == "Embedding":
            out[la.name] = [Refusal("act_bits", None, "its inputs are indices, not activations")]
        elif la.type not in _DYNAMIC_KINDS:
            out[la.name] = [Refusal("act_bits", "dynamic", "dynamic activation quantization is "
                                    "deployed as ONNX Runtime's integer MatMul, for Linear layers "
                                    "only")]
    return out


@register_method("quantize", order=30, limits=_limits)
def _quantize(model: nn.Module, plan: Plan, example_inputs: Any) -> None:
    for name, lp in plan.active().items():
        if lp.bits is not None:
            for leaf in leaves(model, name):
                weight_compression(leaf).bits = lp.bits
        if lp.act_bits == "dynamic":
            for leaf in leaves(model, name):
                _add_act_quant(leaf, ActFakeQuant(8, dynamic=True))
        elif lp.act_bits == 8:
            _add_act_quant(leaves(model, name)[0], ActFakeQuant(8))
    if any(lp.act_bits == 8 for lp in plan.active().values()):
        _calibrate(model, example_inputs)  # only the static ones observe a range


def _add_act_quant(leaf: nn.Module, quant: ActFakeQuant) -> None:
    leaf.act_quant = quant.to(next(leaf.parameters()).device)
    leaf.register_forward_pre_hook(act_quant_pre_hook)


def _calibrate(model: nn.Module, example_inputs: Any) -> None:
    """Initializes activation ranges from one batch so the model is usable before fine-tuning.

    Only the observers run in training mode, so BatchNorm statistics are left alone.
    """
    was_training = model.training
    model.eval()
    for mod in model.modules():
        if isinstance(mod, ActFakeQuant):
            mod.train()
    with torch.no_grad():
        run(model, example_inputs)
    model.train(was_training)


apply = pure("quantize")
