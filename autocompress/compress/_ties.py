"""Tensors that several modules share (tied weights): stored once, counted once, kept tied.

A Hugging Face decoder with tied embeddings computes its logits with its token-embedding
matrix (``lm_head.weight is model.embed_tokens.weight``): the model stores that matrix once.
So does everything autocompress stores or counts: :func:`tensor_aliases` names every later
name of a stored tensor, which :mod:`autocompress.measure.size` skips and the packed format
stores as a tie, and :func:`stored_key` is what "the same stored tensor" means.

Compression keeps a tie (:func:`weight_ties`):

- the first layer holding a shared weight (in definition order: the embedding) *owns* it and
  takes the plan's ``sparsity`` and ``bits``; every other layer holding it refuses the knobs
  that change a weight, and after the methods have run gets the owner's very parametrization
  (:func:`retie`): one mask, one quantizer, so one stored tensor;
- a shared weight is neither factorized (``rank``) nor cut (``structure: channel``): the new
  layer would be the owner's alone, and the others would keep the original matrix.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import cast

import torch
from torch import nn
from torch.nn.utils import parametrize

# The knobs that change what a layer's weight stores (a tied layer other than the owner
# refuses them), and the (knob, value)s that would give the owner a new weight of its own.
WEIGHT_KNOBS = ("sparsity", "bits", "rank")
UNTYING = (("rank", None, "factorizing"), ("structure", "channel", "cutting channels"))


def _tensor_key(t: torch.Tensor) -> Hashable:
    """One view of one storage: equal for the same tensor, or another view of it alike."""
    if t.data_ptr() == 0:  # no storage to compare (empty, or on the meta device)
        return ("id", id(t))
    return ("view", t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def stored_key(module: nn.Module, attr: str) -> Hashable:
    """What ``module.<attr>`` stores: two names with equal keys are one stored tensor.

    A plain parameter or buffer is its storage view; a parametrized one (compression's mask
    and quantizer) its original's view and the identities of the parametrizations: one matrix
    under one mask and quantizer is one stored tensor, under two different ones two.
    """
    if parametrize.is_parametrized(module, attr):
        chain = _chain(module, attr)
        return (_tensor_key(chain.original), *(id(p) for p in chain))
    return _tensor_key(getattr(module, attr))


def _chain(module: nn.Module, attr: str) -> parametrize.ParametrizationList:
    """The parametrizations of ``module.<attr>`` (which has some)."""
    return cast(parametrize.ParametrizationList, getattr(module.parametrizations, attr))


def stored_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """``(module name, module, attribute)`` of every tensor ``model`` stores (its direct
    parameters, parametrized tensors as one, buffers), in ``named_modules`` order; the
    parametrizations' own modules (masks) are part of the tensor they parametrize."""
    inner = {id(m) for mod in model.modules() if isinstance(mod, parametrize.ParametrizationList)
             for m in mod.modules()}
    for name, mod in model.named_modules():
        if id(mod) in inner:
            continue
        attrs = [n for n, _ in mod.named_parameters(recurse=False)]
        if parametrize.is_parametrized(mod):
            attrs += list(cast(nn.ModuleDict, mod.parametrizations).keys())
        attrs += [n for n, _ in mod.named_buffers(recurse=False)]
        for attr in attrs:
            yield name, mod, attr


def tensor_aliases(model: nn.Module) -> dict[str, str]:
    """``{name: first name}`` of every stored tensor that an earlier name (``"<module>.<attr>"``,
    in :func:`stored_tensors` order) already stores: e.g. ``{"lm_head.weight":
    "model.embed_tokens.weight"}`` for tied embeddings. Empty when nothing is shared."""
    first: dict[Hashable, str] = {}
    aliases = {}
    for mod_name, mod, attr in stored_tensors(model):
        name = f"{mod_name}.{attr}" if mod_name else attr
        owner = first.setdefault(stored_key(mod, attr), name)
        if owner != name:
            aliases[name] = owner
    return aliases


def weight_ties(model: nn.Module) -> dict[str, str]:
    """``{layer: owner layer}`` of every module whose ``weight`` is an earlier module's (see the
    module docstring): the layers that follow their owner's compression."""
    return {alias.removesuffix(".weight"): owner.removesuffix(".weight")
            for alias, owner in tensor_aliases(model).items()
            if alias.endswith(".weight") and owner.endswith(".weight")}


def retie(model: nn.Module, ties: dict[str, str]) -> None:
    """Gives each tied layer of ``ties`` (:func:`weight_ties` of the model before compression)
    its owner's parametrizations, so that both compute, and store, one compressed weight.

    A layer already tied (nothing compressed the owner) is left alone, and so is one whose
    weight is no longer the owner's matrix (the tie was broken on purpose): sizes then count
    both, as both are stored.
    """
    for alias_name, owner_name in ties.items():
        alias, owner = model.get_submodule(alias_name), model.get_submodule(owner_name)
        if (not parametrize.is_parametrized(owner, "weight")
                or parametrize.is_parametrized(alias, "weight")
                or alias.weight is not _chain(owner, "weight").original):
            continue
        for p in _chain(owner, "weight"):
            parametrize.register_parametrization(alias, "weight", p)
