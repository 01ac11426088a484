"""Masks over single weights: unstructured sparsity and the N:M pattern (``structure:
unstructured`` / ``"2:4"``), chosen by the plan's ``pruner`` (:data:`MASK_PRUNERS`):

- ``magnitude`` (data-free): the smallest ``|w|`` of the whole weight (unstructured), or of
  each group of 4 (2:4).
- ``wanda`` (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language
  Models"): the smallest ``|w_ij| * ||X_j||_2`` (``X_j``: input column ``j`` over the
  calibration data), compared within each output row (the paper's choice: per-output
  comparison groups), or within each group of 4; no weight update.
- ``sparsegpt`` (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be
  Accurately Pruned in One-Shot"): columns are pruned left to right in blocks of 128, the
  mask of a block chosen adaptively by ``w^2 / [H^-1]_jj^2`` (``H = X^T X`` dampened by 1% of
  its mean diagonal); each pruned weight's error is compensated on the weights to its right
  (Optimal Brain Surgeon through the Cholesky factor of ``H^-1``), so the kept weights change.

The weights are the ``(out, d)`` matrix that multiplies a layer's input rows
(:func:`~autocompress.compress._calibration.weight_matrix`: a conv's flattened ``C_in *
kernel`` patch); N:M groups are ``M`` consecutive columns of a row. A row whose width is not a
multiple of ``M`` (only a low-rank factor's: ``limits`` refuses such layers) keeps its last,
partial group whole. Unstructured masks prune ``round(sparsity * numel)`` weights whatever the
pruner. All calibrated layers of a plan get their input statistics in one pass
(:func:`~autocompress.compress._calibration.input_stats`, on the model as it is before
pruning); a low-rank layer's factors are pruned each (a factor that cannot be calibrated, e.g.
CP's depthwise conv, by magnitude). Without calibration data (rebuilding a logged trial) the
calibrated pruners mask by magnitude, the same counts and pattern: the logged weights' zeros
then set the masks.

The masks are fixed parametrizations (``WeightCompression.mask``): the masked weights stay zero
and get no gradient while fine-tuning. Regrowth (``finetune.regrow``) re-applies the rule named
by the weight's ``mask_rule`` (:data:`MASK_RULES`): ``magnitude`` for unstructured magnitude
masks, ``2:4`` (N:M by magnitude) for 2:4 magnitude masks. A ``wanda`` or ``sparsegpt`` mask
has no rule (``mask_rule = None``) and does not regrow: its choice used calibration data (and
SparseGPT's kept weights were updated around it), which a magnitude rule on the trained
weights would undo at the first refresh.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from autocompress._registry import Registry
from autocompress.compress._calibration import (
    Calibration,
    InputStats,
    calibration_problem,
    input_stats,
    weight_matrix,
)
from autocompress.compress._knob_values import PRUNERS
from autocompress.compress._layers import LayerInfo, Refusal
from autocompress.compress._modules import LowRank, leaves, weight_compression
from autocompress.compress._plan import LayerPlan, PlanError

N_M = (2, 4)  # structure "2:4": 2 of every 4 consecutive input weights are zero
BLOCK = 128  # SparseGPT's columns per block (its mask is chosen per block)
DAMP = 0.01  # SparseGPT's dampening: this fraction of H's mean diagonal added to its diagonal


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


@dataclass(frozen=True)
class MaskTarget:
    """What a mask prunes of an ``(out, d)`` weight.

    Attributes:
        sparsity: The pruned fraction (unstructured: ``round(sparsity * numel)`` weights).
        n_m: ``(N, M)``: N of every M consecutive weights of a row (the sparsity is N/M), or
            None for unstructured.
    """

    sparsity: float
    n_m: tuple[int, int] | None = None

    @classmethod
    def of(cls, lp: LayerPlan) -> MaskTarget:
        return cls(lp.sparsity, N_M if lp.structure == "2:4" else None)


# pruner(weight (out, d) float64, target, stats or None) -> (kept (out, d) bool, the new
# weight (out, d) or None when the kept weights stay as they are).
Pruner = Callable[[torch.Tensor, MaskTarget, InputStats | None],
                  tuple[torch.Tensor, torch.Tensor | None]]

#: ``{pruner: function}``: how each ``pruner`` plan value chooses a mask (module docstring).
MASK_PRUNERS: Registry[Pruner] = Registry("pruner", builtins={
    "sparsegpt": "autocompress.compress._sparsegpt"})


def mask_weights(model: nn.Module, entries: dict[str, LayerPlan], calibration: Calibration) -> None:
    """Masks the weights of the plan ``entries`` (a sparsity, ``structure`` unstructured or
    2:4) by their ``pruner``, the calibrated ones on statistics of ``calibration`` gathered in
    one pass (none if it is empty: then by magnitude, see the module docstring).

    Raises:
        PlanError: A calibrated pruner on a layer that has no input activations to weigh.
    """
    calibrated = _calibrated_leaves(model, entries)
    stats = input_stats(model, calibrated, calibration) if calibrated and not calibration.is_empty else {}
    for name, lp in entries.items():
        target = MaskTarget.of(lp)
        rule = None if lp.pruner != "magnitude" else "2:4" if target.n_m else "magnitude"
        for leaf in leaves(model, name):
            found = stats.get(leaf)
            pruner = lp.pruner if found is not None else "magnitude"
            _mask(leaf, MASK_PRUNERS.get(pruner), target, found, rule)


def _calibrated_leaves(model: nn.Module, entries: dict[str, LayerPlan]) -> list[nn.Module]:
    """The weight-bearing modules of ``entries`` a calibrated pruner prunes on their inputs."""
    found: list[nn.Module] = []
    for name, lp in entries.items():
        if lp.pruner == "magnitude":
            continue
        layer = model.get_submodule(name)
        problem = None if isinstance(layer, LowRank) else calibration_problem(layer)
        if problem is not None:
            raise PlanError(f"layer {name!r}: pruner={lp.pruner!r} calibrates on the layer's "
                            f"inputs: {problem}")
        found += [leaf for leaf in leaves(model, name) if calibration_problem(leaf) is None]
    return found


@torch.no_grad()
def _mask(layer: nn.Module, pruner: Pruner, target: MaskTarget, stats: InputStats | None,
          rule: str | None) -> None:
    """Masks ``layer``'s weight by ``pruner`` (on top of its mask), writes the pruner's new
    weight if it has one, and names the regrowth ``rule`` on it."""
    wc = weight_compression(layer)
    old = cast(torch.Tensor, wc.mask)
    w = weight_matrix(layer).to(torch.float64)
    kept, new = pruner(w, target, stats)
    old.copy_(kept.view_as(old) & old)
    if new is not None:
        original = layer.get_parameter("parametrizations.weight.original")
        original.copy_(new.view_as(original).to(original.dtype))
    wc.mask_rule = rule


def mask_smallest(layer: nn.Module, sparsity: float) -> None:
    """Masks the ``round(sparsity * numel)`` smallest-magnitude weights of ``layer``
    (:func:`magnitude_mask`), on top of its mask."""
    _mask(layer, MASK_PRUNERS.get("magnitude"), MaskTarget(sparsity), None, "magnitude")


#: ``{name: rule}``: a rule ``(weight, pruned count) -> mask`` (True: kept) of a pruning method;
#: a weight's ``WeightCompression.mask_rule`` names the one regrowth re-applies (None: none).
MASK_RULES: Registry[Callable[[torch.Tensor, int], torch.Tensor]] = Registry("mask rule")


@MASK_RULES.register("magnitude")
def magnitude_mask(w: torch.Tensor, pruned: int) -> torch.Tensor:
    """The mask of unstructured magnitude pruning: all but the ``pruned`` smallest-magnitude
    entries of ``w`` (ties by position, a stable ranking: exactly ``pruned`` are masked).

    The one rule of unstructured pruning: pruning applies it, and regrowth during fine-tuning
    (:meth:`~autocompress.compress.WeightCompression.refresh`) re-applies it to the trained
    weights (``MASK_RULES.get("magnitude")``).
    """
    order = w.abs().flatten().argsort(stable=True)[:pruned]
    mask = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
    mask[order] = False
    return mask.view_as(w)


@MASK_RULES.register("2:4")
def n_m_mask(w: torch.Tensor, pruned: int = 0) -> torch.Tensor:
    """The mask of 2:4 magnitude pruning: in each group of 4 consecutive weights of a row of
    ``w`` (flattened to ``(out, d)``), the 2 smallest-magnitude ones masked. ``pruned`` is not
    read: the pattern fixes the count (regrowth passes the mask's own)."""
    return n_m_keep(w.abs().flatten(1), *N_M).view_as(w)


def n_m_keep(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The N:M mask of ``score`` ``(rows, d)``: in each group of ``m`` consecutive columns the
    ``n`` lowest scores masked (ties by position); a last, partial group is kept whole."""
    rows, d = score.shape
    full = d - d % m
    groups = score[:, :full].reshape(rows, -1, m)
    kept = torch.ones(groups.shape, dtype=torch.bool, device=score.device)
    kept.scatter_(-1, groups.argsort(dim=-1, stable=True)[..., :n], False)
    return torch.cat([kept.reshape(rows, full),
                      torch.ones(rows, d - full, dtype=torch.bool, device=score.device)], 1)


def lowest_per_row(score: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The mask that prunes the ``counts[i]`` lowest scores of each row ``i`` of ``score``
    (ties by position)."""
    rank = score.argsort(dim=1, stable=True).argsort(dim=1)
    return rank >= counts.to(rank.device).unsqueeze(1)


def spread(total_fraction: float, rows: int, per_row: int) -> torch.Tensor:
    """How many of ``per_row`` entries each of ``rows`` loses to prune ``round(fraction *
    rows * per_row)`` in all: the differences of the rounded running totals (equal where
    ``fraction * per_row`` is whole)."""
    running = torch.round(torch.arange(rows + 1, dtype=torch.float64) * per_row * total_fraction)
    return running.diff().long()


@MASK_PRUNERS.register("magnitude")
def _magnitude(w: torch.Tensor, target: MaskTarget, stats: InputStats | None
               ) -> tuple[torch.Tensor, None]:
    if target.n_m is not None:
        return n_m_keep(w.abs(), *target.n_m), None
    return magnitude_mask(w, round(target.sparsity * w.numel())), None


@MASK_PRUNERS.register("wanda")
def _wanda(w: torch.Tensor, target: MaskTarget, stats: InputStats | None
           ) -> tuple[torch.Tensor, None]:
    """Wanda's mask: scores ``|w_ij| * ||X_j||``, compared within each row (or N:M group)."""
    assert stats is not None
    score = w.abs() * stats.norms.to(w.dtype).unsqueeze(0)
    if target.n_m is not None:
        return n_m_keep(score, *target.n_m), None
    return lowest_per_row(score, spread(target.sparsity, *w.shape)), None
