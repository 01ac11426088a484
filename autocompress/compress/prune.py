"""Pruning: unstructured magnitude masks and structured channel removal.

``channel``: removes the output channels with the smallest group L2 norm (Torch-Pruning's
``GroupMagnitudeImportance``) and, through Torch-Pruning's dependency graph, the matching
channels of every coupled layer: BatchNorm, residual additions, concatenations and the inputs
of the next conv/linear. Layers coupled by a residual add must lose the same channels, so a
group is cut once, at the ratio of its first layer in the model's definition order (not the
plan's order: plans that compare equal must compress alike).

The plan's ``pruner`` (of that first layer) chooses the channels with calibration data:
``wanda`` by the output energy each channel gives the layers reading it, ``sparsegpt`` by the
least output error after optimally updating them (:mod:`~autocompress.compress._channel_scores`),
then refits those layers by least squares against the model before the cut
(:mod:`~autocompress.compress._reconstruct`). Without calibration data both cut as many
channels by the magnitude score, and nothing is refit.

In a transformer:

- **Attention heads.** The query, key and value projections of one attention block are one
  group (coupled through the attention product), together with the inputs of the attention
  output projection. ``channel`` on any of them removes ``round(sparsity * heads)`` whole heads
  (at most ``heads - 1``), those with the smallest mean group L2 norm: their rows of q, k and
  v and their input columns of the output projection. The block's head count attributes are
  updated (``num_attention_heads`` and ``all_head_size`` on Hugging Face's
  ``BertSelfAttention``; ``num_heads``, ``n_heads`` or ``n_head`` elsewhere). If q, k and v of
  one block are in a plan with different ratios, the first of them in the model sets it.
- **Decoder attention** (Llama, Qwen2, Mistral, ...: ``q_proj``/``k_proj``/``v_proj``/``o_proj``
  and ``head_dim`` on one block; :mod:`~autocompress.compress._kv_groups`, not Torch-Pruning):
  the unit is a key/value group (a key and a value head, the query heads reading them, their
  ``o_proj`` columns; one head without grouped-query attention). ``channel`` on ``k_proj`` or
  ``v_proj`` (also ``q_proj`` without grouped-query attention) removes ``round(sparsity *
  groups)`` of them (at least one stays), scored by magnitude (their rows of q, k, v and
  columns of o_proj), ``wanda`` (the energy o_proj gets from them plus that of their q/k/v
  rows) or ``sparsegpt`` (structured OBS on o_proj, then o_proj refit). Head counts are
  updated on the block alone, so layers may keep different numbers of heads; the shared
  config is left as it is. ``q_proj`` of grouped-query attention is refused (its heads come
  in groups: the refusal says where to put the knob).
- **FFN neurons.** ``channel`` on the FFN's first linear (BERT's ``intermediate.dense``,
  ``nn.TransformerEncoderLayer.linear1``) removes intermediate neurons and the matching inputs
  of the second linear: an ordinary group. A gated FFN's ``gate_proj`` and ``up_proj`` are one
  group (Torch-Pruning couples them through their product) with ``down_proj``'s inputs;
  ``wanda`` adds the energy of their gate and up rows to what ``down_proj`` gets.
- **Refused** (``limits``, before any trial): embeddings (their rows are the vocabulary), and
  every layer whose group reaches the model output, an ``nn.Embedding`` or an ``nn.LayerNorm``
  (the hidden size of a transformer's residual stream: BERT's ``attention.output.dense`` and
  ``output.dense``, ``TransformerEncoderLayer.linear2``), or that Torch-Pruning cannot group
  (e.g. GPT-2's ``Conv1D``); attention groups whose heads cannot be told apart (no head
  count attribute, a fused qkv projection) are refused too. A decoder's residual stream
  (``o_proj``, ``down_proj``: RMSNorm, rotary, the tied embedding) is never cut.
  ``nn.MultiheadAttention`` keeps q/k/v in one parameter and never calls its ``out_proj`` as
  a module, so its heads are not offered.

Inputs may be a tensor, a tuple or a dict of tensors (``autocompress._inputs``); one sample
is traced. After cutting, the model is run once: if it fails or its output shapes changed
(a coupling Torch-Pruning did not see), the plan is refused with a ``PlanError``.

``unstructured`` and ``"2:4"``: a fixed mask over single weights, kept enforced during
fine-tuning through a parametrization (the masked weights stay zero and get no gradient),
chosen by the plan's ``pruner``: ``magnitude`` (data-free), ``wanda`` or ``sparsegpt``
(calibrated; SparseGPT also updates the kept weights). On a low-rank layer every factor is
masked. Regrowth during fine-tuning re-applies the mask's rule (:data:`MASK_RULES`:
:func:`magnitude_mask`, :func:`n_m_mask`; calibrated masks stay fixed)
(:meth:`~autocompress.compress.WeightCompression.refresh`). The pruners, their refusals and
the rules are in :mod:`~autocompress.compress._sparse` and ``_sparsegpt``.

The dependency graph, its groups and attention heads are in
:mod:`~autocompress.compress._channel_groups`.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from autocompress.compress._calibration import Calibration
from autocompress.compress._channel_groups import _Graph, _Heads, _OverBudget
from autocompress.compress._channel_scores import ChannelScorer
from autocompress.compress._kv_groups import KVGroups, check_groups, kv_groups
from autocompress.compress._layers import LayerInfo, Refusal
from autocompress.compress._modules import leaves
from autocompress.compress._plan import Plan, PlanError
from autocompress.compress._reconstruct import (
    Cut,
    Reconstruction,
    consumers,
    removed_outputs,
)
from autocompress.compress._registry import pure, register_method
from autocompress.compress._sparse import (  # noqa: F401  (re-exported: prune.MASK_RULES, ...)
    MASK_PRUNERS,
    MASK_RULES,
    magnitude_mask,
    mask_smallest,
    mask_weights,
    n_m_mask,
    sparse_limits,
)

# Bound of the coupling analysis (Torch-Pruning's group search has none) for all the groups
# ``layers`` builds; per group: ``_channel_groups.GROUP_SECONDS``.
ANALYSIS_SECONDS = 20.0


def _limits(model: nn.Module, example_inputs: Any, layers: list[LayerInfo]) -> dict[str, list[Refusal]]:
    """``structure: channel`` refusals, from one dependency graph of the whole model."""
    out: dict[str, list[Refusal]] = {}

    def refuse(name: str, reason: str) -> None:
        out.setdefault(name, []).append(Refusal("structure", "channel", reason))

    out.update(sparse_limits(model, layers))
    todo = []
    for layer in layers:
        if layer.type == "Embedding":
            refuse(layer.name, "its rows are the vocabulary; its columns are the hidden size "
                               "that every later layer reads")
        elif layer.is_output:
            refuse(layer.name, "it produces the model output (its channels are the outputs)")
        elif layer.used:
            todo.append(layer.name)
    if not todo:
        return out
    try:
        graph = _Graph(model, example_inputs)
    except Exception as e:  # any tracing failure: no layer can be channel-pruned safely
        for name in todo:
            refuse(name, f"Torch-Pruning cannot trace the model ({type(e).__name__}: {e})")
        return out
    # Each layer's coupled layers come from one pass over the graph (``_Graph.component``): a
    # component that reaches the output, an embedding or a norm refuses all its layers at once
    # (the residual stream of a transformer spans every block) without building its exact
    # group, which Torch-Pruning can take hours to do for such a group (Llama/Qwen's rotary
    # slices). The others are built exactly, per layer (Torch-Pruning's index mapping is not
    # always symmetric through reshapes and slices), each within its budget.
    refused: dict[nn.Module, str] = {}
    deadline = time.monotonic() + ANALYSIS_SECONDS
    for name in todo:
        found, problem = kv_groups(model, name)
        if found is not None or problem is not None:  # a decoder's attention: cut here
            if problem is not None:
                refuse(name, problem)
            continue
        leaf = leaves(model, name)[-1]
        if leaf not in refused:
            problem, alike = _problem(model, name, graph, leaf, deadline)
            if problem is None:
                continue
            for module in (leaf, *alike):
                refused.setdefault(module, problem)
        refuse(name, refused[leaf])
    return out


def _problem(model: nn.Module, name: str, graph: _Graph, leaf: nn.Module,
             deadline: float) -> tuple[str | None, set[nn.Module]]:
    """Why the output channels of layer ``name`` (its last leaf ``leaf``) cannot be cut (None
    if they can), within the analysis' ``deadline``, and the other layers refused for the same
    reason: those whose outputs its group (or, without a group, its component) cuts."""
    try:
        component = graph.component(leaf)
    except Exception as e:  # Torch-Pruning raises plain errors for what it cannot group
        return f"Torch-Pruning cannot build its pruning group ({e})", set()
    if component.problem is not None:
        return component.problem, component.outputs
    try:
        if time.monotonic() > deadline:
            raise _OverBudget(f"the analysis of the model used its {ANALYSIS_SECONDS:g} s")
        group = graph.group(leaf)
    except _OverBudget as e:
        return f"Torch-Pruning's coupling analysis did not finish in budget ({e})", component.outputs
    except Exception as e:
        return f"Torch-Pruning cannot build its pruning group ({e})", set()
    problem = graph.problem(group)
    if problem is not None:
        return problem, graph.out_cut(group)
    return _Heads.problem(model, name, graph, group), set()


@register_method("prune", order=20, limits=_limits, calibrated=True)
def _prune(model: nn.Module, plan: Plan, example_inputs: Any, calibration: Calibration) -> None:
    todo = {n: lp for n, lp in plan.active().items() if lp.sparsity > 0}
    channel = {n: lp.sparsity for n, lp in todo.items() if lp.structure == "channel"}
    if channel:
        prune_channels(model, channel, example_inputs, {n: todo[n].pruner for n in channel}, calibration)
    masked = {n: lp for n, lp in todo.items() if lp.structure != "channel"}
    if masked:  # unstructured and N:M masks (compress/_sparse.py)
        mask_weights(model, masked, calibration)


def prune_channels(model: nn.Module, ratios: dict[str, float], example_inputs: Any,
                   pruners: dict[str, str] | None = None,
                   calibration: Calibration | None = None) -> None:
    """Physically removes output channels (or attention heads) of the named layers and the
    matching channels of every layer coupled to them (see the module docstring).

    Args:
        model: Model to prune in place.
        ratios: Fraction of output channels (of heads, for a query/key/value projection) to
            remove, per plan layer name.
        example_inputs: One input batch (a tensor, a tuple or a dict of tensors) for tracing
            the dependency graph.
        pruners: The ``pruner`` of each entry (default ``magnitude``): ``wanda`` scores
            channels by what they carry on ``calibration``, ``sparsegpt`` also refits the
            layers reading them (:mod:`~autocompress.compress._reconstruct`).
        calibration: Data of the calibrated pruners (default, or empty: magnitude scores,
            no refit; the same number of channels is cut).

    Raises:
        PlanError: A layer's channels cannot be removed (coupled to the model output or the
            residual stream, not groupable), or the pruned model no longer runs.
    """
    calibration = Calibration.empty() if calibration is None else calibration
    pruners = {} if calibration.is_empty else {n: p for n, p in (pruners or {}).items()
                                               if p != "magnitude"}
    refit = Reconstruction(model, calibration) if "sparsegpt" in pruners.values() else None
    graph = _Graph(model, example_inputs)
    scorer = ChannelScorer(model, calibration)
    position = {n: i for i, (n, _) in enumerate(model.named_modules())}
    order = sorted(ratios, key=position.__getitem__)
    scorer.prepare([m for name in order if name in pruners for m in _consumers(model, graph, name)])
    done: set[nn.Module] = set()
    for name in order:
        layer = leaves(model, name)[-1]
        if layer in done:
            continue  # its outputs were already cut as part of an earlier layer's group
        try:
            block = check_groups(model, name)
            pruner = pruners.get(name, "magnitude")
            cut = (_cut(model, graph, name, layer, ratios[name], scorer, pruner) if block is None
                   else _cut_groups(block, ratios[name], scorer, pruner))
        except PlanError as e:
            raise PlanError(f"layer {name!r}: its channels cannot be removed: {e}") from None
        except Exception as e:  # Torch-Pruning failing on a graph it mis-traced
            raise PlanError(f"layer {name!r}: Torch-Pruning could not remove its channels "
                            f"({type(e).__name__}: {e})") from None
        done |= cut.outputs
        if refit is not None:
            refit.add(cut, pruners.get(name) == "sparsegpt")
    graph.check(", ".join(order))
    if refit is not None:
        refit.run(model)


def _consumers(model: nn.Module, graph: _Graph, name: str) -> list[nn.Module]:
    """The layers reading the channels plan entry ``name`` would cut (none if its group
    cannot be built: :func:`_cut` says why)."""
    try:
        block = check_groups(model, name)
        if block is not None:
            return [block.layers()[1]]
        return consumers(graph, graph.group(leaves(model, name)[-1]))
    except Exception:  # noqa: BLE001  (reported by _cut, with the layer's name)
        return []


def _cut(model: nn.Module, graph: _Graph, name: str, layer: nn.Module, ratio: float,
         scorer: ChannelScorer, pruner: str = "magnitude") -> Cut:
    """Cuts the channels (or heads) of plan entry ``name`` (its last leaf ``layer``) and of
    its group: those with the smallest group magnitude, or as a calibrated ``pruner`` chooses
    (``scorer``).

    Returns:
        What was cut. Its ``outputs`` are done, even when nothing was cut (the first entry of a
        group in model order decides for the whole group). A layer that merely loses inputs
        (the next conv) still has its own entry to apply.
    """
    group = graph.group(layer)
    problem = graph.problem(group)
    if problem is not None:
        raise PlanError(problem)
    heads = _Heads.find(model, name, graph, group)
    scores = None
    if pruner != "magnitude":
        unit, units = (heads.size, heads.count) if heads else (1, graph.dg.get_out_channels(layer))
        scores = scorer(graph, group, unit, min(round(ratio * units), units - 1), pruner == "sparsegpt")
    if scores is None:
        scores = graph.importance(group)
    idxs = heads.cut(ratio, scores) if heads else _channels(ratio, scores)
    done = Cut(graph.out_cut(group))
    if idxs:
        cut = graph.group(layer, idxs)
        if not graph.dg.check_pruning_group(cut):
            raise PlanError(f"removing {len(idxs)} of {len(scores)} channels would leave a "
                            "coupled layer with none")
        done.removed, done.consumers = removed_outputs(graph, cut), consumers(graph, cut)
        cut.prune()
        if heads:
            heads.update(len(idxs) // heads.size)
    return done


def _cut_groups(block: KVGroups, ratio: float, scorer: ChannelScorer,
                pruner: str = "magnitude") -> Cut:
    """Cuts ``round(ratio * groups)`` key/value groups of a decoder's attention ``block``:
    those with the smallest magnitude, or as a calibrated ``pruner`` chooses (``scorer``)."""
    n_cut = block.n_cut(ratio)
    scores = None
    if pruner != "magnitude" and n_cut:
        projections, o = block.layers()
        everything = block.rows(list(range(block.groups)))
        producers = [(layer, torch.tensor(rows).view(block.groups, -1))
                     for layer, rows in zip(projections, everything, strict=True)]
        greedy = pruner == "sparsegpt"
        scores = scorer.units(o, block.columns(), n_cut, greedy, [] if greedy else producers)
    if scores is None:
        scores = block.magnitude()
    return block.cut(sorted(torch.argsort(scores)[:n_cut].tolist()))


def _channels(ratio: float, scores: torch.Tensor) -> list[int]:
    """The ``round(ratio * n)`` (at most ``n - 1``) channels with the smallest scores."""
    n_cut = min(round(ratio * len(scores)), len(scores) - 1)
    return sorted(torch.argsort(scores)[:n_cut].tolist())


apply = pure("prune")
