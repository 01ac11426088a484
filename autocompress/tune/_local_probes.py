"""The sensitivity profile's layer-local probes: one layer compressed alone, measured by its
own output error on the calibration inputs, without running the model.

One hooked pass over the calibration data (:func:`~autocompress.compress.input_stats`) gives
every probed layer's input statistics. A probe then compresses a copy of the layer alone,
inside a one-layer model of the same name (a *holder*), by the ordinary
:func:`~autocompress.compress.apply` with those statistics as its calibration
(:meth:`~autocompress.compress.Calibration.from_stats`: GPTQ, AWQ, Wanda and SparseGPT run
without a forward pass), reads the compressed layer's effective weight ``W'`` (a Linear's
through its forward on the identity, so low-rank factors, masks, fake quantization and input
scales all count) and returns ``tr((W' - W) H (W' - W)^T) / tr(W H W^T)``
(:func:`~autocompress.compress.output_error`).

:func:`measured_distortion` puts a compressed layer back into the model for one evaluation:
the profile does so once per layer, to turn local errors into model-level distortions.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from autocompress.compress import (
    KNOB_TABLE,
    Calibration,
    InputStats,
    LayerPlan,
    LowRank,
    Plan,
    apply,
    calibration_problem,
    output_error,
    reconcile,
    same,
    weight_matrix,
)


def is_local(module: nn.Module, setting: dict[str, Any]) -> bool:
    """Whether ``setting`` on ``module`` is measured layer-locally: the layer has calibration
    inputs (:func:`~autocompress.compress.calibration_problem`) and every knob value the
    setting leaves off its default is ``local`` in the knob table."""
    if calibration_problem(module) is not None:
        return False
    knobs = reconcile(dict(setting))
    return all(KNOB_TABLE[k].local(v) for k, v in knobs.items() if not same(v, KNOB_TABLE[k].default))


class _Holder(nn.Module):
    """A model of one layer, at the same qualified name as in the model it came from."""

    def __init__(self, name: str, layer: nn.Module) -> None:
        super().__init__()
        *path, last = name.split(".")
        parent: nn.Module = self
        for part in path:
            child = nn.Module()
            parent.add_module(part, child)
            parent = child
        parent.add_module(last, layer)
        self.path = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.get_submodule(self.path)(x)


def compress_alone(name: str, module: nn.Module, setting: dict[str, Any],
                   input_shape: tuple[int, ...], stats: InputStats) -> nn.Module:
    """A compressed copy of ``module`` (named ``name`` in its model) under ``setting``, by
    :func:`~autocompress.compress.apply` on a one-layer model, calibrated on ``stats``.

    Raises:
        PlanError: The method refuses the layer (or is not implemented).
    """
    holder = _Holder(name, copy.deepcopy(module)).eval()
    example = torch.zeros(1, *input_shape)
    new = apply(holder, Plan({name: LayerPlan(**setting)}), example,
                calibration=Calibration.from_stats({name: stats}))
    return new.get_submodule(name).eval()


@torch.no_grad()
def effective_weight(layer: nn.Module, original: nn.Module) -> torch.Tensor:
    """The ``(out, d)`` matrix the compressed ``layer`` multiplies its input rows by
    (``original``: the layer it was made from): its (parametrized) weight, or its low-rank
    factors' product when all but the first are 1x1; a Linear with forward pre-hooks (input
    scales) is read from its forward on the identity, minus its bias.

    Raises:
        ValueError: A factorization whose effective weight this cannot read (Tucker, CP).
    """
    factors = list(layer) if isinstance(layer, LowRank) else [layer]
    if isinstance(original, nn.Linear) and any(f._forward_pre_hooks for f in factors):
        d = original.in_features
        eye = torch.eye(d, dtype=original.weight.dtype)
        return (layer(eye) - layer(torch.zeros(1, d, dtype=eye.dtype))).T
    if any(f.weight.shape[2:].numel() != 1 for f in factors[1:]):
        raise ValueError("a factorization with more than one spatial factor")
    w = weight_matrix(factors[0])
    for f in factors[1:]:
        w = weight_matrix(f) @ w
    return w


def local_error(name: str, module: nn.Module, setting: dict[str, Any],
                input_shape: tuple[int, ...], stats: InputStats) -> tuple[float, nn.Module]:
    """The layer-local relative output error of ``setting`` on ``module`` and the compressed
    layer (see the module docstring)."""
    new = compress_alone(name, module, setting, input_shape, stats)
    return output_error(weight_matrix(module), effective_weight(new, module), stats), new


@contextmanager
def swapped(model: nn.Module, name: str, layer: nn.Module) -> Iterator[nn.Module]:
    """``model`` with its submodule ``name`` replaced by ``layer`` for the ``with`` block."""
    parent_name, _, last = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, last)
    setattr(parent, last, layer)
    try:
        yield model
    finally:
        setattr(parent, last, old)


def measured_distortion(model: nn.Module, name: str, layer: nn.Module,
                        distortion: Callable[[nn.Module], float]) -> float:
    """``distortion(model)`` with ``layer`` in place of ``model``'s ``name``."""
    with swapped(model, name, layer) as m:
        return distortion(m)


@torch.no_grad()
def input_shapes(model: nn.Module, names: list[str], example: Any) -> dict[str, tuple[int, ...]]:
    """The shape (batch dimension dropped) of each named layer's input on ``example``."""
    from autocompress._inputs import run

    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple) -> None:
            shapes.setdefault(name, tuple(args[0].shape[1:]))
        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        run(model, example)
    finally:
        for h in handles:
            h.remove()
    return shapes
