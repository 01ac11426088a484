"""Hugging Face's GPT-2 style ``Conv1D`` (``y = x @ W + b``, ``W`` of shape ``(in, out)``) as a
plain ``nn.Linear`` before any compression method runs (``apply`` does it; it compresses
nothing itself), so that low-rank, pruning, quantization,
export and size accounting treat it as the linear layer it is (weight transposed once; the
outputs are the same). Layers the plan leaves alone stay as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from autocompress.compress._layers import is_hf_conv1d
from autocompress.compress._plan import Plan


def as_linear(layer: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing what the Hugging Face ``Conv1D`` ``layer`` computes."""
    n_in, n_out = layer.weight.shape
    linear = nn.Linear(n_in, n_out, bias=layer.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(layer.weight.t())
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
    return linear.to(layer.weight.device).train(layer.training)


def linearize(model: nn.Module, plan: Plan) -> None:
    """Replaces, in place, every Hugging Face ``Conv1D`` that ``plan`` changes by a Linear."""
    for name in plan.active():
        layer = model.get_submodule(name)
        if is_hf_conv1d(layer):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, as_linear(layer))
