"""What integer formats share: codes with one fp32 scale per output channel, exported to ONNX
as int8 + ``DequantizeLinear`` when the codes fit int8."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autocompress.compress.formats._base import (
    InitializerSlot,
    OnnxNodes,
    StoredWeight,
    WeightFormat,
    per_row,
)

__all__ = ["IntegerFormat"]


@dataclass(frozen=True)
class IntegerFormat(WeightFormat):
    """Integer codes times a per-output-channel fp32 scale."""

    scaled: bool = True

    def onnx_stores(self, stored: StoredWeight) -> bool:
        """The codes fit int8 (pow2 over 4 bits does not: its weight stays fp32, exactly)."""
        q = stored.values
        return q.size == 0 or int(np.abs(q).max()) <= 127

    def to_onnx(self, stored: StoredWeight, slot: InitializerSlot, name: str) -> OnnxNodes:
        """int8 values + DequantizeLinear producing ``slot``'s initializer: BN-folded, the int8
        values stay, the scale becomes ``scale * |k|`` and the sign moves into the values;
        transposed, dequantized along axis 1."""
        from onnx import helper, numpy_helper

        q, scale = stored.values, stored.scale
        assert scale is not None
        init = slot.init.name
        if slot.transposed:
            q_new, scale_new, axis = np.ascontiguousarray(q.T), scale, 1
        else:
            q_new = q * per_row(np.where(slot.k < 0, -1, 1), q.ndim)
            scale_new, axis = scale * np.abs(slot.k), 0
        inits = [numpy_helper.from_array(q_new.astype(np.int8), f"{init}_quantized"),
                 numpy_helper.from_array(scale_new.astype(np.float32), f"{init}_scale"),
                 numpy_helper.from_array(np.zeros(scale_new.shape, np.int8), f"{init}_zero_point")]
        return inits, [helper.make_node(
            "DequantizeLinear", [f"{init}_quantized", f"{init}_scale", f"{init}_zero_point"],
            [init], name=f"{name}_dequantize", axis=axis)]
