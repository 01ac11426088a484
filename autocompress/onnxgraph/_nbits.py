"""Block-wise weights on ONNX Runtime's weight-only kernels (contrib operators, ``com.microsoft``).

A format with a block-wise form (:meth:`~autocompress.compress.formats.WeightFormat.blocks`: the
grouped integer formats, ``int4-g128``) hands its stored codes and scales, unchanged, to the
kernel that replaces the one node reading the weight's initializer (:data:`KERNELS`, keyed by
that node's op type; schemas read in onnxruntime 1.32's contrib op registry):

- ``MatMul`` (a Linear's ``(in, out)`` weight) and ``Gemm`` (``transA=0``, ``alpha=1``, the
  weight as ``B``) become ``MatMulNBits``: ``B`` the codes packed along the input axis
  (``(N, blocks, block_size * bits / 8)`` uint8, low bits first), ``scales`` ``(N, blocks)``,
  no ``zero_points`` (the default ``2**(bits-1)`` is the symmetric codes' zero point), a
  ``Gemm``'s ``C`` or the ``Add`` of a bias vector after the ``MatMul`` as its ``bias``;
  ``accuracy_level`` :data:`ACCURACY_LEVEL`. Bits 2, 4 and 8; block sizes a power of two
  from 16.
- ``Gather`` on axis 0 (an embedding table) becomes ``GatherBlockQuantized``: uint8 codes
  packed along the hidden axis (``quantize_axis=1``), ``(rows, blocks)`` scales, the default
  zero point. Bits 2, 4 and 8, hidden widths whose codes fill whole bytes.

Anything else keeps the format's standard ONNX form (:meth:`WeightFormat.to_onnx`): a weight
read by several nodes or through a ``Transpose``, a BatchNorm-folded weight, a conv, a bit
width the kernels do not take (3, 5, 6, 7), and every weight of ``contrib_ops=False``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from autocompress._registry import Registry
from autocompress.compress.formats import BlockCodes, InitializerSlot, StoredWeight

__all__ = ["ACCURACY_LEVEL", "CONTRIB_DOMAIN", "KERNELS", "BlockKernel", "pack_codes", "store_blockwise",
           "unpack_codes"]

#: ``MatMulNBits``' ``accuracy_level``: 4 quantizes the input to int8 per block and computes in
#: int8 (VNNI). On this CPU (AVX-512 VNNI), a 384x1536 Linear at 1 thread: 3-4x faster than
#: level 0 (fp32 compute) at batch 1 x seq 1, and 8-bit weights have no fast level-0 kernel
#: (5x slower than fp32); the cost is ~0.5% of the output's range (the input's int8 rounding).
ACCURACY_LEVEL = 4
CONTRIB_DOMAIN = "com.microsoft"
_KERNEL_BITS = (2, 4, 8)

Rewrite = Callable[[onnx.GraphProto, onnx.NodeProto, BlockCodes, InitializerSlot, str], bool]


@dataclass(frozen=True)
class BlockKernel:
    """The kernel that replaces the node reading a block-wise weight.

    Attributes:
        op: The contrib operator.
        bits: The bit widths it takes.
        rewrite: ``rewrite(graph, node, blocks, slot, name) -> bool``: replaces ``node`` (its
            weight in ``slot``) by the kernel fed by ``blocks``, or returns False, changing
            nothing, where the node's form does not match.
    """

    op: str
    bits: tuple[int, ...]
    rewrite: Rewrite


KERNELS: Registry[BlockKernel] = Registry("block-wise kernel")


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``codes < 2**bits`` packed along the last axis into uint8, the first code in the
    low bits (``MatMulNBits``' and ``GatherBlockQuantized``'s layout); the last axis times
    ``bits`` must be a multiple of 8."""
    per = 8 // bits
    groups = codes.astype(np.uint8).reshape(*codes.shape[:-1], -1, per)
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(groups << shifts, axis=-1).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of :func:`pack_codes` (int64 codes)."""
    per = 8 // bits
    shifts = np.arange(per, dtype=np.int64) * bits
    codes = (packed.astype(np.int64)[..., None] >> shifts) & (2 ** bits - 1)
    return codes.reshape(*packed.shape[:-1], -1)


def store_blockwise(graph: onnx.GraphProto, stored: StoredWeight, slot: InitializerSlot,
                    name: str) -> bool:
    """Replaces the node reading ``slot.init`` by its block-wise kernel fed by ``stored``'s
    codes (module docstring); False, changing nothing, where no kernel applies."""
    blocks = stored.format.blocks(stored)
    g = 0 if blocks is None else blocks.block_size
    if blocks is None or g < 16 or g & (g - 1) or not np.all(slot.k == 1):
        return False
    readers = [n for n in _all_nodes(graph) if slot.init.name in n.input]
    if len(readers) != 1 or readers[0] not in graph.node or readers[0].op_type not in KERNELS:
        return False
    if slot.init.name in {o.name for o in graph.output}:
        return False
    kernel = KERNELS.get(readers[0].op_type)
    return blocks.bits in kernel.bits and kernel.rewrite(graph, readers[0], blocks, slot, name)


def use_contrib_domain(proto: onnx.ModelProto) -> None:
    """Declares the ``com.microsoft`` opset in ``proto`` if a node uses it."""
    domains = {op.domain for op in proto.opset_import}
    if CONTRIB_DOMAIN not in domains and any(n.domain == CONTRIB_DOMAIN for n in proto.graph.node):
        proto.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """The nodes of ``graph`` and of its subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from _all_nodes(sub)


def _attr(node: onnx.NodeProto, key: str, default: float) -> float:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == key), default)


def _bias(graph: onnx.GraphProto, name: str, n: int) -> str | None:
    """The fp32 initializer of shape ``(n,)`` (a bias) that ``name`` is, directly or through
    ``Identity`` nodes (the exporter keeps one initializer for equal ones, such as random-init
    zero biases, and names the others by Identity), or None."""
    inits = {i.name: i for i in graph.initializer}
    producers = {o: node for node in graph.node for o in node.output}
    while name not in inits and name in producers and producers[name].op_type == "Identity":
        name = producers[name].input[0]
    init = inits.get(name)
    ok = init is not None and init.data_type == onnx.TensorProto.FLOAT and list(init.dims) == [n]
    return name if ok else None


def _bias_add(graph: onnx.GraphProto, out: str, n: int) -> tuple[onnx.NodeProto, str] | None:
    """The ``Add`` that alone reads ``out`` and adds a bias vector of ``n`` to it, and the
    bias' initializer, or None."""
    readers = [node for node in _all_nodes(graph) if out in node.input]
    if len(readers) != 1 or readers[0].op_type != "Add" or out in {o.name for o in graph.output}:
        return None
    add = readers[0]
    bias = _bias(graph, add.input[1] if add.input[0] == out else add.input[0], n)
    return (add, bias) if add in graph.node and bias is not None else None


def _matmul_nbits(graph: onnx.GraphProto, node: onnx.NodeProto, a: str, bias: str | None, out: str,
                  blocks: BlockCodes, name: str) -> None:
    """Writes ``MatMulNBits(a, blocks) (+ bias) -> out`` in ``node``'s place."""
    init = f"{name}_nbits"
    n = blocks.codes.shape[0]
    graph.initializer.extend([numpy_helper.from_array(pack_codes(blocks.codes, blocks.bits), init),
                              numpy_helper.from_array(blocks.scales, f"{init}_scales")])
    inputs = [a, init, f"{init}_scales", *(["", "", bias] if bias else [])]
    node.CopyFrom(helper.make_node(
        "MatMulNBits", inputs, [out], name=f"{name}/MatMulNBits", domain=CONTRIB_DOMAIN,
        K=blocks.width, N=n, bits=blocks.bits, block_size=blocks.block_size,
        accuracy_level=ACCURACY_LEVEL))


def _matmul(graph: onnx.GraphProto, node: onnx.NodeProto, blocks: BlockCodes, slot: InitializerSlot,
            name: str) -> bool:
    """``MatMul(A, W)`` with ``W`` the ``(in, out)`` weight, and a bias ``Add`` after it."""
    if len(node.input) != 2 or node.input[1] != slot.init.name or not slot.transposed:
        return False
    out, bias = node.output[0], None
    found = _bias_add(graph, out, blocks.codes.shape[0])
    if found is not None:
        add, bias = found
        out = add.output[0]
        graph.node.remove(add)
    _matmul_nbits(graph, node, node.input[0], bias, out, blocks, name)
    return True


def _gemm(graph: onnx.GraphProto, node: onnx.NodeProto, blocks: BlockCodes, slot: InitializerSlot,
          name: str) -> bool:
    """``Gemm(A, W, C)``: ``transA=0``, ``alpha=1``, ``W`` the ``(out, in)`` weight with
    ``transB=1`` or the ``(in, out)`` one with ``transB=0``, ``C`` absent or a bias vector with
    ``beta=1``."""
    c = node.input[2] if len(node.input) > 2 and node.input[2] else None
    bias = _bias(graph, c, blocks.codes.shape[0]) if c else None
    if (node.input[1] != slot.init.name or _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1
            or bool(_attr(node, "transB", 0)) == slot.transposed
            or (c and (_attr(node, "beta", 1.0) != 1 or bias is None))):
        return False
    _matmul_nbits(graph, node, node.input[0], bias, node.output[0], blocks, name)
    return True


def _gather(graph: onnx.GraphProto, node: onnx.NodeProto, blocks: BlockCodes, slot: InitializerSlot,
            name: str) -> bool:
    """``Gather(E, ids)`` on axis 0 of an embedding table ``E``: ``GatherBlockQuantized``
    (codes packed along the hidden axis, unpadded: the output takes the data's width)."""
    rows, width = blocks.codes.shape[0], blocks.width
    if (node.input[0] != slot.init.name or slot.transposed or _attr(node, "axis", 0) != 0
            or len(slot.init.dims) != 2 or width * blocks.bits % 8):
        return False
    init = f"{name}_blocks"
    data = pack_codes(blocks.codes.reshape(rows, -1)[:, :width], blocks.bits)
    graph.initializer.extend([numpy_helper.from_array(data, init),
                              numpy_helper.from_array(blocks.scales, f"{init}_scales")])
    node.CopyFrom(helper.make_node(
        "GatherBlockQuantized", [init, node.input[1], f"{init}_scales"], [node.output[0]],
        name=f"{name}/GatherBlockQuantized", domain=CONTRIB_DOMAIN, bits=blocks.bits,
        block_size=blocks.block_size, gather_axis=0, quantize_axis=1))
    return True


KERNELS.register("MatMul", BlockKernel("MatMulNBits", _KERNEL_BITS, _matmul))
KERNELS.register("Gemm", BlockKernel("MatMulNBits", _KERNEL_BITS, _gemm))
KERNELS.register("Gather", BlockKernel("GatherBlockQuantized", _KERNEL_BITS, _gather))
