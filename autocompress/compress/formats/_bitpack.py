"""Bit packing of unsigned integer codes (the packed format's value and index streams)."""

from __future__ import annotations

import numpy as np

__all__ = ["pack_bits", "unpack_bits"]


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Packs unsigned integers ``< 2**bits`` into ``ceil(len(values) * bits / 8)`` bytes
    (little-endian bit order)."""
    v = np.ascontiguousarray(values, dtype=np.uint16).ravel()
    planes = (v[:, None] >> np.arange(bits, dtype=np.uint16)) & 1
    return np.packbits(planes.astype(np.uint8).ravel(), bitorder="little").tobytes()


def unpack_bits(buf: bytes, bits: int, count: int) -> np.ndarray:
    """The inverse of :func:`pack_bits`: ``count`` unsigned integers of ``bits`` bits."""
    planes = np.unpackbits(np.frombuffer(buf, np.uint8), count=count * bits, bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.int64))
    return planes.reshape(count, bits).astype(np.int64) @ weights
