"""The packed format: a compressed model stored in the bytes that ``size_bytes`` reports.

``save_packed(model, path)`` writes a ``.acpk`` file; ``autocompress.load_packed(path)``
rebuilds an eval-mode ``nn.Module`` from that file alone (no task, plan or model class needed)
whose outputs equal the compressed model's (to fp32 rounding).

Layout (little-endian)::

    b"ACPK" | u8 format version | u32 header length | header (zlib-compressed JSON) | payload

Format version 2 added tensor encodings (fp16/bf16 and pow2 weights), version 3 the delta
(relative-index) layout of sparse tensors, version 4 ties (a tensor that several modules
share), version 5 fp8 weights, version 6 group-wise integer weights (one scale per output
channel and group of input columns). A file is written as the oldest version that has what it
uses (one without them is version 1, byte for byte what earlier releases wrote), so older
readers still read it; this reader reads all six.

The header describes the architecture without pickle, as data only:

- ``modules``: ``{qualified name: [type name, constructor kwargs]}`` for every leaf module the
  forward calls (arguments at their defaults left out). Leaf types come from a fixed whitelist
  (:data:`LEAF_TYPES`: conv, linear, batch/layer norm, activations, pooling, flatten, dropout,
  identity, ``ActFakeQuant``, ``InputScale``).
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
  (version 2); ``"fp8"`` (version 5); ``"int<bits>:g<group>"`` (version 6). The layout is
  0 (dense), 1 (bitmap) or ``[width, entries]`` (delta, version 3).
- ``ties`` (version 4, only when the model shares a tensor, e.g. tied embeddings: the output
  layer's weight is the token embedding's): ``[name, stored name]`` pairs. A shared tensor is
  stored once (as ``size_bytes`` counts it: :func:`~autocompress.compress._ties.tensor_aliases`),
  under the first of its names the forward uses, and the loaded model shares it again.

The payload holds each tensor exactly as :mod:`autocompress.measure.size` counts it (the same
rows of :func:`~autocompress.measure.size.size_report`, so the same bits, format choice and
byte count): ``bits``-wide values bit-packed (``numpy.packbits``, little-endian bit order;
uniform integers stored offset by ``qmax`` so they are unsigned; pow2 integers as their
sign + exponent codes, :func:`~autocompress.compress.formats.pow2_codes`): all of them
(dense); a 1-bit-per-element presence bitmap followed by the non-zero values only (bitmap);
or ``entries`` relative indexes of ``width`` bits (distance to the previous entry minus 1;
a gap longer than ``2**width`` takes filler entries of value 0) followed by the entries'
values (delta); then one fp32 scale per output channel for integer levels and fp8 (raw e4m3
bytes, one per value), or per output channel and group (row-major) for group-wise
integers. fp32 tensors are raw float32, fp16 and bf16 weights raw 2-byte values
(little-endian), so every value comes back exactly. An 8-bit activation quantizer is its
observed range ``(lo, hi)`` as two fp32 (8 bytes); a dynamic one (``act_bits: "dynamic"``) has
no state and is only its module entry (``dynamic: true``). AWQ / SmoothQuant's input scale
(``quantizer: awq``: an ``InputScale`` child of the layer) is its ``factor``, fp32, one per
input channel, stored as any buffer (no new encoding: files without it read as before).
So ``file size = size_bytes + 9 + header``; the compressed header is a few hundred bytes to a
couple of KiB (it grows with the number of layers, not with their size).

Limits:

- The model's forward must be traceable by ``torch.fx.symbolic_trace`` (no control flow on
  tensor values), and every leaf module it calls must be of a whitelisted type. A leaf with a
  forward hook is refused, except for the pre-hooks that compression adds (``PRE_HOOKS``:
  AWQ's input scale, then the activation fake-quant), stored as explicit calls of the layer's
  ``InputScale`` / ``ActFakeQuant`` child before the layer. Only float32 tensors are stored.
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
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from autocompress.compress import (
    FORMATS,
    bake,
    find_folds,
    fold_factors,
    fold_into,
    quantized_weights,
    tensor_aliases,
)
from autocompress.deploy._architecture import (
    LEAF_TYPES,
    PackedFormatError,
    Tracer,
    build_module,
    decode_graph,
    encode_graph,
    module_spec,
)
from autocompress.deploy._packed_codec import (
    decode_tensor,
    encode_tensor,
    format_token,
    layout_token,
    pack_bits,
    parse_layout,
    parse_token,
    unpack_bits,
    version_of,
)
from autocompress.measure import size_report

MAGIC = b"ACPK"
# What this reader reads (and older): the newest a layout (4: ties) or a format needs. A file is
# written as the oldest version that reads it.
FORMAT_VERSION = max(4, *(fmt.packed_version for fmt in FORMATS.load_all().values()))
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

    entries, chunks, ties, version = [], [], [], 1
    for row in size_report(model):
        owner, _, attr = row.name.rpartition(".")
        used = [n for n in names.get(row.name, [row.name])
                if n.rpartition(".")[0] in modules or n in attrs]
        if not used:
            continue  # not used by the forward
        ties += [[alias, used[0]] for alias in used[1:]]
        fmt, scale = FORMATS.get(row.format), None
        if attr == _QPARAMS:
            values = torch.stack([baked.get_buffer(f"{owner}.lo"), baked.get_buffer(f"{owner}.hi")]).numpy()
        elif fmt.scaled:
            q, scale = qweights[row.name]
            values = q.ravel()
            if row.name in factors:  # a folded BatchNorm rescales the channels: same codes
                f = factors[row.name]  # each row's scales (one, or one per group) times f
                scale = (scale.reshape(len(f), -1) * f[:, None]).ravel().astype(np.float32)
        else:
            t = baked.get_parameter(row.name) if row.is_param else baked.get_buffer(row.name)
            if t.dtype != torch.float32:
                raise PackedFormatError(f"tensor {row.name!r} is {t.dtype}; the packed format "
                                        "stores float32 tensors")
            values = t.detach().cpu().numpy().ravel()
        chunks.append(encode_tensor(values, fmt, row.layout, scale))
        version = max(version, version_of(fmt, row.layout))
        entry: list[Any] = [used[0], format_token(fmt), layout_token(row.layout)]
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
    version = max(version, 4 if ties else 1)
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
        fmt = parse_token(token, Path(path))
        owner, _, attr = name.rpartition(".")
        if extra:
            shape = tuple(extra[0])
        elif attr == _QPARAMS:
            shape = (2,)
        else:
            shape = tuple(getattr(root[owner], attr).shape)
        vals, offset = decode_tensor(payload, offset, shape, fmt, parse_layout(layout, Path(path)))
        t = torch.from_numpy(vals)
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
