"""Reconstruction after structured pruning (``structure: channel`` with ``pruner: sparsegpt``):
the least-squares refit of the layers that read the channels cut. Which channels are cut is
:mod:`~autocompress.compress._channel_scores`'s job.

After the cut, every consumer (a Linear or conv whose input width shrank: BERT's
``attention.output.dense`` after head pruning, ``output.dense`` after FFN pruning, the next
conv of a CNN, the head after a flatten) is refit so that its outputs on the calibration data
match those of the model before the cut (FLAP's bias compensation, An et al. 2024; ZipLM's and
"Optimal Brain Compression"'s layer-wise reconstruction, Kurtic et al. 2023, Frantar et al.
2022): ``min ||Y_pre - [X_post 1] [W'; b']^T||^2 + lambda ||[W' b'] - [W b]||^2``, ``Y_pre``
the consumer's outputs in a copy of the model taken before the cut (the rows it still has),
``X_post`` its inputs in the pruned model, ``lambda`` a damping (:data:`REFIT_DAMP` of the
Gram's mean diagonal) towards the plain cut. Consumers are refit one after the other in the
model's definition order, each on the inputs left by the refits before it: the uncut model's
outputs come from one pass (up to :data:`CACHE_BYTES`), and each refit's pass over the pruned
model stops at its consumer. No channel index mapping is needed: the refit only compares
outputs, whatever else changed upstream.

Without calibration data (:meth:`Calibration.empty`) nothing is refit: the logged weights
are loaded afterwards.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch_pruning as tp
from torch import nn

from autocompress._inputs import run
from autocompress.compress._calibration import (
    Calibration,
    calibration_problem,
    input_rows,
    weight_matrix,
)
from autocompress.compress._channel_groups import _PRUNABLE, _Graph

#: Damping of the inputs' Gram matrix in the choice of ``sparsegpt``'s channels, relative to
#: its mean diagonal (GPTQ's and SparseGPT's ``percdamp``).
DAMP = 0.01
#: Damping of the refit's normal equations, relative to the same mean diagonal: towards the
#: plain cut. Stronger than :data:`DAMP`: the refit fits every output on a few hundred samples
#: (all-MiniLM-L6-v2, 30% of heads and FFN neurons, 256 samples: fidelity 0.926 at 0.01,
#: 0.930 at 0.1, 0.922 at 0.3).
REFIT_DAMP = 0.1
#: Bytes of the model's outputs before the cut kept in memory for the refits (one pass of
#: the uncut model); consumers past it rerun the uncut model beside their own refit.
CACHE_BYTES = 256 << 20


@dataclass
class Cut:
    """What cutting one group did.

    Attributes:
        outputs: The conv/linear layers whose output channels the group cuts.
        removed: The output channels each of them lost (indices before the cut).
        consumers: The conv/linear layers whose input channels the group cut.
    """

    outputs: set[nn.Module] = field(default_factory=set)
    removed: dict[nn.Module, list[int]] = field(default_factory=dict)
    consumers: list[nn.Module] = field(default_factory=list)


def consumers(graph: _Graph, group: tp.Group) -> list[nn.Module]:
    """The conv/linear layers whose input channels ``group`` cuts, in the group's order."""
    found = [dep.target.module for dep, _ in group if isinstance(dep.target.module, _PRUNABLE)
             and graph.dg.is_in_channel_pruning_fn(dep.handler)]
    return list(dict.fromkeys(found))


def removed_outputs(graph: _Graph, group: tp.Group) -> dict[nn.Module, list[int]]:
    """The output channels ``group`` (a group of channels to cut) removes, per conv/linear."""
    out: dict[nn.Module, list[int]] = {}
    for dep, idxs in group:
        if isinstance(dep.target.module, _PRUNABLE) and graph.dg.is_out_channel_pruning_fn(dep.handler):
            out.setdefault(dep.target.module, []).extend(int(i) for i in idxs)
    return out


class Reconstruction:
    """Refits the consumers of the groups cut (see the module docstring) on
    ``calibration``, against a copy of ``model`` taken now, before any cut."""

    def __init__(self, model: nn.Module, calibration: Calibration) -> None:
        self.original = copy.deepcopy(model)
        self.calibration = calibration
        self.names = {m: n for n, m in model.named_modules()}
        self.layers: set[str] = set()
        self.removed: dict[str, list[int]] = {}

    def add(self, cut: Cut, refit: bool = True) -> None:
        """Records a cut: its layers lost these outputs (every cut must be recorded: a
        consumer may lose outputs to another entry's cut), and, with ``refit``, its consumers
        are to be refit."""
        if refit:
            self.layers |= {self.names[m] for m in cut.consumers if calibration_problem(m) is None}
        for module, idxs in cut.removed.items():
            self.removed.setdefault(self.names[module], []).extend(idxs)

    @torch.no_grad()
    def run(self, model: nn.Module) -> None:
        """Refits every recorded consumer of ``model`` (the pruned model), in definition order."""
        was_training = model.training
        model.eval()
        self.original.eval()
        try:
            order = [(n, m) for n, m in model.named_modules() if n in self.layers]
            cached = self._targets([n for n, _ in order])
            for name, layer in order:
                self._refit(model, name, layer, cached.get(name))
        finally:
            model.train(was_training)

    def _kept(self, name: str) -> list[int]:
        """The outputs of consumer ``name`` that the cuts left (indices before the cut)."""
        removed = set(self.removed.get(name, ()))
        rows = weight_matrix(self.original.get_submodule(name)).shape[0]
        return [i for i in range(rows) if i not in removed]

    def _targets(self, names: list[str]) -> dict[str, dict[int, torch.Tensor]]:
        """The outputs (kept rows, float32) of consumers ``names`` in the model before the
        cut, per calibration batch, from one pass, while they fit :data:`CACHE_BYTES`; the
        others are recomputed beside each refit."""
        found: dict[str, dict[int, torch.Tensor]] = {n: {} for n in names}
        used, batch = [0], [0]

        def keep(name: str, kept: list[int]) -> Any:
            def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
                if name in found and batch[0] not in found[name]:  # its first call only
                    y = _output_rows(module, out)[:, kept].float()
                    used[0] += y.numel() * y.element_size()
                    if used[0] > CACHE_BYTES:
                        found.pop(name)
                    else:
                        found[name][batch[0]] = y
            return hook

        handles = [self.original.get_submodule(n).register_forward_hook(keep(n, self._kept(n)))
                   for n in names]
        try:
            for batch[0], inputs in enumerate(self.calibration.batches):
                run(self.original, inputs)
        finally:
            for h in handles:
                h.remove()
        return found

    def _refit(self, model: nn.Module, name: str, layer: nn.Module,
               cached: dict[int, torch.Tensor] | None) -> None:
        """Refits one consumer ``layer`` (named ``name``) of ``model`` by damped least squares
        against its outputs before the cut (``cached`` per batch, or recomputed)."""
        kept = self._kept(name)
        bias = getattr(layer, "bias", None)
        w = weight_matrix(layer).double()
        d = w.shape[1] + (bias is not None)
        gram = torch.zeros(d, d, dtype=torch.float64)
        cross = torch.zeros(d, len(kept), dtype=torch.float64)
        before = self.original.get_submodule(name)
        for x, y in _paired(self.original, before, model, layer, self.calibration, cached):
            rows = input_rows(layer, x).float()
            if bias is not None:
                rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
            # per batch in float32 (a batch's sums are short), accumulated in float64
            gram += (rows.T @ rows).double()
            target = y if cached is not None else _output_rows(before, y)[:, kept].float()
            cross += (rows.T @ target).double()
        if not gram.any():
            return  # never ran on the calibration data: left as cut
        start = w.T if bias is None else torch.cat([w.T, bias.detach().double()[None]], dim=0)
        damp = REFIT_DAMP * gram.diagonal().mean()
        eye = torch.eye(d, dtype=torch.float64)
        solved = torch.linalg.solve(gram + damp * eye, cross + damp * start)
        weight = cast(torch.Tensor, layer.weight)
        weight.copy_(solved[:w.shape[1]].T.reshape(weight.shape))
        if bias is not None:
            bias.copy_(solved[-1])


class _Stop(Exception):
    """Ends a forward pass once the layer being refit has run."""


def _paired(before_model: nn.Module, before: nn.Module, model: nn.Module, layer: nn.Module,
            calibration: Calibration, cached: dict[int, torch.Tensor] | None
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per calibration batch: ``layer``'s input in ``model`` and ``before``'s output in
    ``before_model`` (their first calls; each forward stopped there), or its ``cached``
    output rows (then ``before_model`` does not run)."""
    got: dict[str, torch.Tensor] = {}

    def output(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        got["y"] = out
        raise _Stop

    def inputs(module: nn.Module, args: Any) -> None:
        got["x"] = args[0]
        raise _Stop

    handles = [layer.register_forward_pre_hook(inputs)]
    if cached is None:
        handles.append(before.register_forward_hook(output))
    try:
        for i, batch in enumerate(calibration.batches):
            got.clear()
            if cached is not None and i in cached:
                got["y"] = cached[i]
            for m in (before_model, model) if cached is None else (model,):
                try:
                    run(m, batch)
                except _Stop:
                    pass
            if len(got) == 2:
                yield got["x"], got["y"]
    finally:
        for h in handles:
            h.remove()


def _output_rows(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """``layer``'s output ``y`` as rows ``(n, out)``: one per token (Linear) or output position
    (conv, channels first), in the order of :func:`input_rows`."""
    if isinstance(layer, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.movedim(1, -1).reshape(-1, y.shape[1])
