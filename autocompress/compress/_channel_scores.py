"""Which channels a calibrated ``structure: channel`` pruner cuts, from the calibration inputs
of the layers that read them (the group's *consumers*: the next conv, BERT's
``attention.output.dense`` for heads, ``output.dense`` for FFN neurons).

- ``wanda``: Wanda's score ``|W_ij| ||X_j||`` (Sun et al. 2023) taken per channel, as
  Wanda-sp and FLAP do (An et al. 2024): a channel's score is the output energy its consumers
  get from it, ``||X_c||^2 ||W_{:,c}||^2`` (``X_c`` the calibration inputs of consumer column
  ``c``, ``W_{:,c}`` the consumer's weights on it; a conv's channel sums its kernel's
  columns), summed over the group's consumers. An attention head scores the mean of its
  channels, as with the magnitude score. A gated FFN's neuron (``act(gate) * up``) and a
  decoder's key/value group (:meth:`ChannelScorer.units`) also add the output energy of their
  own rows (gate and up; q, k and v): ``sum_j W_rj^2 ||X_j||^2``.
- ``sparsegpt``: the channels (or heads) whose removal, with the consumers' remaining weights
  optimally updated, costs the least output error on the calibration inputs, chosen one at a
  time (ZipLM, Kurtic et al. 2023; the Optimal Brain Surgeon of a group of columns ``J``:
  ``err = tr(W_J ([H^-1]_JJ)^-1 W_J^T)``, then ``W`` and ``H^-1`` updated as if ``J`` were
  removed, Frantar & Alistarh 2022), summed over the consumers. The reconstruction that
  follows (:mod:`~autocompress.compress._reconstruct`) refits the consumers on the pruned
  model's real inputs.

Consumers that cannot be calibrated (``calibration_problem``: grouped convs) or never ran add
nothing; a group with none falls back to the group magnitude (the scorer returns None).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from autocompress.compress._calibration import (
    Calibration,
    InputStats,
    calibration_problem,
    input_stats,
    weight_matrix,
)
from autocompress.compress._channel_groups import _Graph
from autocompress.compress._reconstruct import DAMP, consumers

#: Rounds of the greedy choice of ``sparsegpt`` (:func:`_greedy_order`): each round removes the
#: cheapest units at once and updates the consumers, so a wide layer costs this many updates.
GREEDY_ROUNDS = 32


@dataclass
class _Reader:
    """One consumer of a group, as the scores see it.

    Attributes:
        weight: Its weight matrix ``(out, d)``, float64.
        stats: Its input statistics.
        columns: Per output channel of the group's root, the consumer's columns that carry it
            (None where the channels carry different numbers of columns).
        energy: Per output channel of the root, the output energy the consumer gets from it.
    """

    weight: torch.Tensor
    stats: InputStats
    columns: torch.Tensor | None
    energy: torch.Tensor


class ChannelScorer:
    """Activation-aware channel scores (see the module docstring) on ``calibration``, the
    consumers' input statistics gathered in as few passes as their widths allow."""

    def __init__(self, model: nn.Module, calibration: Calibration) -> None:
        self.model = model
        self.calibration = calibration
        self.stats: dict[nn.Module, InputStats] = {}

    def prepare(self, modules: list[nn.Module]) -> None:
        """Gathers, in one pass, the input statistics of those of ``modules`` that can be
        calibrated and have none of their current width."""
        stale = [m for m in dict.fromkeys(modules) if calibration_problem(m) is None and (
            m not in self.stats or self.stats[m].gram.shape[0] != weight_matrix(m).shape[1])]
        if stale:
            self.stats.update(input_stats(self.model, stale, self.calibration))

    def __call__(self, graph: _Graph, group: tp.Group, unit: int = 1, n_cut: int = 0,
                 greedy: bool = False) -> torch.Tensor | None:
        """The score of every output channel of ``group``'s root layer (``group`` holds all
        of them): the lowest are cut; None if no consumer could be calibrated.

        Args:
            graph: The model's dependency graph.
            group: The group of all output channels of its root layer.
            unit: Channels cut together (an attention head's size; 1 for channels).
            n_cut: Units to cut (``greedy`` only).
            greedy: ``sparsegpt``'s choice: the ``n_cut`` units removed one by one at the
                least output error, scored by the step they were removed at (the rest
                ``n_cut``); else ``wanda``'s energies (of a gated FFN's group, plus the output
                energy of its gate and up rows: :meth:`_producer_energy`).
        """
        gated = not greedy and graph.is_gated(group)
        producers = _producers(graph, group) if gated else []
        self.prepare(consumers(graph, group) + [item.dep.target.module for item in producers])
        n = graph.dg.get_out_channels(group[0].dep.target.module)
        readers = [r for r in (self._reader(graph, item, n) for item in group.items) if r is not None]
        if not readers:
            return None
        if greedy and n_cut and all(r.columns is not None for r in readers):
            return _greedy_order(readers, n // unit, n_cut).repeat_interleave(unit)
        energy = torch.stack([r.energy for r in readers]).sum(0)
        for item in producers:
            per_row = self._producer_energy(item.dep.target.module)
            if per_row is not None:
                idxs, roots = torch.tensor(item.idxs), torch.tensor(item.root_idxs)
                energy = energy.index_add(0, roots, per_row[idxs])
        return energy.float()

    def units(self, consumer: nn.Module, columns: torch.Tensor, n_cut: int = 0,
              greedy: bool = False, producers: list[tuple[nn.Module, torch.Tensor]] = ()
              ) -> torch.Tensor | None:
        """The score of every unit of a group cut outside Torch-Pruning (a decoder's
        key/value groups, :mod:`~autocompress.compress._kv_groups`): the lowest are cut; None
        if ``consumer`` could not be calibrated.

        Args:
            consumer: The layer reading the units (o_proj).
            columns: Its input columns per unit ``(units, m)``.
            n_cut: Units to cut (``greedy`` only).
            greedy: ``sparsegpt``'s choice (see :meth:`__call__`); else ``wanda``'s energies,
                to which ``producers`` (layers and their output rows per unit ``(units, r)``)
                add the output energy of their rows (``||W_r||^2`` weighted by their inputs'
                ``||X_j||^2``, Wanda's score summed over the rows).
        """
        self.prepare([consumer, *(layer for layer, _ in producers)])
        stats = self.stats.get(consumer)
        if stats is None or stats.rows == 0:
            return None
        weight = weight_matrix(consumer).double()
        per_column = weight.square().sum(0) * stats.gram.diagonal()
        reader = _Reader(weight, stats, columns, per_column[columns].sum(1))
        if greedy and n_cut:
            return _greedy_order([reader], columns.shape[0], n_cut)
        energy = reader.energy
        for layer, rows in producers:
            per_row = self._producer_energy(layer)
            if per_row is not None:
                energy = energy + per_row[rows].sum(1)
        return energy.float()

    def _producer_energy(self, layer: nn.Module) -> torch.Tensor | None:
        """Per output row of ``layer``: its output energy on the calibration inputs, as Wanda
        weighs it (``sum_j W_rj^2 ||X_j||^2``); None without statistics."""
        found = self.stats.get(layer)
        if found is None or found.rows == 0:
            return None
        return weight_matrix(layer).double().square() @ found.gram.diagonal()

    def _reader(self, graph: _Graph, item: tp.dependency.group.GroupItem, n: int) -> _Reader | None:
        """The consumer of group entry ``item`` (None: the entry is no calibrated consumer)."""
        layer = item.dep.target.module
        stats = self.stats.get(layer)
        if (stats is None or stats.rows == 0 or not graph.dg.is_in_channel_pruning_fn(item.dep.handler)
                or any(r is None for r in item.root_idxs)):
            return None
        weight = weight_matrix(layer).double()
        channels = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
        span = weight.shape[1] // channels  # columns per input channel (a conv's kernel)
        by_root: list[list[int]] = [[] for _ in range(n)]
        for idx, root in zip(item.idxs, item.root_idxs, strict=True):
            by_root[root] += range(int(idx) * span, (int(idx) + 1) * span)
        energy_per_column = weight.square().sum(0) * stats.gram.diagonal()
        energy = torch.stack([energy_per_column[cols].sum() for cols in by_root])
        sizes = {len(cols) for cols in by_root}
        columns = torch.tensor(by_root) if len(sizes) == 1 and 0 not in sizes else None
        return _Reader(weight, stats, columns, energy)


def _producers(graph: _Graph, group: tp.Group) -> list[tp.dependency.group.GroupItem]:
    """The entries of ``group`` that cut the output rows of a calibratable linear layer, with
    every index mapped to the root's."""
    return [item for item in group.items if isinstance(item.dep.target.module, nn.Linear)
            and graph.dg.is_out_channel_pruning_fn(item.dep.handler)
            and calibration_problem(item.dep.target.module) is None
            and not any(r is None for r in item.root_idxs)]


def _inverse_hessian(stats: InputStats) -> torch.Tensor:
    """``(H + lambda I)^-1``, ``H = X^T X`` (summed over the calibration rows, so that the
    errors of consumers with different rows per sample add up) damped by :data:`DAMP` of its
    mean diagonal."""
    h = stats.gram.clone()
    h.diagonal().add_(DAMP * h.diagonal().mean().clamp_min(1e-12))
    return torch.cholesky_inverse(torch.linalg.cholesky(h))


def _costs(w: torch.Tensor, hinv: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """The OBS error ``tr(W_J ([H^-1]_JJ)^-1 W_J^T)`` of removing each row of columns ``j``
    (``(units, m)``)."""
    if j.shape[1] == 1:  # single columns: ||W_j||^2 / [H^-1]_jj
        return w[:, j[:, 0]].square().sum(0) / hinv.diagonal()[j[:, 0]]
    block = hinv[j[:, :, None], j[:, None, :]]  # (units, m, m)
    wj = w[:, j].permute(1, 2, 0)  # (units, m, out)
    return (wj * torch.linalg.solve(block, wj)).sum((1, 2))


def _greedy_order(readers: list[_Reader], units: int, n_cut: int) -> torch.Tensor:
    """Per unit: the round at which the structured OBS removed it, ``n_cut`` if kept (see the
    module docstring). At most :data:`GREEDY_ROUNDS` rounds, each removing the cheapest
    units (one at a time while fewer than that many are left to cut)."""
    weights = [r.weight.clone() for r in readers]
    hinvs = [_inverse_hessian(r.stats) for r in readers]
    columns = [r.columns.view(units, -1) for r in readers if r.columns is not None]
    alive = torch.ones(units, dtype=torch.bool)
    order = torch.full((units,), float(n_cut))
    done = 0
    for step in range(min(n_cut, GREEDY_ROUNDS)):
        take = math.ceil((n_cut - done) / (min(n_cut, GREEDY_ROUNDS) - step))
        left = alive.nonzero().flatten()
        cost = torch.zeros(len(left), dtype=torch.float64)
        for w, hinv, cols in zip(weights, hinvs, columns, strict=True):
            cost += _costs(w, hinv, cols[left])
        best = left[cost.nan_to_num(math.inf).argsort()[:take]]
        for w, hinv, cols in zip(weights, hinvs, columns, strict=True):
            j = cols[best].flatten()
            shift = torch.linalg.solve(hinv[j][:, j], hinv[j])  # ([H^-1]_JJ)^-1 [H^-1]_J:
            w -= w[:, j] @ shift
            hinv -= hinv[:, j] @ shift
        alive[best] = False
        order[best] = float(step)
        done += take
    return order
