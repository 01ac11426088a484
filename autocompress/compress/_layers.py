"""Finding the compressible layers of a model and counting their parameters and MACs."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

COMPRESSIBLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class LayerInfo:
    """One compressible layer.

    Attributes:
        name: Module name as in ``model.named_modules()``.
        type: Module class name (``Conv2d``, ``Conv1d`` or ``Linear``).
        shape: Weight shape.
        params: Parameters of the layer (weight and bias).
        macs: Multiply-accumulates for one sample.
        is_output: True if the layer produces the model output; its output channels cannot be
            removed (the classes would change), so ``channel`` pruning is not allowed on it.
    """

    name: str
    type: str
    shape: tuple[int, ...]
    params: int
    macs: int
    is_output: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, int]:
    """MACs per module name for one sample, counted with forward hooks on conv and linear layers.

    Conv: output elements x (in_channels / groups) x kernel size. Linear: output elements x
    in_features. Sparsity is not discounted: these are dense MACs of the stored shapes.
    """
    macs: dict[str, int] = {}
    batch = example_inputs.shape[0]

    def hook(name: str):
        def fn(mod: nn.Module, _inp, out: torch.Tensor) -> None:
            per_out = mod.weight[0].numel() if isinstance(mod, nn.modules.conv._ConvNd) else mod.in_features
            macs[name] = macs.get(name, 0) + out.numel() // batch * per_out

        return fn

    _forward_with_hooks(model, example_inputs, {
        n: hook(n) for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)
    })
    return macs


def find_layers(model: nn.Module, example_inputs: torch.Tensor) -> list[LayerInfo]:
    """The compressible layers (Conv1d, Conv2d, Linear) of ``model`` in definition order."""
    macs = count_macs(model, example_inputs)
    output_layer = _output_layer(model, example_inputs)
    out = []
    for name, mod in model.named_modules():
        if type(mod) in COMPRESSIBLE_TYPES:
            out.append(LayerInfo(
                name=name,
                type=type(mod).__name__,
                shape=tuple(mod.weight.shape),
                params=sum(p.numel() for p in mod.parameters(recurse=False)),
                macs=macs.get(name, 0),
                is_output=name == output_layer,
            ))
    return out


def _output_layer(model: nn.Module, example_inputs: torch.Tensor) -> str | None:
    """Name of the last compressible layer to run in a forward pass (the classifier)."""
    order: list[str] = []
    _forward_with_hooks(model, example_inputs, {
        n: (lambda *_a, n=n: order.append(n))
        for n, m in model.named_modules() if type(m) in COMPRESSIBLE_TYPES
    })
    return order[-1] if order else None


def _forward_with_hooks(model: nn.Module, example_inputs: torch.Tensor, hooks: dict) -> None:
    """One eval-mode forward pass with ``hooks[name]`` registered as forward hooks."""
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(fn) for n, fn in hooks.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
