"""``quantizer: awq``: AWQ / SmoothQuant per-input-channel scales (``compress/_awq.py``).

The defining property on inputs with a few outlier channels (the case AWQ is for): the layer's
output error after quantization is below round-to-nearest's on the same weights, at 4 and 3
bits weight-only and at W8A8 (static and dynamic activations). Then the deployment: ONNX (the
scale a Mul before the layer; ONNX Runtime's static and dynamic int8 still quantize it), the
packed file, the rebuild from a baked state, and fine-tuning through it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from torch import nn

from autocompress import cli
from autocompress.compress import (
    Calibration,
    InputScale,
    LayerPlan,
    Plan,
    apply,
    bake,
    dynamic_layers,
    static_layers,
)
from autocompress.compress.quantize import calibrate
from autocompress.deploy._export import export_run
from autocompress.deploy._packed import load_packed, save_packed
from autocompress.deploy._rebuild import load_baked_state
from autocompress.measure import size_bytes
from autocompress.measure.runtimes._ort import has_activation_quant, session_options
from autocompress.onnxgraph import export_onnx
from autocompress.tracking import read_front
from tests.models import MODELS

OUTLIERS = (3, 17, 40)


def _inputs(rows: int, d: int, seed: int) -> torch.Tensor:
    """Correlated features, a few channels ~30x larger than the rest (as in LLM activations)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(d) + 0.3 * torch.randn(d, d, generator=torch.Generator().manual_seed(99)) / d ** 0.5
    x = torch.randn(rows, d, generator=gen) @ mix + 0.2
    x[:, list(OUTLIERS)] *= 30
    return x


def _linear(d: int = 64, out: int = 48) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, out))


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(64, 32, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _conv_inputs(n: int, seed: int) -> torch.Tensor:
    """(n, 64, 6, 6) with the outlier channels of :func:`_inputs`."""
    return _inputs(n * 36, 64, seed).view(n, 6, 6, 64).permute(0, 3, 1, 2).contiguous()


LAYERS = {"linear": (lambda: _linear(), lambda seed: _inputs(512, 64, seed), "0"),
          "conv": (lambda: _Conv().eval(), lambda seed: _conv_inputs(24, seed), "conv")}


def _error(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        y, ref = model(x), reference(x)
    return float((y - ref).pow(2).sum() / ref.pow(2).sum())


def _compressed(model: nn.Module, layer: str, x: torch.Tensor, calib: list[torch.Tensor],
                **knobs) -> nn.Module:
    m = apply(model, Plan({layer: LayerPlan(**knobs)}), x, calibration=Calibration(tuple(calib)))
    calibrate(m, calib)
    return m.eval()


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("kind", LAYERS)
def test_awq_output_error_is_below_round_to_nearest(kind: str, bits: int) -> None:
    build, inputs, layer = LAYERS[kind]
    model, calib, held_out = build(), [inputs(0), inputs(1)], inputs(2)
    rtn = _compressed(model, layer, calib[0], calib, bits=bits)
    awq = _compressed(model, layer, calib[0], calib, bits=bits, quantizer="awq")
    for x in (calib[0], held_out):  # on the calibration data and on new data alike
        assert _error(awq, model, x) < 0.95 * _error(rtn, model, x)  # linear ~0.56, conv ~0.92


@pytest.mark.parametrize(("kind", "knobs"), [
    ("linear", {"bits": 8, "act_bits": 8}), ("conv", {"bits": 8, "act_bits": 8}),
    ("linear", {"bits": 4, "act_bits": 8}), ("linear", {"bits": 8, "act_bits": "dynamic"})],
    ids=["linear-w8a8", "conv-w8a8", "linear-w4a8", "linear-w8-dynamic"])
def test_smoothquant_activation_error_is_below_plain_int8(kind: str, knobs: dict) -> None:
    build, inputs, layer = LAYERS[kind]
    model, calib, held_out = build(), [inputs(0), inputs(1)], inputs(2)
    plain = _compressed(model, layer, calib[0], calib, **knobs)
    awq = _compressed(model, layer, calib[0], calib, quantizer="awq", **knobs)
    for x in (calib[0], held_out):  # W8A8 ~0.08 of plain, W4A8 0.5-0.8
        assert _error(awq, model, x) < 0.9 * _error(plain, model, x)


def test_the_scaled_layer_computes_the_same_in_float() -> None:
    """``W diag(s)`` times ``x / s`` is ``W x``: the scale changes what is quantized only
    (but for the weights clipped to their channel's bound, each channel's largest)."""
    model, x = _linear(), _inputs(256, 64, 0)
    m = apply(model, Plan({"0": LayerPlan(bits=4, quantizer="awq")}), x)
    layer = m.get_submodule("0")
    factor = layer.input_scale.factor
    assert not torch.equal(factor, torch.ones_like(factor))
    w = layer.parametrizations.weight.original
    kept = w.abs() < w.abs().amax(1, keepdim=True)
    assert kept.float().mean() > 0.9
    torch.testing.assert_close((w * factor)[kept], model[0].weight[kept], rtol=1e-5, atol=1e-6)
    # The input scale's pre-hook runs first: the activation quantizer sees x / s.
    m8 = apply(model, Plan({"0": LayerPlan(bits=8, act_bits=8, quantizer="awq")}), x)
    hooks = list(m8.get_submodule("0")._forward_pre_hooks.values())
    assert [h.__name__ for h in hooks] == ["input_scale_pre_hook", "act_quant_pre_hook"]


def test_empty_calibration_sets_up_ones_and_leaves_the_weights() -> None:
    model, x = _linear(), _inputs(16, 64, 0)
    plan = Plan({"0": LayerPlan(bits=4, quantizer="awq")})
    m = apply(model, plan, x, calibration=Calibration.empty())
    layer = m.get_submodule("0")
    assert isinstance(layer.input_scale, InputScale)
    assert torch.equal(layer.input_scale.factor, torch.ones(64))
    assert torch.equal(layer.parametrizations.weight.original, model[0].weight)


def test_low_rank_scales_the_first_factor_only() -> None:
    model, x = _linear(), _inputs(256, 64, 0)
    m = apply(model, Plan({"0": LayerPlan(bits=4, rank=0.5, quantizer="awq")}), x)
    first, second = m.get_submodule("0")
    assert isinstance(first.input_scale, InputScale) and not hasattr(second, "input_scale")
    assert not torch.equal(first.input_scale.factor, torch.ones(64))


def test_a_tied_weight_keeps_unit_scales() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    model, x = Tied(), _inputs(128, 64, 0)
    m = apply(model, Plan({"a": LayerPlan(bits=4, quantizer="awq")}), x)
    assert torch.equal(m.a.input_scale.factor, torch.ones(64))


# --- deployment: ONNX, packed, rebuild, fine-tuning ----------------------------------------

PLANS = {
    "weight-only": lambda s: {s.first: LayerPlan(bits=4, quantizer="awq"),
                              s.second: LayerPlan(bits=3, rank=0.5, quantizer="awq")},
    "act8": lambda s: {s.first: LayerPlan(bits=4, act_bits=8, quantizer="awq"),
                       s.second: LayerPlan(bits=8, act_bits=8, quantizer="awq", sparsity=0.5)},
    "dynamic": lambda s: {s.output: LayerPlan(bits=8, act_bits="dynamic", quantizer="awq")},
}
SPECS = ["mlp", "conv2d", "residual"]


def _trial(spec_name: str, plan_name: str) -> tuple[nn.Module, nn.Module, Plan, torch.Tensor]:
    spec = MODELS[spec_name]
    model, x = spec.build(), spec.example_inputs(32)
    plan = Plan(PLANS[plan_name](spec))
    m = apply(model, plan, x, calibration=Calibration((x,)))
    calibrate(m, [x])
    return model, m.eval(), plan, x


@pytest.mark.parametrize("plan_name", PLANS)
@pytest.mark.parametrize("spec_name", SPECS)
def test_exports_to_onnx_and_packed_and_rebuilds(spec_name: str, plan_name: str,
                                                tmp_path: Path) -> None:
    model, m, plan, x = _trial(spec_name, plan_name)
    if plan_name == "dynamic":
        assert dynamic_layers(m)
    elif plan_name == "act8":
        assert static_layers(m)
    y = bake(m)(x).detach()

    path = export_onnx(m, x, tmp_path / "m.onnx", calibration=[x])
    assert "Mul" in [n.op_type for n in onnx.load(str(path)).graph.node]  # x / s before the layer
    opts = session_options(1, fold_weight_qdq=not has_activation_quant(path.read_bytes()))
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ran = {n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node}
    if plan_name != "weight-only":  # the scaled layers run on ONNX Runtime's integer kernels
        assert ran & {"QGemm", "QLinearMatMul", "QLinearConv", "DynamicQuantizeMatMul"}, ran
    y_onnx = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    tol = 0.01 if plan_name == "act8" else 1e-4  # QDQ rounds the tensors between layers too
    np.testing.assert_allclose(y_onnx, y.numpy(), atol=tol * float(y.abs().max()), rtol=0)

    info = save_packed(m, tmp_path / "m.acpk")
    assert info.payload_bytes == size_bytes(m)
    torch.testing.assert_close(load_packed(info.path)(x), y, atol=1e-5, rtol=0)

    rebuilt = apply(model, plan, x, calibration=Calibration.empty())
    load_baked_state(rebuilt, bake(m).state_dict(), plan)
    torch.testing.assert_close(rebuilt(x), m(x), atol=1e-6, rtol=0)
    assert size_bytes(rebuilt) == size_bytes(m)


def test_size_counts_the_input_scales() -> None:
    spec = MODELS["mlp"]
    model, x = spec.build(), spec.example_inputs(8)
    rtn = apply(model, Plan({spec.first: LayerPlan(bits=4)}), x)
    awq = apply(model, Plan({spec.first: LayerPlan(bits=4, quantizer="awq")}), x)
    width = model.get_submodule(spec.first).in_features
    assert size_bytes(awq) == size_bytes(rtn) + 4 * width  # one fp32 factor per input channel


def test_finetuning_trains_the_weight_not_the_scale() -> None:
    _, m, _, x = _trial("mlp", "act8")
    m.train()
    scales = {n: b.clone() for n, b in m.named_buffers() if n.endswith("input_scale.factor")}
    assert scales and not any(n.endswith("factor") for n, _ in m.named_parameters())
    target = torch.randint(0, 4, (len(x),))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(m(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, b in scales.items():
        assert torch.equal(m.get_buffer(n), b)


@pytest.mark.slow
def test_a_search_with_awq_exports_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3-trial search whose every layer takes ``quantizer: awq``: each front model rebuilds
    from MLflow and exports to ONNX and the packed format with the existing verification
    (the artifact's metric and size equal the logged ones)."""
    space = {"version": 1, "layers": [{"types": ["Linear"], "knobs": {
        "bits": [4, 8], "quantizer": ["awq"], "act_bits": [None, 8, "dynamic"]}}]}
    exp = {"name": "awq-e2e", "task": "tests.models:tiny_task", "search_space": space,
           "objectives": [{"metric": "accuracy", "mode": "max"},
                          {"metric": "size_bytes", "mode": "min"}],
           "target": {"runtime": "onnxruntime", "threads": 1, "batch_size": 1, "warmup": 2,
                      "min_runs": 5, "max_runs": 20, "budget_s": 0.05},
           "search": {"sampler": "random", "trials": 3, "seed": 0, "backend": "serial"},
           "finetune": {"epochs": 1, "lr": 0.001}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    assert cli.main(["search", str(tmp_path / "exp.yaml"), "--tracking-uri", uri]) == 0
    front = read_front(uri, "awq-e2e")
    assert front and all("awq" in str(row["plan"]) for row in front)
    for row in front:
        for fmt in ("onnx", "packed"):
            result = export_run(row["run_id"], fmt, tmp_path / fmt / row["run_id"], uri)
            assert result["size_bytes"] == row["size_bytes"]


def test_awq_searches_its_scales_for_the_group_wise_format_too() -> None:
    """With ``group_size`` AWQ's objective quantizes through the grouped format: its output
    error is below group-wise round-to-nearest's on inputs with outlier channels."""
    from autocompress.compress import Calibration, LayerPlan, Plan, apply

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64))
    x = torch.randn(2048, 256) @ (torch.eye(256) + 0.3 * torch.randn(256, 256))
    x[:, :4] *= 20
    calibration = Calibration((x,))
    errors = {}
    for quantizer in ("rtn", "awq"):
        plan = Plan({"0": LayerPlan(bits=4, quantizer=quantizer, group_size=128)})
        compressed = apply(model, plan, x[:2], calibration=calibration)
        with torch.no_grad():
            y0, y = model(x), compressed(x)
        errors[quantizer] = float((y - y0).pow(2).sum() / y0.pow(2).sum())
    assert errors["awq"] < 0.8 * errors["rtn"]
