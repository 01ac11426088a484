"""The registry of compression methods and the function that applies a plan.

A method is one file with one registered in-place transform. ``apply`` copies the model once
and runs every registered method in its fixed ``order``:
low-rank (10) -> pruning (20) -> quantization (30).

Why this order: factorizing first lets pruning and quantization act on the factors (both
factors are pruned and quantized); pruning before quantization means the quantization scales
are computed from the weights that remain.
"""

from __future__ import annotations

import copy
import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from autocompress.compress._layers import find_layers
from autocompress.compress._plan import Plan, PlanError

Transform = Callable[[nn.Module, Plan, torch.Tensor], None]


@dataclass(frozen=True)
class Method:
    name: str
    order: int
    transform: Transform


_METHODS: dict[str, Method] = {}
# The built-in methods, one module each, imported on first use. A new method is one file with
# a ``@register_method`` function, plus its module name here.
BUILTIN_METHODS = ("lowrank", "prune", "quantize")


@functools.cache
def _load_builtin_methods() -> None:
    for module in BUILTIN_METHODS:
        importlib.import_module(f"autocompress.compress.{module}")


def register_method(name: str, order: int) -> Callable[[Transform], Transform]:
    """Registers ``fn(model, plan, example_inputs)``, which compresses ``model`` in place."""

    def deco(fn: Transform) -> Transform:
        if name in _METHODS:
            raise RuntimeError(f"compression method {name!r} is already registered")
        _METHODS[name] = Method(name, order, fn)
        return fn

    return deco


def list_methods() -> list[str]:
    """Names of the registered methods, in the order they are applied."""
    _load_builtin_methods()
    return [m.name for m in sorted(_METHODS.values(), key=lambda m: m.order)]


def apply(model: nn.Module, plan: Plan, example_inputs: torch.Tensor,
          methods: list[str] | None = None) -> nn.Module:
    """Returns a compressed copy of ``model``; ``model`` itself is left untouched.

    Args:
        model: The fp32 model.
        plan: What to do to each layer.
        example_inputs: One input batch, used to trace dependencies between layers.
        methods: Only run these methods (default: all registered ones).

    Raises:
        PlanError: The plan names an unknown layer or asks for something a layer cannot do.
    """
    _load_builtin_methods()
    layers = find_layers(model, example_inputs)
    plan.validate([layer.name for layer in layers])
    unknown = set(methods or ()) - set(_METHODS)
    if unknown:
        raise PlanError(f"unknown compression method {sorted(unknown)[0]!r}; "
                        f"registered: {list_methods()}")
    new = copy.deepcopy(model)
    for name in list_methods():
        if methods is None or name in methods:
            _METHODS[name].transform(new, plan, example_inputs)
    return new


def pure(name: str) -> Callable[[nn.Module, Plan, torch.Tensor], nn.Module]:
    """The registered method ``name`` as a pure ``apply(model, plan, example_inputs)``."""

    def fn(model: nn.Module, plan: Plan, example_inputs: torch.Tensor) -> nn.Module:
        return apply(model, plan, example_inputs, methods=[name])

    fn.__doc__ = f"Applies only the {name!r} part of ``plan``; returns a new model."
    return fn
