"""The weight format record, the registry of formats and the lookup from plan values.

A :class:`WeightFormat` says everything the rest of the package needs to know about how a
compressed weight is stored: its bits per value, how it quantizes (fake quantization during
fine-tuning, the stored codes and scales at export), how its values are bit-packed in the
packed file, how it becomes an ONNX initializer, whether a BatchNorm folds into it and how many
bytes it stores. Size accounting (``measure/size.py``), the packed format
(``deploy/_packed*.py``), ONNX export (``onnxgraph``), BatchNorm folding (``compress/_fold.py``)
and fake quantization (``compress/_modules.py``) ask the format instead of branching on it.

To add a format: write one module that registers it (``_pow2.py`` is the one to copy) and name
it in :data:`~autocompress.compress.formats._names.BUILTIN_FORMATS`: the ``bits`` knob offers
every format whose plan value is a name (``fp16``), the packed file's version follows the
formats' ``packed_version``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from autocompress.compress.formats._names import BUILTIN_FORMATS, FORMATS, format_name, plan_values

__all__ = ["BUILTIN_FORMATS", "FORMATS", "BlockCodes", "InitializerSlot", "OnnxNodes", "StoredWeight",
           "WeightFormat", "codes_for_slot", "compressed_value", "format_name", "per_row", "plan_values",
           "quantize_weight", "weight_format"]

OnnxNodes = tuple[list[Any], list[Any]]  # (initializers, nodes): onnx TensorProto / NodeProto


class InitializerSlot(Protocol):
    """Where a weight sits in an exported ONNX graph (``onnxgraph.WeightMatch``): initializer
    ``init`` holds ``w * k`` per output channel, transposed if ``transposed``."""

    @property
    def init(self) -> Any: ...  # onnx.TensorProto

    @property
    def k(self) -> np.ndarray: ...

    @property
    def transposed(self) -> bool: ...


def per_row(values: np.ndarray, ndim: int) -> np.ndarray:
    """``values`` (one per output channel) shaped to broadcast over a tensor of ``ndim`` dims."""
    return values.reshape(-1, *([1] * (ndim - 1)))


def codes_for_slot(q: np.ndarray, scale: np.ndarray, slot: InitializerSlot
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-channel codes ``q`` and scales placed in ``slot``'s initializer: ``(codes, scales,
    DequantizeLinear axis)``. BN-folded, the codes stay, the scale becomes ``scale * |k|`` and
    the sign moves into the codes (exact); transposed, dequantized along axis 1."""
    if slot.transposed:
        return np.ascontiguousarray(q.T), scale, 1
    return q * per_row(np.where(slot.k < 0, -1, 1), q.ndim).astype(q.dtype), scale * np.abs(slot.k), 0


@dataclass(frozen=True)
class BlockCodes:
    """A weight as block-wise kernels take it (ONNX Runtime's ``MatMulNBits`` and
    ``GatherBlockQuantized``): unsigned codes in blocks of consecutive input columns, one scale
    per output channel and block, value ``(code - zero_point) * scale``.

    Attributes:
        codes: ``(out, blocks, block_size)`` unsigned integers ``< 2**bits`` (int64); the
            padding of a short last block holds ``zero_point`` (the value 0).
        scales: ``(out, blocks)`` fp32 scales.
        bits: Bits per code.
        block_size: Input columns per block.
        zero_point: The code of 0 (one for all blocks: a symmetric format).
        width: The input columns that are real (``<= blocks * block_size``).
    """

    codes: np.ndarray
    scales: np.ndarray
    bits: int
    block_size: int
    zero_point: int
    width: int


@dataclass(frozen=True)
class StoredWeight:
    """A weight as its format stores it.

    Attributes:
        format: The format.
        values: Codes of a scaled format (int32 integers; fp8: the e4m3 values as float32),
            else the fp32 values (exactly representable in the format).
        scale: fp32 scales of a scaled format (one per output channel; a grouped format:
            one per output channel and group of input columns, row-major), else None.
    """

    format: WeightFormat
    values: np.ndarray
    scale: np.ndarray | None = None

    def dequantized(self) -> np.ndarray:
        """The fp32 values the weight computes with."""
        if self.scale is None:
            return self.values
        return self.format.rescaled(self.values, self.scale, self.values.shape)


@dataclass(frozen=True)
class WeightFormat:
    """How one kind of weight is stored (module docstring). Subclasses implement
    :meth:`quantize`, :meth:`pack` and :meth:`unpack`; the rest has defaults.

    Attributes:
        name: Registry name (``"int4"``, ``"pow2-4"``, ``"fp16"``).
        bits: Bits per stored value.
        family: What the values are, as size reports name it (``"uniform"``, ``"pow2"``,
            ``"fp16"``, ...).
        token: The tensor encoding of the packed file's header.
        packed_version: The oldest packed format version that reads it.
        scaled: Whether fp32 scales are stored with the codes (one per output channel, or
            per output channel and group: :meth:`scales`).
        folds: Whether a BatchNorm after the layer may be folded into the stored weight.
    """

    name: str
    bits: int
    family: str
    token: int | str
    packed_version: int = 1
    scaled: bool = False
    folds: bool = True

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(codes, scale)`` of a scaled format (``codes * scale`` approximates ``w``,
        ``scale`` broadcastable to it), else ``(value, None)``."""
        raise NotImplementedError

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        """The value ``w`` is stored as (and computed with during fine-tuning)."""
        q, scale = self.quantize(w)
        return q if scale is None else q * scale

    def store(self, w: torch.Tensor) -> StoredWeight:
        """``w`` (already on the format's grid, or not) as stored."""
        with torch.no_grad():
            q, scale = self.quantize(w)
        if scale is None:
            return StoredWeight(self, q.detach().float().numpy())
        return StoredWeight(self, q.to(torch.int32).numpy(), scale.flatten().float().numpy())

    def pack(self, values: np.ndarray) -> bytes:
        """Flat stored values (codes of a scaled format, else fp32) as ``bits``-wide bytes."""
        raise NotImplementedError

    def unpack(self, raw: bytes, count: int) -> np.ndarray:
        """The inverse of :meth:`pack`: ``count`` values."""
        raise NotImplementedError

    def scales(self, shape: Sequence[int]) -> int:
        """How many fp32 scales a tensor of ``shape`` stores."""
        return int(shape[0]) if self.scaled else 0

    def rescaled(self, values: np.ndarray, scale: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """Codes ``values`` (any shape of ``shape``'s size) times their ``scale``s: fp32 of
        ``shape``. One scale per output channel here; a grouped format overrides
        :meth:`scales` and this."""
        rows = values.reshape(shape[0], -1).astype(np.float32) * scale.reshape(-1, 1)
        return rows.reshape(tuple(shape))

    def stored_bytes(self, shape: Sequence[int]) -> int:
        """Bytes of a dense tensor of ``shape``: values bit-packed, plus the scales."""
        return math.ceil(math.prod(shape) * self.bits / 8) + 4 * self.scales(shape)

    def onnx_stores(self, stored: StoredWeight) -> bool:
        """Whether the ONNX export stores the weight in this format (else as fp32)."""
        return False

    def to_onnx(self, stored: StoredWeight, slot: InitializerSlot, name: str) -> OnnxNodes:
        """The initializers and nodes that compute ``slot.init`` from the stored weight (standard
        ONNX operators)."""
        raise NotImplementedError(f"weight format {self.name!r} has no ONNX form")

    def blocks(self, stored: StoredWeight) -> BlockCodes | None:
        """The stored codes and scales as block-wise kernels take them (the same numbers, no
        re-rounding), or None: the format is not block-wise. ONNX export hands them to ONNX
        Runtime's kernels where the graph and the kernel allow it (``onnxgraph/_nbits.py``),
        else writes :meth:`to_onnx`."""
        return None


def weight_format(bits: int | str | None, scheme: str = "uniform",
                  group_size: int | None = None) -> WeightFormat:
    """The format that stores a weight at plan values ``bits``/``scheme``/``group_size``.

    Raises:
        UnknownNameError: No format has those values.
    """
    return FORMATS.get(format_name(bits, scheme, group_size), key="bits")


def compressed_value(w: torch.Tensor, bits: int | str, scheme: str = "uniform") -> torch.Tensor:
    """The value a weight is stored as (and computed with) at plan values ``bits``/``scheme``."""
    return weight_format(bits, scheme).fake_quant(w)


def quantize_weight(w: torch.Tensor, bits: int,
                    scheme: str = "uniform") -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` of an integer format: integer-valued ``q`` (as float) and ``scale``
    broadcastable to ``w``, so that ``q * scale`` approximates ``w``."""
    q, scale = weight_format(bits, scheme).quantize(w)
    if scale is None:
        raise ValueError(f"bits={bits!r} is not an integer format")
    return q, scale
