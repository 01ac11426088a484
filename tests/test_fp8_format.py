"""The fp8 (e4m3) weight format's defining properties, beyond what every format is tested for
(tests/test_weight_formats.py): 1 byte per weight + one fp32 scale per output channel, the
relative error of e4m3 (``2**-4`` in the normal range), a scale that quantizing again gives
back, the search space offering it, and its ONNX form (FLOAT8E4M3FN + DequantizeLinear, opset
19) running in ONNX Runtime's CPU provider (the exporter writes opset 17, so an exported model
keeps fp8 weights as their fp32 values for now).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper
from torch import nn

from autocompress.compress import KNOB_TABLE, LayerPlan, Plan, apply, weight_format
from autocompress.compress._knob_values import bits_cell
from autocompress.compress.formats import FORMATS
from autocompress.config import load_search_space
from autocompress.measure import size_report
from autocompress.onnxgraph import WeightMatch


def _weight(rows: int = 16, cols: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.logspace(-3, 1, rows)[:, None]


def test_fp8_stores_one_byte_per_weight_plus_one_scale_per_channel() -> None:
    model = nn.Sequential(nn.Linear(64, 16, bias=False))
    model[0].weight.data = _weight()
    new = apply(model, Plan({"0": LayerPlan(bits="fp8")}), torch.randn(2, 64))
    (row,) = size_report(new)
    assert (row.format, row.bits, row.scales, row.bytes) == ("fp8", 8, 16, 16 * 64 + 4 * 16)
    fmt = FORMATS.get("fp8")
    stored = fmt.store(model[0].weight.data)
    assert len(fmt.pack(stored.values.ravel())) == 16 * 64
    assert stored.scale is not None and stored.scale.dtype == np.float32 and stored.scale.size == 16


def test_fp8_relative_error_is_within_e4m3s_bound() -> None:
    fmt = weight_format("fp8")
    w = _weight()
    q, scale = fmt.quantize(w)
    assert q.abs().amax(dim=1).eq(448).all()  # every channel uses the whole range
    normal = w.abs() >= 2.0 ** -6 * scale  # below: e4m3 subnormals, absolute steps 2**-9 * s
    rel = ((fmt.fake_quant(w) - w).abs() / w.abs())[normal]
    assert rel.max() <= 2.0 ** -4
    assert ((fmt.fake_quant(w) - w).abs()[~normal] <= 2.0 ** -10 * scale.expand_as(w)[~normal]).all()


def test_fp8_scale_is_the_one_requantizing_gives_back() -> None:
    fmt = weight_format("fp8")
    for seed in range(20):  # per-channel scales over 4 decades: many fp32 roundings of max/448
        value = fmt.fake_quant(_weight(64, 8, seed))
        q, scale = fmt.quantize(value)
        assert torch.equal(q * scale, value)


def test_fp8_is_a_bits_choice_of_the_search_space_and_plan() -> None:
    spec = KNOB_TABLE["bits"]
    assert spec.valid("fp8") and "'fp8'" in spec.allowed
    assert LayerPlan(bits="fp8").bits == "fp8"
    assert spec.token(LayerPlan(bits="fp8")) == "fp8"
    space = load_search_space({"layers": [{"knobs": {"bits": [4, "fp8", None]}}]})
    assert "fp8" in space.rules[0].knobs["bits"].choices
    assert bits_cell({"bits": "fp8"}) == (8.5, "fp8")  # between int8 and fp16 on the heat map


def test_fp8_onnx_form_runs_in_onnx_runtime_at_opset_19() -> None:
    fmt = weight_format("fp8")
    stored = fmt.store(fmt.fake_quant(_weight()))
    w = stored.dequantized()
    k = np.linspace(-2.0, 1.5, len(w)).astype(np.float32)
    for transposed, factors in ((False, np.ones_like(k)), (True, np.ones_like(k)), (False, k)):
        expected = np.ascontiguousarray((w * factors[:, None]).T if transposed else w * factors[:, None])
        init = numpy_helper.from_array(expected, "W")
        inits, nodes = fmt.to_onnx(stored, WeightMatch(init, factors, transposed), "layer.weight")
        assert inits[0].data_type == onnx.TensorProto.FLOAT8E4M3FN
        assert len(inits[0].raw_data) == w.size  # 1 byte per weight in the ONNX file too
        out = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
        graph = helper.make_graph([*nodes, helper.make_node("Identity", ["W"], ["y"])], "g", [],
                                  [out], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
        model.ir_version = 9
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(session.run(None, {})[0], expected, rtol=1e-6)
