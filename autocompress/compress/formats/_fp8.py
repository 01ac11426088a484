"""8-bit float weights, ``fp8`` (``bits: "fp8"``): OCP FP8 E4M3 ("e4m3fn") with one fp32 scale
per output channel.

The weight divided by its channel's scale ``s = max|w| / 448`` (448: e4m3's largest finite
value, so each channel uses the whole fp8 range) and rounded to e4m3 (round to nearest even,
``torch.float8_e4m3fn``): 1 sign, 4 exponent and 3 mantissa bits, so a value in the normal
range (``|w| >= 2**-6 · s``) is within a relative ``2**-4`` of the weight; smaller ones are
subnormal (steps of ``2**-9 · s``). The scale is ``max|w| / 448`` normalized to the fp32 value
that quantizing the stored values again gives back (``(s · 448) / 448``, within one ulp of
it), so fake quantization is idempotent and a trial rebuilt from its logged weights is the same.
Stored as the e4m3 codes (:attr:`StoredWeight.values` holds their float32 values, in units of
the scale) + the fp32 scales; a BatchNorm folds in like it does into an integer format (the
codes stay, the scales are multiplied).

Packed as the raw e4m3 bytes (1 byte per value) followed by the scales; in the packed header as
``"fp8"`` (version 5).

ONNX: :meth:`Fp8Format.to_onnx` writes a ``FLOAT8E4M3FN`` initializer + ``DequantizeLinear``
(per-axis fp32 scale), which needs opset 19 (and IR version 9); ONNX Runtime 1.32's CPU provider
runs it exactly. The exporter writes opset 17 (``onnxgraph.ONNX_OPSET``), where no float8 type
exists, so :meth:`Fp8Format.onnx_stores` says no: the ONNX weight stays the fp32 value it
computes with (exactly), as pow2 weights over 4 bits do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from autocompress.compress.formats._base import (
    FORMATS,
    InitializerSlot,
    OnnxNodes,
    StoredWeight,
    WeightFormat,
    codes_for_slot,
)

__all__ = ["FP8_MAX", "Fp8Format", "fp8_bytes", "fp8_from_bytes", "fp8_quantize"]

FP8_MAX = 448.0  # e4m3fn's largest finite value


def fp8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: ``q`` float32 values of e4m3, ``scale`` per output channel (module
    docstring)."""
    amax = w.detach().abs().flatten(1).amax(dim=1).clamp_min(1e-12)
    scale = amax / FP8_MAX
    scale = (scale * FP8_MAX) / FP8_MAX  # the fixed point: requantizing ``q * scale`` gives it
    scale = scale.view(-1, *([1] * (w.dim() - 1)))
    scaled = (w / scale).clamp(-FP8_MAX, FP8_MAX)  # e4m3fn has no infinity: beyond 464 is NaN
    return scaled.to(torch.float8_e4m3fn).to(w.dtype), scale


def fp8_bytes(values: np.ndarray) -> bytes:
    """``values`` (float32, already e4m3 values) as raw e4m3 bytes."""
    t = torch.from_numpy(np.ascontiguousarray(values, np.float32)).to(torch.float8_e4m3fn)
    return t.view(torch.uint8).numpy().tobytes()


def fp8_from_bytes(raw: bytes) -> np.ndarray:
    """The inverse of :func:`fp8_bytes`: float32 values."""
    codes = torch.from_numpy(np.frombuffer(raw, np.uint8).copy())
    return codes.view(torch.float8_e4m3fn).float().numpy()


@dataclass(frozen=True)
class Fp8Format(WeightFormat):
    """An fp8 (e4m3) weight with per-output-channel scales (module docstring)."""

    scaled: bool = True

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fp8_quantize(w)

    def store(self, w: torch.Tensor) -> StoredWeight:
        """The e4m3 values as float32 (not integer codes) and the scales."""
        with torch.no_grad():
            q, scale = self.quantize(w)
        return StoredWeight(self, q.float().numpy(), scale.flatten().float().numpy())

    def pack(self, values: np.ndarray) -> bytes:
        return fp8_bytes(values)

    def unpack(self, raw: bytes, count: int) -> np.ndarray:
        return fp8_from_bytes(raw)

    def onnx_stores(self, stored: StoredWeight) -> bool:
        """No: :meth:`to_onnx` needs opset 19, the exporter writes 17 (module docstring)."""
        return False

    def to_onnx(self, stored: StoredWeight, slot: InitializerSlot, name: str) -> OnnxNodes:
        """A ``FLOAT8E4M3FN`` initializer + ``DequantizeLinear`` (opset >= 19) producing
        ``slot``'s initializer: BN-folded, the codes stay, the scale becomes ``scale * |k|`` and
        the sign moves into the codes (exact); transposed, dequantized along axis 1."""
        from onnx import TensorProto, helper, numpy_helper

        assert stored.scale is not None
        init = slot.init.name
        q_new, scale_new, axis = codes_for_slot(stored.values, stored.scale, slot)
        inits = [helper.make_tensor(f"{init}_fp8", TensorProto.FLOAT8E4M3FN, q_new.shape,
                                    fp8_bytes(q_new), raw=True),
                 numpy_helper.from_array(scale_new.astype(np.float32), f"{init}_scale")]
        return inits, [helper.make_node("DequantizeLinear", [f"{init}_fp8", f"{init}_scale"],
                                        [init], name=f"{name}_dequantize", axis=axis)]


FORMATS.register("fp8", Fp8Format("fp8", 8, "fp8", "fp8", packed_version=5))
