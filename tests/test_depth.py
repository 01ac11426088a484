"""Depth pruning: blocks discovered, dropped (Hugging Face layer lists deleted and renumbered,
residual blocks of a Sequential made identities), refused, exported and ranked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from autocompress.compress import LayerPlan, Plan, PlanError, apply, bake, block_importance, describe_layers
from autocompress.config import load_search_space
from autocompress.onnxgraph import export_onnx

transformers = pytest.importorskip("transformers")

DROP = LayerPlan(drop=True)


# --- models ----------------------------------------------------------------------------------


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(x)))


class ResNet(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.stage = nn.Sequential(Residual(width), Residual(width), Residual(width))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage(torch.relu(self.stem(x))).mean((2, 3)))


def resnet() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return ResNet().eval(), torch.randn(2, 1, 8, 8)


class Pooled(nn.Module):
    """A Hugging Face base model returning its mean last hidden state (one tensor out)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.mean(1)


def bert() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=32)
    model = Pooled(transformers.BertModel(config, add_pooling_layer=False)).eval()
    return model, {"input_ids": torch.randint(0, 64, (2, 6)),
                   "attention_mask": torch.ones(2, 6, dtype=torch.long)}


def llama(layers: int = 4) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    return model, {"input_ids": torch.randint(0, 64, (2, 6)),
                   "attention_mask": torch.ones(2, 6, dtype=torch.long)}


def blocks(model: nn.Module, x) -> dict:
    return {la.name: la for la in describe_layers(model, x, blocks=True) if la.type == "Block"}


def logits(model: nn.Module, x: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits if hasattr(model, "lm_head") else model(**x)


def onnx_matches(model: nn.Module, x, tmp_path: Path) -> int:
    """Exports ``model``, checks ONNX Runtime's output against PyTorch's; the node count."""
    import onnx

    tmp_path.mkdir(parents=True, exist_ok=True)
    path = export_onnx(model, x, tmp_path / "model.onnx")
    sess = ort.InferenceSession(str(path))
    feed = ({k: v.numpy() for k, v in x.items() if k in {i.name for i in sess.get_inputs()}}
            if isinstance(x, dict) else {sess.get_inputs()[0].name: x.numpy()})
    got = sess.run(None, feed)[0]
    with torch.no_grad():
        want = bake(model)(**x) if isinstance(x, dict) else bake(model)(x)
    want = want.logits if hasattr(want, "logits") else want
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)
    return len(onnx.load(str(path)).graph.node)


# --- discovery -------------------------------------------------------------------------------


def test_blocks_discovered() -> None:
    model, x = resnet()
    found = blocks(model, x)
    assert list(found) == ["stage.0", "stage.1", "stage.2"]
    assert found["stage.0"].shape == (8, 8, 8) and found["stage.0"].cls == "Residual"
    assert found["stage.0"].params == 2 * (8 * 8 * 9 + 8) and found["stage.0"].macs > 0
    assert not found["stage.0"].refusals
    model, x = bert()
    assert list(blocks(model, x)) == [f"model.encoder.layer.{i}" for i in range(3)]
    model, x = llama()
    assert list(blocks(model, x)) == [f"model.layers.{i}" for i in range(4)]


def test_blocks_in_layers_json() -> None:
    model, x = resnet()
    rows = [la.to_dict() for la in describe_layers(model, x, blocks=True)]
    assert rows[-2] == {"name": "stage.1", "type": "Block", "shape": [8, 8, 8], "params": 1168,
                        "macs": 2 * 64 * 8 * 8 * 9, "is_output": False, "cls": "Residual"}


def test_search_space_selects_blocks_by_type_only() -> None:
    model, x = resnet()
    layers = describe_layers(model, x, blocks=True)
    space = load_search_space({"layers": [
        {"knobs": {"bits": [4, 8]}},
        {"types": ["Block"], "knobs": {"drop": [False, True]}}]}).resolve(layers)
    names = [ls.name for ls in space.layers]
    assert names == ["stem", "stage.0.conv1", "stage.0.conv2", "stage.1.conv1", "stage.1.conv2",
                     "stage.2.conv1", "stage.2.conv2", "head", "stage.0", "stage.1", "stage.2"]
    assert space.layers[-1].knobs["drop"].param == "stage.2/drop"
    assert "drop" not in space.layers[0].knobs
    with pytest.raises(PlanError, match="only a block"):
        apply(model, Plan({"head": DROP}), x)


def test_plan_field_defaults_as_before() -> None:
    assert "drop" not in LayerPlan(bits=8).to_dict()
    plan = Plan.from_json(json.dumps({"version": 1, "layers": {"a": {"drop": True}, "b": {"bits": 8}}}))
    assert plan.layers["a"].drop and not plan.layers["b"].drop
    assert Plan.from_json(plan.to_json()) == plan and plan.summary() == "a: drop | b: b8"
    with pytest.raises(PlanError, match="drop"):
        LayerPlan(drop=1)  # type: ignore[arg-type]


# --- dropping --------------------------------------------------------------------------------


def test_residual_sequential_block_becomes_identity(tmp_path: Path) -> None:
    model, x = resnet()
    new = apply(model, Plan({"stage.1": DROP, "head": LayerPlan(bits=8)}), x)
    assert isinstance(new.stage[1], nn.Identity) and len(new.stage) == 3
    assert new(x).shape == (2, 3) and not torch.allclose(new(x), model(x))
    with torch.no_grad():
        want = model.head(model.stage[2](model.stage[0](torch.relu(model.stem(x)))).mean((2, 3)))
    torch.testing.assert_close(apply(model, Plan({"stage.1": DROP}), x)(x), want)
    onnx_matches(new, x, tmp_path)


def test_bert_layer_deleted(tmp_path: Path) -> None:
    model, x = bert()
    full = onnx_matches(model, x, tmp_path / "full")
    new = apply(model, Plan({"model.encoder.layer.1": DROP}), x)
    assert len(new.model.encoder.layer) == 2 and new.model.config.num_hidden_layers == 2
    assert model.model.config.num_hidden_layers == 3  # the original is untouched
    assert logits(new, x).shape == (2, 32)
    assert onnx_matches(new, x, tmp_path / "dropped") < full


def test_llama_drop_renumbers_cache_and_combines_with_bits(tmp_path: Path) -> None:
    model, x = llama()
    plan = Plan({"model.layers.0": DROP, "model.layers.2": DROP,
                 **{f"model.layers.{i}.mlp.down_proj": LayerPlan(bits=8) for i in range(4)}})
    new = apply(model, plan, x)
    assert len(new.model.layers) == 2 and new.config.num_hidden_layers == 2
    assert [la.self_attn.layer_idx for la in new.model.layers] == [0, 1]
    assert new.model.layers[0].mlp.down_proj.parametrizations.weight[0].bits == 8
    out = logits(new, x)
    assert out.shape == (2, 6, 64)
    # with a KV cache: prefill, then one token, equals the full forward
    with torch.no_grad():
        ids = x["input_ids"]
        first = new(input_ids=ids[:, :5], use_cache=True)
        step = new(input_ids=ids[:, 5:], past_key_values=first.past_key_values, use_cache=True)
        torch.testing.assert_close(step.logits[:, -1], new(input_ids=ids).logits[:, -1],
                                   atol=1e-4, rtol=1e-4)
        generated = new.generate(ids[:, :3], max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, 6)


def test_qwen2_layer_types_dropped() -> None:
    torch.manual_seed(0)
    types = ["full_attention", "sliding_attention", "sliding_attention"]
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, use_sliding_window=True,
                                      sliding_window=4, layer_types=types)
    model = transformers.Qwen2ForCausalLM(config).eval()
    x = {"input_ids": torch.randint(0, 64, (1, 6)), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    new = apply(model, Plan({"model.layers.0": DROP}), x)
    assert new.config.layer_types == types[1:] and new.config.num_hidden_layers == 2
    assert [la.self_attn.layer_idx for la in new.model.layers] == [0, 1]
    with torch.no_grad():
        assert new.generate(x["input_ids"], max_new_tokens=2, do_sample=False).shape == (1, 8)


def test_drop_every_block_refused() -> None:
    model, x = llama(2)
    with pytest.raises(PlanError, match="would remove every block of 'model.layers'"):
        apply(model, Plan({"model.layers.0": DROP, "model.layers.1": DROP}), x)


def test_other_lists_refuse_drop() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(16, 2))
    x = torch.randn(2, 4, 16)
    found = blocks(model, x)
    assert "0.layers.0" in found
    reason = found["0.layers.0"].refusals[0].reason
    assert "ModuleList" in reason and "num_hidden_layers" in reason
    with pytest.raises(PlanError, match="'0.layers.0': cannot take drop=True"):
        apply(model, Plan({"0.layers.0": DROP}), x)


# --- importance ------------------------------------------------------------------------------


def test_block_importance_ranks_an_identity_block_last() -> None:
    model, x = llama(4)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    names = [f"model.layers.{i}" for i in range(4)]
    scores = block_importance(model, [x], names)
    assert min(scores, key=scores.get) == "model.layers.2"
    assert scores["model.layers.2"] == pytest.approx(0.0, abs=1e-5)
    model, x = resnet()
    with torch.no_grad():
        model.stage[0].conv2.weight.zero_()
        model.stage[0].conv2.bias.zero_()
    scores = block_importance(model, [x], ["stage.0", "stage.1", "stage.2"])
    assert min(scores, key=scores.get) == "stage.0"


# --- rebuilding and packing ------------------------------------------------------------------


def _rebuilds(model: nn.Module, x, plan: Plan) -> nn.Module:
    """The trial rebuilt as ``deploy`` does: the plan's structure, then the logged weights."""
    from autocompress.compress import Calibration
    from autocompress.deploy._rebuild import load_baked_state

    new = apply(model, plan, x)
    again = apply(model, plan, x, calibration=Calibration.empty())
    load_baked_state(again, bake(new).state_dict(), plan)
    with torch.no_grad():
        torch.testing.assert_close(logits(bake(again), x) if isinstance(x, dict) else bake(again)(x),
                                   logits(bake(new), x) if isinstance(x, dict) else bake(new)(x))
    return again


def test_rebuild_restores_the_masks_of_renumbered_layers() -> None:
    from autocompress.compress import find_weight_compression, plan_after_drops

    model, x = llama()
    plan = Plan({"model.layers.1": DROP, "model.layers.3.mlp.up_proj": LayerPlan(sparsity=0.5),
                 "model.layers.1.mlp.up_proj": LayerPlan(bits=8)})
    assert plan_after_drops(model, plan).layers == {"model.layers.2.mlp.up_proj": LayerPlan(sparsity=0.5)}
    again = _rebuilds(model, x, plan)
    mask = find_weight_compression(again.model.layers[2].mlp.up_proj).mask
    assert 0.45 < 1 - mask.float().mean().item() < 0.55


def test_packed_round_trip_of_a_dropped_sequential_block(tmp_path: Path) -> None:
    from autocompress.deploy._packed import load_packed, save_packed

    model, x = resnet()
    plan = Plan({"stage.1": DROP, "stage.0.conv1": LayerPlan(sparsity=0.5, bits=4)})
    new = _rebuilds(model, x, plan)
    loaded = load_packed(save_packed(new, tmp_path / "m.acpk").path)
    torch.testing.assert_close(loaded(x), bake(new)(x))


# --- the command line ------------------------------------------------------------------------


def resnet_task():
    """The residual CNN as a task (random targets: the CLI's checks only)."""
    from torch.utils.data import DataLoader, TensorDataset

    from autocompress import Task

    model, _ = resnet()
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen))
    loader = DataLoader(data, batch_size=8)
    return Task(model=model, train_loader=loader, val_loader=loader, example_inputs=data.tensors[0][:2],
                name="resnet")


def test_cli_lists_blocks_and_refuses_dropping_all(capsys, tmp_path: Path) -> None:
    from autocompress.cli import main

    task = "tests.test_depth:resnet_task"
    assert main(["layers", "--task", task, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows if r["type"] == "Block"] == ["stage.0", "stage.1", "stage.2"]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers": {f"stage.{i}": {"drop": True} for i in range(3)}}))
    assert main(["trial", "--task", task, "--plan", str(plan), "--epochs", "0"]) == 2
    assert "would remove every block of 'stage'" in capsys.readouterr().err


# --- seeding ---------------------------------------------------------------------------------


def test_first_trials_drop_the_least_important_blocks_first() -> None:
    from autocompress.tune._seeds import depth_points, seed_points
    from autocompress.tune._sensitivity import profile

    task = resnet_task()
    with torch.no_grad():
        task.model.stage[1].conv2.weight.zero_()
        task.model.stage[1].conv2.bias.zero_()
    layers = describe_layers(task.model, task.example_inputs, blocks=True)
    space = load_search_space({"layers": [
        {"types": ["Conv2d", "Linear"], "knobs": {"bits": [4, 8]}},
        {"types": ["Block"], "knobs": {"drop": [False, True]}}]}).resolve(layers)
    sens = profile(task, space, batches=1, samples=8, allocated_only=True, use_cache=False)
    assert min(sens.importance, key=sens.importance.get) == "stage.1"
    points = depth_points(space, sens.importance, 5)
    ranked = sorted(sens.importance, key=sens.importance.get)
    assert [{k for k, v in p.items() if k.endswith("/drop") and v} for p in points] == [
        {f"{ranked[0]}/drop"}, {f"{ranked[0]}/drop", f"{ranked[1]}/drop"}]  # never all three
    shapes = {la.name: la.shape for la in layers}
    assert seed_points(space, sens, shapes, 8)[0] == points[0]


def test_gpt2_block_dropped(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    model = Pooled(transformers.GPT2Model(config)).eval()
    x = {"input_ids": torch.randint(0, 64, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    assert list(blocks(model, x)) == [f"model.h.{i}" for i in range(3)]
    new = apply(model, Plan({"model.h.2": DROP}), x)
    assert len(new.model.h) == 2 and new.model.config.n_layer == 2
    assert [b.attn.layer_idx for b in new.model.h] == [0, 1]
    onnx_matches(new, x, tmp_path)


# --- a search --------------------------------------------------------------------------------


@pytest.mark.slow  # ~1 min: a small serial search, then exports of a logged trial
def test_a_search_drops_blocks_first_and_its_trials_export(tmp_path: Path, monkeypatch) -> None:
    import autocompress as ac
    from tests.searches import write_experiment

    monkeypatch.chdir(tmp_path)
    space = {"layers": [{"types": ["Conv2d", "Linear"], "knobs": {"bits": [4, 8]}},
                        {"types": ["Block"], "knobs": {"drop": [False, True]}}]}
    path = write_experiment(tmp_path, "depth", task="tests.test_depth:resnet_task",
                            search_space=space, trials=6, concurrency=1, backend="serial")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = ac.search(str(path), tracking_uri=uri, echo=lambda m: None)
    summaries = list(res.trials.summary)
    dropping = [i for i, s in enumerate(summaries) if "drop" in s]
    assert dropping, summaries
    run_id = res.trials.run_id.iloc[dropping[0]]
    out = ac.export(run_id, format="onnx", out=str(tmp_path / "onnx"), tracking_uri=uri)
    assert Path(out["path"]).exists()
    out = ac.export(run_id, format="packed", out=str(tmp_path / "packed"), tracking_uri=uri)
    assert Path(out["path"]).exists()
