"""Modules and parametrizations that compressed models are made of."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


class LowRank(nn.Sequential):
    """A layer factorized into two: ``first`` (to rank r) then ``second`` (back to the outputs).

    A Sequential, so its factors are addressed as ``<name>.0`` and ``<name>.1``.
    """


class WeightCompression(nn.Module):
    """Parametrization of a weight: a fixed sparsity mask, then symmetric per-output-channel
    fake quantization with a straight-through estimator (Bengio et al., 2013).

    Args:
        shape: Weight shape.
        bits: Bit-width in 2..8, or None for fp32.
    """

    def __init__(self, shape: torch.Size, bits: int | None = None) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(shape, dtype=torch.bool))
        self.bits = bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        w = w * self.mask
        if self.bits is None:
            return w
        q, scale = quantize_weight(w, self.bits)
        return w + (q * scale - w).detach()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, sparsity={1 - self.mask.float().mean().item():.3f}"


def quantize_weight(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization.

    Returns:
        ``(q, scale)``: integer-valued ``q`` in ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]`` (as
        float) and ``scale`` broadcastable to ``w``, so that ``q * scale`` approximates ``w``.
    """
    qmax = 2 ** (bits - 1) - 1
    amax = w.detach().abs().flatten(1).amax(dim=1).clamp_min(1e-12)
    scale = (amax / qmax).view(-1, *([1] * (w.dim() - 1)))
    q = torch.clamp(torch.round(w / scale), -qmax, qmax)
    return q, scale


def weight_compression(module: nn.Module) -> WeightCompression:
    """The WeightCompression of ``module.weight``, added on first use."""
    if parametrize.is_parametrized(module, "weight"):
        for p in module.parametrizations["weight"]:
            if isinstance(p, WeightCompression):
                return p
    wc = WeightCompression(module.weight.shape).to(module.weight.device)
    parametrize.register_parametrization(module, "weight", wc)
    return wc


class ActFakeQuant(nn.Module):
    """8-bit asymmetric fake quantization of activations, with an EMA min/max observer.

    In training mode the observer tracks the input range; in eval mode the range is frozen.
    Exported to ONNX as QuantizeLinear/DequantizeLinear.
    """

    def __init__(self, bits: int = 8, momentum: float = 0.1) -> None:
        super().__init__()
        self.bits = bits
        self.momentum = momentum
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(False))

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().float().min(), x.detach().float().max()  # fp32 under autocast too
        if not bool(self.initialized):
            self.lo.copy_(lo)
            self.hi.copy_(hi)
            self.initialized.fill_(True)
        else:
            self.lo.lerp_(lo, self.momentum)
            self.hi.lerp_(hi, self.momentum)

    def qparams(self) -> tuple[float, int]:
        """``(scale, zero_point)`` of the observed range (which always includes 0)."""
        qmax = 2**self.bits - 1
        lo, hi = min(float(self.lo), 0.0), max(float(self.hi), 0.0)
        scale = max((hi - lo) / qmax, 1e-8)
        return scale, int(min(qmax, max(0, round(-lo / scale))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not bool(self.initialized):
            self.observe(x)
        scale, zp = self.qparams()
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 2**self.bits - 1)


def act_quant_pre_hook(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: fake-quantizes a layer's input with its ``act_quant`` child."""
    return (module.act_quant(args[0]), *args[1:])


def leaves(model: nn.Module, name: str) -> list[nn.Module]:
    """The weight-bearing modules a plan entry refers to: the layer, or both low-rank factors."""
    mod = model.get_submodule(name)
    return list(mod) if isinstance(mod, LowRank) else [mod]
