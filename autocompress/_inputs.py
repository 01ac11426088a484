"""Model inputs of any reasonable form: one tensor, a tuple of tensors (positional arguments of
``forward``) or a dict of tensors (keyword arguments), batch dimension first.

Everything that runs a model (layer discovery, fine-tuning, export, latency, the agent's feed)
goes through these functions, so a two-input model (``input_ids`` + ``attention_mask``, an
image + metadata) works wherever a one-input model does.

Example:
    >>> import torch
    >>> batch = {"input_ids": torch.zeros(4, 8, dtype=torch.long), "attention_mask": torch.ones(4, 8)}
    >>> batch_size(batch), input_names(batch), batch_size(take(batch, 1))
    (4, ['input_ids', 'attention_mask'], 1)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import nn

__all__ = ["as_args", "batch_size", "check_inputs", "input_names", "map_tensors", "repeat_to", "run",
           "take", "tensors_of", "to_device", "to_numpy_feed"]

Inputs = Any  # torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]


def check_inputs(inputs: Any, what: str = "example_inputs") -> None:
    """Raises TypeError (naming ``what``) unless ``inputs`` is a tensor, a non-empty tuple/list
    or a non-empty dict of tensors, each of at least 2 dimensions, all with the same batch
    dimension first."""
    tensors = _tensors(inputs, what)
    if not tensors:
        raise TypeError(f"{what}: empty; give a tensor, a tuple or a dict of tensors")
    if any(t.dim() < 2 for t in tensors):
        shapes = [tuple(t.shape) for t in tensors]
        raise TypeError(f"{what}: every tensor needs a batch dimension first and at least one more "
                        f"(shape (batch, ...)); shapes {shapes}")
    sizes = {t.shape[0] for t in tensors}
    if len(sizes) != 1:
        shapes = [tuple(t.shape) for t in tensors]
        raise TypeError(f"{what}: every tensor needs the same batch dimension first; shapes {shapes}")


def tensors_of(inputs: Any) -> list[torch.Tensor]:
    """The tensors of ``inputs``, in argument order."""
    return _tensors(inputs, "inputs")


def _tensors(inputs: Any, what: str) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    values = list(inputs.values()) if isinstance(inputs, Mapping) else (
        list(inputs) if isinstance(inputs, tuple | list) else None)
    if values is None or not all(isinstance(v, torch.Tensor) for v in values):
        raise TypeError(f"{what}: expected a tensor, a tuple of tensors or a dict of tensors "
                        f"(batch dimension first), got {_describe(inputs)}")
    if isinstance(inputs, Mapping) and not all(isinstance(k, str) for k in inputs):
        raise TypeError(f"{what}: the keys of a dict of inputs must be argument names (strings)")
    return values


def _describe(inputs: Any) -> str:
    if isinstance(inputs, Mapping):
        return "a dict of " + ", ".join(sorted({type(v).__name__ for v in inputs.values()}))
    if isinstance(inputs, tuple | list):
        return f"a {type(inputs).__name__} of " + ", ".join(sorted({type(v).__name__ for v in inputs}))
    return type(inputs).__name__


def map_tensors(inputs: Inputs, fn: Any) -> Inputs:
    """``inputs`` with ``fn`` applied to every tensor, in the same form."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return {k: fn(v) for k, v in inputs.items()}
    return tuple(fn(v) for v in inputs)


def run(model: nn.Module, inputs: Inputs) -> Any:
    """``model`` called on ``inputs``: ``model(x)``, ``model(*x)`` or ``model(**x)``."""
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


def as_args(inputs: Inputs) -> tuple[Any, ...]:
    """``inputs`` as the ``args`` of ``torch.onnx.export`` / ``torch.jit.trace``: positional
    tensors, or one trailing dict of keyword arguments."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, Mapping):
        return (dict(inputs),)
    return tuple(inputs)


def to_device(inputs: Inputs, device: torch.device | str) -> Inputs:
    """``inputs`` on ``device``."""
    return map_tensors(inputs, lambda t: t.to(device, non_blocking=True))


def batch_size(inputs: Inputs) -> int:
    """The batch dimension of ``inputs``."""
    return int(_tensors(inputs, "inputs")[0].shape[0])


def take(inputs: Inputs, n: int) -> Inputs:
    """The first ``n`` rows of every tensor."""
    return map_tensors(inputs, lambda t: t[:n])


def repeat_to(inputs: Inputs, n: int) -> Inputs:
    """A batch of exactly ``n`` rows made by repeating ``inputs`` (for timing at a batch size)."""
    reps = -(-n // batch_size(inputs))
    return map_tensors(inputs, lambda t: t.repeat(reps, *([1] * (t.dim() - 1)))[:n].contiguous())


def trace_arguments(inputs: Inputs) -> dict[str, Any]:
    """``torch.jit.trace``'s example arguments for inputs of any form: a dict is keyword
    arguments (given as ``example_inputs`` it would be one positional argument)."""
    if isinstance(inputs, Mapping):
        return {"example_kwarg_inputs": dict(inputs)}
    return {"example_inputs": inputs}


def input_names(inputs: Inputs) -> list[str]:
    """ONNX input names: ``input`` for one tensor (as before), ``input_<i>`` for a tuple, the
    argument names for a dict."""
    if isinstance(inputs, torch.Tensor):
        return ["input"]
    if isinstance(inputs, Mapping):
        return [str(k) for k in inputs]
    return [f"input_{i}" for i in range(len(inputs))]


def to_numpy_feed(inputs: Inputs) -> dict[str, Any]:
    """An ONNX Runtime feed ``{name: array}`` of ``inputs`` (names as in :func:`input_names`)."""
    tensors = _tensors(inputs, "inputs")
    return {name: t.detach().cpu().numpy() for name, t in zip(input_names(inputs), tensors, strict=True)}
