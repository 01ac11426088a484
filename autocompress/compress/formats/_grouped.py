"""Group-wise uniform integer weights, ``int2-g32`` .. ``int8-g128`` (``bits`` 2..8,
``group_size`` 32, 64 or 128).

The weight, flattened to ``(out, d)`` (a conv's ``C_in * kernel`` columns in the order
:func:`~autocompress.compress._calibration.input_rows` unfolds its input), is cut into groups
of ``g`` consecutive input columns; every row of every group has its own symmetric scale
``max|w| / (2**(b-1) - 1)``: the uniform per-channel levels of ``_uniform.py`` applied to each
(row, group), as GPTQ's and AWQ's group-wise formats store 3-4 bit weights (a scale follows
the outliers of its group only). The last group is shorter where ``g`` does not divide ``d``
(a low-rank factor's width; the plan refuses such a group size on a layer itself).
``out * ceil(d / g)`` fp32 scales, row-major (row, group).

Packed as the uniform codes followed by the scales; in the packed header as
``"int<b>:g<g>"`` (version 6). In ONNX, where ONNX Runtime's contrib operators may run
(``export_onnx(contrib_ops=True)``), 2, 4 and 8 bits go to its block-wise kernels
(``MatMulNBits``, ``GatherBlockQuantized``: ``onnxgraph/_nbits.py``) as :meth:`blocks` gives
them: the codes plus ``2**(b-1)``, unsigned, in ``(out, G, g)`` blocks, and the ``(out, G)``
scales. Otherwise (the exporter writes opset 17; the blocked ``DequantizeLinear`` is opset 21):
int8 codes ``(out, G, g)`` (zero-padded), ``Cast``, ``Mul`` by the ``(out, G, 1)`` scales,
``Reshape`` (a ``Slice`` drops the padding) to the weight's shape (``Transpose`` where the
exporter transposed it): constants that ONNX Runtime folds into the fp32 weight at load time
(size, not speed). A BatchNorm folds: every scale of a row times ``|k|``, the sign into the
codes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from autocompress.compress.formats._base import (
    FORMATS,
    BlockCodes,
    InitializerSlot,
    OnnxNodes,
    StoredWeight,
)
from autocompress.compress.formats._names import GROUP_SIZES
from autocompress.compress.formats._uniform import UniformFormat, uniform_quantize

__all__ = ["GroupedFormat", "expand_scales", "group_quantize"]


def group_quantize(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: ``q`` integer levels shaped as ``w``, ``scale`` ``(out, groups)``
    (module docstring)."""
    flat = w.flatten(1)
    out, d = flat.shape
    rows = F.pad(flat, (0, -d % group)).reshape(-1, group)  # one row per (output, group)
    q, scale = uniform_quantize(rows, bits)
    return q.reshape(out, -1)[:, :d].reshape(w.shape), scale.reshape(out, -1)


def expand_scales(scale: torch.Tensor, shape: Sequence[int], group: int) -> torch.Tensor:
    """The ``(out, groups)`` scales repeated over their columns: one per value of ``shape``."""
    d = math.prod(shape[1:])
    return scale.repeat_interleave(group, dim=1)[:, :d].reshape(tuple(shape))


@dataclass(frozen=True)
class GroupedFormat(UniformFormat):
    """``bits``-bit symmetric uniform levels, one scale per output channel and group of
    ``group_size`` input columns (module docstring)."""

    group_size: int = 128

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q, scale)`` with ``scale`` expanded to ``w``'s shape (one per value)."""
        q, scale = group_quantize(w, self.bits, self.group_size)
        return q, expand_scales(scale, w.shape, self.group_size)

    def store(self, w: torch.Tensor) -> StoredWeight:
        """The codes and the ``out * groups`` scales (row-major)."""
        with torch.no_grad():
            q, scale = group_quantize(w, self.bits, self.group_size)
        return StoredWeight(self, q.to(torch.int32).numpy(), scale.flatten().float().numpy())

    def scales(self, shape: Sequence[int]) -> int:
        return int(shape[0]) * self._groups(shape)

    def rescaled(self, values: np.ndarray, scale: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        d = math.prod(shape[1:])
        cols = np.repeat(scale.reshape(shape[0], -1), self.group_size, axis=1)[:, :d]
        return (values.reshape(shape[0], d).astype(np.float32) * cols).reshape(tuple(shape))

    def blocks(self, stored: StoredWeight) -> BlockCodes:
        """The codes plus ``2**(bits-1)`` (unsigned, zero point ``2**(bits-1)``) in ``(out,
        groups, group_size)``, the short last group padded with the zero point, and the
        ``(out, groups)`` scales: the stored numbers, as ONNX Runtime's block-wise kernels take
        them."""
        assert stored.scale is not None
        shape, g, zero = stored.values.shape, self.group_size, 2 ** (self.bits - 1)
        out, groups, d = shape[0], self._groups(shape), math.prod(shape[1:])
        codes = np.full((out, groups * g), zero, np.int64)
        codes[:, :d] += stored.values.reshape(out, d)
        return BlockCodes(codes.reshape(out, groups, g),
                          stored.scale.reshape(out, groups).astype(np.float32), self.bits, g, zero, d)

    def _groups(self, shape: Sequence[int]) -> int:
        return math.ceil(math.prod(shape[1:]) / self.group_size)

    def to_onnx(self, stored: StoredWeight, slot: InitializerSlot, name: str) -> OnnxNodes:
        """int8 codes + Cast, Mul, Reshape (module docstring) producing ``slot``'s initializer:
        BN-folded, the codes keep their magnitude, the scales become ``scale * |k|`` and the
        sign moves into the codes (exact); transposed, the weight is transposed last."""
        from onnx import TensorProto, helper, numpy_helper

        assert stored.scale is not None
        shape, init, g = stored.values.shape, slot.init.name, self.group_size
        out, groups, d = shape[0], self._groups(shape), math.prod(shape[1:])
        k = np.ones(out, np.float32) if slot.transposed else slot.k
        codes = np.zeros((out, groups * g), np.int8)
        codes[:, :d] = stored.values.reshape(out, d) * np.where(k < 0, -1, 1)[:, None]
        scale = stored.scale.reshape(out, groups) * np.abs(k)[:, None]
        inits = [numpy_helper.from_array(codes.reshape(out, groups, g), f"{init}_codes"),
                 numpy_helper.from_array(scale.astype(np.float32)[:, :, None], f"{init}_scale"),
                 numpy_helper.from_array(np.array(shape, np.int64), f"{init}_shape")]
        nodes = [helper.make_node("Cast", [f"{init}_codes"], [f"{init}_float"],
                                  name=f"{name}_cast", to=TensorProto.FLOAT),
                 helper.make_node("Mul", [f"{init}_float", f"{init}_scale"], [f"{init}_groups"],
                                  name=f"{name}_rescale")]
        rows = f"{init}_groups"
        if d % g:  # the padding of the last group goes
            inits += [numpy_helper.from_array(np.array(v, np.int64), f"{init}_{n}") for n, v in
                      (("rows", [out, groups * g]), ("start", [0]), ("end", [d]), ("axis", [1]))]
            nodes += [helper.make_node("Reshape", [rows, f"{init}_rows"], [f"{init}_padded"],
                                       name=f"{name}_rows"),
                      helper.make_node("Slice", [f"{init}_padded", f"{init}_start", f"{init}_end",
                                                 f"{init}_axis"], [f"{init}_cols"],
                                       name=f"{name}_unpad")]
            rows = f"{init}_cols"
        weight = f"{init}_weight" if slot.transposed else init
        nodes.append(helper.make_node("Reshape", [rows, f"{init}_shape"], [weight],
                                      name=f"{name}_reshape"))
        if slot.transposed:
            nodes.append(helper.make_node("Transpose", [weight], [init], name=f"{name}_transpose",
                                          perm=[1, 0]))
        return inits, nodes


for _bits in range(2, 9):
    for _group in GROUP_SIZES:
        FORMATS.register(f"int{_bits}-g{_group}", GroupedFormat(
            f"int{_bits}-g{_group}", _bits, "uniform", f"int{_bits}:g{_group}", packed_version=6,
            group_size=_group))
