"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): integer weights rounded column by column, each rounding error
compensated on the columns not yet rounded with the inverse Hessian of the layer's calibration
inputs. ``quantizer: gptq``.

Per weight (every leaf of a plan entry: the layer, or each factor of a low-rank one), with
``H = X^T X / rows`` of its inputs (one :func:`~autocompress.compress._calibration.input_stats`
pass over all GPTQ weights, the model as the earlier methods left it), as the reference
implementation (IST-DASLab/gptq ``gptq.py``) does:

- dead inputs (``H_jj = 0``: an input never non-zero on the calibration data): the weight's
  column is zeroed and ``H_jj = 1``;
- dampening: 1% of the mean diagonal added to ``H``;
- the inverse Hessian through Cholesky factors, its upper Cholesky factor driving the updates;
  lazy batch updates of 128 columns;
- act-order with static groups: columns are rounded in order of decreasing ``H_jj``, on scales
  fixed before any rounding (the format's own: ``max|w|`` per output channel, or per output
  channel and group of ``group_size`` consecutive columns), so stored groups stay contiguous.

The stored weight is a fixed point of the format's fake quantization: bake, export and rebuild
re-derive the scales from the weight (``max|w|`` per row or group). GPTQ's updates may move the
largest weight of a row (group) below its top level, and re-deriving would then shrink the
scale and move every level of it. So that weight keeps its top level ``±qmax`` (its rounding
error is compensated like any other: the OBS update holds for any value a column takes), and
the result is written through ``format.fake_quant`` (a no-op, up to float rounding). A sparsity
mask's zeros stay zero: their weights take the value 0 and the error is compensated
(SparseGPT's joint treatment).

Fewer calibration rows than a weight's input width leave ``H`` singular: the dampening still
makes it invertible and GPTQ runs, but it compensates on directions the data never showed; a
warning is logged (the trial log). Leaves the calibration cannot describe (a CP factor's
grouped conv) or never reaches keep round-to-nearest. An empty calibration changes nothing (rebuilding a trial
loads its weights).
"""

from __future__ import annotations

import logging
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from autocompress.compress._calibration import (
    Calibration,
    calibration_problem,
    input_stats,
    inverse_hessian_factor,
)
from autocompress.compress._modules import leaves, weight_compression
from autocompress.compress._plan import LayerPlan
from autocompress.compress.formats import WeightFormat

__all__ = ["BLOCK", "DAMPENING", "gptq_round", "gptq_weight"]

BLOCK = 128  # columns per lazy batch update
DAMPENING = 0.01  # of the mean diagonal of H
DAMP_TRIES = 6  # dampening x10 each time the Cholesky factorization fails

log = logging.getLogger(__name__)


def gptq_round(model: nn.Module, entries: dict[str, LayerPlan], calibration: Calibration) -> None:
    """Moves the weights of the plan ``entries`` (integer ``bits``, ``quantizer: gptq``; their
    formats already set) onto their quantization grid with GPTQ's error compensation (module
    docstring)."""
    if calibration.is_empty:
        return
    params: dict[int, nn.Module] = {}  # one per stored parameter (tied weights once)
    for name in entries:
        for leaf in leaves(model, name):
            if calibration_problem(leaf) is None:
                params.setdefault(id(leaf.parametrizations["weight"].original), leaf)
    targets = list(params.values())
    if not targets:
        return
    stats = input_stats(model, targets, calibration)
    names = {id(m): n for n, m in model.named_modules()}
    short = [f"{names[id(m)]}: {stats[m].rows} rows for {len(stats[m].gram)} inputs"
             for m in targets if stats[m].rows < len(stats[m].gram)]
    if short:
        log.warning("GPTQ: a calibration smaller than the input width of %d weight(s) (%s); "
                    "the dampened Hessian is used, the compensation may overfit the calibration "
                    "data", len(short), "; ".join(short[:3]))
    for leaf in targets:
        if stats[leaf].rows:  # else the forward never reached it: round-to-nearest stays
            _round_leaf(leaf, stats[leaf].gram)
            log.debug("GPTQ %s: %s", names[id(leaf)], weight_compression(leaf).format.name)


@torch.no_grad()
def _round_leaf(leaf: nn.Module, gram: torch.Tensor) -> None:
    """GPTQ on one parametrized weight, written back into its stored parameter."""
    wc = weight_compression(leaf)
    param = cast(torch.Tensor, leaf.parametrizations["weight"].original)
    mask = cast(torch.Tensor, wc.mask)
    keep = None if bool(mask.all()) else mask.flatten(1)
    q = gptq_weight((param * mask).flatten(1), gram, wc.format, keep, wc.group_size)
    param.copy_(wc.format.fake_quant(q.view_as(param)).to(param.dtype))


def _top_of_groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """Where each row's largest ``|w|`` of each group of ``group`` columns is (one per group)."""
    out, d = w.shape
    padded = F.pad(w.abs(), (0, -d % group)).reshape(out, -1, group)
    top = torch.zeros_like(padded, dtype=torch.bool)
    top.scatter_(2, padded.argmax(2, keepdim=True), True)
    return top.reshape(out, -1)[:, :d]


def _levels(w: torch.Tensor, fmt: WeightFormat, keep: torch.Tensor | None,
            group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per weight: its scale (the format's, fixed before any rounding) and the lowest and
    highest code it may take: ``±qmax``; the top level of its row's (group's) largest weight
    for that weight (module docstring); 0 where pruned."""
    qmax = 2 ** (fmt.bits - 1) - 1
    scale = fmt.quantize(w)[1].expand_as(w).reshape(w.shape)
    top = _top_of_groups(w, group)
    pinned = torch.sign(w) * qmax
    lo = torch.where(top, pinned, torch.full_like(w, -qmax))
    hi = torch.where(top, pinned, torch.full_like(w, qmax))
    if keep is not None:
        lo, hi = lo * keep, hi * keep
    return scale, lo, hi


def gptq_weight(w: torch.Tensor, gram: torch.Tensor, fmt: WeightFormat,
                keep: torch.Tensor | None = None, group_size: int | None = None,
                block: int = BLOCK) -> torch.Tensor:
    """GPTQ of one ``(out, d)`` weight: its values on ``fmt``'s grid (module docstring).

    Args:
        w: The weight (masked where ``keep`` is False).
        gram: ``X^T X`` of its inputs (``d x d``; any positive multiple of ``H`` gives the same
            result).
        fmt: Its format (uniform integer levels, per output channel or per group).
        keep: Where the weight is not pruned (None: everywhere).
        group_size: Columns sharing a scale in ``fmt`` (None: the whole row).
        block: Columns per lazy batch update.
    """
    w = w.detach().float().clone()
    h = gram.detach().float().clone()  # float32, as the reference: the dampening conditions it
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    d = w.shape[1]
    perm = torch.argsort(h.diagonal(), descending=True, stable=True)  # act-order
    hinv = inverse_hessian_factor(h[perm][:, perm], DAMPENING, DAMP_TRIES)
    if hinv is None:
        raise ValueError("GPTQ: the calibration inputs' Hessian is not positive definite even "
                         "with dampening")
    # Transposed (one row per input column, contiguous), in act-order.
    wt, scale, lo, hi = (t[:, perm].T.contiguous() for t in (w, *_levels(w, fmt, keep, group_size or d)))
    q = torch.empty_like(wt)
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        w1, err, hinv1 = wt[i1:i2].clone(), torch.empty(i2 - i1, wt.shape[1]), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            q[c] = torch.clamp(torch.round(w1[i] / scale[c]), lo[c], hi[c]) * scale[c]
            err[i] = (w1[i] - q[c]) / hinv1[i, i]
            w1[i:].addr_(hinv1[i, i:], err[i], alpha=-1)
        wt[i2:] -= hinv[i1:i2, i2:].T @ err
    return q.T[:, torch.argsort(perm)]
