"""Masks over single weights: unstructured sparsity and the N:M pattern (``structure:
unstructured`` / ``"2:4"``), chosen by the plan's ``pruner``: ``magnitude`` (data-free),
``wanda`` or ``sparsegpt`` (calibrated).

The masks are fixed parametrizations (``WeightCompression.mask``): the masked weights stay zero
and get no gradient while fine-tuning; regrowth re-applies the rule that made a mask
(:data:`MASK_RULES`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from autocompress._registry import Registry
from autocompress.compress._calibration import Calibration, calibration_problem
from autocompress.compress._knob_values import PRUNERS
from autocompress.compress._layers import LayerInfo, Refusal
from autocompress.compress._modules import leaves, weight_compression
from autocompress.compress._plan import LayerPlan, PlanError

N_M = (2, 4)  # structure "2:4": 2 of every 4 consecutive input weights are zero


def sparse_limits(model: nn.Module, layers: list[LayerInfo]) -> dict[str, list[Refusal]]:
    """What the mask pruners cannot do to a layer: calibrated pruners on a layer without
    input activations, N:M on an input width that is not a multiple of M."""
    out: dict[str, list[Refusal]] = {}
    for la in layers:
        refusals = out.setdefault(la.name, [])
        problem = None if la.type == "Conv1D" else calibration_problem(model.get_submodule(la.name))
        if problem is not None:
            refusals += [Refusal("pruner", p, f"{p} calibrates on the layer's inputs: {problem}")
                         for p in PRUNERS if p != "magnitude"]
        width = la.shape[0] if la.type == "Conv1D" else int(torch.Size(la.shape[1:]).numel())
        if width % N_M[1]:
            refusals.append(Refusal("structure", "2:4", f"its input width {width} is not a "
                                                        f"multiple of {N_M[1]}"))
    return {name: refusals for name, refusals in out.items() if refusals}


def mask_weights(model: nn.Module, entries: dict[str, LayerPlan], calibration: Calibration) -> None:
    """Masks the weights of the plan ``entries`` (a sparsity, ``structure`` unstructured or
    2:4) by their ``pruner``."""
    for name, lp in entries.items():
        if lp.pruner != "magnitude" or lp.structure != "unstructured":
            raise PlanError(f"layer {name!r}: pruner={lp.pruner!r} with structure="
                            f"{lp.structure!r} is not implemented yet")
        for leaf in leaves(model, name):
            mask_smallest(leaf, lp.sparsity)


def mask_smallest(layer: nn.Module, sparsity: float) -> None:
    """Masks the ``round(sparsity * numel)`` smallest-magnitude weights of ``layer``
    (:func:`magnitude_mask`), on top of its mask."""
    wc = weight_compression(layer)
    w = cast(torch.Tensor, layer.weight).detach()
    k = round(sparsity * w.numel())
    if k == 0:
        return
    old = cast(torch.Tensor, wc.mask)
    old.copy_(magnitude_mask(w, k) & old)
    wc.mask_rule = "magnitude"


#: ``{name: rule}``: a rule ``(weight, pruned count) -> mask`` (True: kept) of a pruning method;
#: a weight's ``WeightCompression.mask_rule`` names the one regrowth re-applies.
MASK_RULES: Registry[Callable[[torch.Tensor, int], torch.Tensor]] = Registry("mask rule")


@MASK_RULES.register("magnitude")
def magnitude_mask(w: torch.Tensor, pruned: int) -> torch.Tensor:
    """The mask of unstructured magnitude pruning: all but the ``pruned`` smallest-magnitude
    entries of ``w`` (ties by position, a stable ranking: exactly ``pruned`` are masked).

    The one rule of unstructured pruning: pruning applies it, and regrowth during fine-tuning
    (:meth:`~autocompress.compress.WeightCompression.refresh`) re-applies it to the trained
    weights (``MASK_RULES.get("magnitude")``), so a pattern a pruning method imposes (an N:M rule
    registered beside it) is kept by regrowth.
    """
    order = w.abs().flatten().argsort(stable=True)[:pruned]
    mask = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
    mask[order] = False
    return mask.view_as(w)
