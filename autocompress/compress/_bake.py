"""The deployable form of a compressed model: weights baked into plain parameters, and each
compressed weight as its format stores it (what ``autocompress.onnxgraph.export_onnx`` and the
packed format write).
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Iterator
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from autocompress.compress._modules import ActFakeQuant, WeightCompression, find_weight_compression
from autocompress.compress._ties import stored_key
from autocompress.compress.formats import StoredWeight

__all__ = ["bake", "dynamic_layers", "float_weights", "quantized_weights", "static_layers",
           "stored_weights"]


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


def stored_weights(model: nn.Module) -> dict[str, StoredWeight]:
    """``{parameter name: the weight as its format stores it}`` for every weight with ``bits``
    (in module order)."""
    return {name: wc.format.store(weight) for name, weight, wc in _compressed_weights(model)}


def quantized_weights(model: nn.Module) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{parameter name: (int32 values, fp32 per-channel scales)}`` for every weight of a
    scaled (integer) format (uniform: within int8; pow2: 0 or ``±2**e``, within int8 up to 4
    bits)."""
    return {name: (s.values, s.scale) for name, s in stored_weights(model).items()
            if s.scale is not None}


def float_weights(model: nn.Module) -> dict[str, tuple[np.ndarray, str]]:
    """``{parameter name: (fp32 values, format name)}`` for every compressed weight stored
    without scales (``fp16``/``bf16``; the values are exactly representable in it)."""
    return {name: (s.values, s.format.name) for name, s in stored_weights(model).items()
            if s.scale is None}
