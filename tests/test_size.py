"""Stored size: hand-computed cases and properties of the formula in measure/size.py."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from autocompress.compress import apply
from autocompress.compress._plan import LayerPlan, Plan
from autocompress.measure import count_params, size_bytes, size_report, tensor_bytes, weight_storage
from autocompress.measure.size import Layout, best_layout, delta_entries, gaps_of

FAST = settings(max_examples=200, deadline=None)


@pytest.mark.parametrize(("numel", "positions", "bits", "scales", "expected"), [
    # dense fp32: 100 * 4 = 400 < bitmap 400 + ceil(100 / 8) = 413
    pytest.param(100, range(100), 32, 0, (400, False), id="fp32-dense"),
    # every other one zero: bitmap 32 * 4 + 64 / 8 = 136 < dense 256; delta with 1-bit
    # indexes (every gap is 1 or 2: no fillers) 32 entries: ceil(32 / 8) + 32 * 4 = 132
    pytest.param(64, range(0, 64, 2), 32, 0, (132, True), id="fp32-50pct-delta"),
    # all zero: no delta entries, nothing stored
    pytest.param(10, [], 32, 0, (0, True), id="fp32-all-zero"),
    # 4-bit packed: ceil(30 * 4 / 8) = 15 (bitmap 15 + 4 = 19), plus 3 fp32 scales
    pytest.param(30, range(30), 4, 3, (15 + 12, False), id="4bit-packed-with-scales"),
    # 3 bits do not fill bytes: ceil(5 * 3 / 8) = 2
    pytest.param(5, range(5), 3, 1, (2 + 4, False), id="3bit-rounds-up"),
    # 8-bit with 3 of 16 non-zero (gaps 1, 5, 10): bitmap 3 + 2 = 5 < dense 16; delta at
    # best ties it (4-bit indexes: 3 entries, 2 + 3 bytes), and a tie keeps the bitmap
    pytest.param(16, [0, 5, 15], 8, 2, (5 + 8, True), id="8bit-bitmap"),
    # 10 of 1000 non-zero 100 apart, 4 bits: bitmap 5 + 125 = 130; delta with 7-bit
    # indexes (gaps up to 128) 10 entries: ceil(70 / 8) + 5 = 14; with 6-bit ones every gap
    # takes a filler: 20 entries, 15 + 10 = 25
    pytest.param(1000, range(99, 1000, 100), 4, 10, (14 + 40, True), id="4bit-delta"),
    # a tie goes to dense: 8 values, 7 non-zero at 8 bits: dense 8, bitmap 7 + 1 = 8
    pytest.param(8, range(7), 8, 0, (8, False), id="tie-is-dense"),
])
def test_tensor_bytes_hand_computed(numel: int, positions: Sequence[int], bits: int, scales: int,
                                    expected: tuple[int, bool]) -> None:
    mask = np.zeros(numel, bool)
    mask[list(positions)] = True
    assert tensor_bytes(numel, int(mask.sum()), bits, scales, gaps_of(mask)) == expected


def test_delta_layout_hand_computed() -> None:
    mask = np.zeros(1000, bool)
    mask[99::100] = True
    layout = best_layout(1000, 10, 4, gaps_of(mask))
    assert layout == Layout("delta", 14, width=7, entries=10)
    assert delta_entries(gaps_of(mask), 6) == 20  # one filler per gap of 100 > 64
    # planning (no positions): 10 non-zeros at random positions, p = 0.01: with 8-bit
    # indexes E = 10 / (1 - 0.99^256) = 10.8 -> 11 entries, 11 + 6 = 17 bytes
    assert best_layout(1000, 10, 4) == Layout("delta", 17, width=8, entries=11)


def test_dense_fp32_model_is_four_bytes_per_value() -> None:
    # Linear(3, 2): 6 + 2 params; BatchNorm1d(2): weight, bias, mean, var (not the counter)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    nn.init.uniform_(model[0].weight, 0.1, 1.0)
    nn.init.uniform_(model[0].bias, 0.1, 1.0)
    nn.init.constant_(model[1].bias, 0.3)  # BatchNorm's zero bias would be stored sparse
    model[1].running_mean.fill_(0.5)
    assert size_bytes(model) == 4 * (6 + 2) + 4 * (2 + 2 + 2 + 2)
    assert count_params(model) == (8 + 4, 8 + 4)
    rows = {r.name: r for r in size_report(model)}
    assert set(rows) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                         "1.running_var"}
    assert not rows["1.running_mean"].is_param and rows["1.weight"].is_param


def test_sparse_linear_hand_computed() -> None:
    linear = nn.Linear(3, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]))
        linear.bias.copy_(torch.tensor([0.5, -0.5]))
    # weight: dense 24 vs sparse 2 * 4 + ceil(6 / 8) = 9; bias 8
    assert size_bytes(linear) == 9 + 8
    assert count_params(linear) == (8, 4)
    weight = next(r for r in size_report(linear) if r.name == "weight")
    assert (weight.numel, weight.nnz, weight.bits, weight.sparse) == (6, 2, 32, True)


def _two_layer(rows: torch.Tensor) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(rows)
        model[0].bias.fill_(0.1)
        model[1].weight.fill_(0.3)
        model[1].bias.fill_(0.2)
    return model


ROW = torch.tensor([0.7, -0.7, 0.1, 0.02])


@pytest.mark.parametrize(("bits", "first_weight_bytes"), [
    # qmax 7, scale 0.1: q = [7, -7, 1, 0] -> 9 of 12 non-zero. dense ceil(48 / 8) = 6,
    # sparse ceil(36 / 8) + ceil(12 / 8) = 7; plus 3 scales
    pytest.param(4, 6 + 12, id="4bit"),
    # qmax 1, scale 0.7: q = [1, -1, 0, 0] -> 6 of 12. dense 3, sparse 2 + 2 = 4; plus scales
    pytest.param(2, 3 + 12, id="2bit"),
    # qmax 127, scale 0.7/127: q = [127, -127, 18, 4] -> all non-zero: 12 bytes + scales
    pytest.param(8, 12 + 12, id="8bit"),
])
def test_quantized_linear_hand_computed(bits: int, first_weight_bytes: int) -> None:
    model = _two_layer(ROW.repeat(3, 1))
    compressed = apply(model, Plan({"0": LayerPlan(bits=bits)}), torch.randn(2, 4))
    # the rest is fp32: bias 3, second weight 6, second bias 2
    assert size_bytes(compressed) == first_weight_bytes + 4 * (3 + 6 + 2)
    weight = next(r for r in size_report(compressed) if r.name == "0.weight")
    assert (weight.bits, weight.scales) == (bits, 3)
    assert size_bytes(model) == 4 * (12 + 3 + 6 + 2)  # the original is still fp32


@pytest.mark.parametrize(("knobs", "first_weight_bytes", "bits", "scales"), [
    # 16 bits per value, no scales: 12 * 2 = 24 (sparse 24 + 2)
    pytest.param({"bits": "fp16"}, 24, 16, 0, id="fp16"),
    pytest.param({"bits": "bf16"}, 24, 16, 0, id="bf16"),
    # 50% unstructured masks the 0.1s and 0.02s: 6 of 12 at 16 bits: dense 24, sparse 12 + 2
    pytest.param({"bits": "fp16", "sparsity": 0.5}, 14, 16, 0, id="fp16-sparse"),
    # pow2, 3 bits: levels 0, s, s/2, s/4; s = 0.7 (its smaller candidates clip the 0.7s):
    # 0.1 / 0.7 = 0.14 -> 1/4 (above 1/8), 0.02 / 0.7 = 0.03 -> 0; 9 of 12 non-zero.
    # dense ceil(36 / 8) = 5 < sparse ceil(27 / 8) + 2 = 6; plus 3 scales
    pytest.param({"bits": 3, "scheme": "pow2"}, 5 + 12, 3, 3, id="pow2-3bit"),
    # pow2, 4 bits: levels down to s/64, all 12 non-zero: dense 6; plus 3 scales
    pytest.param({"bits": 4, "scheme": "pow2"}, 6 + 12, 4, 3, id="pow2-4bit"),
])
def test_fp16_bf16_and_pow2_linear_hand_computed(knobs: dict, first_weight_bytes: int, bits: int,
                                                 scales: int) -> None:
    model = _two_layer(ROW.repeat(3, 1))
    compressed = apply(model, Plan({"0": LayerPlan(**knobs)}), torch.randn(2, 4))
    assert size_bytes(compressed) == first_weight_bytes + 4 * (3 + 6 + 2)
    weight = next(r for r in size_report(compressed) if r.name == "0.weight")
    assert (weight.bits, weight.scales) == (bits, scales)
    if knobs.get("scheme") == "pow2":
        levels = [0.7, -0.7, 0.7 / 4, 0.0] if bits == 3 else [0.7, -0.7, 0.7 / 8, 0.7 / 32]
        torch.testing.assert_close(compressed[0].weight[0], torch.tensor(levels), rtol=1e-6, atol=0)


def test_weight_storage_of_each_bits_value() -> None:
    assert weight_storage(None) == (32, False)
    assert weight_storage(4) == (4, True)
    assert weight_storage("fp16") == weight_storage("bf16") == (16, False)


def test_activation_quantizer_costs_eight_bytes() -> None:
    model = _two_layer(ROW.repeat(3, 1))
    x = torch.randn(2, 4)
    weights_only = apply(model, Plan({"1": LayerPlan(bits=8)}), x)
    compressed = apply(model, Plan({"1": LayerPlan(bits=8, act_bits=8)}), x)
    assert size_bytes(compressed) == size_bytes(weights_only) + 8
    assert count_params(compressed) == count_params(weights_only)


def test_masked_and_quantized_weight_counts_zeros_as_stored() -> None:
    model = _two_layer(ROW.repeat(3, 1))
    # 50% unstructured masks the 6 smallest: the 0.1s and 0.02s -> q = [7, -7, 0, 0]
    compressed = apply(model, Plan({"0": LayerPlan(sparsity=0.5, bits=4)}), torch.randn(2, 4))
    # 6 of 12 non-zero at 4 bits: dense 6, sparse 3 + 2 = 5; plus 3 scales
    weight = next(r for r in size_report(compressed) if r.name == "0.weight")
    assert (weight.nnz, weight.sparse, weight.bytes) == (6, True, 5 + 12)
    assert count_params(compressed) == (12 + 3 + 6 + 2, 6 + 3 + 6 + 2)


# --- properties -------------------------------------------------------------------------------

sizes = st.integers(min_value=1, max_value=10**7)
bit_widths = st.sampled_from([2, 3, 4, 5, 6, 7, 8, 32])


@st.composite
def tensors(draw) -> tuple[int, int, int, int]:
    numel = draw(sizes)
    nnz = draw(st.integers(min_value=0, max_value=numel))
    return numel, nnz, draw(bit_widths), draw(st.integers(min_value=0, max_value=1000))


def reference_delta_bytes(mask: Sequence[bool], bits: int) -> int:
    """The delta layout's smallest size over index widths 1..16, from each gap ``d`` between
    stored non-zeros costing ``ceil(d / 2^w)`` entries (the last one the value, the others
    fillers)."""
    positions = [i for i, nonzero in enumerate(mask) if nonzero]
    gaps = [b - a for a, b in zip([-1, *positions], positions, strict=False)]
    best = math.inf
    for width in range(1, 17):
        entries = sum(math.ceil(d / 2 ** width) for d in gaps)
        best = min(best, math.ceil(entries * width / 8) + math.ceil(entries * bits / 8))
    return best


def reference_bytes(weight: torch.Tensor | Sequence[bool], bits: int, scales: int = 0) -> int:
    """Stored bytes of a tensor (or of its non-zero mask) at ``bits`` per value: the smallest
    of dense, bitmap and delta (``measure/size.py``'s formula, written out independently),
    plus ``scales`` fp32 scales."""
    mask = (weight != 0).flatten().tolist() if isinstance(weight, torch.Tensor) else list(weight)
    numel, nnz = len(mask), sum(mask)
    dense = math.ceil(numel * bits / 8)
    bitmap = math.ceil(nnz * bits / 8) + math.ceil(numel / 8)
    return min(dense, bitmap, reference_delta_bytes(mask, bits)) + 4 * scales


@FAST
@given(st.lists(st.booleans(), min_size=1, max_size=300), bit_widths,
       st.integers(min_value=0, max_value=8))
def test_the_smallest_layout_is_chosen(mask: list[bool], bits: int, scales: int) -> None:
    numel, nnz = len(mask), sum(mask)
    nbytes, is_sparse = tensor_bytes(numel, nnz, bits, scales, gaps_of(np.array(mask)))
    assert nbytes == reference_bytes(mask, bits, scales)
    assert is_sparse == (nbytes - 4 * scales < math.ceil(numel * bits / 8))


@FAST
@given(tensors())
def test_planned_bytes_are_at_most_dense_and_bitmap(t: tuple[int, int, int, int]) -> None:
    numel, nnz, bits, scales = t
    dense = math.ceil(numel * bits / 8)
    bitmap = math.ceil(nnz * bits / 8) + math.ceil(numel / 8)
    assert tensor_bytes(numel, nnz, bits, scales)[0] <= min(dense, bitmap) + 4 * scales


@FAST
@given(tensors(), st.data())
def test_bytes_grow_with_nonzeros(t: tuple[int, int, int, int], data: st.DataObject) -> None:
    numel, nnz, bits, scales = t
    more = data.draw(st.integers(min_value=nnz, max_value=numel))
    assert tensor_bytes(numel, nnz, bits, scales)[0] <= tensor_bytes(numel, more, bits, scales)[0]


@FAST
@given(tensors(), st.data())
def test_bytes_grow_with_bits(t: tuple[int, int, int, int], data: st.DataObject) -> None:
    numel, nnz, bits, scales = t
    more = data.draw(st.sampled_from([b for b in (2, 3, 4, 5, 6, 7, 8, 32) if b >= bits]))
    assert tensor_bytes(numel, nnz, bits, scales)[0] <= tensor_bytes(numel, nnz, more, scales)[0]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.booleans(), min_size=12, max_size=12))
def test_size_report_counts_zeros_of_any_pattern(zero: list[bool]) -> None:
    linear = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.where(torch.tensor(zero).view(3, 4), 0.0, 1.5))
    nnz = 12 - sum(zero)
    assert size_bytes(linear) == min(48, 4 * nnz + 2, reference_delta_bytes(
        [not z for z in zero], 32))
    assert count_params(linear) == (12, nnz)
