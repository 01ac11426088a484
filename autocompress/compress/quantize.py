"""Quantization: per-output-channel symmetric weights at 2-8 bits, 8-bit activations.

During fine-tuning weights are fake-quantized with a straight-through estimator; the
deployable form (:func:`autocompress.compress.deploy.export_onnx`) stores them as int8 with
one fp32 scale per output channel. With ``act_bits: 8`` the layer's input is fake-quantized to
uint8 with an EMA-observed range, exported as QuantizeLinear/DequantizeLinear.
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


def _limits(model: nn.Module, example_inputs: Any, layers: list[LayerInfo]) -> dict[str, list[Refusal]]:
    return {la.name: [Refusal("act_bits", None, "its inputs are indices, not activations")]
            for la in layers if la.type == "Embedding"}


@register_method("quantize", order=30, limits=_limits)
def _quantize(model: nn.Module, plan: Plan, example_inputs: Any) -> None:
    for name, lp in plan.active().items():
        if lp.bits is not None:
            for leaf in leaves(model, name):
                weight_compression(leaf).bits = lp.bits
        if lp.act_bits is not None:
            first = leaves(model, name)[0]
            first.act_quant = ActFakeQuant(lp.act_bits)
            first.register_forward_pre_hook(act_quant_pre_hook)
    if any(lp.act_bits for lp in plan.layers.values()):
        _calibrate(model, example_inputs)


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
