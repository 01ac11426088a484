"""The packed format's tensor codec: each tensor's values in its layout (dense, bitmap, delta)
and its weight format (:class:`~autocompress.compress.formats.WeightFormat`: bit-packed codes
and scales, 16-bit floats or raw fp32), and the header tokens that name them. The file format
is described in :mod:`autocompress.deploy._packed`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autocompress.compress import FORMATS, WeightFormat
from autocompress.compress.formats import pack_bits, unpack_bits
from autocompress.deploy._architecture import PackedFormatError
from autocompress.measure.size import INDEX_WIDTHS, Layout, gaps_of

__all__ = ["decode_tensor", "encode_tensor", "format_token", "layout_token", "pack_bits",
           "parse_layout", "parse_token", "take", "unpack_bits", "version_of"]


def _layout_split(values: np.ndarray, layout: Layout) -> tuple[bytes, np.ndarray]:
    """The index bytes of ``layout`` and the values it stores, in order (see the module
    docstring): none and all values (dense), the presence bitmap and the non-zeros (bitmap),
    the relative indexes and the entries' values, fillers' zeros included (delta)."""
    if layout.kind == "dense":
        return b"", values
    nonzero = values != 0
    if layout.kind == "bitmap":
        return np.packbits(nonzero, bitorder="little").tobytes(), values[nonzero]
    gaps = gaps_of(nonzero)
    span = 1 << layout.width
    reps = ((gaps - 1) >> layout.width) + 1  # entries per non-zero: fillers, then itself
    ends = np.cumsum(reps) - 1
    if ends.size and ends[-1] + 1 != layout.entries:
        raise PackedFormatError(f"the tensor has {ends[-1] + 1} delta entries, its size row "
                                f"{layout.entries}: it changed after size_report")
    dist = np.full(layout.entries, span, np.int64)
    dist[ends] = gaps - (reps - 1) * span
    stored = np.zeros(layout.entries, values.dtype)
    stored[ends] = values[nonzero]
    return pack_bits(dist - 1, layout.width), stored


def encode_tensor(values: np.ndarray, fmt: WeightFormat, layout: Layout,
                  scale: np.ndarray | None = None) -> bytes:
    """``values`` (flat: codes of a scaled format, else float32) in ``layout`` and ``fmt``,
    followed by the format's fp32 ``scale``s."""
    prefix, values = _layout_split(values, layout)
    chunk = prefix + fmt.pack(values)
    if fmt.scaled:
        assert scale is not None
        chunk += scale.astype("<f4").tobytes()
    return chunk


def take(buf: memoryview, offset: int, nbytes: int) -> bytes:
    """``nbytes`` of ``buf`` at ``offset``; a short read is a truncated file."""
    raw = bytes(buf[offset:offset + nbytes])
    if len(raw) != nbytes:
        raise PackedFormatError("packed file is truncated")
    return raw


def _decode_positions(buf: memoryview, offset: int, numel: int,
                      layout: Layout) -> tuple[np.ndarray | None, int, int]:
    """Reads the index of a tensor in ``layout`` at ``offset``: the flat positions of its
    stored values (None: all, dense), how many values follow, and the offset after the index."""
    if layout.kind == "dense":
        return None, numel, offset
    if layout.kind == "bitmap":
        nbytes = math.ceil(numel / 8)
        mask = np.unpackbits(np.frombuffer(take(buf, offset, nbytes), np.uint8), count=numel,
                             bitorder="little").astype(bool)
        return np.flatnonzero(mask), int(mask.sum()), offset + nbytes
    nbytes = math.ceil(layout.entries * layout.width / 8)
    dist = unpack_bits(take(buf, offset, nbytes), layout.width, layout.entries) + 1
    positions = np.cumsum(dist) - 1
    if positions.size and positions[-1] >= numel:
        raise PackedFormatError("packed file is damaged: a relative index runs past its tensor")
    return positions, layout.entries, offset + nbytes


def decode_tensor(buf: memoryview, offset: int, shape: Sequence[int], fmt: WeightFormat,
                  layout: Layout) -> tuple[np.ndarray, int]:
    """Reads one tensor of ``shape`` at ``offset`` (the inverse of :func:`encode_tensor`);
    returns its fp32 values, shaped, and the next offset."""
    numel = math.prod(shape)
    positions, count, offset = _decode_positions(buf, offset, numel, layout)
    nbytes = math.ceil(count * fmt.bits / 8)
    vals = fmt.unpack(take(buf, offset, nbytes), count)
    offset += nbytes
    if positions is not None:
        out = np.zeros(numel, vals.dtype)
        out[positions] = vals
        vals = out
    if fmt.scaled:
        nscales = fmt.scales(shape)
        scale = np.frombuffer(take(buf, offset, 4 * nscales), "<f4")
        offset += 4 * nscales
        vals = fmt.rescaled(vals, scale, shape)
    return np.array(vals, np.float32).reshape(tuple(shape)), offset


def format_token(fmt: WeightFormat) -> int | str:
    """A tensor's encoding in the header: its format's token (see the module docstring)."""
    return fmt.token


def parse_token(token: Any, path: Path) -> WeightFormat:
    """The format of a header encoding token."""
    for fmt in FORMATS.load_all().values():
        if type(token) is type(fmt.token) and token == fmt.token:
            return fmt
    raise PackedFormatError(f"{path}: unknown tensor encoding {token!r}")


def version_of(fmt: WeightFormat, layout: Layout) -> int:
    """The oldest format version that reads a tensor of ``fmt`` in ``layout``."""
    return max(fmt.packed_version, 3 if layout.kind == "delta" else 1)


def layout_token(layout: Layout) -> int | list[int]:
    """A tensor's layout in the header: 0 dense, 1 bitmap, ``[width, entries]`` delta."""
    return [layout.width, layout.entries] if layout.kind == "delta" else int(layout.kind == "bitmap")


def parse_layout(token: Any, path: Path) -> Layout:
    """The :class:`Layout` of a header layout token (bytes are not needed to read it)."""
    if token in (0, 1) and not isinstance(token, bool):
        return Layout("bitmap" if token else "dense", 0)
    if (isinstance(token, list) and len(token) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in token)
            and token[0] in INDEX_WIDTHS and token[1] >= 0):
        return Layout("delta", 0, token[0], token[1])
    raise PackedFormatError(f"{path}: unknown tensor layout {token!r}")
