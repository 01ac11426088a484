"""The packed format: a compressed model stored in the bytes that ``size_bytes`` reports.

``save_packed(model, path)`` writes a ``.acpk`` file; ``autocompress.load_packed(path)``
rebuilds an eval-mode ``nn.Module`` from that file alone (no task, plan or model class needed)
whose outputs equal the compressed model's (to fp32 rounding).

Layout (little-endian)::

    b"ACPK" | u8 format version | u32 header length | header (zlib-compressed JSON) | payload

Format version 2 added tensor encodings (fp16/bf16 and pow2 weights), version 3 the delta
(relative-index) layout of sparse tensors, version 4 ties (a tensor that several modules
share). A file is written as the oldest version that has what it uses (one without them is
version 1, byte for byte what earlier releases wrote), so older readers still read it; this
reader reads all four.

The header describes the architecture without pickle, as data only:

- ``modules``: ``{qualified name: [type name, constructor kwargs]}`` for every leaf module the
  forward calls (arguments at their defaults left out). Leaf types come from a fixed whitelist
  (:data:`LEAF_TYPES`: conv, linear, batch/layer norm, activations, pooling, flatten, dropout,
  identity, ``ActFakeQuant``).
- ``graph``: the forward as a ``torch.fx`` graph, one ``[op, target, args, kwargs]`` entry
  per node (node references by index). Modules outside the whitelist (``Sequential``,
  ``LowRank``, the user's own classes) are traced through, so only their ops remain. Function
  targets are qualified names restricted to ``torch.*``, ``operator.*``, ``math.*`` and
  ``getattr``, looked up by name at load time. Loading unpickles nothing and runs no code from
  the file; running the model calls the functions its graph names, so a file from an
  untrusted source deserves the care any model file does.
- ``tensors``: ``[name, encoding, layout]`` per stored tensor, in payload order (shapes follow
  from the modules; a tensor the forward reads directly, not through a leaf module, also
  carries ``[shape, is_param]``). The encoding is the bit-width for fp32 (32) and uniform
  integer levels (2..8), as in version 1; ``"fp16"``, ``"bf16"`` or ``"pow2:<bits>"``
  (version 2). The layout is 0 (dense), 1 (bitmap) or ``[width, entries]`` (delta, version 3).
- ``ties`` (version 4, only when the model shares a tensor, e.g. tied embeddings: the output
  layer's weight is the token embedding's): ``[name, stored name]`` pairs. A shared tensor is
  stored once (as ``size_bytes`` counts it: :func:`~autocompress.compress._ties.tensor_aliases`),
  under the first of its names the forward uses, and the loaded model shares it again.

The payload holds each tensor exactly as :mod:`autocompress.measure.size` counts it (the same
rows of :func:`~autocompress.measure.size.size_report`, so the same bits, format choice and
byte count): ``bits``-wide values bit-packed (``numpy.packbits``, little-endian bit order;
uniform integers stored offset by ``qmax`` so they are unsigned; pow2 integers as their
sign + exponent codes, :func:`~autocompress.compress._formats.pow2_codes`): all of them
(dense); a 1-bit-per-element presence bitmap followed by the non-zero values only (bitmap);
or ``entries`` relative indexes of ``width`` bits (distance to the previous entry minus 1;
a gap longer than ``2**width`` takes filler entries of value 0) followed by the entries'
values (delta); then
one fp32 scale per output channel for integer levels. fp32 tensors are raw float32, fp16 and
bf16 weights raw 2-byte values (little-endian), so every value comes back exactly. An 8-bit activation
quantizer is its observed range ``(lo, hi)`` as two fp32 (8 bytes); a dynamic one
(``act_bits: "dynamic"``) has no state and is only its module entry (``dynamic: true``). So
``file size = size_bytes + 9 + header``; the compressed header is a few hundred bytes to a
couple of KiB (it grows with the number of layers, not with their size).

Limits:

- The model's forward must be traceable by ``torch.fx.symbolic_trace`` (no control flow on
  tensor values), and every leaf module it calls must be of a whitelisted type. A leaf with a
  forward hook is refused, except for the activation fake-quant pre-hook that compression adds
  (stored as an explicit ``ActFakeQuant`` call). Only float32 tensors are stored.
- Only what the forward uses is stored: parameters of modules the forward never calls are
  dropped, and BatchNorm ``num_batches_tracked`` is reset to 0 (it only matters for training
  with ``momentum=None``).
- A BatchNorm that only normalizes a convolution's output is stored folded into it
  (:mod:`autocompress.compress._fold`, as ``size_bytes`` counts it): the loaded model has an
  ``nn.Identity`` in its place and the convolution a bias; its outputs equal the
  compressed model's to fp32 rounding.
- The loaded model is a ``torch.fx.GraphModule`` for inference: its module names are the
  original ones, but its class is not the user's.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from autocompress.compress._bake import bake, quantized_weights
from autocompress.compress._fold import find_folds, fold_factors, fold_into
from autocompress.compress._formats import (
    FLOAT_DTYPES,
    float_bytes,
    float_from_bytes,
    pow2_codes,
    pow2_from_codes,
)
from autocompress.compress._ties import tensor_aliases
from autocompress.deploy._architecture import (
    LEAF_TYPES,
    PackedFormatError,
    Tracer,
    build_module,
    decode_graph,
    encode_graph,
    module_spec,
)
from autocompress.measure.size import INDEX_WIDTHS, Layout, TensorSize, gaps_of, size_report

MAGIC = b"ACPK"
FORMAT_VERSION = 4  # what this reader reads (and older); a file is written as the oldest that reads it
_V1_ENCODINGS = ("fp32", "uniform")
_PREFIX = struct.Struct("<4sBI")  # magic, format version, header length


_QPARAMS = "qparams"  # size_report's row for an ActFakeQuant: its range (lo, hi)


@dataclass(frozen=True)
class PackedInfo:
    """What :func:`save_packed` wrote.

    Attributes:
        path: The file.
        header_bytes: The compressed architecture description (plus the 9-byte prefix).
        payload_bytes: The tensors; equals ``size_bytes(model)`` for the tensors the forward uses.
        file_bytes: Size of the file on disk.
    """

    path: Path
    header_bytes: int
    payload_bytes: int
    file_bytes: int


# --- bit packing ----------------------------------------------------------------------------

def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Packs unsigned integers ``< 2**bits`` into ``ceil(len(values) * bits / 8)`` bytes."""
    v = np.ascontiguousarray(values, dtype=np.uint16).ravel()
    planes = (v[:, None] >> np.arange(bits, dtype=np.uint16)) & 1
    return np.packbits(planes.astype(np.uint8).ravel(), bitorder="little").tobytes()


def unpack_bits(buf: bytes, bits: int, count: int) -> np.ndarray:
    """The inverse of :func:`pack_bits`: ``count`` unsigned integers of ``bits`` bits."""
    planes = np.unpackbits(np.frombuffer(buf, np.uint8), count=count * bits, bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.int64))
    return planes.reshape(count, bits).astype(np.int64) @ weights


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


def _encode_values(values: np.ndarray, encoding: str, bits: int, layout: Layout) -> bytes:
    """``values`` (flat: integers for ``uniform``/``pow2``, else float32) in ``layout``."""
    prefix, values = _layout_split(values, layout)
    if encoding == "fp32":
        return prefix + values.astype("<f4").tobytes()
    if encoding in FLOAT_DTYPES:
        return prefix + float_bytes(values, encoding)
    if encoding == "pow2":
        return prefix + pack_bits(pow2_codes(values, bits), bits)
    return prefix + pack_bits(values.astype(np.int32) + _qmax(bits), bits)


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _scaled(encoding: str) -> bool:
    """Whether a tensor of ``encoding`` is followed by one fp32 scale per output channel."""
    return encoding in ("uniform", "pow2")


def _token(row: TensorSize) -> int | str:
    """A tensor's encoding in the header (see the module docstring)."""
    if row.encoding in _V1_ENCODINGS:
        return row.bits
    return f"pow2:{row.bits}" if row.encoding == "pow2" else row.encoding


def _parse_token(token: Any, path: Path) -> tuple[str, int]:
    """``(encoding, bits)`` of a header encoding."""
    if isinstance(token, int) and not isinstance(token, bool) and 2 <= token <= 32:
        return ("fp32" if token == 32 else "uniform"), token
    if token in FLOAT_DTYPES:
        return token, 16
    if isinstance(token, str) and token.startswith("pow2:") and token[5:].isdigit():
        return "pow2", int(token[5:])
    raise PackedFormatError(f"{path}: unknown tensor encoding {token!r}")


def _version_of(entry: list[Any]) -> int:
    """The oldest format version that reads a header tensor entry."""
    if isinstance(entry[2], list):
        return 3
    return 1 if isinstance(entry[1], int) else 2


def _take(buf: memoryview, offset: int, nbytes: int) -> bytes:
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
        mask = np.unpackbits(np.frombuffer(_take(buf, offset, nbytes), np.uint8), count=numel,
                             bitorder="little").astype(bool)
        return np.flatnonzero(mask), int(mask.sum()), offset + nbytes
    nbytes = math.ceil(layout.entries * layout.width / 8)
    dist = unpack_bits(_take(buf, offset, nbytes), layout.width, layout.entries) + 1
    positions = np.cumsum(dist) - 1
    if positions.size and positions[-1] >= numel:
        raise PackedFormatError("packed file is damaged: a relative index runs past its tensor")
    return positions, layout.entries, offset + nbytes


def _decode_values(buf: memoryview, offset: int, numel: int, encoding: str, bits: int,
                   layout: Layout) -> tuple[np.ndarray, int]:
    """Reads one tensor's values at ``offset``; returns them (flat) and the next offset."""
    positions, count, offset = _decode_positions(buf, offset, numel, layout)
    nbytes = math.ceil(count * bits / 8)
    raw = _take(buf, offset, nbytes)
    if encoding == "fp32":
        vals = np.frombuffer(raw, "<f4")
    elif encoding in FLOAT_DTYPES:
        vals = float_from_bytes(raw, encoding)
    elif encoding == "pow2":
        vals = pow2_from_codes(unpack_bits(raw, bits, count), bits)
    else:
        vals = unpack_bits(raw, bits, count) - _qmax(bits)
    if positions is not None:
        out = np.zeros(numel, vals.dtype)
        out[positions] = vals
        vals = out
    return vals, offset + nbytes


def _layout_token(layout: Layout) -> int | list[int]:
    """A tensor's layout in the header: 0 dense, 1 bitmap, ``[width, entries]`` delta."""
    return [layout.width, layout.entries] if layout.kind == "delta" else int(layout.kind == "bitmap")


def _parse_layout(token: Any, path: Path) -> Layout:
    """The :class:`Layout` of a header layout token (bytes are not needed to read it)."""
    if token in (0, 1) and not isinstance(token, bool):
        return Layout("bitmap" if token else "dense", 0)
    if (isinstance(token, list) and len(token) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in token)
            and token[0] in INDEX_WIDTHS and token[1] >= 0):
        return Layout("delta", 0, token[0], token[1])
    raise PackedFormatError(f"{path}: unknown tensor layout {token!r}")


# --- the architecture -----------------------------------------------------------------------


# --- save / load ----------------------------------------------------------------------------

def save_packed(model: nn.Module, path: str | Path) -> PackedInfo:
    """Writes ``model`` (compressed or not) in the packed format (see the module docstring).

    Args:
        model: The model; quantized weights are read from its ``WeightCompression``
            parametrizations, so pass the compressed model, not a baked copy.
        path: Where to write (conventionally ``*.acpk``).

    Raises:
        PackedFormatError: The forward cannot be traced, or uses a module type, hook or
            function the format does not store.
    """
    baked = bake(model)
    folds = find_folds(model)
    factors = {f"{f.conv}.weight": fold_factors(model.get_submodule(f.batchnorm))[0].numpy()
               for f in folds}
    fold_into(baked, folds)
    try:
        graph = Tracer().trace(baked)
    except PackedFormatError:
        raise
    except Exception as e:  # noqa: BLE001  (fx raises many types for untraceable code)
        raise PackedFormatError(f"the model's forward cannot be traced by torch.fx: "
                                f"{type(e).__name__}: {e}") from None
    modules = {n.target: module_spec(baked.get_submodule(n.target))
               for n in graph.nodes if n.op == "call_module"}
    attrs = {n.target for n in graph.nodes if n.op == "get_attr"}
    qweights = quantized_weights(model)
    names: dict[str, list[str]] = {}  # stored name -> all its names (ties)
    for alias, first in tensor_aliases(model).items():
        names.setdefault(first, [first]).append(alias)

    entries, chunks, ties = [], [], []
    for row in size_report(model):
        owner, _, attr = row.name.rpartition(".")
        used = [n for n in names.get(row.name, [row.name])
                if n.rpartition(".")[0] in modules or n in attrs]
        if not used:
            continue  # not used by the forward
        ties += [[alias, used[0]] for alias in used[1:]]
        if attr == _QPARAMS:
            values = torch.stack([baked.get_buffer(f"{owner}.lo"), baked.get_buffer(f"{owner}.hi")]).numpy()
        elif _scaled(row.encoding):
            q, scale = qweights[row.name]
            values = q.ravel()
            if row.name in factors:  # a folded BatchNorm rescales the channels: same codes
                scale = (scale * factors[row.name]).astype(np.float32)
        else:
            t = baked.get_parameter(row.name) if row.is_param else baked.get_buffer(row.name)
            if t.dtype != torch.float32:
                raise PackedFormatError(f"tensor {row.name!r} is {t.dtype}; the packed format "
                                        "stores float32 tensors")
            values = t.detach().cpu().numpy().ravel()
        chunk = _encode_values(values, row.encoding, row.bits, row.layout)
        if _scaled(row.encoding):
            chunk += scale.astype("<f4").tobytes()
        chunks.append(chunk)
        entry: list[Any] = [used[0], _token(row), _layout_token(row.layout)]
        if used[0] in attrs:  # not owned by a leaf module: its shape is not implied
            entry += [list(baked.get_parameter(row.name).shape if row.is_param
                           else baked.get_buffer(row.name).shape), int(row.is_param)]
        entries.append(entry)

    described: dict[str, Any] = {"modules": modules, "graph": encode_graph(graph),
                                 "tensors": entries}
    if ties:
        described["ties"] = ties
    header = zlib.compress(json.dumps(described, separators=(",", ":"),
                                      allow_nan=False).encode(), 9)
    payload = b"".join(chunks)
    version = max([_version_of(e) for e in entries] + [4 if ties else 1])
    path = Path(path)
    with open(path, "wb") as f:
        f.write(_PREFIX.pack(MAGIC, version, len(header)))
        f.write(header)
        f.write(payload)
    return PackedInfo(path, _PREFIX.size + len(header), len(payload), path.stat().st_size)


def load_packed(path: str | Path) -> nn.Module:
    """Rebuilds the model stored by :func:`save_packed`, in eval mode, from the file alone.

    Example:
        >>> model = autocompress.load_packed("dist/model.acpk")  # doctest: +SKIP
        >>> logits = model(x)  # doctest: +SKIP

    Raises:
        PackedFormatError: Not a packed file, an unsupported version, or a damaged file.
    """
    header, payload = _read(Path(path))
    graph = decode_graph(header["graph"])
    root: dict[str, Any] = {name: build_module(spec) for name, spec in header["modules"].items()}

    state, offset = {}, 0
    for name, token, layout, *extra in header["tensors"]:
        encoding, bits = _parse_token(token, Path(path))
        owner, _, attr = name.rpartition(".")
        if extra:
            shape = tuple(extra[0])
        elif attr == _QPARAMS:
            shape = (2,)
        else:
            shape = tuple(getattr(root[owner], attr).shape)
        vals, offset = _decode_values(payload, offset, math.prod(shape), encoding, bits,
                                      _parse_layout(layout, Path(path)))
        if _scaled(encoding):
            scale = np.frombuffer(_take(payload, offset, 4 * shape[0]), "<f4")
            offset += 4 * shape[0]
            vals = vals.reshape(shape[0], -1).astype(np.float32) * scale[:, None]
        t = torch.from_numpy(np.array(vals, np.float32).reshape(shape))
        if attr == _QPARAMS:
            state.update({f"{owner}.lo": t[0], f"{owner}.hi": t[1],
                          f"{owner}.initialized": torch.tensor(True)})
        elif extra:  # a get_attr target: handed to the GraphModule directly
            root[name] = nn.Parameter(t, requires_grad=False) if extra[1] else t
        else:
            state[name] = t
    if offset != len(payload):
        raise PackedFormatError(f"{path}: {len(payload) - offset} bytes left after the tensors")

    model = fx.GraphModule(root, graph, class_name="PackedModel")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = _tie(model, header.get("ties", []), Path(path))
    missing = [k for k in missing
               if not k.endswith("num_batches_tracked") and k not in root and k not in tied]
    if missing or unexpected:
        raise PackedFormatError(f"{path}: tensors do not match the architecture "
                                f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _tie(model: nn.Module, ties: Any, path: Path) -> set[str]:
    """Makes each ``[name, stored name]`` of the header's ``ties`` the stored tensor again
    (after it is loaded); returns the tied names."""
    if not isinstance(ties, list):
        raise PackedFormatError(f"{path}: damaged header: ties is not a list")
    for pair in ties:
        try:
            name, stored = pair
            owner, _, attr = name.rpartition(".")
            old, new = _tensor(model, name), _tensor(model, stored)
            if new.shape != old.shape:
                raise ValueError(f"shapes {tuple(old.shape)} and {tuple(new.shape)}")
            setattr(model.get_submodule(owner), attr, new)
        except (AttributeError, TypeError, ValueError) as e:
            raise PackedFormatError(f"{path}: damaged header: bad tie {pair!r}: {e}") from None
    return {pair[0] for pair in ties}


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer ``name`` of ``model``."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_buffer(name)


def _read(path: Path) -> tuple[dict, memoryview]:
    """The header (parsed) and the payload of a packed file."""
    data = path.read_bytes()
    if len(data) < _PREFIX.size or data[:4] != MAGIC:
        raise PackedFormatError(f"{path}: not a packed model")
    _, version, header_len = _PREFIX.unpack_from(data)
    if not 1 <= version <= FORMAT_VERSION:
        raise PackedFormatError(f"{path}: packed format version {version} is not supported; "
                                f"this reader reads 1 to {FORMAT_VERSION}")
    try:
        header = json.loads(zlib.decompress(data[_PREFIX.size:_PREFIX.size + header_len]))
    except (zlib.error, ValueError) as e:
        raise PackedFormatError(f"{path}: damaged header: {e}") from None
    return header, memoryview(data)[_PREFIX.size + header_len:]


__all__ = ["LEAF_TYPES", "PackedFormatError", "PackedInfo", "load_packed", "pack_bits",
           "save_packed", "unpack_bits"]
