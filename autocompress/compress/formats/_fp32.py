"""fp32: a weight (or any other tensor) stored as it is, 32 bits per value, no scale.

Packed as raw little-endian float32 (the packed header's encoding 32); never rewritten in an
ONNX export.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from autocompress.compress.formats._base import FORMATS, WeightFormat

__all__ = ["Float32Format"]


@dataclass(frozen=True)
class Float32Format(WeightFormat):
    """The uncompressed format (module docstring)."""

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, None]:
        return w, None

    def pack(self, values: np.ndarray) -> bytes:
        return values.astype("<f4").tobytes()

    def unpack(self, raw: bytes, count: int) -> np.ndarray:
        return np.frombuffer(raw, "<f4")


FORMATS.register("fp32", Float32Format("fp32", 32, "fp32", 32))
