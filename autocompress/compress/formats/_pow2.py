"""Power-of-two ("shift") weights, ``pow2-3`` .. ``pow2-6`` (``bits`` 3..6, ``scheme: pow2``).

Miyashita et al. 2016, "Convolutional Neural Networks using Logarithmic Data Representation":
levels ``{0} ∪ {±s·2**-k : k = 0..L-1}`` with ``L = 2**(b-1) - 1`` exponents per output
channel: one code for zero, a sign bit and an exponent code for the rest (``2**b - 1`` levels,
as many as uniform has). A weight goes to the level **nearest in linear value** (the midpoint
between ``s·2**-k`` and ``s·2**-(k+1)`` is ``0.75·s·2**-k``, between the smallest level and 0
it is half the smallest level; ties go to the larger magnitude). Nearest in value, not in
log-value, so the rounding error is the least a level set allows and the stored value is
exactly what the forward used. The scale ``s`` is calibrated, not just ``max|w|``: per output
channel, the candidate ``max|w| · 2**(-j/4)``, ``j = 0..3`` (one octave, since ``2**-1`` would
shift the whole level set by one exponent) of least squared error, the first on ties. It
depends on the weights alone, so quantizing again reproduces it: already-quantized values have
``max|w| = s`` and ``j = 0`` quantizes them with zero error (rebuilding a trial from its logged
weights relies on it). As integers: ``q = ±2**(L-1-k)`` (or 0) times ``scale = s·2**-(L-1)``;
up to 4 bits (``|q| <= 64``) they are int8 values, exported as int8 + ``DequantizeLinear`` like
uniform, over 4 bits as fp32. Packed as sign + exponent codes (:func:`pow2_codes`); in the
packed header as ``"pow2:<bits>"`` (version 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from autocompress.compress.formats._base import FORMATS
from autocompress.compress.formats._bitpack import pack_bits, unpack_bits
from autocompress.compress.formats._integer import IntegerFormat

__all__ = ["POW2_CANDIDATES", "Pow2Format", "pow2_codes", "pow2_from_codes", "pow2_quantize"]

POW2_CANDIDATES = 4  # scale candidates max|w| * 2**(-j/4), j = 0..3


def _pow2_round(a: torch.Tensor, levels: int) -> torch.Tensor:
    """``a >= 0`` (in units of the scale) rounded to the nearest of
    ``{0} ∪ {2**-k : k = 0..levels-1}`` (ties to the larger); exact (``frexp``, no logarithm)."""
    mantissa, exponent = torch.frexp(a)  # a = mantissa * 2**exponent, mantissa in [0.5, 1)
    up = (mantissa >= 0.75).to(exponent.dtype)  # nearer 2**exponent than 2**(exponent - 1)
    level = torch.ldexp(torch.ones_like(a), exponent - 1 + up)
    smallest = 2.0 ** (1 - levels)
    return torch.where(a < smallest / 2, torch.zeros_like(a), level.clamp(smallest, 1.0))


def pow2_quantize(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: ``q`` 0 or ``±2**e`` (``e < 2**(bits-1) - 1``), ``scale`` per output
    channel (module docstring)."""
    levels = 2 ** (bits - 1) - 1
    flat = w.detach().flatten(1)
    mag = flat.abs()
    amax = mag.amax(dim=1, keepdim=True).clamp_min(1e-12)

    def fit(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rounded = _pow2_round(mag / s, levels)
        return rounded, ((rounded * s - mag) ** 2).sum(dim=1, keepdim=True)

    scale = amax
    best, best_error = fit(scale)
    for j in range(1, POW2_CANDIDATES):  # one at a time: the memory of one weight, not four
        s = amax * 2.0 ** (-j / 4)
        rounded, error = fit(s)
        better = error < best_error  # strictly: the first of the least error wins
        best = torch.where(better, rounded, best)
        best_error = torch.where(better, error, best_error)
        scale = torch.where(better, s, scale)
    top = 2.0 ** (levels - 1)  # q = level * top: integers up to 2**(levels - 1)
    q = torch.sign(flat) * best * top
    return q.view_as(w), (scale / top).view(-1, *([1] * (w.dim() - 1)))


def pow2_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """pow2 integer values (0 or ``±2**(L-1-k)``) as ``bits``-bit unsigned codes: 0 for zero,
    else ``(sign << (bits - 1)) | (k + 1)``."""
    levels = 2 ** (bits - 1) - 1
    q = np.asarray(q, np.int64)
    exponent = np.frexp(np.abs(q).astype(np.float64))[1] - 1  # |q| = 2**exponent
    codes = (levels - exponent) | (np.where(q < 0, 1, 0) << (bits - 1))
    return np.where(q == 0, 0, codes)


def pow2_from_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of :func:`pow2_codes` (int64 values)."""
    levels = 2 ** (bits - 1) - 1
    codes = np.asarray(codes, np.int64)
    k1 = codes & levels
    q = np.where(k1 == 0, 0, np.left_shift(1, np.maximum(levels - k1, 0)))
    return np.where(codes >> (bits - 1) == 1, -q, q)


@dataclass(frozen=True)
class Pow2Format(IntegerFormat):
    """``bits``-bit power-of-two levels (module docstring)."""

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pow2_quantize(w, self.bits)

    def pack(self, values: np.ndarray) -> bytes:
        return pack_bits(pow2_codes(values, self.bits), self.bits)

    def unpack(self, raw: bytes, count: int) -> np.ndarray:
        return pow2_from_codes(unpack_bits(raw, self.bits, count), self.bits)


for _bits in range(3, 7):
    FORMATS.register(f"pow2-{_bits}", Pow2Format(f"pow2-{_bits}", _bits, "pow2", f"pow2:{_bits}",
                                                 packed_version=2))
