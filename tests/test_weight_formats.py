"""Every registered weight format (``FORMATS``), one parametrized suite: a format added to the
registry joins it without edits here.

Per format: quantization is idempotent and the stored form computes the fake-quantized value;
pack/unpack round-trips in ``bits`` per value; the size model counts its bits and scales; the
ONNX form computes the stored value (also transposed and BatchNorm-folded); a BatchNorm folds
into it exactly when the format says so; the packed file stores it in the bytes the size model
counts and loads back the same outputs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

from autocompress.compress import WeightCompression, find_folds, weight_format
from autocompress.compress._modules import weight_compression
from autocompress.compress.formats import FORMATS, format_name, plan_values
from autocompress.deploy._packed import load_packed, save_packed
from autocompress.measure import size_bytes, size_report
from autocompress.onnxgraph import WeightMatch

NAMES = FORMATS.names()


def _weight(rows: int = 6, cols: int = 80, seed: int = 0) -> torch.Tensor:
    """80 columns: several groups of a grouped format, the last one short (of 32 and 64)."""
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.3


def _compress(module: nn.Module, name: str) -> WeightCompression:
    wc = weight_compression(module)
    wc.bits, wc.scheme, wc.group_size = plan_values(name)
    return wc


@pytest.mark.parametrize("name", NAMES)
def test_name_and_plan_values_round_trip(name: str) -> None:
    fmt = FORMATS.get(name)
    assert fmt.name == name
    assert weight_format(*plan_values(name)) is fmt
    assert format_name(*plan_values(name)) == name


@pytest.mark.parametrize("name", NAMES)
def test_quantize_is_idempotent_and_the_stored_form_computes_the_value(name: str) -> None:
    fmt = FORMATS.get(name)
    value = fmt.fake_quant(_weight())
    assert torch.equal(fmt.fake_quant(value), value)
    stored = fmt.store(value)
    assert (stored.scale is not None) == fmt.scaled
    assert np.array_equal(stored.dequantized(), value.numpy())
    if fmt.scaled:
        assert stored.scale.size == fmt.scales(value.shape)


@pytest.mark.parametrize("name", NAMES)
def test_pack_unpack_round_trip_in_bits_per_value(name: str) -> None:
    fmt = FORMATS.get(name)
    values = fmt.store(fmt.fake_quant(_weight())).values.ravel()
    raw = fmt.pack(values)
    assert len(raw) == math.ceil(values.size * fmt.bits / 8)
    assert np.array_equal(fmt.unpack(raw, values.size), values)


@pytest.mark.parametrize("name", NAMES)
def test_size_model_counts_the_formats_bits_and_scales(name: str) -> None:
    fmt = FORMATS.get(name)
    layer = nn.Linear(80, 6, bias=False)
    _compress(layer, name)
    (row,) = size_report(layer)
    shape = tuple(layer.weight.shape)
    assert (row.format, row.encoding, row.bits) == (name, fmt.family, fmt.bits)
    assert row.scales == fmt.scales(shape)
    assert row.bytes <= fmt.stored_bytes(shape)  # dense, or smaller when sparse
    if row.layout.kind == "dense":
        assert row.bytes == fmt.stored_bytes(shape)


def _run_initializer(init: onnx.TensorProto, inits: list, nodes: list) -> np.ndarray:
    """Runs a graph whose output is ``init``'s value, computed by ``nodes`` from ``inits``."""
    out = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    graph = helper.make_graph([*nodes, helper.make_node("Identity", [init.name], ["y"])], "g",
                              [], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {})[0]


@pytest.mark.parametrize("transposed", [False, True], ids=["plain", "transposed"])
@pytest.mark.parametrize("name", NAMES)
def test_onnx_initializer_computes_the_stored_value(name: str, transposed: bool) -> None:
    fmt = FORMATS.get(name)
    stored = fmt.store(fmt.fake_quant(_weight()))
    w = stored.dequantized()
    if not fmt.onnx_stores(stored):
        pytest.skip(f"{name}: stored as fp32 in ONNX (nothing to rewrite)")
    init = numpy_helper.from_array(np.ascontiguousarray(w.T if transposed else w), "W")
    slot = WeightMatch(init, np.ones(len(w), np.float32), transposed)
    inits, nodes = fmt.to_onnx(stored, slot, "layer.weight")
    assert all(i.name != "W" for i in inits)
    assert np.array_equal(_run_initializer(init, inits, nodes), w.T if transposed else w)


@pytest.mark.parametrize("name", NAMES)
def test_onnx_initializer_of_a_batchnorm_folded_weight(name: str) -> None:
    fmt = FORMATS.get(name)
    stored = fmt.store(fmt.fake_quant(_weight()))
    if not fmt.onnx_stores(stored):
        pytest.skip(f"{name}: stored as fp32 in ONNX (nothing to rewrite)")
    w = stored.dequantized()
    k = np.linspace(-2.0, 1.5, len(w)).astype(np.float32)
    init = numpy_helper.from_array(w * k[:, None], "W")
    inits, nodes = fmt.to_onnx(stored, WeightMatch(init, k, False), "layer.weight")
    np.testing.assert_allclose(_run_initializer(init, inits, nodes), w * k[:, None], rtol=1e-6)


class _ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 4, 3)  # 72 input columns: several groups
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).relu()


def _conv_bn(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = _ConvBN().eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    _compress(model.conv, name)
    return model


@pytest.mark.parametrize("name", NAMES)
def test_batchnorm_folds_into_the_weight_as_the_format_says(name: str) -> None:
    folds = find_folds(_conv_bn(name))
    assert bool(folds) == FORMATS.get(name).folds


@pytest.mark.parametrize("name", NAMES)
def test_packed_file_stores_the_size_models_bytes_and_the_outputs(name: str, tmp_path: Path) -> None:
    model = _conv_bn(name)
    info = save_packed(model, tmp_path / "m.acpk")
    assert info.payload_bytes == size_bytes(model)
    x = torch.randn(3, 8, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(load_packed(info.path)(x), model(x), rtol=1e-5, atol=1e-5)
