"""Low-rank factorization by truncated SVD.

A Linear ``W (out x in)`` becomes ``Linear(in, r) -> Linear(r, out)``; a Conv with kernel k
becomes a k x k conv with r output channels followed by a 1x1 conv (Jaderberg et al., 2014,
scheme 2 via SVD of the ``out x (in*k)`` unfolded weight); an Embedding ``E (num x dim)``
becomes ``Embedding(num, r) -> Linear(r, dim)`` (ALBERT's factorized embedding, Lan et al.,
2020, here initialized by SVD). The singular values are split evenly (sqrt) between the two
factors. ``rank`` is the kept fraction of ``min(out, in*k)``. Refused (``limits``): grouped and
depthwise convs (their weight is not one matrix) and layers whose parent reads their weight
directly (``nn.TransformerEncoderLayer``'s linears).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from autocompress.compress._layers import LayerInfo, Refusal
from autocompress.compress._modules import LowRank
from autocompress.compress._plan import Plan, PlanError
from autocompress.compress._registry import pure, register_method


def kept_rank(weight_shape: torch.Size | tuple[int, ...], fraction: float) -> int:
    """Number of singular values kept for a weight of this shape."""
    full = min(weight_shape[0], int(torch.tensor(weight_shape[1:]).prod()))
    return max(1, round(fraction * full))


def factorize(layer: nn.Module, fraction: float) -> LowRank:
    """Two-layer truncated-SVD approximation of a Linear or Conv1d/Conv2d layer."""
    w = layer.weight.detach()
    r = kept_rank(w.shape, fraction)
    u, s, vh = torch.linalg.svd(w.flatten(1), full_matrices=False)
    root = s[:r].sqrt()
    first_w, second_w = root[:, None] * vh[:r], u[:, :r] * root
    if isinstance(layer, nn.Embedding):
        return _factorize_embedding(layer, u[:, :r] * root, root[:, None] * vh[:r])
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        first = nn.Linear(layer.in_features, r, bias=False)
        second = nn.Linear(r, layer.out_features, bias=has_bias)
    else:
        if layer.groups != 1:
            raise PlanError("low-rank factorization of grouped convolutions is not supported")
        conv = type(layer)
        first = conv(layer.in_channels, r, layer.kernel_size, layer.stride, layer.padding,
                     layer.dilation, bias=False, padding_mode=layer.padding_mode)
        second = conv(r, layer.out_channels, 1, bias=has_bias)
    with torch.no_grad():
        first.weight.copy_(first_w.reshape(first.weight.shape))
        second.weight.copy_(second_w.reshape(second.weight.shape))
        if has_bias:
            second.bias.copy_(layer.bias)
    return LowRank(first, second).to(w.device).train(layer.training)


def _factorize_embedding(layer: nn.Embedding, rows: torch.Tensor, proj: torch.Tensor) -> LowRank:
    """``Embedding(num, r)`` holding ``U_r S_r^1/2`` then ``Linear(r, dim)`` holding ``S_r^1/2 V_r^T``."""
    first = nn.Embedding(layer.num_embeddings, rows.shape[1], padding_idx=layer.padding_idx,
                         max_norm=layer.max_norm, norm_type=layer.norm_type,
                         scale_grad_by_freq=layer.scale_grad_by_freq, sparse=layer.sparse)
    second = nn.Linear(rows.shape[1], layer.embedding_dim, bias=False)
    with torch.no_grad():
        first.weight.copy_(rows)
        second.weight.copy_(proj.t())
    return LowRank(first, second).to(rows.device).train(layer.training)


def _limits(model: nn.Module, example_inputs: Any, layers: list[LayerInfo]) -> dict[str, list[Refusal]]:
    out: dict[str, list[Refusal]] = {}
    for layer in layers:
        mod = model.get_submodule(layer.name)
        if isinstance(mod, nn.modules.conv._ConvNd) and mod.groups != 1:
            what = "depthwise" if mod.groups == mod.in_channels else "grouped"
            out[layer.name] = [Refusal("rank", None, f"a {what} conv (groups={mod.groups}) has no "
                                                     f"single weight matrix to factorize")]
        elif _parent_reads_weight(model, layer.name):
            parent = type(model.get_submodule(layer.name.rpartition(".")[0])).__name__
            out[layer.name] = [Refusal("rank", None, f"its parent {parent} reads its weight "
                                                     f"directly, so it cannot become two layers")]
    return out


def _parent_reads_weight(model: nn.Module, name: str) -> bool:
    """Whether the forward of the module holding layer ``name`` reads the layer's ``weight``
    or ``bias`` itself (``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` do, for
    their fused fast paths), which a factorized replacement does not have."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    try:
        source = inspect.getsource(type(parent).forward)
    except (OSError, TypeError):  # built in, or defined where its source is not kept
        return False
    return f"self.{attr}.weight" in source or f"self.{attr}.bias" in source


@register_method("lowrank", order=10, limits=_limits)
def _lowrank(model: nn.Module, plan: Plan, example_inputs: Any) -> None:
    for name, lp in plan.active().items():
        if lp.rank is None:
            continue
        layer = model.get_submodule(name)
        try:
            new = factorize(layer, lp.rank)
        except PlanError as e:
            raise PlanError(f"layer {name!r}: {e}") from None
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)


apply = pure("lowrank")
