"""The registry of compression methods and the function that applies a plan.

A method is one file with one registered in-place transform. ``apply`` copies the model once
and runs every registered method in its fixed ``order``: low-rank (10) -> pruning (20) ->
quantization (30), then the plan's dropped blocks go (``compress/_blocks.py``). Hugging Face
``Conv1D`` layers the plan changes become ``Linear`` first (``conv1d.py``), so the methods only
see conv, linear and embedding layers.

A weight shared by several layers (tied embeddings) stays shared: the first of them takes the
plan's knobs, the others follow it (:mod:`~autocompress.compress._ties`).

Why this order: factorizing first lets pruning and quantization act on the factors (both
factors are pruned and quantized); pruning before quantization means the quantization scales
are computed from the weights that remain.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from autocompress._registry import Registry
from autocompress.compress._blocks import check_drops, drop_blocks
from autocompress.compress._calibration import DEFAULT_SAMPLES, Calibration
from autocompress.compress._knob_values import BLOCK, CALIBRATED
from autocompress.compress._knobs import KNOB_TABLE, summary_tokens, why_refused
from autocompress.compress._layers import LayerInfo, Refusal, find_layers
from autocompress.compress._plan import Plan, PlanError
from autocompress.compress._ties import UNTYING, WEIGHT_KNOBS, retie, weight_ties
from autocompress.compress.conv1d import linearize

# transform(model, plan, example_inputs), or with ``calibrated``:
# transform(model, plan, example_inputs, calibration).
Transform = Callable[..., None]
# limits(model, example_inputs, layers) -> {layer name: [Refusal, ...]}: the knob values a
# method cannot apply to a layer, known before any trial runs.
Limits = Callable[[nn.Module, Any, list[LayerInfo]], dict[str, list[Refusal]]]


@dataclass(frozen=True)
class Method:
    name: str
    order: int
    transform: Transform
    limits: Limits | None = None
    calibrated: bool = False


# The built-in methods, one module each, imported on first use. A new method is one file with
# a ``@register_method`` function, plus its module name here.
BUILTIN_METHODS = ("lowrank", "prune", "quantize")
METHODS: Registry[Method] = Registry("compression method", builtins={
    name: f"autocompress.compress.{name}" for name in BUILTIN_METHODS})


def _in_order() -> list[Method]:
    """Every method (built-ins imported), in the order :func:`apply` runs them."""
    return sorted(METHODS.values(), key=lambda m: m.order)


def register_method(name: str, order: int, limits: Limits | None = None,
                    calibrated: bool = False) -> Callable[[Transform], Transform]:
    """Registers ``fn(model, plan, example_inputs)``, which compresses ``model`` in place.

    Args:
        name: The method's name.
        order: Its place in :func:`apply` (low-rank 10, pruning 20, quantization 30).
        limits: ``limits(model, example_inputs, layers) -> {layer: [Refusal]}``: the knob
            values this method cannot apply to a layer (a search never samples them).
        calibrated: ``fn`` takes a fourth argument, the
            :class:`~autocompress.compress._calibration.Calibration` its calibrated knobs
            compute their statistics on (empty: set up the structure only).

    Returns:
        A decorator; it raises ValueError for a name already registered.
    """

    def deco(fn: Transform) -> Transform:
        METHODS.register(name, Method(name, order, fn, limits, calibrated))
        return fn

    return deco


def describe_layers(model: nn.Module, example_inputs: Any,
                    calibration_samples: int | None = DEFAULT_SAMPLES,
                    blocks: bool = False) -> list[LayerInfo]:
    """The compressible layers (:func:`find_layers`) with the refusals of every method's limits,
    of tied weights and of a calibration too small for a layer (what ``autocompress layers``
    shows and what a search space leaves out).

    Args:
        model: The model.
        example_inputs: One input batch.
        calibration_samples: The samples a trial calibrates on (``search.calibration_samples``):
            a layer whose calibration inputs would have fewer rows than its input width (an
            underdetermined Hessian) refuses the calibrated knobs; None: no such check.
        blocks: Also the blocks a plan can drop, after the layers (type ``Block``:
            :mod:`~autocompress.compress._blocks`; what ``autocompress layers`` and a search
            list).
    """
    every = find_layers(model, example_inputs, blocks=blocks)
    layers = [la for la in every if la.type != BLOCK]  # blocks take drop alone: their own refusal
    found: dict[str, list[Refusal]] = {la.name: list(la.refusals) for la in every}
    if calibration_samples is not None:
        for la in layers:
            found[la.name] += _too_few_rows(la, calibration_samples)
    for method in _in_order():
        if method.limits is not None:
            for name, refusals in method.limits(model, example_inputs, layers).items():
                found.setdefault(name, []).extend(refusals)
    ties = weight_ties(model)
    for la in layers:
        refusals = found.setdefault(la.name, [])
        refusals += [r for r in _tie_refusals(la, ties.get(la.name))
                     if not any((r.knob, r.value) == (o.knob, o.value) for o in refusals)]
    return [replace(la, refusals=tuple(found[la.name])) for la in every]


def _too_few_rows(layer: LayerInfo, samples: int) -> list[Refusal]:
    """The calibrated knob values refused when ``samples`` samples give ``layer`` fewer input
    rows (tokens, output positions: its MACs per sample over its weights) than inputs."""
    weights = math.prod(layer.shape)
    if layer.type == "Embedding" or not layer.macs or not weights:
        return []
    rows = samples * layer.macs // weights
    width = layer.shape[0] if layer.type == "Conv1D" else weights // layer.shape[0]
    if rows >= width:
        return []
    return [Refusal(knob, value, f"{samples} calibration samples give it {rows} input rows for "
                                 f"{width} inputs: raise search.calibration_samples to "
                                 f"{-(-samples * width // rows)} or more")
            for knob, values in CALIBRATED.items() for value in values]


def _tie_refusals(layer: LayerInfo, owner: str | None) -> list[Refusal]:
    """What a layer whose weight is shared cannot take (:mod:`~autocompress.compress._ties`):
    a layer that follows ``owner`` every knob that changes its weight; the owner factorizing
    and channel cuts."""
    if owner is not None:
        return [Refusal(knob, None, f"its weight is {owner}'s (tied): compressed as {owner} is")
                for knob in WEIGHT_KNOBS]
    if not layer.shared_with:
        return []
    return [Refusal(knob, value, f"its weight is also {', '.join(layer.shared_with)}'s (tied): "
                                 f"{doing} would untie it") for knob, value, doing in UNTYING]


def check_plan(plan: Plan, layers: list[LayerInfo]) -> None:
    """Refuses a plan that names an unknown or unused layer or a value a layer refuses.

    Raises:
        PlanError: Naming the layer, the knob and why.
    """
    plan.validate([layer.name for layer in layers])
    by_name = {layer.name: layer for layer in layers}
    for name, lp in plan.active().items():
        layer = by_name[name]
        if not layer.used:
            raise PlanError(f"layer {name!r} never runs in the model's forward, so it cannot be "
                            f"compressed; leave it out of the plan")
        for spec in KNOB_TABLE.values():
            value = getattr(lp, spec.name)
            if summary_tokens(replace(lp, **{spec.name: spec.default})) == summary_tokens(lp):
                continue  # the knob changes nothing here (e.g. structure without sparsity)
            reason = why_refused(spec, value, layer)
            if reason is not None:
                raise PlanError(f"layer {name!r}: cannot take {spec.name}={value!r} "
                                f"({layer.type}): {reason}")


def list_methods() -> list[str]:
    """Names of the registered methods, in the order they are applied."""
    return [m.name for m in _in_order()]


def apply(model: nn.Module, plan: Plan, example_inputs: Any,
          methods: list[str] | None = None, calibration: Calibration | None = None) -> nn.Module:
    """Returns a compressed copy of ``model``; ``model`` itself is left untouched.

    Args:
        model: The fp32 model.
        plan: What to do to each layer.
        example_inputs: One input batch, used to trace dependencies between layers.
        methods: Only run these methods (default: all registered ones).
        calibration: The data the plan's calibrated knobs (``pruner: wanda``,
            ``quantizer: gptq``, ...) compute their statistics on (default: ``example_inputs``
            alone; a search passes ``search.calibration_samples`` training samples);
            :meth:`Calibration.empty` sets up the structure only (the weights are loaded
            afterwards, as rebuilding a logged trial does).

    Raises:
        PlanError: The plan names an unknown or unused layer or asks for something a layer
            cannot do (a method's limits, or a failure while applying it).
    """
    for name in methods or ():
        if name not in METHODS:  # the registry's message: the closest name and the allowed
            raise PlanError(METHODS.unknown(name).message)
    check_plan(plan, describe_layers(model, example_inputs, calibration_samples=None,
                                     blocks=any(lp.drop for lp in plan.layers.values())))
    check_drops(model, plan)
    ties = weight_ties(model)
    new = copy.deepcopy(model)
    linearize(new, plan)
    if calibration is None:
        calibration = Calibration((example_inputs,))
    for method in _in_order():
        if methods is None or method.name in methods:
            if method.calibrated:
                method.transform(new, plan, example_inputs, calibration)
            else:
                method.transform(new, plan, example_inputs)
    if methods is None:  # last: the methods' names and calibration are the whole model's
        drop_blocks(new, plan)
    retie(new, ties)
    return new


def pure(name: str) -> Callable[..., nn.Module]:
    """The registered method ``name`` as a pure ``apply(model, plan, example_inputs,
    calibration=None)``."""

    def fn(model: nn.Module, plan: Plan, example_inputs: Any,
           calibration: Calibration | None = None) -> nn.Module:
        return apply(model, plan, example_inputs, methods=[name], calibration=calibration)

    fn.__doc__ = f"Applies only the {name!r} part of ``plan``; returns a new model."
    return fn
