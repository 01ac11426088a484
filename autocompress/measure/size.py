"""Size of the deployable artifact, computed from what is really stored.

Every stored tensor costs ``min(dense, sparse)`` bytes plus its quantization scales:

- ``dense  = ceil(numel * b / 8)``: all values bit-packed at ``b`` bits (``b`` = the layer's
  integer bit-width, uniform or pow2 alike; 16 for fp16/bf16 weights; 32 for fp32);
- ``sparse = ceil(nnz * b / 8) + ceil(numel / 8)``: only the ``nnz`` non-zero values, plus a
  1-bit-per-element presence bitmap;
- ``scales = 4 * out_channels`` for a weight with integer bits (one fp32 scale per output
  channel); fp16/bf16 weights have none.

Zeros are counted on the weight as it will be stored (after masking and quantization).
Biases, BatchNorm affine parameters and running statistics are fp32; an 8-bit activation
quantizer costs 8 bytes (fp32 scale + int32 zero point), a dynamic one (``act_bits:
"dynamic"``) nothing: it computes its range from each input at run time. Its layer's 8-bit
weight is counted like any other (8 bits per value, one fp32 scale per output channel: what
ONNX Runtime's ``quantize_dynamic`` stores, plus a zero point per channel that is always 0).
Not counted: the architecture description (layer names and shapes, a few hundred bytes) and
``num_batches_tracked``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from autocompress.compress._modules import ActFakeQuant, WeightCompression, find_weight_compression

ACT_QUANT_BYTES = 8


@dataclass(frozen=True)
class TensorSize:
    """Storage of one tensor: ``bytes`` = min(dense, sparse) + scales.

    ``encoding`` is what its ``bits``-wide values are: ``fp32``, ``uniform`` or ``pow2``
    integer levels (with ``scales``), ``fp16`` or ``bf16``.
    """

    name: str
    numel: int
    nnz: int
    bits: int
    scales: int
    bytes: int
    sparse: bool
    is_param: bool = True
    encoding: str = "fp32"


def weight_storage(bits: int | str | None) -> tuple[int, bool]:
    """``(bits per stored value, whether one fp32 scale per output channel is stored)`` of a
    weight at plan value ``bits``: ``(b, True)`` for an integer ``b`` (uniform and pow2
    alike), ``(16, False)`` for ``"fp16"``/``"bf16"``, ``(32, False)`` for None (fp32)."""
    if bits is None:
        return 32, False
    if isinstance(bits, str):
        return 16, False
    return bits, True


def tensor_bytes(numel: int, nnz: int, bits: int = 32, scales: int = 0) -> tuple[int, bool]:
    """Bytes to store a tensor, and whether the sparse (bitmap) format is the smaller one."""
    dense = math.ceil(numel * bits / 8)
    sparse = math.ceil(nnz * bits / 8) + math.ceil(numel / 8)
    return min(dense, sparse) + 4 * scales, sparse < dense


def size_report(model: nn.Module) -> list[TensorSize]:
    """Per-tensor storage of ``model`` (compressed or not)."""
    rows = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, WeightCompression | parametrize.ParametrizationList):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, ActFakeQuant):
            if not mod.dynamic:  # a dynamic one stores nothing
                rows.append(TensorSize(f"{prefix}qparams", 2, 2, 32, 0, ACT_QUANT_BYTES, False, False))
            continue
        tensors: dict[str, tuple[torch.Tensor, WeightCompression | None, bool]] = {
            n: (p, None, True) for n, p in mod.named_parameters(recurse=False)}
        if parametrize.is_parametrized(mod, "weight"):
            tensors["weight"] = (mod.weight, find_weight_compression(mod), True)
        tensors.update({n: (b, None, False) for n, b in mod.named_buffers(recurse=False)
                        if n != "num_batches_tracked"})
        for n, (t, wc, is_param) in tensors.items():
            numel, nnz = t.numel(), int(torch.count_nonzero(t.detach()))
            bits, scaled = weight_storage(wc.bits if wc else None)
            scales = t.shape[0] if scaled else 0
            nbytes, sparse = tensor_bytes(numel, nnz, bits, scales)
            rows.append(TensorSize(prefix + n, numel, nnz, bits, scales, nbytes, sparse, is_param,
                                   _encoding(wc)))
    return rows


def _encoding(wc: WeightCompression | None) -> str:
    if wc is None or wc.bits is None:
        return "fp32"
    return wc.bits if isinstance(wc.bits, str) else wc.scheme


def size_bytes(model: nn.Module) -> int:
    """Total bytes of the deployable artifact (see the module docstring for the formula)."""
    return sum(row.bytes for row in size_report(model))


def count_params(model: nn.Module) -> tuple[int, int]:
    """``(params, nonzero params)`` of the model as stored."""
    rows = [r for r in size_report(model) if r.is_param]
    return sum(r.numel for r in rows), sum(r.nnz for r in rows)
