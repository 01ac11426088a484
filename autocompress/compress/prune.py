"""Pruning: unstructured magnitude masks and structured channel removal.

``channel``: removes the output channels with the smallest group L2 norm (Torch-Pruning's
``GroupMagnitudeImportance``) and, through Torch-Pruning's dependency graph, the matching
channels of every coupled layer: BatchNorm, residual additions, concatenations and the inputs
of the next conv/linear. Layers coupled by a residual add must lose the same channels, so a
group is cut once, at the ratio of its first layer in the model's definition order (not the
plan's order: plans that compare equal must compress alike).

``unstructured``: zeroes the smallest-magnitude fraction of each weight with a fixed mask,
kept enforced during fine-tuning through a parametrization (the masked weights stay zero and
get no gradient). On a low-rank layer both factors are masked.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from autocompress.compress._layers import find_layers
from autocompress.compress._modules import leaves, weight_compression
from autocompress.compress._plan import Plan, PlanError
from autocompress.compress._registry import pure, register_method


@register_method("prune", order=20)
def _prune(model: nn.Module, plan: Plan, example_inputs: torch.Tensor) -> None:
    todo = {n: lp for n, lp in plan.active().items() if lp.sparsity > 0}
    channel = {n: lp.sparsity for n, lp in todo.items() if lp.structure == "channel"}
    if channel:
        prune_channels(model, channel, example_inputs)
    for name, lp in todo.items():
        if lp.structure == "unstructured":
            for leaf in leaves(model, name):
                mask_smallest(leaf, lp.sparsity)


def mask_smallest(layer: nn.Module, sparsity: float) -> None:
    """Masks the ``round(sparsity * numel)`` smallest-magnitude weights of ``layer``."""
    wc = weight_compression(layer)
    w = layer.weight.detach()
    k = round(sparsity * w.numel())
    if k == 0:
        return
    cut = w.abs().flatten().kthvalue(k).values
    # Ties at the threshold: keep exactly k masked by ranking, not by comparing to ``cut``.
    order = w.abs().flatten().argsort(stable=True)[:k]
    mask = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
    mask[order] = False
    assert (w.abs().flatten()[~mask] <= cut).all()
    wc.mask.copy_(mask.view_as(w) & wc.mask)


def prune_channels(model: nn.Module, ratios: dict[str, float], example_inputs: torch.Tensor) -> None:
    """Physically removes output channels of the named layers and of all layers coupled to them.

    Args:
        model: Model to prune in place.
        ratios: Fraction of output channels to remove, per plan layer name.
        example_inputs: One input batch for tracing the dependency graph.
    """
    output = next((layer.name for layer in find_layers(model, example_inputs) if layer.is_output), None)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    output_module = model.get_submodule(output) if output else None
    done: set[nn.Module] = set()
    position = {n: i for i, (n, _) in enumerate(model.named_modules())}
    for name, ratio in sorted(ratios.items(), key=lambda item: position[item[0]]):
        if name == output:
            raise PlanError(f"layer {name!r} produces the model output; its channels cannot be "
                            "removed (use structure 'unstructured')")
        layer = leaves(model, name)[-1]
        if layer in done:
            continue  # its outputs were already cut as part of an earlier layer's group
        fn = tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels
        n_out = layer.weight.shape[0]
        n_cut = min(round(ratio * n_out), n_out - 1)
        if n_cut == 0:
            continue
        group = graph.get_pruning_group(layer, fn, idxs=list(range(n_out)))
        # Only layers whose outputs this group cuts are done; a layer that merely loses
        # inputs (the next conv) still has its own entry to apply.
        touched = _out_cut_modules(group)
        if output_module is not None and _cuts_outputs_of(group, output_module):
            raise PlanError(f"pruning channels of {name!r} would remove model outputs")
        scores = importance(group)
        idxs = torch.argsort(scores)[:n_cut].tolist()
        group = graph.get_pruning_group(layer, fn, idxs=idxs)
        if not graph.check_pruning_group(group):
            raise PlanError(f"layer {name!r}: cannot remove {n_cut} of {n_out} channels")
        group.prune()
        done |= touched


def _out_cut_modules(group) -> set[nn.Module]:
    """The conv/linear layers whose output channels ``group`` removes."""
    out_fns = (tp.prune_linear_out_channels, tp.prune_conv_out_channels)
    return {dep.target.module for dep, _ in group if dep.handler in out_fns}


def _cuts_outputs_of(group, module: nn.Module) -> bool:
    return module in _out_cut_modules(group)


apply = pure("prune")
