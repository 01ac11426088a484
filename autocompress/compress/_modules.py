"""Modules and parametrizations that compressed models are made of."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from autocompress.compress.formats import WeightFormat, quantize_weight, weight_format

__all__ = ["ActFakeQuant", "FunctionalLowRank", "LowRank", "Regrowth", "WeightCompression",
           "act_quant_pre_hook", "dynamic_fake_quant", "leaves", "quantize_weight", "sparse_weights",
           "weight_compression"]


class LowRank(nn.Sequential):
    """A layer factorized into two to four ordinary layers, applied in order: SVD (two: to
    rank r, back to the outputs), Tucker-2 (three convs) or CP (three or four convs).

    A Sequential, so its factors are addressed as ``<name>.0``, ``<name>.1``, ...
    """


class FunctionalLowRank(LowRank):
    """An SVD-factorized Linear that a parent reads as ``weight`` and ``bias`` instead of
    calling it (``nn.MultiheadAttention.out_proj``): ``weight`` is the product of the two
    factors' (compressed) weights, ``bias`` the second factor's. Called as a module it is the
    ordinary two-layer chain.
    """

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        inner, outer = self[0], self[1]
        return outer.weight @ inner.weight

    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        return self[1].bias


class WeightCompression(nn.Module):
    """Parametrization of a weight: a fixed sparsity mask, then fake quantization (uniform or
    power-of-two integer levels, one scale per output channel or per group of input columns)
    or rounding to fp16/bf16 (its
    :class:`~autocompress.compress.formats.WeightFormat`), with a straight-through estimator (Bengio et
    al., 2013).

    The forward value is exactly the stored value (``v + (w - w.detach())``, not
    ``w + (v - w).detach()``, which can be an ulp off it), so a baked weight is on its grid.

    While ``regrow`` is set (fine-tuning sets it for the first part of training, see
    :class:`Regrowth`), the gradient also passes through the mask to the pruned weights, and
    :meth:`refresh` re-chooses the mask by the rule of the pruning method that made it
    (``mask_rule``, a name in :data:`~autocompress.compress.prune.MASK_RULES`; unstructured
    pruning's :func:`~autocompress.compress.prune.magnitude_mask`), keeping its count of pruned
    weights: a pruned weight whose gradient makes it large comes back, the smallest kept one
    goes. This is dynamic pruning with feedback (Lin et al., 2020, "Dynamic Model Pruning
    with Feedback"; Guo et al., 2016, "Dynamic Network Surgery"): after one-shot pruning to 80%
    or more, the mask chosen before training is rarely the best one.

    Args:
        shape: Weight shape.
        bits: Bit-width in 2..8, ``"fp16"``, ``"bf16"``, or None for fp32.
        scheme: ``"uniform"`` or ``"pow2"`` levels for integer ``bits``.
        group_size: Input columns sharing one scale (uniform integer ``bits``), or None: one
            scale per output channel.
    """

    group_size: int | None = None  # the default of instances pickled before the attribute

    def __init__(self, shape: torch.Size, bits: int | str | None = None,
                 scheme: str = "uniform", group_size: int | None = None) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(shape, dtype=torch.bool))
        self.bits = bits
        self.scheme = scheme
        self.group_size = group_size
        self.regrow = False
        # The pruning method's rule (prune.MASK_RULES) refresh re-applies; None: the mask is
        # fixed (a calibrated pruner's choice, which no rule on the weight alone reproduces).
        self.mask_rule: str | None = "magnitude"

    @property
    def format(self) -> WeightFormat:
        """The stored format of the weight (``fp32`` without ``bits``)."""
        return weight_format(self.bits, self.scheme, self.group_size)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        masked = w * self.mask
        if not self.regrow:
            if self.bits is None:
                return masked
            return self.format.fake_quant(masked.detach()) + (masked - masked.detach())
        value = masked.detach()
        if self.bits is not None:
            value = self.format.fake_quant(value)
        return value + (w - w.detach())  # straight through the mask too

    @torch.no_grad()
    def refresh(self, w: torch.Tensor) -> None:
        """Re-chooses the mask from ``w`` (the unmasked weight) by its pruning method's rule
        (``mask_rule``), pruning as many weights as it prunes now; a mask without a rule
        stays as it is."""
        # Deferred: prune.py builds on this module (the rule belongs to the pruning method).
        from autocompress.compress.prune import MASK_RULES

        mask: torch.Tensor = self.mask  # type: ignore[assignment]
        pruned = mask.numel() - int(mask.sum())
        if pruned == 0 or self.mask_rule is None:
            return
        mask.copy_(MASK_RULES.get(self.mask_rule)(w.detach(), pruned))

    def extra_repr(self) -> str:
        scheme = f", scheme={self.scheme}" if self.scheme != "uniform" else ""
        scheme += f", group_size={self.group_size}" if self.group_size else ""
        return f"bits={self.bits}{scheme}, sparsity={1 - self.mask.float().mean().item():.3f}"


def sparse_weights(model: nn.Module) -> list[tuple[WeightCompression, nn.Parameter]]:
    """Every masked weight of ``model`` (a mask with a zero) and its unmasked parameter."""
    found = []
    for module in model.modules():
        wc = find_weight_compression(module)
        if wc is not None and not bool(cast(torch.Tensor, wc.mask).all()):
            chain = module.parametrizations["weight"]
            if chain[0] is wc:  # its input is the stored parameter itself
                found.append((wc, chain.original))
    return found


class Regrowth:
    """Context in which a model's pruned weights may grow back (:class:`WeightCompression`):
    sets ``regrow`` on every masked weight whose mask has a rule (``mask_rule``; the others
    stay fixed); ``refresh()`` re-chooses their masks (call it after each optimizer step);
    ``stop()`` (or leaving the context) freezes the masks again."""

    def __init__(self, model: nn.Module) -> None:
        self.weights = [(wc, w) for wc, w in sparse_weights(model) if wc.mask_rule is not None]

    def __enter__(self) -> Regrowth:
        for wc, _ in self.weights:
            wc.regrow = True
        return self

    def refresh(self) -> None:
        for wc, w in self.weights:
            if wc.regrow:
                wc.refresh(w)

    def stop(self) -> None:
        for wc, _ in self.weights:
            wc.regrow = False

    def __exit__(self, *exc: object) -> None:
        self.stop()


def find_weight_compression(module: nn.Module) -> WeightCompression | None:
    """The WeightCompression of ``module.weight``, or None if it has none."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations["weight"] if isinstance(p, WeightCompression)),
                None)


def weight_compression(module: nn.Module) -> WeightCompression:
    """The WeightCompression of ``module.weight``, added on first use."""
    if (found := find_weight_compression(module)) is not None:
        return found
    wc = WeightCompression(module.weight.shape).to(module.weight.device)
    parametrize.register_parametrization(module, "weight", wc)
    return wc


class ActFakeQuant(nn.Module):
    """8-bit asymmetric (uint8) fake quantization of activations, per tensor.

    Two modes, both with a straight-through estimator:

    - static (``dynamic=False``, the ``act_bits: 8`` plan value): a min/max observer. While
      ``calibrating`` it takes the range of all inputs; in training mode it tracks the range
      with an EMA; in eval mode the range is frozen. Deployed with that fixed range
      (``onnxgraph._ort_quant``).
    - dynamic (``dynamic=True``, ``act_bits: "dynamic"``): no state; every call quantizes
      with the range of the tensor it gets, exactly as ONNX Runtime's ``DynamicQuantizeLinear``
      does at run time (:func:`dynamic_fake_quant`). Exported by ``export_onnx`` as ONNX
      Runtime's dynamic quantization of the layer (DynamicQuantizeLinear + MatMulInteger).

    Args:
        bits: Bit-width (8; the dynamic mode is uint8 only, as ONNX Runtime's op).
        momentum: EMA factor of the static observer.
        dynamic: Quantize with each tensor's own range (no observer).
    """

    def __init__(self, bits: int = 8, momentum: float = 0.1, dynamic: bool = False) -> None:
        super().__init__()
        if dynamic and bits != 8:
            raise ValueError(f"dynamic activation quantization is 8-bit only, got bits={bits}")
        self.bits = bits
        self.momentum = momentum
        self.dynamic = dynamic
        self.calibrating = False  # observe the min/max of all inputs, not an EMA (calibrate())
        if not dynamic:
            self.register_buffer("lo", torch.tensor(0.0))
            self.register_buffer("hi", torch.tensor(0.0))
            self.register_buffer("initialized", torch.tensor(False))

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().float().min(), x.detach().float().max()  # fp32 under autocast too
        if not bool(self.initialized):
            self.lo.copy_(lo)
            self.hi.copy_(hi)
            self.initialized.fill_(True)
        elif self.calibrating:  # the range of everything seen (calibration)
            self.lo.copy_(torch.minimum(self.lo, lo))
            self.hi.copy_(torch.maximum(self.hi, hi))
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
        if self.dynamic:
            return dynamic_fake_quant(x)
        if self.training or not bool(self.initialized):
            self.observe(x)
        scale, zp = self.qparams()
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 2**self.bits - 1)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, dynamic=True" if self.dynamic else f"bits={self.bits}"


def dynamic_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """Fake-quantizes ``x`` as ONNX Runtime's ``DynamicQuantizeLinear`` quantizes it, with a
    straight-through estimator (the gradient passes as if the op were the identity).

    The ONNX operator (opset 11; ONNX Runtime's ``GetQuantizationParameter`` in
    ``onnxruntime/core/util/qmath.h`` computes the same): uint8, one scale and zero point for
    the whole tensor (every sample of the batch together), range widened to include 0::

        scale = (max(0, max(x)) - min(0, min(x))) / 255     (1 if that range is empty)
        zero_point = round(clamp(-min(0, min(x)) / scale, 0, 255))
        q = clamp(round(x / scale) + zero_point, 0, 255)

    with rounding half to even (``torch.round``). Returns ``(q - zero_point) * scale``. Tensor
    ops only (no host sync, traceable). Computed in fp32, returned in ``x``'s dtype.
    """
    xf = x.float()
    xd = xf.detach()
    lo, hi = xd.min().clamp(max=0.0), xd.max().clamp(min=0.0)
    scale = torch.where(hi > lo, (hi - lo) / 255.0, torch.ones_like(hi))
    zero_point = torch.round(torch.clamp(-lo / scale, 0.0, 255.0))
    q = torch.clamp(torch.round(xd / scale) + zero_point, 0.0, 255.0)
    # dq + (x - x): the value is exactly dq (x + (dq - x) can be an ulp off), the gradient 1.
    return ((q - zero_point) * scale + (xf - xd)).to(x.dtype)


def act_quant_pre_hook(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: fake-quantizes a layer's input with its ``act_quant`` child."""
    return (module.act_quant(args[0]), *args[1:])


def leaves(model: nn.Module, name: str) -> list[nn.Module]:
    """The weight-bearing modules a plan entry refers to: the layer, or every low-rank factor."""
    mod = model.get_submodule(name)
    return list(mod) if isinstance(mod, LowRank) else [mod]
