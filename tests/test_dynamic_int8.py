"""``act_bits: "dynamic"``: int8 Linear layers deployed as ONNX Runtime's dynamic quantization.

The plan value and its refusals, the fake quantizer against the ONNX operator it imitates, the
exported graph (integer MatMuls for exactly the dynamic layers), ONNX Runtime against the
PyTorch fake-quant model, size accounting, the packed format and latency measurement.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from autocompress._inputs import run
from autocompress.compress import apply, bake, dynamic_layers
from autocompress.compress._knobs import KNOB_TABLE
from autocompress.compress._modules import ActFakeQuant, dynamic_fake_quant, quantize_weight
from autocompress.compress._plan import LayerPlan, Plan, PlanError
from autocompress.compress._registry import describe_layers
from autocompress.deploy._packed import load_packed, save_packed
from autocompress.measure import Target, measure_latency, size_bytes
from autocompress.measure.runtimes._ort import has_activation_quant, session_options
from autocompress.onnxgraph import export_onnx
from tests.models import MODELS
from tests.real_models import tokens_model, two_inputs

DYN = LayerPlan(bits=8, act_bits="dynamic")
MLP = MODELS["mlp"]
# net.0 dynamic; net.2 int8 weights only; net.4 dynamic and factorized (both factors become
# integer MatMuls); net.6 4-bit weights with a static 8-bit input: every path in one graph.
MIXED = Plan({"net.0": DYN, "net.2": LayerPlan(bits=8),
              "net.4": LayerPlan(bits=8, act_bits="dynamic", rank=0.5),
              "net.6": LayerPlan(bits=4, act_bits=8)})


# --- the plan value ----------------------------------------------------------------------------


def test_dynamic_is_a_plan_value_with_its_own_token() -> None:
    plan = Plan({"fc": DYN})
    assert Plan.from_json(plan.to_json()) == plan
    assert plan.summary() == "fc: b8 adyn"
    assert LayerPlan(bits=8, act_bits=8).is_identity is False
    cell = KNOB_TABLE["bits"].heat.cell({"bits": 8, "act_bits": "dynamic"})
    assert cell == (8, "8 adyn")


@pytest.mark.parametrize("value", ["dyn", "static", 8.0, 4, True])
def test_other_values_are_refused_with_the_allowed_ones(value: object) -> None:
    with pytest.raises(PlanError, match=r"act_bits=.* is out of range; allowed: 'dynamic', 8 or null"):
        LayerPlan(bits=8, act_bits=value)


@pytest.mark.parametrize("bits", [None, 4, 2])
def test_dynamic_needs_8_bit_weights(bits: int | None) -> None:
    with pytest.raises(PlanError, match=rf"^layer 'fc': act_bits='dynamic' needs bits=8 .*"
                                        rf"got bits={bits}"):
        Plan({"fc": LayerPlan(bits=bits, act_bits="dynamic")})
    with pytest.raises(PlanError, match=r"^layers\.fc: act_bits='dynamic' needs bits=8"):
        Plan.from_dict({"layers": {"fc": {"act_bits": "dynamic", **({"bits": bits} if bits else {})}}})


def test_convolutions_and_embeddings_refuse_dynamic() -> None:
    model, x = two_inputs()
    refusals = {la.name: la.refusals for la in describe_layers(model, x)}
    assert ("act_bits", "dynamic") in [(r.knob, r.value) for r in refusals["conv"]]
    assert "act_bits" not in [r.knob for r in refusals["meta"]]
    with pytest.raises(PlanError, match=r"layer 'conv': cannot take act_bits='dynamic' \(Conv2d\): "
                                        r"dynamic activation quantization .* Linear layers only"):
        apply(model, Plan({"conv": DYN}), x)
    apply(model, Plan({"conv": LayerPlan(bits=8, act_bits=8), "meta": DYN}), x)  # both fine

    model, x = tokens_model()
    with pytest.raises(PlanError, match=r"layer 'embed': cannot take act_bits='dynamic' "
                                        r"\(Embedding\): its inputs are indices"):
        apply(model, Plan({"embed": DYN}), x)
    spec = MODELS["conv1d"]
    with pytest.raises(PlanError, match=r"\(Conv1d\): dynamic activation quantization"):
        apply(spec.build(), Plan({spec.first: DYN}), spec.example_inputs())


# --- the fake quantizer ------------------------------------------------------------------------

_CASES = {
    "mixed": torch.randn(4, 37) * 3 + 0.5,
    "positive": torch.rand(3, 16) + 0.1,
    "negative": -torch.rand(5, 8) - 2.0,
    "zeros": torch.zeros(2, 4),
    "ties": torch.tensor([[0.0, 0.5, 1.5, 2.5, 3.5, 254.5, 255.0]]),  # scale 1: x.5 are ties
}


@pytest.mark.parametrize("x", _CASES.values(), ids=list(_CASES))
def test_dynamic_fake_quant_is_the_onnx_operator(x: torch.Tensor) -> None:
    """Bit-exact with the ONNX reference implementation of DynamicQuantizeLinear followed by
    dequantization, and with ONNX Runtime's kernel."""
    node = onnx.helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])
    dq = onnx.helper.make_node("DequantizeLinear", ["y", "s", "z"], ["out"])
    graph = onnx.helper.make_graph(
        [node, dq], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
        [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 19)])
    ours = dynamic_fake_quant(x).numpy()
    np.testing.assert_array_equal(ReferenceEvaluator(model).run(None, {"x": x.numpy()})[0], ours)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": x.numpy()})[0], ours)


def test_dynamic_fake_quant_passes_the_gradient_straight_through() -> None:
    x = (torch.randn(3, 5) * 2).requires_grad_()
    y = dynamic_fake_quant(x)
    assert not torch.equal(y.detach(), x.detach())  # it does quantize
    y.backward(torch.arange(15.0).view(3, 5))
    torch.testing.assert_close(x.grad, torch.arange(15.0).view(3, 5))


def test_the_dynamic_quantizer_has_no_state() -> None:
    quant = ActFakeQuant(8, dynamic=True)
    assert dict(quant.state_dict()) == {}
    with pytest.raises(ValueError, match="8-bit only"):
        ActFakeQuant(4, dynamic=True)


def test_fine_tuning_runs_through_the_fake_quant() -> None:
    model = apply(MLP.build(), MIXED, MLP.example_inputs()).train()
    assert dynamic_layers(model) == ["net.0", "net.4.0", "net.4.1"]
    model(MLP.example_inputs(8)).square().sum().backward()
    grad = model.net[0].parametrizations.weight.original.grad
    assert grad is not None and grad.abs().sum() > 0


# --- export ------------------------------------------------------------------------------------


def _export(model: torch.nn.Module, x, path: Path) -> onnx.ModelProto:
    export_onnx(model, x, path)
    return onnx.load(str(path))


def test_export_gives_integer_matmuls_to_exactly_the_dynamic_layers(tmp_path: Path) -> None:
    x = MLP.example_inputs(8)
    model = apply(MLP.build(), MIXED, x).eval()
    graph = _export(model, x, tmp_path / "m.onnx").graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["MatMulInteger"] == ops["DynamicQuantizeLinear"] == 3  # net.0, net.4.0, net.4.1
    integer = sorted(n.name for n in graph.node if n.op_type == "MatMulInteger")
    assert integer == ["/net/net.0/Gemm_MatMul_quant", "/net/net.4/net.4.0/MatMul_quant",
                       "/net/net.4/net.4.1/Gemm_MatMul_quant"]
    # net.2 (weight-only) keeps our int8 weight + DequantizeLinear; net.6 (act_bits 8) is the
    # static QDQ graph: its MatMul reads a dequantized input and weight.
    dq = {n.output[0]: n.name for n in graph.node if n.op_type == "DequantizeLinear"}
    assert "net.2.weight_dequantize" in dq.values()
    (last,) = [n for n in graph.node if n.name.startswith("/net/net.6/") and n.op_type == "MatMul"]
    assert last.input[0] in dq and last.input[1] in dq
    # The integer weights are exactly our 8-bit values, transposed to (in, out), zero points 0.
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    node = next(n for n in graph.node if n.name == "/net/net.0/Gemm_MatMul_quant")
    q, scale = quantize_weight(model.net[0].weight.detach(), 8)
    np.testing.assert_array_equal(inits[node.input[1]], q.numpy().astype(np.int8).T)
    assert not inits[node.input[3]].any()
    scale_name = next(i for i in inits if i.startswith(node.input[1].removesuffix("_quantized"))
                      and i.endswith("_scale"))
    np.testing.assert_allclose(inits[scale_name], scale.flatten().numpy(), rtol=1e-6)


def test_onnxruntime_computes_what_the_fake_quant_model_computes(tmp_path: Path) -> None:
    """Same int8 weights, same activation quantization: only fp32 summation order differs
    (the integer product is exact), so the outputs agree to ~1e-7 of their size, far inside
    the quantization error itself (which is checked to be larger)."""
    x = MLP.example_inputs(8)
    fp32 = MLP.build()
    model = apply(fp32, MIXED, x).eval()
    export_onnx(model, x, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for batch in (x, x[:1]):
            expected = model(batch).numpy()
            got = session.run(None, {"input": batch.numpy()})[0]
            scale = np.abs(expected).max()
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * scale)
            assert np.abs(fp32(batch).numpy() - expected).max() > 100 * 1e-6 * scale


@pytest.mark.parametrize("case", ["tokens", "bert"])
def test_sequence_models_match_too(case: str, tmp_path: Path) -> None:
    """Linear layers on (batch, sequence, features) inputs are MatMuls, not Gemms. A BERT's
    LayerNorm/GELU/softmax differ between the runtimes by ~1e-7, which can move an activation
    across an 8-bit rounding boundary (one quantum, range/255), hence the looser bound."""
    if case == "bert":
        pytest.importorskip("transformers")
        from tests.real_models import tiny_bert

        model, x = tiny_bert()
        plan = {n: DYN for n in ("encoder.encoder.layer.0.attention.self.query",
                                 "encoder.encoder.layer.0.attention.self.key",
                                 "encoder.encoder.layer.0.intermediate.dense",
                                 "encoder.encoder.layer.1.output.dense")}
        plan["encoder.encoder.layer.0.output.dense"] = LayerPlan(bits=8)
        tolerance = 1e-3
    else:
        model, x = tokens_model()
        plan, tolerance = {"proj": DYN}, 1e-6
    compressed = apply(model, Plan(plan), x).eval()
    graph = _export(compressed, x, tmp_path / "m.onnx").graph
    dynamic = [n for n, lp in plan.items() if lp.act_bits]
    assert Counter(n.op_type for n in graph.node)["MatMulInteger"] == len(dynamic)
    assert sum(n.op_type == "DequantizeLinear" for n in graph.node) == len(plan) - len(dynamic)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in x.items()})[0]
    with torch.no_grad():
        expected = run(compressed, x).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance * np.abs(expected).max())


# --- size, packed, latency ---------------------------------------------------------------------


def test_size_counts_int8_weights_and_a_free_quantizer() -> None:
    x = MLP.example_inputs()
    weights_only = apply(MLP.build(), Plan({"net.0": LayerPlan(bits=8)}), x)
    dynamic = apply(MLP.build(), Plan({"net.0": DYN}), x)
    static = apply(MLP.build(), Plan({"net.0": LayerPlan(bits=8, act_bits=8)}), x)
    assert size_bytes(dynamic) == size_bytes(weights_only) == size_bytes(static) - 8


def test_packed_round_trip(tmp_path: Path) -> None:
    x = MLP.example_inputs(8)
    model = apply(MLP.build(), MIXED, x)
    info = save_packed(model, tmp_path / "m.acpk")
    loaded = load_packed(info.path)
    quants = {n: m.dynamic for n, m in loaded.named_modules() if isinstance(m, ActFakeQuant)}
    assert quants == {"net.0.act_quant": True, "net.4.0.act_quant": True,
                      "net.4.1.act_quant": True, "net.6.act_quant": False}
    torch.testing.assert_close(loaded(x), bake(model)(x), atol=1e-6, rtol=0)
    assert info.payload_bytes == size_bytes(model)


def test_onnxruntime_keeps_the_integer_kernels_when_folding_weight_dequantization(tmp_path: Path) -> None:
    """A graph without static activation Q/DQ gets ``session.disable_quant_qdq``; the dynamic
    layers still run as DynamicQuantizeMatMul, the weight-only layer is folded to fp32."""
    x = MLP.example_inputs()
    model = apply(MLP.build(), Plan({"net.0": DYN, "net.2": LayerPlan(bits=8)}), x).eval()
    export_onnx(model, x, tmp_path / "m.onnx")
    data = (tmp_path / "m.onnx").read_bytes()
    assert not has_activation_quant(data)
    opts = session_options(1, fold_weight_qdq=True)
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert ops["DynamicQuantizeMatMul"] == 1 and ops["DequantizeLinear"] == 0


def test_latency_is_measured() -> None:
    x = MLP.example_inputs()
    model = apply(MLP.build(), Plan({"net.0": DYN, "net.2": DYN}), x)
    target = Target(warmup=1, min_runs=3, max_runs=8, budget_s=0.05)
    result = measure_latency(model, x, target, use_cache=False)
    assert 0 < result.latency_ms < 10_000


def test_a_space_never_samples_dynamic_activations_without_8_bit_weights() -> None:
    import optuna

    from autocompress.compress import LayerInfo
    from autocompress.config import load_search_space

    space = load_search_space({"layers": [{"knobs": {"bits": [4, 8, None],
                                                     "act_bits": ["dynamic", None]}}]})
    resolved = space.resolve([LayerInfo("fc", "Linear", (4, 4), 20, 16, is_output=True)])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        plan = resolved.suggest(study.ask())
        lp = plan.layers["fc"]
        seen.add((lp.bits, lp.act_bits))
        assert lp.act_bits != "dynamic" or lp.bits == 8
    assert (8, "dynamic") in seen and (4, None) in seen


def test_the_warm_start_adds_int8_activations_where_the_space_offers_them() -> None:
    from autocompress.compress import LayerInfo
    from autocompress.config import load_search_space

    layers = [LayerInfo("emb", "Embedding", (10, 4), 40, 0), LayerInfo("fc", "Linear", (4, 4), 20, 16)]
    space = load_search_space({"layers": [{"types": ["Linear"], "knobs": {"bits": [4, 8, None],
                                                                          "act_bits": [None, "dynamic"]}},
                                          {"types": ["Embedding"], "knobs": {"bits": [4, 8]}}]})
    first, second = space.resolve(layers).warm_start_points()
    assert first == {"fc/bits": 8, "fc/act_bits": None, "emb/bits": 8}
    assert second == {**first, "fc/act_bits": "dynamic"}
    plain = load_search_space({"layers": [{"knobs": {"bits": [4, 8]}}]}).resolve(layers)
    assert len(plain.warm_start_points()) == 1
