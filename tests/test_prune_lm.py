"""Structured pruning of decoder LMs (tiny random Llama, Qwen2, Mistral; grouped-query and
multi-head attention): whole key/value groups of attention, gated FFN neurons (gate, up and
down together), per-layer sizes that differ, and the residual stream left whole.

Every family runs each pruner: the pruned model keeps its logits' shape, runs with a KV cache
and ``generate``, loses exactly the parameters of the groups and neurons cut, and exports to
ONNX with the same logits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from autocompress.compress import Calibration, LayerPlan, Plan, PlanError, apply, describe_layers
from autocompress.onnxgraph import export_onnx

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, HEADS, HEAD_DIM, FFN = 128, 64, 4, 16, 128
# Plan: layer 0 loses half its key/value groups and FFN neurons, layer 1 a quarter.
RATIOS = (0.5, 0.25)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, 2),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, 2),  # q/k/v biases
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, 2),
    "llama-mha": (transformers.LlamaConfig, transformers.LlamaForCausalLM, HEADS),
}


def channel(sparsity: float, pruner: str = "magnitude") -> LayerPlan:
    return LayerPlan(sparsity=sparsity, structure="channel", pruner=pruner)


def decoder(family: str) -> nn.Module:
    config_cls, model_cls, kv_heads = FAMILIES[family]
    config = config_cls(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                        num_hidden_layers=2, num_attention_heads=HEADS,
                        num_key_value_heads=kv_heads, head_dim=HEAD_DIM,
                        tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(0)
    return model_cls(config).eval()


def ids(batch: int = 2, seq: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def lm_plan(pruner: str = "magnitude") -> Plan:
    """Layer 0's knobs on k_proj and gate_proj, layer 1's on v_proj and up_proj: each carries
    its whole group."""
    return Plan({"model.layers.0.self_attn.k_proj": channel(RATIOS[0], pruner),
                 "model.layers.0.mlp.gate_proj": channel(RATIOS[0], pruner),
                 "model.layers.1.self_attn.v_proj": channel(RATIOS[1], pruner),
                 "model.layers.1.mlp.up_proj": channel(RATIOS[1], pruner)})


def expected_sizes(model: nn.Module) -> tuple[list[int], list[int], int]:
    """Key/value heads and FFN neurons left per layer, and the parameters removed."""
    config = model.config
    kv, per_group = config.num_key_value_heads, HEADS // config.num_key_value_heads
    bias = model.model.layers[0].self_attn.k_proj.bias is not None
    group_params = HEAD_DIM * HIDDEN * (2 * per_group + 2) + bias * HEAD_DIM * (per_group + 2)
    kv_left, ffn_left, removed = [], [], 0
    for ratio in RATIOS:
        groups, neurons = min(round(ratio * kv), kv - 1), round(ratio * FFN)
        kv_left.append(kv - groups)
        ffn_left.append(FFN - neurons)
        removed += groups * group_params + neurons * 3 * HIDDEN
    return kv_left, ffn_left, removed


class Logits(nn.Module):
    """The logits of a causal LM from token ids alone (an all-ones attention mask: without one
    transformers looks for packed sequences with ``torch.diff``, which ONNX cannot export)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                       use_cache=False).logits


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied weight once


def calibration() -> Calibration:
    return Calibration(tuple(ids(4, 16, seed) for seed in range(10, 18)))


@pytest.mark.parametrize("pruner", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_decoder_lm_prunes_groups_and_ffn(family: str, pruner: str, tmp_path: Path) -> None:
    model, x = decoder(family), ids()
    kv_left, ffn_left, removed = expected_sizes(model)
    new = apply(model, lm_plan(pruner), x, calibration=calibration())

    per_group = HEADS // model.config.num_key_value_heads
    for layer, kv, neurons in zip(new.model.layers, kv_left, ffn_left, strict=True):
        att, mlp = layer.self_attn, layer.mlp
        assert att.k_proj.out_features == att.v_proj.out_features == kv * HEAD_DIM
        assert att.q_proj.out_features == att.o_proj.in_features == kv * per_group * HEAD_DIM
        assert att.num_key_value_groups == per_group
        assert att.o_proj.out_features == HIDDEN  # the residual stream is whole
        assert mlp.gate_proj.out_features == mlp.up_proj.out_features == neurons
        assert mlp.down_proj.in_features == neurons and mlp.down_proj.out_features == HIDDEN
        assert layer.input_layernorm.weight.shape == layer.post_attention_layernorm.weight.shape == (HIDDEN,)
    assert kv_left[0] != kv_left[1] or ffn_left[0] != ffn_left[1]  # layers differ
    assert new.lm_head.weight is new.model.embed_tokens.weight
    assert new.model.embed_tokens.weight.shape == (VOCAB, HIDDEN)
    assert new.config.num_key_value_heads == model.config.num_key_value_heads  # shared: untouched
    assert n_params(model) - n_params(new) == removed

    with torch.no_grad():
        assert new(x).logits.shape == (2, 8, VOCAB)
        assert new(x, use_cache=True).logits.shape == (2, 8, VOCAB)
    out = new.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=2, do_sample=False,
                       pad_token_id=0)
    assert out.shape == (2, 10) and torch.equal(out[:, :8], x)

    wrapped = Logits(new).eval()
    path = export_onnx(wrapped, x, tmp_path / "lm.onnx")
    got = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, wrapped(x).numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_query_heads_out_of_their_groups_are_refused(family: str) -> None:
    model, x = decoder(family), ids()
    refused = {la.name: r.reason for la in describe_layers(model, x) for r in la.refusals
               if (r.knob, r.value) == ("structure", "channel")}
    for i in range(2):
        block = f"model.layers.{i}.self_attn"
        assert "prune whole key/value groups" in refused[f"{block}.q_proj"]
        assert f"{block}.k_proj" in refused[f"{block}.q_proj"]
        assert f"{block}.k_proj" not in refused and f"{block}.v_proj" not in refused
        assert "RMSNorm" in refused[f"{block}.o_proj"]
        assert "RMSNorm" in refused[f"model.layers.{i}.mlp.down_proj"]
    name = "model.layers.1.self_attn.q_proj"
    with pytest.raises(PlanError, match=rf"'{name}'.*put the knob on 'model.layers.1.self_attn.k_proj'"):
        apply(model, Plan({name: channel(0.5)}), x)


def test_multi_head_attention_prunes_single_heads_from_any_projection() -> None:
    model, x = decoder("llama-mha"), ids()
    new = apply(model, Plan({"model.layers.0.self_attn.q_proj": channel(0.5),
                             "model.layers.0.self_attn.v_proj": channel(0.25),  # q's ratio wins
                             "model.layers.1.self_attn.k_proj": channel(0.99)}), x)
    heads = [layer.self_attn.q_proj.out_features // HEAD_DIM for layer in new.model.layers]
    assert heads == [2, 1]  # at least one head stays
    with torch.no_grad():
        assert new(x).logits.shape == (2, 8, VOCAB)


def test_kept_groups_are_whole_blocks_of_the_original() -> None:
    """A kept group keeps its k and v head, its query heads and their o_proj columns as they
    were, in order."""
    model, x = decoder("llama"), ids()
    new = apply(model, Plan({"model.layers.0.self_attn.v_proj": channel(0.5)}), x)
    old, att = model.model.layers[0].self_attn, new.model.layers[0].self_attn
    kept = [g for g in range(2) if torch.equal(att.k_proj.weight, old.k_proj.weight[g * 16:(g + 1) * 16])]
    assert len(kept) == 1
    g = kept[0]
    assert torch.equal(att.v_proj.weight, old.v_proj.weight[g * 16:(g + 1) * 16])
    assert torch.equal(att.q_proj.weight, old.q_proj.weight[g * 32:(g + 1) * 32])
    assert torch.equal(att.o_proj.weight, old.o_proj.weight[:, g * 32:(g + 1) * 32])


def test_wanda_scores_a_gated_ffn_by_gate_up_and_down() -> None:
    from autocompress.compress._calibration import input_stats
    from autocompress.compress._channel_groups import _Graph
    from autocompress.compress._channel_scores import ChannelScorer

    model, x = decoder("llama"), ids()
    mlp = model.model.layers[0].mlp
    graph, data = _Graph(model, x), calibration()
    got = ChannelScorer(model, data)(graph, graph.group(mlp.gate_proj))
    stats = input_stats(model, [mlp.gate_proj, mlp.up_proj, mlp.down_proj], data)
    want = (mlp.down_proj.weight.double().square().sum(0) * stats[mlp.down_proj].gram.diagonal()
            + sum(layer.weight.double().square() @ stats[layer].gram.diagonal()
                  for layer in (mlp.gate_proj, mlp.up_proj)))
    torch.testing.assert_close(got, want.float().detach())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_sparsegpt_refit_lowers_the_output_error(family: str, monkeypatch) -> None:
    """The same groups and neurons cut (sparsegpt's choice) with and without the refit of
    o_proj and down_proj: the refit model's logits are closer to the original's."""
    from autocompress.compress._reconstruct import Reconstruction

    model, x, data = decoder(family), ids(), calibration()
    plan = Plan({f"model.layers.{i}.{name}": channel(0.5, "sparsegpt")
                 for i in range(2) for name in ("self_attn.k_proj", "mlp.gate_proj")})
    refit = apply(model, plan, x, calibration=data)
    monkeypatch.setattr(Reconstruction, "run", lambda self, model: None)
    plain = apply(model, plan, x, calibration=data)

    def error(pruned: nn.Module) -> float:
        with torch.no_grad():
            return sum(float((pruned(b).logits - model(b).logits).square().mean()) for b in data.batches)

    assert refit.model.layers[0].mlp.down_proj.in_features == FFN // 2
    assert error(refit) < error(plain)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_pruned_attention_with_a_cache_matches_the_full_forward(attention: str) -> None:
    """Layers with different head counts: the last token's logits from a KV cache of the
    prefix equal those of the whole sequence, with either attention implementation."""
    model, x = decoder("llama"), ids()
    new = apply(model, lm_plan(), x)
    new.set_attn_implementation(attention)
    with torch.no_grad():
        full = new(x).logits[:, -1]
        prefix = new(x[:, :-1], use_cache=True)
        step = new(x[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
