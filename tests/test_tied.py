"""Tied weights (a decoder's token embedding used as its output layer): stored once, counted
once, and still tied after compression, baking, rebuilding and the packed round trip."""

from __future__ import annotations

import copy
import json
import struct
import zlib
from collections.abc import Callable

import pytest
import torch
from torch import nn

from autocompress.compress import apply
from autocompress.compress._bake import bake
from autocompress.compress._plan import Plan, PlanError
from autocompress.compress._registry import describe_layers
from autocompress.compress._ties import tensor_aliases, weight_ties
from autocompress.deploy._packed import PackedFormatError, load_packed, save_packed
from autocompress.deploy._rebuild import load_baked_state
from autocompress.measure import count_params, size_bytes, size_report
from autocompress.measure._registry import relative_metrics

VOCAB = 128


class TiedLM(nn.Module):
    """Embedding -> Linear -> output Linear whose weight is the embedding's (no transformers)."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(self.embed(ids))))


def tied_plain() -> tuple[nn.Module, str, str]:
    """The model, its embedding's and its output layer's names."""
    torch.manual_seed(0)
    return TiedLM().eval(), "embed", "head"


def tied_llama() -> tuple[nn.Module, str, str]:
    """A tiny random-init Llama with ``tie_word_embeddings`` (nothing downloaded)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model, "model.embed_tokens", "lm_head"


MODELS: dict[str, Callable[[], tuple[nn.Module, str, str]]] = {
    "plain": tied_plain, "llama": tied_llama}
IDS = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))


def unique_bytes(model: nn.Module) -> tuple[int, int]:
    """``(bytes, params)`` of the distinct tensors of a model (one storage view counted once)."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[(t.data_ptr(), tuple(t.shape))] = t
    params = {(p.data_ptr(), tuple(p.shape)) for p in model.parameters()}
    return (sum(t.numel() * t.element_size() for t in seen.values()),
            sum(t.numel() for k, t in seen.items() if k in params))


def headless(model: nn.Module, head: str) -> nn.Module:
    """A copy without the output layer: what the model stores, less nothing when tied."""
    out = copy.deepcopy(model)
    parent, _, attr = head.rpartition(".")
    setattr(out.get_submodule(parent) if parent else out, attr, nn.Identity())
    return out


def int8_plan(model: nn.Module, head: str) -> Plan:
    """8-bit weights on every Linear and Embedding but the output layer (it follows the
    embedding it is tied to)."""
    layers = {n: {"bits": 8} for n, m in model.named_modules()
              if isinstance(m, nn.Linear | nn.Embedding) and n != head}
    return Plan.from_dict({"version": 1, "layers": layers})


@pytest.mark.parametrize("family", MODELS)
def test_baseline_counts_the_tied_matrix_once(family: str) -> None:
    model, embed, head = MODELS[family]()
    assert tensor_aliases(model) == {f"{head}.weight": f"{embed}.weight"}
    assert weight_ties(model) == {head: embed}
    nbytes, params = unique_bytes(model)
    assert size_bytes(model) == nbytes  # random fp32 weights: dense, 4 bytes each
    assert count_params(model) == (params, params)
    assert [r.name for r in size_report(model)].count(f"{embed}.weight") == 1
    assert f"{head}.weight" not in [r.name for r in size_report(model)]


@pytest.mark.parametrize("family", MODELS)
def test_int8_keeps_the_tie_and_stores_the_matrix_once(family: str) -> None:
    model, embed, head = MODELS[family]()
    compressed = apply(model, int8_plan(model, head), IDS)
    out_layer, emb_layer = compressed.get_submodule(head), compressed.get_submodule(embed)
    assert torch.equal(out_layer.weight, emb_layer.weight)
    assert (out_layer.parametrizations.weight.original
            is emb_layer.parametrizations.weight.original)
    rows = {r.name: r for r in size_report(compressed)}
    assert f"{head}.weight" not in rows and rows[f"{embed}.weight"].bits == 8
    # Honest: the output layer costs nothing more than the embedding already does.
    assert size_bytes(compressed) == size_bytes(headless(compressed, head))
    ratio = relative_metrics({"size_bytes": size_bytes(compressed)},
                             {"size_bytes": size_bytes(model)})["compression_ratio"]
    honest = size_bytes(headless(model, head)) / size_bytes(headless(compressed, head))
    assert ratio == pytest.approx(honest)
    baked = bake(compressed)
    assert baked.get_submodule(head).weight is baked.get_submodule(embed).weight
    # Fine-tuning moves one matrix: both layers still read the same weight.
    opt = torch.optim.SGD(compressed.parameters(), lr=0.1)
    out = compressed(IDS)
    (out if isinstance(out, torch.Tensor) else out.logits).square().mean().backward()
    opt.step()
    assert torch.equal(out_layer.weight, emb_layer.weight)


def test_tied_layers_refuse_what_would_untie_them() -> None:
    model, embed, head = tied_plain()
    layers = {la.name: la for la in describe_layers(model, IDS)}
    assert layers[head].shared_with == (embed,) and layers[embed].shared_with == (head,)
    assert layers[head].to_dict()["shared_with"] == [embed]
    assert "shared_with" not in layers["body"].to_dict()  # the --json contract, extended
    follow = {r.knob for r in layers[head].refusals if "tied" in r.reason and r.value is None}
    assert follow == {"sparsity", "bits", "rank"}
    assert any(r.knob == "rank" and "tied" in r.reason for r in layers[embed].refusals)
    for name, knobs in ((head, {"bits": 8}), (head, {"sparsity": 0.5}), (embed, {"rank": 0.5})):
        with pytest.raises(PlanError, match="tied"):
            apply(model, Plan.from_dict({"version": 1, "layers": {name: knobs}}), IDS)


def test_packed_round_trip_keeps_the_tie(tmp_path) -> None:
    model, embed, head = tied_plain()
    plan = Plan.from_dict({"version": 1, "layers": {embed: {"bits": 4, "sparsity": 0.5},
                                                    "body": {"bits": 8}}})
    compressed = apply(model, plan, IDS)
    info = save_packed(compressed, tmp_path / "m.acpk")
    assert info.payload_bytes == size_bytes(compressed)
    assert (tmp_path / "m.acpk").read_bytes()[4] == 4  # ties: format version 4
    loaded = load_packed(tmp_path / "m.acpk")
    assert loaded.get_submodule(head).weight is loaded.get_submodule(embed).weight
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), compressed(IDS))
    # Rebuilding from the logged (baked) weights keeps it too.
    rebuilt = apply(model, plan, IDS)
    load_baked_state(rebuilt, bake(compressed).state_dict(), plan)
    assert torch.equal(rebuilt.get_submodule(head).weight, rebuilt.get_submodule(embed).weight)
    assert size_bytes(rebuilt) == size_bytes(compressed)


def test_packed_refuses_a_damaged_tie(tmp_path) -> None:
    model, embed, head = tied_plain()
    path = tmp_path / "m.acpk"
    save_packed(model, path)
    data = path.read_bytes()
    header_len = struct.unpack_from("<I", data, 5)[0]
    header = json.loads(zlib.decompress(data[9:9 + header_len]))
    assert header["ties"] == [[f"{head}.weight", f"{embed}.weight"]]
    header["ties"] = [[f"{head}.weight", "body.weight"]]  # (128, 16) tied to (16, 16)
    damaged = zlib.compress(json.dumps(header).encode())
    path.write_bytes(data[:5] + struct.pack("<I", len(damaged)) + damaged + data[9 + header_len:])
    with pytest.raises(PackedFormatError, match="bad tie"):
        load_packed(path)


def tied_task():
    """``autocompress layers --task tests.test_tied:tied_task``."""
    from autocompress import Task

    model, _, _ = tied_plain()
    ids = torch.randint(0, VOCAB, (4, 6))
    batches = [(ids, torch.zeros(4, 6, VOCAB))]
    return Task(model=model, train_loader=batches, val_loader=batches, example_inputs=ids)


def test_layers_counts_a_tied_matrix_once_and_says_why_once(capsys) -> None:
    from autocompress.cli import main

    assert main(["layers", "--task", "tests.test_tied:tied_task"]) == 0
    out = capsys.readouterr().out.splitlines()
    model = tied_plain()[0]
    unique = sum(p.numel() for p in model.parameters())  # parameters() yields a tie once
    assert unique < sum(p.numel() for m in model.modules() for p in m.parameters(recurse=False))
    assert out[-1].startswith(f"3 layers; the model stores {unique:,} parameters,")
    assert out[-1].endswith("(each tied weight once: 1 shared)")
    head = next(line for line in out if line.startswith("head "))
    assert head.count("(tied)") == 1 and "no sparsity, bits, rank (its weight is embed's" in head
