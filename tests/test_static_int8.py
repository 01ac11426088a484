"""``act_bits: 8``: layers deployed on ONNX Runtime's integer kernels (QLinearConv,
QLinearMatMul, QGemm, MatMulIntegerToFloat) with our weights and trained input ranges."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from autocompress.compress import LayerPlan, Plan, apply, static_layers
from autocompress.compress._knobs import reconcile
from autocompress.compress._modules import ActFakeQuant, quantize_weight
from autocompress.compress._plan import PlanError
from autocompress.compress._registry import describe_layers
from autocompress.compress.quantize import calibrate
from autocompress.measure import Target
from autocompress.measure.cache import graph_signature
from autocompress.measure.runtimes._ort import session_options
from autocompress.measure.runtimes._table import get_runtime
from autocompress.onnxgraph import export_onnx
from tests.models import MODELS

# Ops the CPU session runs a quantized weight-bearing layer as.
INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
               "MatMulInteger", "ConvInteger"}
FLOAT_OPS = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}


def _optimized(path: Path, tmp_path: Path) -> list[str]:
    """The op types of the graph ONNX Runtime's CPU session actually runs."""
    opts = session_options(1, fold_weight_qdq=False)
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]


def _all_int8(model: torch.nn.Module, x: torch.Tensor, **extra) -> Plan:
    return Plan({la.name: LayerPlan(bits=8, act_bits=8, **extra)
                 for la in describe_layers(model, x) if la.used})


@pytest.mark.parametrize("name", list(MODELS))
def test_every_static_layer_runs_on_an_integer_kernel(name: str, tmp_path: Path) -> None:
    spec = MODELS[name]
    fp32, x = spec.build(), spec.example_inputs()
    model = apply(fp32, _all_int8(fp32, x), x).eval()
    ops = Counter(_optimized(export_onnx(model, x, tmp_path / "m.onnx"), tmp_path))
    assert sum(ops[o] for o in INTEGER_OPS) == len(static_layers(model)), ops
    assert not FLOAT_OPS & set(ops), ops  # no layer fell back to fp32


def test_low_rank_factors_both_run_integer(tmp_path: Path) -> None:
    spec = MODELS["conv2d"]
    fp32, x = spec.build(), spec.example_inputs()
    model = apply(fp32, _all_int8(fp32, x, rank=0.5), x).eval()
    assert len(static_layers(model)) == 2 * len(_all_int8(fp32, x).layers)
    ops = Counter(_optimized(export_onnx(model, x, tmp_path / "m.onnx"), tmp_path))
    assert sum(ops[o] for o in INTEGER_OPS) == len(static_layers(model)), ops


def test_the_graph_holds_our_weights_and_input_ranges(tmp_path: Path) -> None:
    """BatchNorm folded into the conv: the int8 values are ours (sign of the BN factor moved
    in), the scale ours times |factor|; the conv's input has the observer's range."""
    spec = MODELS["residual"]
    fp32, x = spec.build(), spec.example_inputs()
    model = apply(fp32, Plan({"conv_a": LayerPlan(bits=4, act_bits=8)}), x).eval()
    graph = onnx.load(str(export_onnx(model, x, tmp_path / "m.onnx"))).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    (conv,) = [n for n in graph.node if n.op_type == "Conv" and n.input[1] in producer
               and producer[n.input[1]].op_type == "DequantizeLinear"]
    w_dq = producer[conv.input[1]]
    q, scale = quantize_weight(model.conv_a.weight.detach(), 4)
    stored = inits[w_dq.input[0]]
    assert stored.dtype == np.int8 and np.abs(stored).max() <= 7  # 4-bit values in int8
    np.testing.assert_array_equal(np.abs(stored), np.abs(q.numpy()).astype(np.int8))
    bn = model.bn_a
    k = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
    np.testing.assert_allclose(inits[w_dq.input[1]], scale.flatten().numpy() * np.abs(k), rtol=1e-5)
    x_dq = producer[conv.input[0]]
    act_scale, act_zp = model.conv_a.act_quant.qparams()
    np.testing.assert_allclose(inits[x_dq.input[1]], act_scale, rtol=1e-6)
    assert int(inits[x_dq.input[2]]) == act_zp


def test_calibration_takes_the_range_of_all_batches_and_leaves_batchnorm_alone() -> None:
    spec = MODELS["conv2d"]
    fp32, x = spec.build(), spec.example_inputs(8)
    model = apply(fp32, Plan({spec.second: LayerPlan(bits=8, act_bits=8)}), x[:2])
    batches = [x[:4], 3 * x[4:]]
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(spec.second).register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].detach()))
    assert calibrate(model, batches) == 1
    handle.remove()
    quant = model.get_submodule(spec.second).act_quant
    assert float(quant.lo) == pytest.approx(float(torch.cat([s.flatten() for s in seen]).min()))
    assert float(quant.hi) == pytest.approx(float(torch.cat([s.flatten() for s in seen]).max()))
    assert not quant.calibrating
    for k, v in stats.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert calibrate(apply(fp32, Plan({spec.second: LayerPlan(bits=8)}), x), batches) == 0


def test_act_bits_8_needs_integer_weights() -> None:
    with pytest.raises(PlanError, match="act_bits=8 needs integer weights"):
        Plan({"a": LayerPlan(act_bits=8)})
    assert reconcile({"bits": None, "act_bits": 8})["act_bits"] is None
    assert reconcile({"bits": 4, "act_bits": 8})["act_bits"] == 8


def test_latency_cache_keys_tell_the_int8_graphs_apart(tmp_path: Path) -> None:
    spec = MODELS["conv2d"]
    fp32, x = spec.build(), spec.example_inputs()
    names = [la.name for la in describe_layers(fp32, x) if la.used]
    plans = {"fp32": Plan(), "w8": Plan({n: LayerPlan(bits=8) for n in names}),
             "w8a8": _all_int8(fp32, x)}
    signatures = {k: graph_signature(export_onnx(apply(fp32, p, x), x, tmp_path / f"{k}.onnx"))
                  for k, p in plans.items()}
    assert len({signatures[k] for k in ("fp32", "w8", "w8a8")}) == 3


def test_runtimes_say_whether_they_run_integer_kernels() -> None:
    assert get_runtime(Target(runtime="onnxruntime")).integer_kernels(Target(runtime="onnxruntime")) is None
    reason = get_runtime(Target(runtime="torch")).integer_kernels(Target(runtime="torch"))
    assert reason and "fp32" in reason


def test_act_bits_are_searched_only_where_they_can_pay() -> None:
    """Left out, with one note each, on a runtime without integer kernels (torch) and when no
    objective measures speed (they buy nothing else)."""
    from autocompress.config._space import load_search_space
    from autocompress.tune._driver import _without_knobs_that_cannot_pay

    spec = MODELS["mlp"]
    layers = describe_layers(spec.build(), spec.example_inputs())
    space = load_search_space({"layers": [
        {"types": ["Linear"], "knobs": {"bits": [4, 8], "act_bits": [None, 8]}}]},
        source="inline.yaml").resolve(layers)
    for runtime, metrics, kept, why in (
            ("onnxruntime", ["accuracy", "latency_ms"], True, None),
            ("torch", ["accuracy", "latency_ms"], False, "torch"),
            ("onnxruntime", ["accuracy", "size_bytes"], False, "no objective measures it")):
        notes: list[str] = []
        exp = SimpleNamespace(target=Target(runtime=runtime), metrics=metrics)  # what it reads
        out = _without_knobs_that_cannot_pay(space, exp, notes.append)
        assert any(p.endswith("/act_bits") for p in out.params()) is kept
        assert all(lp.act_bits is None for lp in out.plan_from_params(
            {p: 8 for p in out.params()}).layers.values()) is not kept
        assert len(notes) == (0 if kept else 1)
        assert kept or ("act_bits left out of the search" in notes[0] and why in notes[0])


def test_the_static_range_always_includes_zero() -> None:
    """uint8 with zero exactly representable (zero padding, ReLU outputs)."""
    quant = ActFakeQuant(8)
    quant.observe(torch.tensor([-1.0, 3.0]))
    assert quant.qparams() == pytest.approx((4.0 / 255, 64))


@pytest.mark.slow
def test_a_w8a8_search_result_exports_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              serial: dict) -> None:
    """Search (1 trial, every layer W8A8, 1 epoch) -> export: the deployed integer graph scores
    what the trial logged, within the export tolerance."""
    import autocompress as ac

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = ac.search("tests.models:tiny_task", space={"layers": [
        {"knobs": {"bits": [8], "act_bits": [8]}}]}, objectives=["accuracy", "latency_ms"],
        trials=1, concurrency=1, warm_start=False, finetune={"epochs": 1},
        target={"threads": 1, "warmup": 1, "min_runs": 3, "max_runs": 5, "budget_s": 0.01},
        tracking_uri=uri, echo=lambda _: None, **serial)
    assert len(result.front) == 1
    row = result.front.iloc[0]
    assert "a8" in row["summary"] and "adyn" not in row["summary"]
    out = ac.export(row["run_id"], format="onnx", out=str(tmp_path / "dist"), tracking_uri=uri)
    assert abs(out["accuracy"] - row["accuracy"]) <= out["tolerance"]
    ops = Counter(n.op_type for n in onnx.load(out["path"]).graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0


def test_static_convs_and_dynamic_linears_in_one_graph(tmp_path: Path) -> None:
    """The search's second warm-start point on a CNN: act_bits 8 on the convs, dynamic on the
    Linear layers reading the same flattened tensor; both tools name their nodes after it."""
    torch.manual_seed(0)
    fp32 = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x = torch.randn(4, 1, 8, 8)
    layers = [la for la in describe_layers(fp32, x) if la.used]
    plan = Plan({la.name: LayerPlan(bits=8, act_bits="dynamic" if la.type == "Linear" else 8)
                 for la in layers})
    model = apply(fp32, plan, x).eval()
    path = export_onnx(model, x, tmp_path / "m.onnx")
    names = [n.name for n in onnx.load(str(path)).graph.node]
    assert len(names) == len(set(names))
    ops = Counter(_optimized(path, tmp_path))
    assert sum(ops[o] for o in INTEGER_OPS) == len(layers), ops


def test_calibration_reads_no_data_for_a_model_without_static_quantizers(tiny) -> None:
    """Every trial calibrates; a plan without act_bits 8 must not pay for reading batches."""
    import copy

    class Unreadable:
        def __iter__(self):
            raise AssertionError("the training data was read")

    task = copy.copy(tiny)
    task.train_loader = Unreadable()
    model = apply(tiny.model, Plan({"net.0": LayerPlan(bits=8, act_bits="dynamic")}), tiny.example_inputs)
    assert calibrate(model, task.calibration_batches()) == 0
