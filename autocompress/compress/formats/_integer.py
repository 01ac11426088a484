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
    codes_for_slot,
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

        assert stored.scale is not None
        init = slot.init.name
        q_new, scale_new, axis = codes_for_slot(stored.values, stored.scale, slot)
        inits = [numpy_helper.from_array(q_new.astype(np.int8), f"{init}_quantized"),
                 numpy_helper.from_array(scale_new.astype(np.float32), f"{init}_scale"),
                 numpy_helper.from_array(np.zeros(scale_new.shape, np.int8), f"{init}_zero_point")]
        return inits, [helper.make_node(
            "DequantizeLinear", [f"{init}_quantized", f"{init}_scale", f"{init}_zero_point"],
            [init], name=f"{name}_dequantize", axis=axis)]
