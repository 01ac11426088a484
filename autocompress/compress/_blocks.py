"""Depth pruning: whole blocks (residual blocks, transformer layers) dropped from a model.

A *block* is a child of an ``nn.ModuleList`` or ``nn.Sequential`` that the forward runs, that
holds at least one compressible layer and is none itself, and whose output (its first tensor
output, for Hugging Face layers that return tuples) has the shape of its first input: the
residual blocks of a ResNet stage, the layers of a transformer. Blocks are found in the same
hooked forward pass as the layers (:func:`~autocompress.compress.find_layers` with
``blocks=True``) and listed with type ``Block`` (``shape``: its output per sample; ``params``
and ``macs``: those of its layers). A plan drops one with ``drop: true`` on its name.

How a block is dropped (:func:`drop_blocks`, after every method has run):

- a Hugging Face layer list (a ``ModuleList`` whose length a config above it counts in
  ``num_hidden_layers``: BERT's ``encoder.layer``, Llama's and Qwen2's ``model.layers``,
  GPT-2's ``h``): deleted from the list, and the model kept consistent: the config's
  ``num_hidden_layers`` (GPT-2's ``n_layer``) and ``layer_types``, and every ``layer_idx``
  of the remaining layers (the KV cache's index) renumbered;
- a block of an ``nn.Sequential`` called with its input alone: replaced by ``nn.Identity``
  (a residual block then passes its input through);
- anything else is refused (``drop`` in the block's refusals, with the reason).

A plan that drops every block of one list is refused (a model needs at least one). Blocks are
ranked by how little they change their input (:func:`block_importance`, ShortGPT's Block
Influence), which the first trials of a search use to drop the least important first.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from autocompress._inputs import run
from autocompress.compress._plan import Plan, PlanError

__all__ = ["block_candidates", "block_importance", "check_drops", "drop_blocks", "drop_refusal",
           "first_tensor", "plan_after_drops"]


def block_candidates(model: nn.Module, is_layer: Any) -> dict[str, nn.Module]:
    """The children of every ``ModuleList`` and ``Sequential`` that hold a compressible layer
    and are none (``is_layer(module)`` tells a compressible layer), by name."""
    out = {}
    for name, parent in model.named_modules():
        if not isinstance(parent, nn.ModuleList | nn.Sequential):
            continue
        for child_name, child in parent.named_children():
            if not is_layer(child) and any(is_layer(m) for m in child.modules()):
                out[f"{name}.{child_name}" if name else child_name] = child
    return out


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor of a value (a tensor, or a tuple, list or mapping holding tensors)."""
    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, tuple | list) else ()
    return next((t for v in items if (t := first_tensor(v)) is not None), None)


def block_hook(shapes: dict[str, tuple], name: str) -> Any:
    """A forward hook (``with_kwargs=True``) that records ``(input shape, output shape,
    called with one argument)`` of a candidate block's first call."""

    def fn(_mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        x, y = first_tensor((args, kwargs)), first_tensor(out)
        if name not in shapes and x is not None and y is not None:
            shapes[name] = (tuple(x.shape), tuple(y.shape), len(args) == 1 and not kwargs)

    return fn


def _layer_list(model: nn.Module, parent_name: str) -> Any:
    """The config (``num_hidden_layers``) of the nearest module at or above ``parent_name``
    that counts the list below it, or None."""
    parent = model.get_submodule(parent_name)
    path = parent_name.split(".") if parent_name else []
    for i in range(len(path), -1, -1):
        config = getattr(model.get_submodule(".".join(path[:i])), "config", None)
        if getattr(config, "num_hidden_layers", None) == len(parent):
            return config
    return None


def drop_refusal(model: nn.Module, name: str, single_input: bool) -> str | None:
    """Why block ``name`` cannot be dropped (None: it can); ``single_input``: the forward
    calls it with its input alone."""
    parent_name, _, _ = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if isinstance(parent, nn.ModuleList) and _layer_list(model, parent_name) is not None:
        return None
    if isinstance(parent, nn.Sequential):
        return None if single_input else "the Sequential calls it with more than its input"
    return (f"a {type(parent).__name__} whose length no config counts (num_hidden_layers): "
            f"its owner's forward may rely on it")


def _dropped(plan: Plan) -> dict[str, list[int]]:
    """``{list name: [indices of its dropped blocks]}`` of the plan."""
    out: dict[str, list[int]] = {}
    for name, lp in plan.layers.items():
        if getattr(lp, "drop", False):
            parent, _, index = name.rpartition(".")
            out.setdefault(parent, []).append(int(index))
    return out


def check_drops(model: nn.Module, plan: Plan) -> None:
    """Refuses a plan that drops every block of one list.

    Raises:
        PlanError: Naming the list.
    """
    for parent, indices in _dropped(plan).items():
        container = model.get_submodule(parent)
        if len(set(indices)) >= len(container):
            raise PlanError(f"dropping {sorted(f'{parent}.{i}' for i in indices)} would remove "
                            f"every block of {parent!r} ({len(container)}); keep at least one")


def drop_blocks(model: nn.Module, plan: Plan) -> None:
    """Drops, in place, the blocks the plan marks ``drop: true`` (see the module docstring)."""
    check_drops(model, plan)
    for parent_name, indices in _dropped(plan).items():
        container = model.get_submodule(parent_name)
        if isinstance(container, nn.Sequential):
            for i in indices:
                container[i] = nn.Identity()
            continue
        config = _layer_list(model, parent_name)
        kept = [i for i in range(len(container)) if i not in set(indices)]
        new = nn.ModuleList([container[i] for i in kept])
        owner, _, attr = parent_name.rpartition(".")
        setattr(model.get_submodule(owner), attr, new)
        _renumber(new)
        config.num_hidden_layers = len(kept)
        if isinstance(getattr(config, "layer_types", None), list | tuple):
            config.layer_types = [config.layer_types[i] for i in kept]


def plan_after_drops(model: nn.Module, plan: Plan) -> Plan:
    """The plan's entries named as in the model :func:`drop_blocks` leaves (``model``: the
    model before or after it): the drops themselves and the entries inside dropped blocks
    left out, the later blocks of a Hugging Face layer list renumbered (what rebuilding a
    trial looks its layers up by)."""
    dropped = _dropped(plan)
    out = {}
    for name, lp in plan.layers.items():
        new: str | None = name
        for parent, indices in dropped.items():
            if not name.startswith(f"{parent}."):
                continue
            index, _, rest = name[len(parent) + 1:].partition(".")
            if int(index) in indices:
                new = None
            elif isinstance(model.get_submodule(parent), nn.ModuleList):
                shifted = int(index) - sum(i < int(index) for i in set(indices))
                new = f"{parent}.{shifted}" + (f".{rest}" if rest else "")
        if new is not None:
            out[new] = lp
    return Plan(out)


def _renumber(layers: nn.ModuleList) -> None:
    """Sets every integer ``layer_idx`` under each layer to the layer's new index (the KV
    cache's slot of Hugging Face attention modules)."""
    for i, layer in enumerate(layers):
        for mod in layer.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = i


def _rows(t: torch.Tensor) -> torch.Tensor:
    """Hidden states ``(batch, tokens, width)`` as one row per token; anything else (a conv's
    feature maps) as one row per sample."""
    return t.float().flatten(0, 1) if t.dim() == 3 else t.float().flatten(1)


@torch.no_grad()
def block_importance(model: nn.Module, batches: Iterable[Any], names: list[str]) -> dict[str, float]:
    """How much each block changes its input: ``1 - cosine(input, output)`` of its hidden
    states (per token of ``(batch, tokens, width)`` hidden states, else per sample), averaged
    over every batch, ShortGPT's
    Block Influence (Men et al., 2024). Low: the block is nearly an identity, the first to
    drop. A block that never runs gets 0.
    """
    sums = dict.fromkeys(names, 0.0)
    counts = dict.fromkeys(names, 0)

    def hook(name: str) -> Any:
        def fn(_mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x, y = first_tensor((args, kwargs)), first_tensor(out)
            if x is None or y is None or x.shape != y.shape or not x.is_floating_point():
                return
            cos = torch.nn.functional.cosine_similarity(_rows(x), _rows(y), dim=-1)
            sums[name] += float((1 - cos).sum())
            counts[name] += cos.numel()

        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n), with_kwargs=True) for n in names]
    was_training = model.training
    try:
        model.eval()
        for batch in batches:
            run(model, batch)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] if counts[n] else 0.0 for n in names}
