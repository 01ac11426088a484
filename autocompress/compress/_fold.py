"""BatchNorm folding: a BatchNorm that only normalizes a convolution's output is stored inside it.

At inference a BatchNorm is a per-channel affine map, ``y = x * f + (beta - mean * f)`` with
``f = gamma / sqrt(running_var + eps)``. When it reads a convolution's output and nothing else
does, the pair equals one convolution with weight ``w * f`` (per output channel) and bias
``b * f + beta - mean * f``, which is how every deployment runtime runs it (ONNX Runtime, TFLite,
TensorRT fold it at load time). The stored model does the same:

- an fp32 weight is stored as ``w * f``;
- an integer weight keeps its codes and stores its per-channel scale times ``f`` (exact: the
  same levels, rescaled; ``f`` may be negative);
- the BatchNorm's four tensors are not stored; the convolution's bias (added if it had none)
  carries the shift.

Only what is certain is folded: the forward must be traceable by ``torch.fx`` (else nothing is
folded), the BatchNorm exactly ``nn.BatchNorm1d/2d/3d`` with running statistics (a subclass
may do more, e.g. an activation), its input an ``nn.Conv1d/2d/3d`` (channels on dimension 1,
as the BatchNorm's; a ``Linear`` is not folded: its features are on the last dimension; nor a
transposed conv: its weight holds output channels on dimension 1) whose output nothing else
reads, and the weight's format one that folds (:attr:`WeightFormat.folds
<autocompress.compress.formats.WeightFormat.folds>`: not fp16/bf16, whose rescaled values would
round again).

A conv may be a subclass (timm's ``Conv2dSame`` pads in its forward): the folded weight and
bias go into the instance itself, so its forward still runs. A subclass that computes its own
forward is folded only when a small copy of it shows that it is a convolution with its weight
and bias, possibly of a padded input (:func:`_folds_exactly`); one that standardizes its
weight (timm's ``StdConv2d``) would undo the folded scale, and is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from autocompress.compress._convs import (
    CONVS,
    overrides_forward,
    own_class,
    probe_copy,
    probe_input,
    relative_error,
)
from autocompress.compress._modules import find_weight_compression

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: The largest relative output error of a folded probe copy that counts as exact.
PROBE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Fold:
    """A BatchNorm folded into the convolution before it (qualified module names)."""

    conv: str
    batchnorm: str


class _LeafTracer(fx.Tracer):
    """Convolutions (subclasses too) and BatchNorms are leaves (parametrized or not); the rest
    as fx does."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, CONVS) or own_class(m) in BATCHNORMS:
            return True
        return not parametrize.is_parametrized(m) and super().is_leaf_module(m, module_qualified_name)


def find_folds(model: nn.Module) -> list[Fold]:
    """The (convolution, BatchNorm) pairs of ``model`` that are stored folded (see the module
    docstring); ``[]`` when the model has no BatchNorm or its forward cannot be traced."""
    if not any(type(m) in BATCHNORMS for m in model.modules()):
        return []
    try:
        graph = _LeafTracer().trace(model)
    except Exception:  # noqa: BLE001  (fx raises many types for untraceable code)
        return []
    folds = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        bn = model.get_submodule(node.target)
        src = node.args[0]
        if (type(bn) not in BATCHNORMS or bn.running_mean is None or bn.running_var is None
                or not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1):
            continue
        conv = model.get_submodule(src.target)
        wc = find_weight_compression(conv)
        if (isinstance(conv, CONVS) and conv.out_channels == bn.num_features
                and (wc is None or wc.format.folds) and _folds_exactly(conv)):
            folds.append(Fold(src.target, node.target))
    return folds


def _folds_exactly(conv: nn.Module) -> bool:
    """Whether ``conv``'s forward, given the folded weight and bias, computes its output
    followed by the BatchNorm: always for a torch conv and a subclass that keeps its forward;
    for a subclass with its own, when a small copy of it
    (:func:`~autocompress.compress._convs.probe_copy`) with a random per-channel affine map
    folded in gives its output mapped so."""
    if not overrides_forward(conv):
        return True
    probe = probe_copy(cast(_ConvNd, conv))
    gen = torch.Generator().manual_seed(2)
    f, shift = (torch.randn(probe.out_channels, generator=gen).to(probe.weight.device)
                for _ in range(2))
    per_channel = (-1, *[1] * (probe.weight.dim() - 2))
    try:
        with torch.no_grad():
            x = probe_input(probe)
            expected = probe(x) * f.view(per_channel) + shift.view(per_channel)
            weight, bias = _affine_folded(probe, f, shift)
            probe.weight.copy_(weight)
            cast(torch.Tensor, probe.bias).copy_(bias)
            got = probe(x)
    except Exception:  # noqa: BLE001  (whatever the subclass's forward raises)
        return False
    return relative_error(got, expected) <= PROBE_TOLERANCE


def fold_factors(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f, shift)`` of an eval-mode BatchNorm: it computes ``x * f + shift`` per channel."""
    with torch.no_grad():
        f = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            f = f * bn.weight
        shift = -bn.running_mean * f
        if bn.bias is not None:
            shift = shift + bn.bias
    return f.detach().float(), shift.detach().float()


def folded(conv: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The folded convolution's ``(weight, bias)``: ``w * f`` per output channel and
    ``b * f + shift`` (``b`` = 0 without a bias)."""
    return _affine_folded(conv, *fold_factors(bn))


def _affine_folded(conv: nn.Module, f: torch.Tensor,
                   shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`folded` for the per-channel map ``x * f + shift``."""
    with torch.no_grad():
        w = conv.weight.detach()
        weight = w * f.view(-1, *([1] * (w.dim() - 1)))
        bias = shift if conv.bias is None else conv.bias.detach() * f + shift
    return weight, bias


def fold_into(model: nn.Module, folds: list[Fold]) -> None:
    """Folds in place, on a baked (unparametrized) eval copy: each convolution gets the folded
    weight and bias, each BatchNorm becomes ``nn.Identity``."""
    for fold in folds:
        conv, bn = model.get_submodule(fold.conv), model.get_submodule(fold.batchnorm)
        weight, bias = folded(conv, bn)
        conv.weight = nn.Parameter(weight, requires_grad=False)
        conv.bias = nn.Parameter(bias, requires_grad=False)
        model.set_submodule(fold.batchnorm, nn.Identity())
