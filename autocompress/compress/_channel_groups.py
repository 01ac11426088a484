"""Channel groups for structured pruning (:mod:`autocompress.compress.prune`): Torch-Pruning's
dependency graph of a model, the groups of coupled layers it builds (bounded in time), their
importance, what cutting them would break, and attention heads as units of a group.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from autocompress._inputs import run, take
from autocompress.compress._plan import PlanError

# Attributes that hold the head count / head size of an attention block, by library:
# Hugging Face BERT family, nn.MultiheadAttention/timm/Llama, DistilBERT, GPT-2/nanoGPT.
HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head")
HEAD_SIZE_ATTRS = ("attention_head_size", "head_dim", "dim_per_head", "head_size")
# Autograd ops (lowercase substrings of their names) that make a group an attention group:
# PyTorch's fused attention kernels, and the batched matmuls and softmax of eager attention.
_ATTENTION_OPS = ("scaleddotproduct", "attention", "bmm", "softmax")
_PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)
# Bound of the coupling analysis per group (Torch-Pruning's group search has none).
GROUP_SECONDS = 5.0


class _Graph:
    """Torch-Pruning's dependency graph of a model, traced once, with what this method asks of
    it; the model's train/eval mode and ``requires_grad`` flags are left as they were."""

    def __init__(self, model: nn.Module, example_inputs: Any) -> None:
        self.model = model
        # One sample is enough to trace, and cheaper.
        self.example_inputs = example_inputs = take(example_inputs, 1)
        self.names = {m: n for n, m in model.named_modules()}
        self.shapes: list[tuple[int, ...]] = []

        def forward(m: nn.Module, inputs: Any) -> list[torch.Tensor]:
            # Our own forward_fn: Torch-Pruning's default tries ``model(*x)`` before
            # ``model(x)``, which unpacks a single tensor along its batch dimension.
            outputs = _tensors(run(m, inputs))
            self.shapes = [tuple(t.shape) for t in outputs]
            return outputs

        with _traceable(model):
            self.dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_inputs, forward_fn=forward, verbose=False)
        self._importance = tp.importance.GroupMagnitudeImportance(p=2)
        self._components: dict[tuple[Any, Any], _Component] = {}
        # Torch-Pruning's graph holds a module's parameter, not the module, where the module
        # is not one it knows (Llama's RMSNorm: ``weight * x``).
        self.owners = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}

    def _root(self, layer: nn.Module) -> tuple[Any, Any]:
        """The graph node of ``layer`` and the pruning function that cuts its outputs."""
        pruner = self.dg.get_pruner_of_module(layer)
        if layer not in self.dg.module2node or pruner is None:
            raise ValueError(f"no node for this {type(layer).__name__} in the traced graph")
        fn = pruner.prune_out_channels
        if (isinstance(layer, tp.ops.TORCH_CONV) and layer.groups == layer.out_channels
                and layer.out_channels > 1):  # as Torch-Pruning's get_pruning_group does
            fn = tp.pruner.function.prune_depthwise_conv_out_channels
        return self.dg.module2node[layer], fn

    def group(self, layer: nn.Module, idxs: list[int] | None = None) -> tp.Group:
        """The group removing output channels ``idxs`` (default: all) of ``layer``.

        Raises:
            _OverBudget: Torch-Pruning's search for the group went past
                :data:`GROUP_SECONDS` or a size many times that of the layer's component
                (it can loop through slices and concatenations, growing without end).
        """
        self._root(layer)
        n_out = self.dg.get_out_channels(layer)
        idxs = list(range(n_out)) if idxs is None else idxs
        component = self.component(layer)
        items = 8 * len(component.pairs) + 64
        # A channel may become many through a flatten (a conv's channel: H x W inputs of the
        # next linear): the index bound scales with the widest layer of the component.
        with _bounded(items, items * max(len(idxs), component.width, 1), GROUP_SECONDS):
            return self.dg.get_pruning_group(layer, self.dg.get_pruner_of_module(layer)
                                             .prune_out_channels, idxs=idxs)

    def component(self, layer: nn.Module) -> _Component:
        """The layers ``layer``'s output channels are coupled to, index mappings ignored (a
        superset of its group), from one walk of the graph; cached, and shared by every layer
        of the component."""
        node, fn = self._root(layer)
        found = self._components.get((node, fn))
        if found is not None:
            return found
        pairs, todo = {(node, fn)}, [(node, fn)]
        while todo:
            node, fn = todo.pop()
            for dep in node.dependencies:
                if dep.is_triggered_by(fn) and (dep.target, dep.handler) not in pairs:
                    pairs.add((dep.target, dep.handler))
                    todo.append((dep.target, dep.handler))
        targets = list(dict.fromkeys(n.module for n, _ in pairs))
        outputs = {n.module for n, f in pairs if isinstance(n.module, _PRUNABLE)
                   and self.dg.is_out_channel_pruning_fn(f)}
        width = max((self.side(n.module, f) or 0 for n, f in pairs), default=0)
        found = _Component(pairs, outputs, self._coupling_problem(targets), width)
        for pair in pairs:  # coupling is symmetric: every pair of it has this component
            self._components.setdefault(pair, found)
        return found

    def importance(self, group: tp.Group) -> torch.Tensor:
        """Group L2 norm of every channel of ``group``'s root layer."""
        return self._importance(group)

    def out_cut(self, group: tp.Group) -> set[nn.Module]:
        """The conv/linear layers whose output channels ``group`` removes."""
        return {dep.target.module for dep, _ in group if isinstance(dep.target.module, _PRUNABLE)
                and self.dg.is_out_channel_pruning_fn(dep.handler)}

    def problem(self, group: tp.Group) -> str | None:
        """Why ``group`` must not be cut (it reaches the output, an embedding or a LayerNorm)."""
        for dep, idxs in group:
            n = self.channels(dep)
            if n is not None and idxs and max(idxs) >= n:
                return (f"Torch-Pruning maps its channels past the {n} channels of "
                        f"{self.names.get(dep.target.module, '?')!r} (a reshape or slice it "
                        "cannot follow)")
        return self._coupling_problem(list(dict.fromkeys(dep.target.module for dep, _ in group)))

    def _coupling_problem(self, targets: list[Any]) -> str | None:
        """Why channels coupled to ``targets`` (modules, ops and parameters of the graph) must
        not be cut: they reach the output, an embedding or a norm of the residual stream."""
        coupled = []
        modules = [self.owners.get(id(m), m) for m in targets]
        for test in (_is_norm, lambda m: isinstance(m, nn.Embedding)):
            found = sorted({(self.names.get(m, "?"), type(m).__name__) for m in modules if test(m)})
            if found:
                more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
                coupled.append(f"the {found[0][1]} {found[0][0]!r}{more}")
        residual = bool(coupled)
        if any(isinstance(m, tp.ops._OutputOp) for m in targets):
            coupled.append("the model output")
        if not coupled:
            return None
        reason = f"its channels are coupled to {_join(coupled)}"
        if residual:
            reason += (" (the hidden size of a transformer's residual stream; cut heads or FFN "
                       "neurons instead)")
        return reason

    def channels(self, dep: tp.Dependency) -> int | None:
        """How many channels the layer ``dep`` cuts has on the side it cuts (None: no layer)."""
        return self.side(dep.target.module, dep.handler)

    def side(self, module: Any, fn: Any) -> int | None:
        """How many channels ``module`` has on the side pruning function ``fn`` cuts (None:
        not a layer, or a side without a count)."""
        if module not in self.names or self.dg.get_pruner_of_module(module) is None:
            return None
        if self.dg.is_out_channel_pruning_fn(fn):
            return self.dg.get_out_channels(module)
        return self.dg.get_in_channels(module) if self.dg.is_in_channel_pruning_fn(fn) else None

    def is_attention(self, group: tp.Group) -> bool:
        """Whether ``group`` runs through an attention product (its channels are heads)."""
        ops = (str(getattr(dep.target.module, "_grad_fn", "")).lower() for dep, _ in group)
        return any(a in op for op in ops for a in _ATTENTION_OPS)

    def is_gated(self, group: tp.Group) -> bool:
        """Whether ``group``'s channels are multiplied together (a gated FFN: ``act(gate) *
        up``) and not through attention."""
        ops = [str(getattr(dep.target.module, "_grad_fn", "")).lower() for dep, _ in group]
        return any("mulbackward" in op for op in ops) and not self.is_attention(group)

    def check(self, what: str) -> None:
        """Raises PlanError unless the pruned model runs and gives outputs of the traced shapes."""
        was_training = self.model.training
        try:
            self.model.eval()
            with torch.no_grad():
                shapes = [tuple(t.shape) for t in _tensors(run(self.model, self.example_inputs))]
        except Exception as e:
            raise PlanError(f"pruning channels of {what} broke the model's forward "
                            f"({type(e).__name__}: {e})") from None
        finally:
            self.model.train(was_training)
        if shapes != self.shapes:
            raise PlanError(f"pruning channels of {what} changed the output shapes from "
                            f"{self.shapes} to {shapes}")


@dataclass
class _Heads:
    """The attention block whose heads a q/k/v group cuts.

    Attributes:
        module: The block (e.g. a ``BertSelfAttention``).
        name: Its module name.
        count: Its head count.
        size: Channels per head.
    """

    module: nn.Module
    name: str
    count: int
    size: int

    @staticmethod
    def block(model: nn.Module, name: str) -> tuple[str, nn.Module, int] | None:
        """The nearest ancestor of layer ``name`` with a head count attribute, and the count."""
        parts = name.split(".")
        for i in range(len(parts) - 1, -1, -1):
            prefix = ".".join(parts[:i])
            mod = model.get_submodule(prefix)
            count = _head_count(mod)
            if count is not None:
                return prefix, mod, count
        return None

    @classmethod
    def problem(cls, model: nn.Module, name: str, graph: _Graph, group: tp.Group) -> str | None:
        """Why the heads of ``name``'s attention group cannot be cut (None if they can, or if
        it is not an attention group)."""
        try:
            cls.find(model, name, graph, group)
        except PlanError as e:
            return str(e)
        return None

    @classmethod
    def find(cls, model: nn.Module, name: str, graph: _Graph, group: tp.Group) -> _Heads | None:
        """The heads cut by ``group``, the group of layer ``name``; None if it is no attention
        group.

        Raises:
            PlanError: It is an attention group whose heads cannot be told apart.
        """
        if not graph.is_attention(group):
            return None
        projections = graph.out_cut(group)
        coupled = sorted(graph.names.get(m, "?") for m in projections)
        found = cls.block(model, name)
        if found is None:
            raise PlanError(f"it is coupled to {coupled} through attention, and no module "
                            f"around it has a head count ({', '.join(HEAD_COUNT_ATTRS)})")
        prefix, block, count = found
        if not all(graph.names.get(m, "").startswith(prefix + "." if prefix else "") for m in projections):
            raise PlanError(f"it is coupled through attention to {coupled}, which are not all "
                            f"inside {prefix or 'the model'!r}")
        widths = {graph.dg.get_out_channels(m) for m in projections}
        # The output projection reads heads x size channels, whatever q, k and v hold.
        read = [graph.dg.get_in_channels(dep.target.module) for dep, _ in group
                if isinstance(dep.target.module, _PRUNABLE)
                and graph.dg.is_in_channel_pruning_fn(dep.handler)]
        size = _head_size(block) or (min(read or widths) // count)
        if widths != {count * size}:
            raise PlanError(f"its attention projections {coupled} have widths {sorted(widths)}, "
                            f"not {count} heads x {size} (grouped-query or fused attention is "
                            "not supported)")
        return cls(block, prefix, count, size)

    def cut(self, ratio: float, scores: torch.Tensor) -> list[int]:
        """The channels of the ``round(ratio * count)`` (at most ``count - 1``) heads with the
        smallest mean channel score."""
        n_cut = min(round(ratio * self.count), self.count - 1)
        heads = torch.argsort(scores.view(self.count, self.size).mean(dim=1))[:n_cut]
        return [h * self.size + i for h in sorted(heads.tolist()) for i in range(self.size)]

    def update(self, n_cut: int) -> None:
        """Records that ``n_cut`` heads were removed in the block's attributes."""
        self.count -= n_cut
        for attr in HEAD_COUNT_ATTRS:
            if isinstance(getattr(self.module, attr, None), int):
                setattr(self.module, attr, self.count)
        if isinstance(getattr(self.module, "all_head_size", None), int):
            setattr(self.module, "all_head_size", self.count * self.size)  # not an nn.Module attribute


def _head_count(module: nn.Module) -> int | None:
    for attr in HEAD_COUNT_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _head_size(module: nn.Module) -> int | None:
    for attr in HEAD_SIZE_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


@dataclass
class _Component:
    """What a layer's output channels are coupled to, index mappings ignored (a superset of
    its Torch-Pruning group; the same for every layer in it).

    Attributes:
        pairs: The graph's (node, pruning function) pairs it reaches.
        outputs: The conv/linear layers whose output channels it cuts.
        problem: Why none of them may be cut (:meth:`_Graph._coupling_problem`), or None.
        width: The most channels one of its layers has on the side it cuts.
    """

    pairs: set[tuple[Any, Any]]
    outputs: set[nn.Module]
    problem: str | None
    width: int = 0


class _OverBudget(RuntimeError):
    """The coupling analysis ran past its time or size budget."""


@contextlib.contextmanager
def _bounded(items: int, indices: int, seconds: float) -> Iterator[None]:
    """Bounds Torch-Pruning's group search (which has no bound of its own): it raises
    :class:`_OverBudget` once a group has more than ``items`` entries, ``indices`` channel
    indices in all, or took more than ``seconds``. Torch-Pruning grows a group only through
    ``Group.add_dep``; this counts its calls for the duration (one search at a time)."""
    cls = tp.dependency.group.Group
    add = cls.add_dep
    stop = time.monotonic() + seconds
    seen = [0, 0]

    def add_dep(group: Any, dep: Any, idxs: Any) -> None:
        seen[0] += 1
        seen[1] += len(idxs)
        if seen[0] > items or seen[1] > indices:
            raise _OverBudget(f"its group grew past {items} entries or {indices} channels")
        if time.monotonic() > stop:
            raise _OverBudget(f"building its group took more than {seconds:g} s")
        add(group, dep, idxs)

    cls.add_dep = add_dep  # type: ignore[method-assign]
    try:
        yield
    finally:
        cls.add_dep = add  # type: ignore[method-assign]


def _is_norm(module: Any) -> bool:
    """A LayerNorm or RMSNorm (torch's, or a library's own class of that name): its channels
    are the hidden size of a residual stream."""
    return isinstance(module, nn.LayerNorm | getattr(nn, "RMSNorm", nn.LayerNorm)) or (
        isinstance(module, nn.Module) and type(module).__name__.endswith(("LayerNorm", "RMSNorm")))


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model output (a tensor, a tuple/list, a dict or a ``ModelOutput``)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, tuple | list):
        return [t for o in out for t in _tensors(o)]
    return []


@contextlib.contextmanager
def _traceable(model: nn.Module) -> Iterator[None]:
    """Autograd on and every parameter requiring grad (Torch-Pruning traces through autograd),
    restored afterwards with the model's train/eval mode."""
    was_training = model.training
    frozen = [p for p in model.parameters() if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)
