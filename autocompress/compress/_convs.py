"""Convolution subclasses: rebuilt in another shape with their own forward, and probed.

Model zoos subclass ``nn.Conv2d`` to pad in ``forward`` (timm's ``Conv2dSame``, EfficientNet
ports: TensorFlow's "same" padding, computed from the input's size), to standardize the weight
(timm's ``StdConv2d``) or to do anything else, with constructors that take other arguments.
Methods that change a conv's shape (low-rank factors) or its weight (BatchNorm folding) must
keep what the subclass does, or leave the layer alone:

- :func:`respecified` builds a conv of a layer's own class from ``nn.Conv1d/2d/3d``'s
  arguments without calling the subclass's constructor: a plain conv of the new shape becomes
  an instance of the subclass, with the subclass's own attributes, buffers and submodules
  copied, so its forward (and the padding it computes) runs as before;
- a subclass that overrides ``forward`` (:func:`overrides_forward`) may compute anything, so
  its users check it on a small copy (:func:`probe_copy`, :func:`probe_input`) before relying
  on it being a convolution of its (padded) input. One that does not is a plain conv that only
  constructs differently: nothing to check.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

#: The convolutions (not transposed) whose subclasses count as one of them.
CONVS: tuple[type[_ConvNd], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: The input and output channels of a probe copy.
PROBE_CHANNELS = (3, 4)


def own_class(m: nn.Module) -> type:
    """The module's class, seen through ``torch.nn.utils.parametrize``'s generated subclass."""
    return type(m).__bases__[0] if parametrize.is_parametrized(m) else type(m)


def conv_class(m: nn.Module) -> type[_ConvNd] | None:
    """The one of :data:`CONVS` that ``m`` is an instance of (None: not a conv, or transposed)."""
    return next((cls for cls in CONVS if isinstance(m, cls)), None)


def overrides_forward(m: nn.Module) -> bool:
    """Whether ``m`` is a conv whose class computes its own ``forward`` (or ``_conv_forward``)
    instead of its torch base class's."""
    base = conv_class(m)
    cls = own_class(m)
    return base is not None and any(getattr(cls, f) is not getattr(base, f)
                                    for f in ("forward", "_conv_forward"))


def respecified(layer: _ConvNd, in_channels: int, out_channels: int, kernel_size: Any,
                bias: bool, keep_class: bool = True, **kwargs: Any) -> _ConvNd:
    """A new conv with ``nn.Conv1d/2d/3d``'s constructor arguments, ``layer``'s padding mode
    and freshly initialized weights, of ``layer``'s own class (see the module docstring).

    Args:
        layer: The conv whose class (seen through parametrizations) and padding mode to keep;
            left as it is.
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Kernel size.
        bias: Whether it has a bias.
        keep_class: False gives the plain torch conv (e.g. a 1x1 factor, which no padding
            computed in a forward reaches).
        **kwargs: ``stride``, ``padding``, ``dilation``, ``groups``.
    """
    base = conv_class(layer)
    if base is None:
        raise TypeError(f"{type(layer).__name__} is not a Conv1d/2d/3d")
    new = base(in_channels, out_channels, kernel_size, bias=bias,
               padding_mode=layer.padding_mode, **kwargs)
    cls = own_class(layer)
    if not keep_class or cls is base:
        return new
    memo: dict[int, Any] = {}
    for key, value in vars(layer).items():  # the subclass's own plain attributes
        if key not in vars(new):
            new.__dict__[key] = copy.deepcopy(value, memo)
    for store in ("_parameters", "_buffers", "_modules"):  # ... and its own tensors and modules
        mine = getattr(new, store)
        for key, value in getattr(layer, store).items():
            if key not in mine and key != "parametrizations":
                mine[key] = copy.deepcopy(value, memo)
    new._non_persistent_buffers_set |= layer._non_persistent_buffers_set
    new.__class__ = cls
    return new


def probe_copy(layer: _ConvNd, seed: int = 0) -> _ConvNd:
    """A small copy of ``layer`` to check its class's forward on: :func:`respecified` with
    :data:`PROBE_CHANNELS`, ``groups=1``, the layer's kernel, stride, padding and dilation, and
    a random weight and bias."""
    c_in, c_out = PROBE_CHANNELS
    probe = respecified(layer, c_in, c_out, layer.kernel_size, True, stride=layer.stride,
                        padding=layer.padding, dilation=layer.dilation)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (probe.weight, cast(torch.Tensor, probe.bias)):
            p.copy_(torch.randn(p.shape, generator=gen))
    return probe.to(layer.weight.device).eval()


def probe_input(conv: _ConvNd, seed: int = 1) -> torch.Tensor:
    """A random batch of two for ``conv``: on spatial axis ``a``, ``(k-1)*d + 2*s + 2 + a``
    positions (``k``, ``s``, ``d`` its kernel, stride and dilation there), so that the
    TensorFlow-style "same" padding of a strided conv is uneven on the first axis and even on
    the second."""
    sizes = [(k - 1) * d + 2 * s + 2 + a for a, (k, s, d)
             in enumerate(zip(conv.kernel_size, conv.stride, conv.dilation, strict=True))]
    x = torch.randn(2, conv.in_channels, *sizes, generator=torch.Generator().manual_seed(seed))
    return x.to(conv.weight.device)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """``|got - expected| / |expected|`` (Frobenius norms); infinite when the shapes differ."""
    if got.shape != expected.shape:
        return float("inf")
    return float((got - expected).norm() / expected.norm().clamp_min(1e-12))
