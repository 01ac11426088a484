"""Uniform integer weights, ``int2`` .. ``int8`` (``bits`` 2..8, ``scheme: uniform``).

Symmetric per-output-channel levels ``q * scale``, ``q`` an integer in
``[-(2**(b-1) - 1), 2**(b-1) - 1]`` and ``scale = max|w| / (2**(b-1) - 1)`` per output channel.
Packed as ``q + qmax`` (unsigned) in ``b`` bits; in the packed header as the integer ``b``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from autocompress.compress.formats._base import FORMATS
from autocompress.compress.formats._bitpack import pack_bits, unpack_bits
from autocompress.compress.formats._integer import IntegerFormat

__all__ = ["UniformFormat", "uniform_quantize"]


def uniform_quantize(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: symmetric per-output-channel uniform levels (module docstring)."""
    qmax = 2 ** (bits - 1) - 1
    amax = w.detach().abs().flatten(1).amax(dim=1).clamp_min(1e-12)
    scale = (amax / qmax).view(-1, *([1] * (w.dim() - 1)))
    q = torch.clamp(torch.round(w / scale), -qmax, qmax)
    return q, scale


@dataclass(frozen=True)
class UniformFormat(IntegerFormat):
    """``bits``-bit symmetric uniform levels (module docstring)."""

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return uniform_quantize(w, self.bits)

    def pack(self, values: np.ndarray) -> bytes:
        return pack_bits(values.astype(np.int32) + self._qmax, self.bits)

    def unpack(self, raw: bytes, count: int) -> np.ndarray:
        return unpack_bits(raw, self.bits, count) - self._qmax

    @property
    def _qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1


for _bits in range(2, 9):
    FORMATS.register(f"int{_bits}", UniformFormat(f"int{_bits}", _bits, "uniform", _bits))
