"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot"): the ``pruner: sparsegpt`` of :data:`~autocompress.compress._sparse.MASK_PRUNERS`.

The reference implementation's ``fasterprune`` (IST-DASLab/sparsegpt, ``sparsegpt.py``), on
CPU in float64: ``H = X^T X`` of the layer's calibration inputs, columns never seen (zero
diagonal) zeroed and their diagonal set to 1, 1% of the mean diagonal added, then the upper
Cholesky factor ``U`` of ``H^-1`` (``U[j, j]`` is ``[H^-1]_jj`` of column ``j`` once the
columns to its left are fixed). Columns go left to right in blocks of 128; each block's mask
prunes the weights of lowest ``w^2 / U_jj^2`` (OBS saliency) among the block's weights, as
updated by the blocks before it (unstructured), or the N of every M with the lowest saliency
when the group's first column is reached (N:M). Each column's pruning error ``(w - q) / U_jj``
is spread over the columns to its right through row ``j`` of ``U``, within the block at once
and onto the later blocks after it (lazy batch updates), which minimizes the layer's output
error ``||W X - W' X||^2`` for the chosen mask, column by column.

The one change: the reference prunes the lowest ``sparsity`` fraction of each block by a
threshold (ties may prune more); here each block prunes its share of exactly
``round(sparsity * numel)`` weights (ties by position), as the other pruners do.
"""

from __future__ import annotations

import torch

from autocompress.compress._calibration import InputStats, inverse_hessian_factor
from autocompress.compress._plan import PlanError
from autocompress.compress._sparse import (
    BLOCK,
    DAMP,
    MASK_PRUNERS,
    MaskTarget,
    lowest_per_row,
    n_m_keep,
)

__all__ = ["sparsegpt"]

DAMP_TRIES = 4  # dampening x10 each time the Cholesky factorization fails


@MASK_PRUNERS.register("sparsegpt")
def sparsegpt(w: torch.Tensor, target: MaskTarget, stats: InputStats | None,
              block: int = BLOCK, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's mask of ``w`` ``(out, d)`` and the updated weight (module docstring).

    Args:
        w: The weight as the ``(out, d)`` matrix that multiplies the layer's input rows.
        target: The sparsity (unstructured) or the N:M pattern.
        stats: The layer's calibration input statistics (its Gram matrix ``X^T X``).
        block: Columns per block.
        damp: Fraction of ``H``'s mean diagonal added to its diagonal.

    Returns:
        ``(kept, new)``: the mask (True: kept) and the weight with the pruned entries zero and
        the kept ones compensated, both ``(out, d)``, ``new`` in ``w``'s dtype.
    """
    assert stats is not None
    out, d = w.shape
    w = w.to(torch.float64).clone()
    h = stats.gram.to(torch.float64).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = inverse_hessian_factor(h, damp, DAMP_TRIES)
    if u is None:
        raise PlanError(f"sparsegpt: the calibration inputs' Hessian cannot be factorized even "
                        f"with {damp * 10 ** (DAMP_TRIES - 1):g} of its mean diagonal added")
    kept = torch.ones(out, d, dtype=torch.bool)
    done = 0  # weights pruned so far (unstructured: each block's share of the total)
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        saliency_scale = u1.diagonal().square().unsqueeze(0)
        if target.n_m is None:
            share = round(target.sparsity * (out * i2)) - done
            done += share
            kept1 = lowest_per_row((w1.square() / saliency_scale).reshape(1, -1),
                                   torch.tensor([share])).view_as(w1)
        else:
            kept1 = torch.ones_like(w1, dtype=torch.bool)
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        for i in range(i2 - i1):
            if target.n_m is not None and i % target.n_m[1] == 0 and i + target.n_m[1] <= i2 - i1:
                j = slice(i, i + target.n_m[1])
                kept1[:, j] = n_m_keep(w1[:, j].square() / saliency_scale[:, j], *target.n_m)
            col = w1[:, i]
            q = col * kept1[:, i]
            err = (col - q) / u1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            q1[:, i], err1[:, i] = q, err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
        kept[:, i1:i2] = kept1
    return kept, w
