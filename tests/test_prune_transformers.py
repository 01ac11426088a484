"""Structured pruning of transformers: attention heads, FFN neurons, and the refusals of the
residual stream, on a tiny random Hugging Face BERT (dict inputs) and ``nn.TransformerEncoder``.

Expectations come from the original weights: a kept head is a block of ``head_size``
consecutive rows of q, k and v that is a block of the original, and the attention output
projection keeps exactly the matching input columns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch_pruning as tp
from torch import nn

from autocompress._inputs import to_numpy_feed
from autocompress.compress import apply, bake
from autocompress.compress._plan import LayerPlan, Plan, PlanError
from autocompress.compress._registry import describe_layers
from autocompress.onnxgraph import export_onnx

HEADS, HEAD_SIZE, HIDDEN, FFN = 4, 8, 32, 64
SELF = "bert.encoder.layer.0.attention.self"


def channel(sparsity: float, **knobs) -> LayerPlan:
    return LayerPlan(sparsity=sparsity, structure="channel", **knobs)


def structure_refusals(model: nn.Module, inputs) -> dict[str, str]:
    """``{layer: reason}`` for every layer that refuses ``structure: channel``."""
    return {la.name: r.reason for la in describe_layers(model, inputs) for r in la.refusals
            if (r.knob, r.value) == ("structure", "channel")}


def onnx_matches_torch(model: nn.Module, inputs, tmp_path: Path) -> None:
    path = export_onnx(model, inputs, tmp_path / "model.onnx")
    got = ort.InferenceSession(str(path)).run(None, to_numpy_feed(inputs))[0]
    with torch.no_grad():
        want = bake(model)(**inputs) if isinstance(inputs, dict) else bake(model)(inputs)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)


# --- a tiny BERT -----------------------------------------------------------------------------


class PooledBert(nn.Module):
    """A BertModel returning the mask-weighted mean of ``last_hidden_state``."""

    def __init__(self, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.BertConfig(
            vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
            intermediate_size=FFN, max_position_embeddings=64, attn_implementation=attn_implementation)
        self.bert = transformers.BertModel(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1)


def bert(attn_implementation: str = "sdpa") -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = PooledBert(attn_implementation).eval()
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0  # padding, so the mask matters
    return model, {"input_ids": torch.randint(1, 100, (3, 10)), "attention_mask": mask}


def head_blocks(new: torch.Tensor, old: torch.Tensor) -> list[int]:
    """The original head of each head-sized block of rows of ``new``."""
    found = []
    for block in new.split(HEAD_SIZE):
        hits = [h for h, o in enumerate(old.split(HEAD_SIZE)) if torch.equal(block, o)]
        assert len(hits) == 1, "a kept block of rows is not an original head"
        found.append(hits[0])
    return found


def kept_columns(heads: list[int]) -> list[int]:
    return [h * HEAD_SIZE + i for h in heads for i in range(HEAD_SIZE)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_head_pruning_removes_the_weakest_whole_heads(attn: str) -> None:
    model, x = bert(attn)
    att = model.bert.encoder.layer[0].attention
    with torch.no_grad():  # make heads 1 and 3 clearly the least important over the group
        for h in (1, 3):
            rows = slice(h * HEAD_SIZE, (h + 1) * HEAD_SIZE)
            for lin in (att.self.query, att.self.key, att.self.value):
                lin.weight[rows] *= 1e-3
                lin.bias[rows] *= 1e-3
            att.output.dense.weight[:, rows] *= 1e-3
    new = apply(model, Plan({f"{SELF}.key": channel(0.5)}), x)
    new_att = new.bert.encoder.layer[0].attention
    for proj in ("query", "key", "value"):
        old_lin, new_lin = getattr(att.self, proj), getattr(new_att.self, proj)
        assert new_lin.weight.shape == (2 * HEAD_SIZE, HIDDEN)
        assert head_blocks(new_lin.weight, old_lin.weight) == [0, 2], proj
        assert torch.equal(new_lin.bias, old_lin.bias[kept_columns([0, 2])])
    dense = new_att.output.dense
    assert torch.equal(dense.weight, att.output.dense.weight[:, kept_columns([0, 2])])
    assert torch.equal(dense.bias, att.output.dense.bias)  # the hidden size stays
    assert (new_att.self.num_attention_heads, new_att.self.all_head_size) == (2, 2 * HEAD_SIZE)
    assert new_att.self.attention_head_size == HEAD_SIZE
    # the other block is untouched, the model runs and keeps its output shape
    assert new.bert.encoder.layer[1].attention.self.num_attention_heads == HEADS
    assert new(**x).shape == model(**x).shape == (3, HIDDEN)


def test_pruned_heads_give_the_output_of_the_kept_heads() -> None:
    """Zeroing the removed heads' value rows (and biases) in the original gives the same output."""
    model, x = bert()
    new = apply(model, Plan({f"{SELF}.query": channel(0.25)}), x)
    att = model.bert.encoder.layer[0].attention.self
    kept = head_blocks(new.bert.encoder.layer[0].attention.self.value.weight, att.value.weight)
    removed = sorted(set(range(HEADS)) - set(kept))
    assert len(removed) == 1
    with torch.no_grad():
        for h in removed:
            rows = slice(h * HEAD_SIZE, (h + 1) * HEAD_SIZE)
            att.value.weight[rows] = 0
            att.value.bias[rows] = 0
        torch.testing.assert_close(new(**x), model(**x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("plan", "heads_left"), [
    pytest.param({"query": 0.5}, 2, id="query"),
    pytest.param({"value": 0.75}, 1, id="value"),
    pytest.param({"query": 0.25, "value": 0.75}, 3, id="first-in-model-order-wins"),
    pytest.param({"value": 0.75, "key": 0.25}, 3, id="plan-order-does-not-matter"),
    pytest.param({"query": 0.99}, 1, id="at-least-one-head-stays"),
    pytest.param({"query": 0.1}, 4, id="rounds-to-no-head"),
])
def test_heads_removed(plan: dict[str, float], heads_left: int) -> None:
    model, x = bert()
    new = apply(model, Plan({f"{SELF}.{p}": channel(s) for p, s in plan.items()}), x)
    att = new.bert.encoder.layer[0].attention.self
    assert att.num_attention_heads == heads_left
    for lin in (att.query, att.key, att.value):
        assert lin.out_features == heads_left * HEAD_SIZE
    assert new.bert.encoder.layer[0].attention.output.dense.in_features == heads_left * HEAD_SIZE
    assert new(**x).shape == (3, HIDDEN)


def test_ffn_pruning_removes_intermediate_neurons() -> None:
    model, x = bert()
    layer = model.bert.encoder.layer[1]
    new = apply(model, Plan({"bert.encoder.layer.1.intermediate.dense": channel(0.5)}), x)
    new_layer = new.bert.encoder.layer[1]
    assert new_layer.intermediate.dense.weight.shape == (FFN // 2, HIDDEN)
    old_rows, new_rows = layer.intermediate.dense.weight, new_layer.intermediate.dense.weight
    kept = [int((old_rows == row).all(1).nonzero()) for row in new_rows]
    assert kept == sorted(kept)
    assert torch.equal(new_layer.output.dense.weight, layer.output.dense.weight[:, kept])
    assert new_layer.attention.self.num_attention_heads == HEADS
    assert new(**x).shape == (3, HIDDEN)


def test_heads_of_a_factorized_projection() -> None:
    """rank + channel on a query: the second low-rank factor loses the heads' rows."""
    model, x = bert()
    new = apply(model, Plan({f"{SELF}.query": channel(0.5, rank=0.5)}), x)
    att = new.bert.encoder.layer[0].attention.self
    assert att.query[1].out_features == att.key.out_features == 2 * HEAD_SIZE
    assert att.num_attention_heads == 2
    assert new(**x).shape == (3, HIDDEN)


def test_bert_refusals_name_what_the_channels_are_coupled_to() -> None:
    model, x = bert()
    refused = structure_refusals(model, x)
    for i in range(2):
        prefix = f"bert.encoder.layer.{i}"
        for free in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "intermediate.dense"):
            assert f"{prefix}.{free}" not in refused
        assert "LayerNorm" in refused[f"{prefix}.attention.output.dense"]
    assert "LayerNorm" in refused["bert.encoder.layer.0.output.dense"]
    assert "output" in refused["bert.encoder.layer.1.output.dense"]
    for emb in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        assert "vocabulary" in refused[f"bert.embeddings.{emb}"]
    assert "bert.pooler.dense" not in refused  # never runs: refused as unused, not here


@pytest.mark.parametrize("name", ["bert.encoder.layer.0.attention.output.dense",
                                  "bert.encoder.layer.1.output.dense",
                                  "bert.embeddings.word_embeddings"])
def test_a_refused_channel_plan_raises_naming_the_layer(name: str) -> None:
    model, x = bert()
    with pytest.raises(PlanError, match=f"{name!r}.*channel"):
        apply(model, Plan({name: channel(0.5)}), x)


def test_pruned_bert_exports_to_onnx(tmp_path: Path) -> None:
    model, x = bert()
    plan = Plan({f"{SELF}.query": channel(0.5),
                 "bert.encoder.layer.0.intermediate.dense": channel(0.25),
                 "bert.encoder.layer.1.attention.self.value": channel(0.25),
                 "bert.encoder.layer.1.intermediate.dense": channel(0.5)})
    new = apply(model, plan, x)
    assert [blk.attention.self.num_attention_heads for blk in new.bert.encoder.layer] == [2, 3]
    onnx_matches_torch(new, x, tmp_path)


def test_limits_trace_the_model_once_and_leave_it_as_it_was(monkeypatch) -> None:
    model, x = bert()
    model.train()
    model.bert.embeddings.requires_grad_(False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    builds = []
    original = tp.DependencyGraph.build_dependency

    def counting(self, *args, **kwargs):
        builds.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", counting)
    with torch.no_grad():  # the graph is traced through autograd all the same
        refused = structure_refusals(model, x)
    assert len(builds) == 1
    assert "bert.encoder.layer.0.output.dense" in refused
    assert model.training
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen


def test_gpt2_conv1d_is_refused_not_crashed() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(
        vocab_size=100, n_embd=HIDDEN, n_layer=1, n_head=HEADS, n_positions=64,
        bos_token_id=0, eos_token_id=0)).eval()
    x = {"input_ids": torch.randint(0, 100, (2, 8))}
    refused = structure_refusals(gpt2, x)
    assert {"h.0.attn.c_attn", "h.0.mlp.c_fc"} <= set(refused)


# --- nn.TransformerEncoder -------------------------------------------------------------------


class Encoder(nn.Module):
    """Two ``nn.TransformerEncoderLayer`` (batch first), mean pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=HIDDEN, nhead=HEADS, dim_feedforward=FFN,
                                           dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(HIDDEN, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


def encoder() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Encoder().eval(), torch.randn(3, 6, HIDDEN)


@contextlib.contextmanager
def no_mha_fastpath() -> Iterator[None]:
    """PyTorch's fused ``TransformerEncoderLayer`` kernel (used in eval mode without grad)
    has no ONNX export; ``export_onnx`` does not switch it off itself."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def test_encoder_ffn_pruning(tmp_path: Path) -> None:
    model, x = encoder()
    plan = Plan({"encoder.layers.0.linear1": channel(0.5),
                 "encoder.layers.1.linear1": channel(0.25)})
    new = apply(model, plan, x)
    for i, kept in ((0, FFN // 2), (1, FFN * 3 // 4)):
        layer, old = new.encoder.layers[i], model.encoder.layers[i]
        assert layer.linear1.weight.shape == (kept, HIDDEN)
        rows = [int((old.linear1.weight == r).all(1).nonzero()) for r in layer.linear1.weight]
        assert torch.equal(layer.linear2.weight, old.linear2.weight[:, rows])
        assert layer.self_attn.in_proj_weight.shape == (3 * HIDDEN, HIDDEN)  # attention untouched
    assert new(x).shape == (3, 4)
    with no_mha_fastpath():
        onnx_matches_torch(new, x, tmp_path)


def test_encoder_refusals() -> None:
    model, x = encoder()
    refused = structure_refusals(model, x)
    for i in range(2):
        assert "LayerNorm" in refused[f"encoder.layers.{i}.linear2"]
        assert f"encoder.layers.{i}.linear1" not in refused
    assert "output" in refused["head"]
    with pytest.raises(PlanError, match="'encoder.layers.0.linear2'.*LayerNorm"):
        apply(model, Plan({"encoder.layers.0.linear2": channel(0.5)}), x)
    # nn.MultiheadAttention reads out_proj's weight in a functional call: no channel cut
    with pytest.raises(PlanError, match="'encoder.layers.0.self_attn.out_proj'.*functional call"):
        apply(model, Plan({"encoder.layers.0.self_attn.out_proj": channel(0.5)}), x)


class FusedQKV(nn.Module):
    """A timm-style block: one ``qkv`` projection split into heads, then ``proj``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, HIDDEN)
        self.num_heads = HEADS
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        att = nn.functional.scaled_dot_product_attention(*qkv.unbind(0))
        x = self.norm(x + self.proj(att.transpose(1, 2).reshape(b, n, c)))
        return self.head(x.mean(1))


def test_a_fused_qkv_projection_is_refused() -> None:
    torch.manual_seed(0)
    model, x = FusedQKV().eval(), torch.randn(2, 5, 6)
    refused = structure_refusals(model, x)
    assert "fused" in refused["qkv"]
    assert "LayerNorm" in refused["proj"] and "LayerNorm" in refused["embed"]
    with pytest.raises(PlanError, match="'qkv'.*fused"):
        apply(model, Plan({"qkv": channel(0.5)}), x)


# --- input forms -----------------------------------------------------------------------------


class TwoInputs(nn.Module):
    """``forward(a, b)``: two branches, concatenated, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.b = nn.Linear(5, 8)
        self.head = nn.Linear(24, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([torch.relu(self.a(a)), torch.relu(self.b(b))], dim=1))


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_channel_pruning_takes_tuple_and_dict_inputs(form: str) -> None:
    torch.manual_seed(0)
    model = TwoInputs().eval()
    a, b = torch.randn(4, 6), torch.randn(4, 5)
    x = (a, b) if form == "tuple" else {"a": a, "b": b}
    new = apply(model, Plan({"b": channel(0.5)}), x)
    assert new.b.out_features == 4 and new.head.in_features == 20
    assert new(a, b).shape == (4, 3)


def test_channel_pruning_a_batch_of_one_tensor() -> None:
    """One sample of a one-tensor model: not unpacked along the batch dimension."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(1, 4)
    new = apply(model, Plan({"0": channel(0.5)}), x)
    assert new[0].out_features == 4 and new(x).shape == (1, 2)


# --- decoder LMs: Llama / Qwen2 (grouped-query attention, rotary, RMSNorm, tied embeddings) --


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Fails the test (TimeoutError) if the block runs longer than ``seconds``: the analysis
    ran for hours inside Torch-Pruning on these models."""
    import signal

    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def decoder(family: str) -> tuple[nn.Module, torch.Tensor]:
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[family]
    config = config_cls(vocab_size=128, hidden_size=HIDDEN, intermediate_size=FFN,
                        num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=2,
                        tie_word_embeddings=True)
    torch.manual_seed(0)
    return model_cls(config).eval(), torch.randint(0, 128, (1, 8))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_decoder_lm_analysis_finishes_and_offers_only_the_ffn(family: str) -> None:
    """``layers`` on a decoder LM returns in seconds (it ran for 30 minutes and more inside
    Torch-Pruning's group search); its gated FFN neurons and its key/value groups (the knob on
    k_proj or v_proj: ``tests/test_prune_lm.py``) can be cut, the residual stream (o_proj,
    down_proj: RMSNorm, the tied embedding) and query heads out of their groups cannot."""
    model, ids = decoder(family)
    with time_limit(30):
        refused = structure_refusals(model, ids)
    for i in range(2):
        block = f"model.layers.{i}"
        for name in ("mlp.gate_proj", "mlp.up_proj"):
            assert f"{block}.{name}" not in refused
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            assert "RMSNorm" in refused[f"{block}.{name}"], refused[f"{block}.{name}"]
        assert "key/value groups" in refused[f"{block}.self_attn.q_proj"]
        for name in ("k_proj", "v_proj"):
            assert f"{block}.self_attn.{name}" not in refused
    assert "vocabulary" in refused["model.embed_tokens"]
    assert "model output" in refused["lm_head"]

    with torch.no_grad():
        want = model(ids).logits.shape
    pruned = apply(model, Plan({"model.layers.0.mlp.gate_proj": channel(0.5),
                                "model.layers.1.mlp.up_proj": channel(0.25)}), ids)
    mlp = pruned.model.layers
    assert (mlp[0].mlp.gate_proj.out_features, mlp[0].mlp.up_proj.out_features,
            mlp[0].mlp.down_proj.in_features) == (FFN // 2,) * 3
    assert mlp[1].mlp.gate_proj.out_features == FFN - FFN // 4
    with torch.no_grad():
        assert pruned(ids).logits.shape == want


def test_a_group_search_past_its_budget_stops() -> None:
    """Torch-Pruning's group search is bounded: on Llama's rotary attention it grows without
    end; past the budget it raises instead, and the layer is refused with the reason."""
    from autocompress.compress.prune import _Graph, _OverBudget

    model, ids = decoder("llama")
    graph = _Graph(model, ids)
    q = model.model.layers[0].self_attn.q_proj
    with time_limit(30), pytest.raises(_OverBudget, match="grew past"):
        graph.group(q)
    assert len(graph.group(model.model.layers[0].mlp.gate_proj)) > 0  # others still build


@pytest.mark.parametrize("ratios", [
    {"features.3": 0.75, "features.7": 0.75},
    {"features.0": 0.75, "features.7": 0.8},
    {"features.0": 0.75, "features.3": 0.75, "classifier.1": 0.75, "features.7": 0.5},
], ids=["3-7", "0-7", "all"])
def test_the_budget_lets_a_channel_become_many_through_a_flatten(ratios) -> None:
    """A conv's channel is H x W inputs of the linear after a flatten: the group of a cut is
    that much wider than the channels cut, and its bound must allow it (the digits demo's
    75%-channel plans failed with the bound counted in channels)."""
    from autocompress.compress.prune import prune_channels
    from autocompress.tasks.digits import DigitsCNN

    torch.manual_seed(0)
    model, x = DigitsCNN().eval(), torch.randn(1, 1, 8, 8)
    prune_channels(model, ratios, x)
    assert model.features[7].out_channels == 64 - round(ratios["features.7"] * 64)
    assert model(x).shape == (1, 10)
