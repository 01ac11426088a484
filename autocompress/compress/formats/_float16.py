"""16-bit float weights, ``fp16`` and ``bf16`` (``bits: "fp16" | "bf16"``).

The weight rounded to IEEE half precision or to bfloat16 (round to nearest even; fp16
saturates at ±65504), 16 bits per value, no scale. Packed as raw little-endian 2-byte values;
exported to ONNX as a 16-bit initializer + ``Cast`` to float. Not folded with a BatchNorm:
rescaled values would round again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from autocompress.compress.formats._base import (
    FORMATS,
    InitializerSlot,
    OnnxNodes,
    StoredWeight,
    WeightFormat,
    per_row,
)

__all__ = ["FLOAT_DTYPES", "Float16Format", "float_bytes", "float_from_bytes", "round_to_float"]

FLOAT_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}
_ONNX_DTYPES = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}


def round_to_float(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """``w`` rounded to ``fmt`` (``"fp16"`` or ``"bf16"``) and back to its dtype; fp16
    saturates at its largest finite value instead of overflowing to infinity."""
    dtype = FLOAT_DTYPES[fmt]
    big = torch.finfo(dtype).max
    return w.clamp(-big, big).to(dtype).to(w.dtype)


def float_bytes(values: np.ndarray, fmt: str) -> bytes:
    """``values`` (float32, already representable) as little-endian 2-byte fp16/bf16."""
    t = torch.from_numpy(np.ascontiguousarray(values, np.float32)).to(FLOAT_DTYPES[fmt])
    return t.view(torch.int16).numpy().astype("<i2").tobytes()


def float_from_bytes(raw: bytes, fmt: str) -> np.ndarray:
    """The inverse of :func:`float_bytes`: float32 values."""
    halves = torch.from_numpy(np.frombuffer(raw, "<i2").astype(np.int16))
    return halves.view(FLOAT_DTYPES[fmt]).float().numpy()


@dataclass(frozen=True)
class Float16Format(WeightFormat):
    """A 16-bit float weight (module docstring)."""

    folds: bool = False

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, None]:
        return round_to_float(w, self.name), None

    def pack(self, values: np.ndarray) -> bytes:
        return float_bytes(values, self.name)

    def unpack(self, raw: bytes, count: int) -> np.ndarray:
        return float_from_bytes(raw, self.name)

    def onnx_stores(self, stored: StoredWeight) -> bool:
        return True

    def to_onnx(self, stored: StoredWeight, slot: InitializerSlot, name: str) -> OnnxNodes:
        """A float16/bfloat16 initializer + Cast to float producing ``slot``'s initializer;
        BN-folded (``X != W``), a Mul by the per-channel ``k`` follows, so the 16-bit values
        stay exactly the trained ones."""
        init, fmt = slot.init.name, self.name
        w = np.ascontiguousarray(stored.values.T) if slot.transposed else stored.values
        inits = [helper.make_tensor(f"{init}_{fmt}", _ONNX_DTYPES[fmt], w.shape, float_bytes(w, fmt),
                                    raw=True)]
        cast = f"{init}_cast"
        if np.array_equal(numpy_helper.to_array(slot.init), w):
            cast = init  # the common case: the initializer is the weight itself
        nodes = [helper.make_node("Cast", [f"{init}_{fmt}"], [cast], name=f"{name}_cast",
                                  to=onnx.TensorProto.FLOAT)]
        if cast != init:
            inits.append(numpy_helper.from_array(per_row(slot.k, w.ndim).astype(np.float32),
                                                 f"{init}_k"))
            nodes.append(helper.make_node("Mul", [cast, f"{init}_k"], [init], name=f"{name}_fold"))
        return inits, nodes


for _name in FLOAT_DTYPES:
    FORMATS.register(_name, Float16Format(_name, 16, _name, _name, packed_version=2))
