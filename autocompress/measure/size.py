"""Size of the deployable artifact, computed from what is really stored.

Every stored tensor costs the smallest of three layouts of its ``b``-bit values, plus its
quantization scales:

- ``dense  = ceil(numel * b / 8)``: all values bit-packed at ``b`` bits (``b`` = the bits
  per value of the weight's format, :class:`~autocompress.compress.formats.WeightFormat`: the
  integer bit-width, uniform or pow2 alike; 16 for fp16/bf16 weights; 32 for fp32);
- ``bitmap = ceil(nnz * b / 8) + ceil(numel / 8)``: only the ``nnz`` non-zero values, plus a
  1-bit-per-element presence bitmap;
- ``delta  = ceil(E * w / 8) + ceil(E * b / 8)``: relative indexing (Deep Compression, Han et
  al. 2016): each non-zero value is stored with the distance ``d`` (1..2^w) from the previous
  stored entry in a ``w``-bit index; a gap longer than 2^w takes filler entries (index 2^w,
  value 0), so ``E = sum(ceil(d / 2^w))`` over the non-zeros, fillers included. ``w`` is
  chosen per tensor (1..16) to minimise the bytes. Beyond ~75% sparsity it is smaller than
  the bitmap, which costs 1 bit per element however sparse the tensor is;
- ``scales = 4 * format.scales(shape)``: one fp32 scale per output channel for a weight with
  integer bits, one per output channel and group of ``group_size`` input columns for a
  group-wise one (``out * ceil(d / group_size)``); fp16/bf16 weights have none.

Zeros and their positions are those of the weight as it will be stored (after masking and
quantization). A BatchNorm that only normalizes a convolution's output is stored folded into
it (:mod:`autocompress.compress._fold`: its tensors cost nothing, the convolution's fp32
bias, added if it had none, carries its shift), as deployment runtimes run it. Biases, other
BatchNorms' affine parameters and running statistics are fp32; an 8-bit
activation quantizer costs 8 bytes (fp32 scale + int32 zero point), a dynamic one (``act_bits:
"dynamic"``) nothing: it computes its range from each input at run time. Its layer's 8-bit
weight is counted like any other (8 bits per value, one fp32 scale per output channel: what
ONNX Runtime's ``quantize_dynamic`` stores, plus a zero point per channel that is always 0).
AWQ / SmoothQuant's input scale (``quantizer: awq``: the layer's ``input_scale.factor``
buffer, ``1/s``) is fp32, one per input channel, counted as any buffer.
A tensor that several modules share (tied weights: a decoder's token embedding and output
layer) is stored once and counted once, under its first name
(:func:`~autocompress.compress._ties.tensor_aliases`); compressed, it stays shared only as long
as every module holding it computes it alike (one mask, one quantizer: ``apply`` keeps ties so),
else each stored version counts. Not counted: the architecture description (layer names and
shapes, each delta tensor's ``w`` and ``E``: a few hundred bytes) and ``num_batches_tracked``.

Before a model exists (planning), :func:`tensor_bytes` prices ``nnz`` non-zeros at random
positions: the delta layout's expected ``E`` for independent positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from autocompress.compress import (
    ActFakeQuant,
    LayerPlan,
    WeightCompression,
    WeightFormat,
    find_folds,
    find_weight_compression,
    folded,
    tensor_aliases,
    weight_format,
)

ACT_QUANT_BYTES = 8


INDEX_WIDTHS = range(1, 17)  # bits per relative index of the delta layout


@dataclass(frozen=True)
class Layout:
    """How one tensor's values are laid out (see the module docstring).

    Attributes:
        kind: ``"dense"``, ``"bitmap"`` or ``"delta"``.
        bytes: Bytes of the values and their index (no scales).
        width: ``"delta"``: bits per relative index; else 0.
        entries: ``"delta"``: stored (index, value) pairs, fillers included; else 0.
    """

    kind: str
    bytes: int
    width: int = 0
    entries: int = 0


@dataclass(frozen=True)
class TensorSize:
    """Storage of one tensor: ``bytes`` = its layout's bytes + scales.

    ``encoding`` is what its ``bits``-wide values are (its format's family): ``fp32``,
    ``uniform`` or ``pow2`` integer levels (with ``scales``), ``fp16`` or ``bf16``; ``format``
    its format's name (:data:`~autocompress.compress.formats.FORMATS`); ``layout`` how they
    are stored.
    """

    name: str
    numel: int
    nnz: int
    bits: int
    scales: int
    bytes: int
    is_param: bool = True
    encoding: str = "fp32"
    layout: Layout = Layout("dense", 0)
    format: str = "fp32"

    @property
    def sparse(self) -> bool:
        """Whether only the non-zeros are stored (a bitmap or delta layout)."""
        return self.layout.kind != "dense"


def weight_storage(bits: int | str | None, scheme: str = "uniform",
                   group_size: int | None = None) -> tuple[int, bool]:
    """``(bits per stored value, whether fp32 scales are stored)`` of a weight at plan values
    ``bits``/``scheme``/``group_size`` (its :func:`weight_format`): ``(b, True)`` for an
    integer ``b`` (uniform and pow2 alike, per channel or per group), ``(16, False)`` for
    ``"fp16"``/``"bf16"``, ``(32, False)`` for None (fp32)."""
    fmt = weight_format(bits, scheme, group_size)
    return fmt.bits, fmt.scaled


def gaps_of(values: np.ndarray | torch.Tensor) -> np.ndarray:
    """Distances between consecutive non-zeros of ``values`` (flattened in C order), the
    first counted from position -1: what the delta layout indexes."""
    flat = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values
    return np.diff(np.flatnonzero(np.ravel(flat)), prepend=-1)


def delta_entries(gaps: np.ndarray, width: int) -> int:
    """Stored entries of the delta layout with ``width``-bit indexes: ``sum(ceil(d / 2^w))``."""
    return int(gaps.size + np.sum((gaps.astype(np.int64) - 1) >> width))


def _expected_entries(numel: int, nnz: int, width: int) -> int:
    """Delta entries for ``nnz`` non-zeros at independent random positions (rounded up): each
    gap ``d`` has ``P(d > k) = (1 - p)^k``, so ``E[ceil(d / 2^w)] = 1 / (1 - (1 - p)^(2^w))``."""
    if nnz == 0:
        return 0
    miss = (1 - nnz / numel) ** (1 << width)
    return nnz if miss <= 0 else math.ceil(nnz / (1 - miss) - 1e-9)


def best_layout(numel: int, nnz: int, bits: int = 32, gaps: np.ndarray | None = None) -> Layout:
    """The smallest layout of a tensor (ties go to the simpler: dense, then bitmap).

    Args:
        numel: Elements.
        nnz: Non-zero elements.
        bits: Bits per stored value.
        gaps: The tensor's :func:`gaps_of` (exact delta cost); None prices the non-zeros at
            random positions (planning, before the tensor exists).
    """
    best = Layout("dense", math.ceil(numel * bits / 8))
    bitmap = math.ceil(nnz * bits / 8) + math.ceil(numel / 8)
    if bitmap < best.bytes:
        best = Layout("bitmap", bitmap)
    for width in INDEX_WIDTHS:
        if math.ceil(nnz * width / 8) + math.ceil(nnz * bits / 8) >= best.bytes:
            break  # E >= nnz: no wider index can be smaller
        entries = (delta_entries(gaps, width) if gaps is not None
                   else _expected_entries(numel, nnz, width))
        nbytes = math.ceil(entries * width / 8) + math.ceil(entries * bits / 8)
        if nbytes < best.bytes:
            best = Layout("delta", nbytes, width, entries)
    return best


def tensor_bytes(numel: int, nnz: int, bits: int = 32, scales: int = 0,
                 gaps: np.ndarray | None = None) -> tuple[int, bool]:
    """Bytes to store a tensor (its :func:`best_layout` + ``4 * scales``), and whether only
    its non-zeros are stored (bitmap or delta layout)."""
    layout = best_layout(numel, nnz, bits, gaps)
    return layout.bytes + 4 * scales, layout.kind != "dense"


def size_report(model: nn.Module) -> list[TensorSize]:
    """Per-tensor storage of ``model`` (compressed or not), BatchNorms folded where they can be
    (:mod:`autocompress.compress._fold`), each shared tensor once (under its first name)."""
    aliases = tensor_aliases(model)
    folds = find_folds(model)
    folded_bns = {f.batchnorm for f in folds}
    bn_of = {f.conv: model.get_submodule(f.batchnorm) for f in folds}
    rows = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, WeightCompression | parametrize.ParametrizationList) or mod_name in folded_bns:
            continue
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, ActFakeQuant):
            if not mod.dynamic:  # a dynamic one stores nothing
                rows.append(TensorSize(f"{prefix}qparams", 2, 2, 32, 0, ACT_QUANT_BYTES, False))
            continue
        tensors: dict[str, tuple[torch.Tensor, WeightCompression | None, bool]] = {
            n: (p, None, True) for n, p in mod.named_parameters(recurse=False)}
        if parametrize.is_parametrized(mod, "weight"):
            tensors["weight"] = (mod.weight, find_weight_compression(mod), True)
        tensors.update({n: (b, None, False) for n, b in mod.named_buffers(recurse=False)
                        if n != "num_batches_tracked"})
        if (bn := bn_of.get(mod_name)) is not None:  # stored with the BatchNorm folded in
            wc = tensors["weight"][1]
            weight, bias = folded(mod, bn)
            if not _format(wc).scaled:  # fp32: w * f (integer codes keep their zeros)
                tensors["weight"] = (weight, wc, True)
            tensors["bias"] = (bias, None, True)
        rows += [_row(prefix + n, t, _format(wc), is_param) for n, (t, wc, is_param)
                 in tensors.items() if prefix + n not in aliases]  # else: under its first name
    return rows


def _format(wc: WeightCompression | None) -> WeightFormat:
    return weight_format(None) if wc is None else wc.format


def _row(name: str, t: torch.Tensor, fmt: WeightFormat, is_param: bool) -> TensorSize:
    """The size row of tensor ``t`` stored in ``fmt``."""
    gaps = gaps_of(t)
    scales = fmt.scales(t.shape)
    layout = best_layout(t.numel(), gaps.size, fmt.bits, gaps)
    return TensorSize(name, t.numel(), gaps.size, fmt.bits, scales, layout.bytes + 4 * scales,
                      is_param, fmt.family, layout, fmt.name)


def planned_weight_bytes(shape: Sequence[int], lp: LayerPlan) -> int:
    """Bytes of a layer's weight of ``shape`` stored under ``lp``, before the model exists
    (planning): the two factors of a rank, the output channels left by channel pruning, the
    non-zeros of unstructured sparsity at random positions (:func:`tensor_bytes`), in the
    plan's weight format (its bits per value and scales: per group with a ``group_size``)."""
    out, fan_in = shape[0], math.prod(shape[1:])
    if lp.rank is not None:
        r = max(1, round(lp.rank * min(out, fan_in)))
        tensors = [(r, fan_in), (out, r)]
    else:
        tensors = [(out, fan_in)]
    rows, cols = tensors[-1]
    if lp.sparsity and lp.structure == "channel":
        tensors[-1] = (rows - round(lp.sparsity * rows), cols)
    fmt = weight_format(lp.bits, lp.scheme, lp.group_size)
    total = 0
    for rows, cols in tensors:
        numel = rows * cols
        nnz = numel - round(lp.sparsity * numel) if lp.structure != "channel" else numel
        total += tensor_bytes(numel, nnz, fmt.bits, fmt.scales((rows, cols)))[0]
    return total


def size_bytes(model: nn.Module) -> int:
    """Total bytes of the deployable artifact (see the module docstring for the formula)."""
    return size_and_params(model)[0]


def count_params(model: nn.Module) -> tuple[int, int]:
    """``(params, nonzero params)`` of the model as stored."""
    return size_and_params(model)[1:]


def size_and_params(model: nn.Module) -> tuple[int, int, int]:
    """``(size_bytes, params, nonzero params)`` from one :func:`size_report`."""
    rows = size_report(model)
    params = [r for r in rows if r.is_param]
    return (sum(r.bytes for r in rows), sum(r.numel for r in params),
            sum(r.nnz for r in params))
