"""ONNX Runtime's transformer fusions as a graph form (``target.graph``): what fuses on tiny
random-init transformers (BERT eager and SDPA, ``nn.TransformerEncoder``, a Llama decoder),
pruned heads and int8 graphs, that fused outputs match the plain graph's, and that the ONNX
Runtime runtime times and records the form the target asks for."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from autocompress._inputs import to_numpy_feed
from autocompress.compress import LayerPlan, Plan, apply
from autocompress.measure import LatencyResult, PairedMeasurer, Target, measure_latency
from autocompress.onnxgraph import export_onnx, fuse, model_type, verify_fused
from tests.test_prune_transformers import HEADS, SELF, bert, channel

FAST = {"warmup": 1, "min_runs": 3, "max_runs": 20, "budget_s": 0.05, "min_time_s": 0.0}


class Encoder(nn.Module):
    """A tiny ``nn.TransformerEncoder`` (2 layers, 4 heads) over float embeddings."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class Logits(nn.Module):
    """A Hugging Face causal LM's logits, no KV cache."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def encoder() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Encoder().eval(), torch.randn(2, 10, 32)


def llama() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True)
    model = Logits(transformers.LlamaForCausalLM(config)).eval()
    return model, {"input_ids": torch.randint(0, 100, (1, 12)),
                   "attention_mask": torch.ones(1, 12, dtype=torch.long)}


MODELS = {
    "bert-eager": lambda: bert("eager"),
    "bert-sdpa": lambda: bert("sdpa"),
    "transformer-encoder": encoder,
    "llama": llama,
}
# What ONNX Runtime 1.32's optimizer fuses on each export (transformers 5, torch 2.13): BERT
# fully, eager and SDPA (after onnxgraph._fusion's rewrites); Llama's RMSNorms (no attention or rotary
# pattern of that export is known to the optimizer); nothing of nn.TransformerEncoder's (its
# LayerNorms are exported as LayerNormalization already; ORT's symbolic shape inference fails on
# the export's reshapes, which the skip-LayerNorm fusion needs).
EXPECTED = {
    "bert-eager": {"Attention": 2, "EmbedLayerNormalization": 1, "SkipLayerNormalization": 4},
    "bert-sdpa": {"Attention": 2, "EmbedLayerNormalization": 1, "SkipLayerNormalization": 4},
    "transformer-encoder": {"LayerNormalization": 4},
    "llama": {"SkipSimplifiedLayerNormalization": 4},
}


def exported(model: nn.Module, x, tmp_path: Path) -> bytes:
    return export_onnx(model, x, tmp_path / "model.onnx").read_bytes()


@pytest.mark.parametrize("name", list(MODELS))
def test_fusions_present_and_outputs_match(name: str, tmp_path: Path) -> None:
    model, x = MODELS[name]()
    plain = exported(model, x, tmp_path)
    fused = fuse(plain)
    for op, count in EXPECTED[name].items():
        assert fused.ops.get(op) == count, (op, fused.ops)
    assert verify_fused(plain, fused.onnx, to_numpy_feed(x)) is None
    assert fused.summary == ",".join(f"{k}={v}" for k, v in sorted(fused.ops.items()))


def test_model_type_is_read_from_the_graph(tmp_path: Path) -> None:
    import onnx

    for build, kind in ((lambda: bert("eager"), "bert"), (encoder, "bert"), (llama, "gpt2")):
        model, x = build()
        assert model_type(onnx.load_from_string(exported(model, x, tmp_path))) == kind
        assert fuse(exported(model, x, tmp_path)).model_type == kind


def test_pruned_heads_still_fuse(tmp_path: Path) -> None:
    """Layer 0 keeps 2 of 4 heads, layer 1 all 4: both attentions fuse, each with its own
    head count (read from the graph, not given)."""
    import onnx

    model, x = bert("eager")
    pruned = apply(model, Plan({f"{SELF}.query": channel(0.5)}), x)
    plain = exported(pruned, x, tmp_path)
    fused = fuse(plain)
    assert fused.ops.get("Attention") == 2
    heads = sorted(a.i for n in onnx.load_from_string(fused.onnx).graph.node
                   if n.op_type == "Attention" for a in n.attribute if a.name == "num_heads")
    assert heads == [HEADS // 2, HEADS]
    assert verify_fused(plain, fused.onnx, to_numpy_feed(x)) is None


@pytest.mark.parametrize("knobs", [{"bits": 8}, {"bits": 8, "act_bits": "dynamic"}],
                         ids=["int8-weights", "dynamic-int8"])
def test_int8_berts_fuse_their_layernorms(knobs: dict, tmp_path: Path) -> None:
    model, x = bert("eager")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "pooler" not in n]
    compressed = apply(model, Plan({n: LayerPlan(**knobs) for n in linears}), x)
    plain = exported(compressed, x, tmp_path)
    fused = fuse(plain)
    assert fused.ops.get("SkipLayerNormalization", 0) + fused.ops.get("LayerNormalization", 0) > 0
    if knobs.get("act_bits") == "dynamic":
        assert fused.ops.get("MatMulInteger", 0) + fused.ops.get("DynamicQuantizeMatMul", 0) > 0
    assert verify_fused(plain, fused.onnx, to_numpy_feed(x)) is None


@pytest.mark.parametrize("graph", ["fused", "best"])
def test_the_runtime_times_and_records_the_form(graph: str) -> None:
    model, x = bert("eager")
    result = measure_latency(model, x, Target(graph=graph, **FAST), use_cache=False)
    assert result.graph in ("fused", "plain") if graph == "best" else result.graph == "fused"
    assert "Attention=2" in result.fused_ops
    if graph == "best":
        assert result.graph_note.startswith("best of plain") and "fused" in result.graph_note
    again = LatencyResult.from_dict(result.to_dict())  # the latency cache's round trip
    assert (again.graph, again.fused_ops) == (result.graph, result.fused_ops)


def test_paired_timing_records_the_form_of_the_trial() -> None:
    from autocompress.measure.latency import prepare

    model, x = bert("eager")
    target = Target(graph="fused", **FAST)
    paired = PairedMeasurer(target)
    base = paired.set_reference(prepare(model, x, target))
    assert base is not None and base.graph == "fused"
    pruned = apply(model, Plan({f"{SELF}.query": channel(0.5)}), x)
    result = paired.measure(prepare(pruned, x, target), use_cache=False)
    assert result.paired and result.graph == "fused" and "Attention=2" in result.fused_ops


def test_plain_target_records_nothing_new() -> None:
    model, x = encoder()
    result = measure_latency(model, x, Target(**FAST), use_cache=False)
    assert (result.graph, result.fused_ops, result.graph_note) == ("", "", "")


def test_a_fused_graph_that_does_not_match_is_not_used(monkeypatch) -> None:
    import autocompress.onnxgraph as onnxgraph
    from autocompress.measure.runtimes import _ort

    monkeypatch.setattr(_ort, "_FORMS", {})  # not the forms an earlier test made
    monkeypatch.setattr(onnxgraph, "verify_fused", lambda *a, **k: "output 0: relative difference 1")
    model, x = bert("eager")
    result = measure_latency(model, x, Target(graph="fused", **FAST), use_cache=False)
    assert result.graph == "plain"
    assert result.graph_note == "fused graph not used: output 0: relative difference 1"
    assert "Attention=2" in result.fused_ops


def test_verify_fused_names_the_output_that_differs(tmp_path: Path) -> None:
    model, x = encoder()
    plain = exported(model, x, tmp_path)
    other = exported(Encoder().eval(), x, tmp_path)  # other weights: other outputs
    reason = verify_fused(plain, other, to_numpy_feed(x))
    assert reason is not None and reason.startswith("output 0: relative difference")


@pytest.mark.parametrize("settings", [{"runtime": "torch", "graph": "fused"},
                                      {"runtime": "torchscript", "graph": "best"}])
def test_graph_forms_need_onnxruntime(settings: dict) -> None:
    with pytest.raises(ValueError, match=r"target.graph=.*allowed: \['plain'\]"):
        Target(**settings)


def test_graph_facts_are_logged_with_every_trial() -> None:
    from autocompress.tracking import LATENCY_FACTS

    assert {"graph", "fused_ops", "graph_note"} <= set(LATENCY_FACTS)
    assert math.isnan(LatencyResult(1.0, 1.0, 0.0, 1, "onnxruntime", "cpu", 1, 1).speedup)


@pytest.mark.parametrize(("graph", "logged", "written"), [
    ("fused", {}, "fused"), ("best", {"graph": "fused"}, "fused"),
    ("best", {"graph": "plain"}, "plain"), ("plain", {}, None)])
def test_export_writes_the_form_the_target_timed(graph: str, logged: dict, written: str | None,
                                                 tmp_path: Path) -> None:
    import onnx

    from autocompress.deploy._export import graph_form

    model, x = bert("eager")
    path = export_onnx(model, x, tmp_path / "model.onnx")
    rebuilt = SimpleNamespace(target=Target(graph=graph), latency=logged,
                              task=SimpleNamespace(example_inputs=x))
    form = graph_form(rebuilt, path)
    assert form.get("graph") == written
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ("Attention" in ops) == (written == "fused")


# --- a search and an export with graph forms (slow) ------------------------------------------


class BertClassifier(nn.Module):
    """The tiny eager BERT, mean-pooled, with a 4-class head."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = bert("eager")[0]
        self.head = nn.Linear(32, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids, attention_mask))


def bert_task():
    """A tiny BERT classifying random token sequences (labels: its own predictions)."""
    from autocompress import Task

    torch.manual_seed(0)
    model = BertClassifier().eval()
    ids, mask = torch.randint(1, 100, (64, 10)), torch.ones(64, 10, dtype=torch.long)
    with torch.no_grad():
        labels = model(ids, mask).argmax(1)

    def batches(lo: int, hi: int) -> list:
        return [({"input_ids": ids[i:i + 16], "attention_mask": mask[i:i + 16]}, labels[i:i + 16])
                for i in range(lo, hi, 16)]

    return Task(model=model, train_loader=batches(0, 32), val_loader=batches(32, 64),
                example_inputs={"input_ids": ids[:1], "attention_mask": mask[:1]}, name="tiny-bert")


@pytest.mark.slow
def test_search_logs_the_form_and_export_writes_it(tmp_path: Path, monkeypatch) -> None:
    import json

    import onnx
    import yaml

    from autocompress import cli
    from autocompress.deploy import export_run
    from autocompress.tracking import read_front

    space = {"version": 1, "layers": [{"types": ["Linear"], "exclude": ["head"],
                                       "knobs": {"bits": [8, None]}}]}
    exp = {"name": "fusion-e2e", "task": "tests.test_fusion:bert_task", "search_space": space,
           "objectives": [{"metric": "accuracy", "mode": "max"},
                          {"metric": "latency_ms", "mode": "min"}],
           "target": {"graph": "best", **FAST},
           "search": {"sampler": "random", "trials": 2, "seed": 0, "backend": "serial"},
           "finetune": {"epochs": 0}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1]))
    assert cli.main(["search", str(tmp_path / "exp.yaml"), "--tracking-uri", uri]) == 0
    front = read_front(uri, "fusion-e2e")
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(uri).get_run(front[0]["run_id"]).data.tags
    form = tags["autocompress.latency.graph"]
    assert form in ("plain", "fused") and tags["autocompress.latency.graph_note"].startswith("best of")
    assert "SkipLayerNormalization" in tags["autocompress.latency.fused_ops"]
    result = export_run(front[0]["run_id"], "onnx", tmp_path / "out", uri)
    assert result["graph"] == form
    written = json.loads((tmp_path / "out" / "export.json").read_text())["graph"]
    ops = {n.op_type for n in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.node}
    assert written == form and ("SkipLayerNormalization" in ops) == (form == "fused")
