"""``target.runtime: openvino``: registered and validated, every plan family run on it and on
ONNX Runtime against PyTorch (or refused with the reason), timed by the shared protocol, and a
clear error without the package.

The plan-family table here is README's "Runtimes" table: a family that runs on ONNX Runtime
either runs on OpenVINO with outputs as close to PyTorch's as ONNX Runtime's, or is refused
(:class:`RefusedPlan`) where a trial prepares its timing.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from autocompress._inputs import run
from autocompress.compress import LayerPlan, Plan, apply, bake
from autocompress.measure import Target, measure_latency
from autocompress.measure.latency import PairedMeasurer, prepare
from autocompress.measure.runtimes import RUNTIMES, RefusedPlan, get_runtime, runtime_names
from tests.real_models import tiny_bert
from tests.runtimes import first_output

QUICK = {"warmup": 1, "min_runs": 3, "max_runs": 6, "budget_s": 0.05}


class TinyCNN(nn.Module):
    """Two 3x3 convs (32 channels: ``conv2``'s 288 inputs take groups of 32) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


def tiny_cnn() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return TinyCNN().eval(), torch.randn(2, 3, 8, 8)


BERT_LINEARS = [f"encoder.encoder.layer.{i}.{n}" for i in range(2) for n in (
    "attention.self.query", "attention.self.key", "attention.self.value",
    "attention.output.dense", "intermediate.dense", "output.dense")]
BERT_FFN = [f"encoder.encoder.layer.{i}.intermediate.dense" for i in range(2)]
MODELS = {
    "cnn": (tiny_cnn, {"all": ["conv1", "conv2", "head"], "grouped": ["conv2", "head"],
                       "linear": ["head"], "2:4": ["conv2", "head"], "channel": ["conv1"]}),
    "bert": (tiny_bert, {"all": BERT_LINEARS, "grouped": BERT_LINEARS, "linear": BERT_LINEARS,
                         "2:4": BERT_LINEARS, "channel": BERT_FFN}),
}
# family: (its knobs, which layers take it); act: whether activations are quantized
FAMILIES: dict[str, tuple[dict[str, Any], str]] = {
    "fp32": ({}, "all"),
    "bits8": ({"bits": 8}, "all"),
    "fp16": ({"bits": "fp16"}, "all"),
    "bf16": ({"bits": "bf16"}, "all"),
    "int4-group32": ({"bits": 4, "group_size": 32}, "grouped"),
    "pow2-4": ({"bits": 4, "scheme": "pow2"}, "all"),
    "pow2-6": ({"bits": 6, "scheme": "pow2"}, "all"),
    "act8-static": ({"bits": 8, "act_bits": 8}, "all"),
    "act-dynamic": ({"bits": 8, "act_bits": "dynamic"}, "linear"),
    "unstructured": ({"sparsity": 0.5}, "all"),
    "2:4": ({"sparsity": 0.5, "structure": "2:4"}, "2:4"),
    "channel": ({"sparsity": 0.5, "structure": "channel"}, "channel"),
    "rank": ({"rank": 0.5}, "all"),
    "awq-int4": ({"bits": 4, "quantizer": "awq"}, "all"),
    "awq-act8": ({"bits": 8, "act_bits": 8, "quantizer": "awq"}, "all"),
}
# (family, model) -> the refusal OpenVINO gives (a substring); every other pair runs.
# Static QDQ on a transformer: OpenVINO's low-precision AddTransformation fails on a MatMul +
# int32-bias Add (compile error), and a single layer's calibrated attention-mask range
# overflows float32 (inf scale) so it would compute NaN.
REFUSED = {("act8-static", "bert"): "OpenVINO", ("awq-act8", "bert"): "OpenVINO"}


def _plan_model(model_id: str, family: str) -> tuple[nn.Module, Any]:
    build, layers = MODELS[model_id]
    model, x = build()
    knobs, which = FAMILIES[family]
    plan = Plan({name: LayerPlan(**knobs) for name in layers[which]}) if knobs else Plan({})
    return apply(model, plan, x), x


def _outputs(model: nn.Module, x: Any, runtime: str) -> tuple[np.ndarray, np.ndarray]:
    """(the runtime's first output, PyTorch's) on the timed batch."""
    target = Target(runtime=runtime, batch_size=2, **QUICK)
    prepared = prepare(model, x, target)
    got = first_output(get_runtime(target).runner(prepared, target)())
    with torch.inference_mode():
        expected = first_output(run(bake(model), prepared.batch))
    return np.array(got), expected


@pytest.mark.parametrize("model_id", list(MODELS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_plan_family_runs_on_openvino_as_on_onnxruntime_or_is_refused(
        family: str, model_id: str) -> None:
    model, x = _plan_model(model_id, family)
    ort_out, expected = _outputs(model, x, "onnxruntime")
    scale = float(np.abs(expected).max())
    act = "act_bits" in FAMILIES[family][0]
    # integer activations: ONNX Runtime's integer kernels round where PyTorch's fake quant does
    # not always; the tolerance is a few quantization steps of the output
    tol = 0.05 * scale if act else 1e-4 * scale + 1e-6
    # group-wise weights run on ONNX Runtime's MatMulNBits at accuracy level 4, which rounds each
    # block of the input to int8 (OpenVINO gets the standard-op form: exact)
    blockwise = "group_size" in FAMILIES[family][0]
    assert np.abs(ort_out - expected).max() <= (0.02 * scale if blockwise else tol)
    if (family, model_id) in REFUSED:
        with pytest.raises(RefusedPlan, match=REFUSED[family, model_id]) as err:
            _outputs(model, x, "openvino")
        assert err.value.runtime == "openvino" and err.value.where and err.value.reason
        assert str(err.value).startswith("target.runtime='openvino' cannot run this plan: ")
        return
    ov_out, _ = _outputs(model, x, "openvino")
    assert ov_out.shape == expected.shape
    assert np.abs(ov_out - expected).max() <= tol
    if act:  # and as close to ONNX Runtime's integer result
        assert np.abs(ov_out - ort_out).max() <= tol


def test_a_graph_openvino_cannot_read_or_compile_is_refused_naming_the_op() -> None:
    from onnx import TensorProto, helper

    from autocompress.measure.runtimes._openvino import _compiler_error, compile_onnx

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    node = helper.make_node("MatMulNBits", ["x"], ["y"], domain="com.microsoft")
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(RefusedPlan, match="cannot read or compile it") as err:
        compile_onnx(model.SerializeToString(), {"x": (1, 4)}, 1)
    assert err.value.where == "com.microsoft.MatMulNBits"
    # the low-precision pass's error on a transformer's static QDQ graph names its node
    seen = RuntimeError("Exception from src/inference/src/cpp/core.cpp:117:\n[AddTransformation] "
                        "END: node: opset1::Add /layer.1/dense/Add (opset1::Multiply ...) "
                        "CALLBACK HAS THROWN: index '0' out of range")
    assert _compiler_error(seen).where == "opset1::Add /layer.1/dense/Add"


def test_openvino_is_registered_for_the_cpu_and_validates() -> None:
    assert "openvino" in runtime_names() and RUNTIMES.get("openvino").devices == ("cpu",)
    target = Target(runtime="openvino", threads=2)
    rt = get_runtime(target)
    assert rt.name == "openvino" and rt.artifact == "onnx"
    assert rt.export_options(target) == {"contrib_ops": False}
    assert rt.integer_kernels(target) is None
    rt.check(target)
    facts = rt.facts(target)
    import openvino

    assert facts["runtime_version"] == openvino.__version__ and facts["cpu"]
    assert rt.cache_facts(target)["openvino"] == openvino.__version__
    with pytest.raises(ValueError, match=r"target.runtime='openvino' with device: cuda; allowed"):
        get_runtime(Target(runtime="openvino", device="cuda"))


def test_a_fused_graph_and_another_device_are_refused_naming_the_key() -> None:
    from autocompress.measure.runtimes._openvino import OpenVinoRuntime

    rt = OpenVinoRuntime()
    # the target refuses it first (graph forms are ONNX Runtime's); the runtime's own check too
    with pytest.raises(ValueError, match=r"^target.graph='fused' with runtime: openvino.*\['plain'\]"):
        Target(runtime="openvino", graph="fused")
    with pytest.raises(ValueError, match=r"^target.graph='fused' with runtime openvino.*\['plain'\]"):
        rt.check(Target(runtime="onnxruntime", graph="fused"))
    with pytest.raises(ValueError, match=r"^target.device='cuda' with runtime openvino"):
        rt.check(Target(runtime="onnxruntime", device="cuda"))


def test_without_openvino_the_target_is_refused_with_the_install_command(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from autocompress.measure.latency import check_target

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    with pytest.raises(ValueError, match=r"^target.runtime='openvino': the openvino package is "
                                         r"not installed .*pip install"):
        check_target(Target(runtime="openvino"))


def test_measure_latency_on_openvino() -> None:
    import openvino

    model, x = tiny_cnn()
    r = measure_latency(model, x, Target(runtime="openvino", **QUICK), use_cache=False)
    assert r.runtime == "openvino" and r.device == "cpu" and r.threads == 1
    assert r.latency_ms > 0 and r.runs >= 3 and r.runtime_version == openvino.__version__


def test_a_refused_plan_fails_its_paired_timing_alone() -> None:
    """A search times trials paired with the baseline: a refused plan raises there (its trial
    fails with the reason) and the next one is timed as usual."""
    target = Target(runtime="openvino", **QUICK)
    paired = PairedMeasurer(target)
    model, x = tiny_bert()
    paired.reference(model, x, target)
    refused, _ = _plan_model("bert", "act8-static")
    with pytest.raises(RefusedPlan):
        paired(refused, x, target)
    ok, _ = _plan_model("bert", "bits8")
    result = paired(ok, x, target)
    assert result.paired and result.latency_ms > 0 and result.runtime == "openvino"


def test_an_experiment_on_openvino_validates(tmp_path: Path) -> None:
    from autocompress.config import load_experiment
    from autocompress.measure.latency import check_target
    from tests.searches import write_experiment

    path = write_experiment(tmp_path, "ov", target={**QUICK, "runtime": "openvino"})
    exp = load_experiment(path)
    assert exp.target.runtime == "openvino"
    check_target(exp.target)


@pytest.mark.parametrize("build", ["two_inputs", "tokens_model", "tiny_gpt2", "tiny_bert"])
def test_the_exported_onnx_file_runs_on_openvino_as_the_export_verifier_requires(
        build: str, tmp_path: Path) -> None:
    """The file ``export --format onnx`` writes (sequence axis dynamic) in standard ops, run on
    OpenVINO, gives the torch model's outputs within the verifier's tolerance for ONNX Runtime
    (``test_export.py``: atol 1e-4)."""
    from autocompress._inputs import to_numpy_feed
    from autocompress.measure.runtimes._openvino import compile_onnx
    from autocompress.onnxgraph import export_onnx
    from tests import real_models

    model, inputs = getattr(real_models, build)()
    path = export_onnx(model, inputs, tmp_path / "m.onnx", dynamic_sequence=isinstance(inputs, dict),
                       contrib_ops=False)
    feed = to_numpy_feed(inputs)
    compiled = compile_onnx(path.read_bytes(), {k: v.shape for k, v in feed.items()}, 1)
    names = {n for port in compiled.inputs for n in port.get_names()}
    got = compiled({k: v for k, v in feed.items() if k in names})[compiled.outputs[0]]
    with torch.no_grad():
        expected = first_output(run(model, inputs))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
