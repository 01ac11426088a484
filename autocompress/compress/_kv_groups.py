"""The attention of decoder LMs (Hugging Face Llama, Qwen2, Mistral, ...: ``q_proj``,
``k_proj``, ``v_proj``, ``o_proj`` and ``head_dim`` on one block) as units of structured
pruning, cut here rather than through Torch-Pruning (whose group search grows without end
through these blocks' rotary slices).

The unit is a *key/value group*: one key head, one value head, the ``num_attention_heads //
num_key_value_heads`` query heads that read them (consecutive in ``q_proj``, as
``repeat_kv`` lays them out) and the matching input columns of ``o_proj``. Without
grouped-query attention (as many key/value heads as query heads) a group is a single head.
The hidden size (``o_proj``'s outputs, the projections' inputs) is never cut, so RMSNorm,
rotary embeddings and tied embeddings are untouched; the block's head counts are updated on
the block alone (the shared config is left as it is: layers may differ), and
``num_key_value_groups`` stays what it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from autocompress.compress._channel_groups import HEAD_COUNT_ATTRS
from autocompress.compress._modules import leaves
from autocompress.compress._plan import PlanError
from autocompress.compress._reconstruct import Cut

QKV = ("q_proj", "k_proj", "v_proj")


@dataclass
class KVGroups:
    """A decoder attention block, as its key/value groups.

    Attributes:
        name: The block's module name.
        block: The block.
        head_dim: Channels per head.
        groups: Key/value heads (groups).
        per_group: Query heads per group.
    """

    name: str
    block: nn.Module
    head_dim: int
    groups: int
    per_group: int

    @classmethod
    def of(cls, model: nn.Module, layer: str) -> KVGroups | None:
        """The block whose ``q_proj``/``k_proj``/``v_proj`` is ``layer`` (None: ``layer`` is
        no such projection).

        Raises:
            PlanError: The projections' widths are not whole heads of ``head_dim``.
        """
        prefix, _, leaf = layer.rpartition(".")
        if leaf not in QKV:
            return None
        block = model.get_submodule(prefix)
        head_dim = getattr(block, "head_dim", None)
        if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0 or not all(
                isinstance(getattr(block, p, None), nn.Module) for p in (*QKV, "o_proj")):
            return None
        q, k, v = (_width(block, p, -1) for p in QKV)
        o = _width(block, "o_proj", 0)
        if q % head_dim or k % head_dim or k != v or o != q or not k or (q // k) * k != q:
            raise PlanError(f"its attention block {prefix!r} has q/k/v/o widths {q}/{k}/{v}/{o}, "
                            f"not whole key/value groups of heads of {head_dim}")
        return cls(prefix, block, head_dim, k // head_dim, q // k)

    def problem(self, layer: str) -> str | None:
        """Why plan entry ``layer`` (one of the block's projections) cannot carry the ratio of
        the block's groups: ``q_proj`` of grouped-query attention (its heads come in groups)."""
        if self.per_group == 1 or not layer.endswith(".q_proj"):
            return None
        return (f"grouped-query attention ({self.per_group} query heads per key/value head in "
                f"{self.name!r}): prune whole key/value groups: put the knob on "
                f"'{self.name}.k_proj' or '{self.name}.v_proj' (its sparsity is the fraction of "
                "key/value groups removed, with their query heads and o_proj inputs)")

    def n_cut(self, ratio: float) -> int:
        """Groups removed at ``ratio``: ``round(ratio * groups)``, at least one kept."""
        return min(round(ratio * self.groups), self.groups - 1)

    def layers(self) -> tuple[list[nn.Module], nn.Module]:
        """The layers whose rows the groups hold (q, k and v: their last low-rank factor) and
        the one whose columns they hold (o_proj: its first factor)."""
        return ([leaves(self.block, p)[-1] for p in QKV], leaves(self.block, "o_proj")[0])

    def rows(self, groups: list[int]) -> list[list[int]]:
        """The rows of q, k and v that ``groups`` hold (q's are also o_proj's columns)."""
        q_size, kv_size = self.per_group * self.head_dim, self.head_dim
        q = [g * q_size + i for g in groups for i in range(q_size)]
        kv = [g * kv_size + i for g in groups for i in range(kv_size)]
        return [q, kv, kv]

    def columns(self) -> torch.Tensor:
        """``o_proj``'s input columns per group ``(groups, per_group * head_dim)``."""
        return torch.arange(self.groups * self.per_group * self.head_dim).view(self.groups, -1)

    def magnitude(self) -> torch.Tensor:
        """Per group: the squared L2 norm of its rows of q, k, v and its columns of o_proj."""
        projections, o = self.layers()
        score = torch.zeros(self.groups, dtype=torch.float64)
        for layer, width in zip(projections, (self.per_group, 1, 1), strict=True):
            rows = layer.weight.detach().double().square().sum(1)
            if layer.bias is not None:
                rows = rows + layer.bias.detach().double().square()
            score += rows.view(self.groups, width * self.head_dim).sum(1)
        return score + o.weight.detach().double().square().sum(0).view(self.groups, -1).sum(1)

    def cut(self, groups: list[int]) -> Cut:
        """Removes ``groups`` (indices) from the block and updates its head counts.

        Returns:
            What was cut: q, k and v lost these outputs, o_proj (the consumer) its inputs.
        """
        projections, o = self.layers()
        done = Cut(set(projections), consumers=[o])
        if not groups:
            return done
        rows = self.rows(sorted(groups))
        done.removed = dict(zip(projections, rows, strict=True))
        for layer, idxs in zip(projections, rows, strict=True):
            tp.pruner.function.prune_linear_out_channels(layer, idxs)
        tp.pruner.function.prune_linear_in_channels(o, rows[0])
        self.groups -= len(groups)
        for attr in HEAD_COUNT_ATTRS:
            if isinstance(getattr(self.block, attr, None), int):
                setattr(self.block, attr, self.groups * self.per_group)
        for attr in ("num_key_value_heads", "num_kv_heads"):
            if isinstance(getattr(self.block, attr, None), int):
                setattr(self.block, attr, self.groups)
        return done


def _width(block: nn.Module, proj: str, end: int) -> int:
    """Outputs (``end=-1``: of the last factor) or inputs (``end=0``: of the first) of ``proj``."""
    layer = leaves(block, proj)[end]
    if not isinstance(layer, nn.Linear):
        return -1
    return layer.out_features if end == -1 else layer.in_features


def kv_groups(model: nn.Module, layer: str) -> tuple[KVGroups | None, str | None]:
    """The decoder attention block of projection ``layer`` (None: no such block) and why
    ``layer`` cannot carry its ratio (None: it can)."""
    try:
        found = KVGroups.of(model, layer)
    except PlanError as e:
        return None, str(e)
    return found, None if found is None else found.problem(layer)


def check_groups(model: nn.Module, layer: str) -> KVGroups | None:
    """:func:`kv_groups`, raising its problem.

    Raises:
        PlanError: ``layer`` is a projection that cannot carry its block's ratio.
    """
    found, problem = kv_groups(model, layer)
    if problem is not None:
        raise PlanError(problem)
    return found
