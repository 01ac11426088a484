"""Latency over several shapes: ``target.seq_len`` (one batch per length, ``latency_seq<n>_ms``,
``latency_ms`` their aggregate), a decoder's prefill/decode workloads, the cache per workload,
the objectives, the position limit, and the device agent timing the same feeds.

Times are compared as ratios (a 64-token batch of a BERT against a 16-token one), never as
absolute numbers.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from autocompress import Task
from autocompress._errors import ConfigError
from autocompress.measure import (
    LatencyResult,
    PairedMeasurer,
    Target,
    get_metric,
    measure,
    measure_latency,
    relative_metrics,
)
from autocompress.measure import _workloads as workloads_module
from autocompress.measure import latency as latency_module
from autocompress.onnxgraph import export_onnx
from tests.real_models import SentenceEncoder, task_of, tokens

FAST = {"warmup": 2, "min_runs": 10, "max_runs": 200, "budget_s": 0.3}


def bert() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A 2-layer BERT that takes up to 128 tokens (wide enough that 64 tokens cost clearly
    more than 16), and a 12-token example."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=512, max_position_embeddings=128)
    return SentenceEncoder(BertModel(config)).eval(), tokens(batch=1)


def bert_task() -> Task:
    """The BERT as a user task (``tests.test_shapes:bert_task``)."""
    return task_of(*bert(), n=4, name="bert")


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "latency.db"
    monkeypatch.setenv("AUTOCOMPRESS_LATENCY_CACHE", str(path))
    return path


def rows(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT COUNT(*) FROM latency").fetchone()[0]


def test_one_batch_per_length_with_masks_of_ones() -> None:
    model, x = bert()
    feeds = workloads_module.workload_feeds(model, x, Target(seq_len=(16, 5), batch_size=2))
    assert list(feeds) == ["seq5", "seq16"]
    assert feeds["seq16"]["input_ids"].shape == feeds["seq16"]["attention_mask"].shape == (2, 16)
    assert torch.equal(feeds["seq16"]["input_ids"][0, 12:], x["input_ids"][0, :4])  # repeated
    assert torch.equal(feeds["seq5"]["input_ids"][0], x["input_ids"][0, :5])  # cut
    assert bool((feeds["seq16"]["attention_mask"] == 1).all())
    assert list(workloads_module.workload_feeds(model, x, Target())) == [""]  # as before


def test_latency_per_length_and_its_aggregate(cache: Path) -> None:
    model, x = bert()
    result = measure_latency(model, x, Target(seq_len=[16, 64], **FAST))
    per = result.workloads
    assert set(per) == {"seq16", "seq64"}
    assert per["seq16"] < per["seq64"], per
    assert result.latency_ms == pytest.approx((per["seq16"] + per["seq64"]) / 2)
    assert rows(cache) == 2  # one cache entry per length
    # The other aggregate: the same two entries (the key leaves aggregate out), their max.
    again = measure_latency(model, x, Target(seq_len=[16, 64], aggregate="max", **FAST))
    assert again.cached and again.workloads == per
    assert again.latency_ms == pytest.approx(max(per.values()))
    # Another set of lengths: 16 is a hit, 32 is timed; the entries are keyed per length.
    third = measure_latency(model, x, Target(seq_len=[16, 32], **FAST))
    assert third.workloads["seq16"] == per["seq16"] and not third.cached
    assert rows(cache) == 3
    # Without seq_len: the example's shape, one entry more, no workloads in the result.
    plain = measure_latency(model, x, Target(**FAST))
    assert plain.workloads == {} and "workloads" not in plain.to_dict() and rows(cache) == 4


def test_metrics_and_paired_timing_per_length(cache: Path) -> None:
    model, x = bert()
    task = task_of(model, x, n=4)
    target = Target(seq_len=[16, 64], **FAST)
    timer = PairedMeasurer(target)
    baseline = measure(model, task, target, timer.reference)
    assert set(timer.clocks) == {"seq16", "seq64"}
    same = measure(model, task, target, timer)  # the baseline against itself, per length
    assert same.latency is not None and same.latency.paired
    for m in (baseline, same):
        d = m.to_dict()
        assert d["latency_seq16_ms"] < d["latency_seq64_ms"]
        assert d["latency_ms"] == pytest.approx((d["latency_seq16_ms"] + d["latency_seq64_ms"]) / 2)
    rel = relative_metrics(same.to_dict(), baseline.to_dict())
    assert 0.5 < rel["speedup_seq16"] < 2 and 0.5 < rel["speedup_seq64"] < 2
    # A resumed search's logged baseline (one latency_ms): the clocks are scaled to it.
    resumed = PairedMeasurer(target)
    resumed.set_reference(latency_module.prepare(model, x, target), latency_ms=10.0)
    assert resumed.reference_ms == pytest.approx(10.0)
    assert resumed.clocks["seq16"] < resumed.clocks["seq64"]


def test_per_workload_metrics_are_objectives(tmp_path: Path) -> None:
    from autocompress.config import load_experiment

    assert get_metric("latency_seq64_ms").direction == "min"
    assert get_metric("latency_decode_ms").objective and get_metric("latency_prefill_128_ms")

    def experiment(metric: str) -> Path:
        path = tmp_path / f"{metric}.yaml"
        path.write_text(yaml.safe_dump({
            "name": "shapes", "task": "tests.test_shapes:bert_task",
            "search_space": {"layers": [{"types": ["Linear"], "knobs": {"bits": [8, None]}}]},
            "objectives": [{"metric": "accuracy"}, {"metric": metric, "mode": "min"}],
            "target": {"seq_len": [16, 64]}}))
        return path

    exp = load_experiment(experiment("latency_seq64_ms"))
    assert [o.metric for o in exp.objectives] == ["accuracy", "latency_seq64_ms"]
    assert exp.target.seq_len == (16, 64)
    with pytest.raises(ConfigError, match=r"latency_<workload>_ms"):
        load_experiment(experiment("latency_seq64ms"))
    with pytest.raises(ConfigError, match=r"latency_<workload>_ms"):
        load_experiment(experiment("latency_p90_ms"))  # a metric, but not an objective


def test_a_length_above_the_position_limit_exits_2(tmp_path: Path, capsys) -> None:
    from autocompress.cli import main

    model, x = bert()
    with pytest.raises(ConfigError, match=r"target.seq_len.*above the model's position limit of 128"):
        measure_latency(model, x, Target(seq_len=[16, 256]))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"version": 1, "layers": {}}))
    code = main(["trial", "--task", "tests.test_shapes:bert_task", "--plan", str(plan),
                 "--epochs", "0", "--seq-len", "16", "256"])
    assert code == 2
    err = capsys.readouterr().err
    assert "seq_len" in err and "128" in err


class FixedPositions(nn.Module):
    """Token embeddings plus a table of 16 positions: longer inputs fail."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(50, 8), nn.Embedding(16, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1])
        return self.head((self.tok(input_ids) + self.pos(pos)).mean(1))


def test_a_length_the_model_fails_at_is_refused() -> None:
    x = {"input_ids": torch.randint(0, 50, (1, 8))}
    with pytest.raises(ConfigError, match=r"target.seq_len.*fails at 32 tokens"):
        measure_latency(FixedPositions(), x, Target(seq_len=[8, 32]))


class TinyDecoder(nn.Module):
    """Stands in for a decoder LM: its "prefill" feed is a prompt, its "decode" feed one token."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 64)
        self.mlp = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
        self.head = nn.Linear(64, 50)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(self.emb(input_ids)))


def test_a_decoder_reports_decode_as_latency_and_prefill_as_its_own_metric(
        cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def feeds(model, example_inputs, prompt_lens, context_len, batch_size):
        assert prompt_lens == (48,) and context_len == 48
        return {"prefill": {"input_ids": torch.zeros(batch_size, 48, dtype=torch.long)},
                "decode": {"input_ids": torch.zeros(batch_size, 1, dtype=torch.long)}}

    def export(model, example_inputs, path, **options):
        return export_onnx(model, example_inputs, path, dynamic_sequence=True, **options)

    is_decoder = lambda model: isinstance(model, TinyDecoder)  # noqa: E731
    monkeypatch.setattr(workloads_module, "is_causal_lm", is_decoder)
    monkeypatch.setattr(workloads_module, "causal_lm_feeds", feeds)
    monkeypatch.setattr(latency_module, "is_causal_lm", is_decoder)
    monkeypatch.setattr(latency_module, "export_causal_lm", export)
    model = TinyDecoder().eval()
    x = {"input_ids": torch.zeros(1, 8, dtype=torch.long)}
    task = Task(model=model, train_loader=[], val_loader=[], example_inputs=x,
                metric=lambda m, loader: 1.0, name="decoder")
    target = Target(seq_len=[48], **FAST)
    timer = PairedMeasurer(target)
    baseline = measure(model, task, target, timer.reference).to_dict()
    assert baseline["latency_ms"] == baseline["latency_decode_ms"]
    assert baseline["latency_decode_ms"] < baseline["latency_prefill_ms"]
    trial = measure(model, task, target, timer)
    assert trial.latency is not None and trial.latency.paired
    assert trial.latency_ms == trial.to_dict()["latency_decode_ms"]
    assert set(relative_metrics(trial.to_dict(), baseline)) >= {"speedup_decode", "speedup_prefill"}


def test_combine_keeps_one_batch_as_it_was() -> None:
    from autocompress.measure._results import combine

    one = LatencyResult(1.0, 2.0, 0.5, 10, "onnxruntime", "cpu", 1, 1)
    assert combine({"": one}) is one
    two = combine({"seq8": one, "seq16": LatencyResult(3.0, 4.0, 0.5, 10, "onnxruntime", "cpu",
                                                       1, 1)}, "mean")
    assert (two.latency_ms, two.p90_ms, two.runs, two.workloads) == (
        2.0, 3.0, 20, {"seq8": 1.0, "seq16": 3.0})
    assert LatencyResult.from_dict(two.to_dict()) == two


def test_the_agent_times_each_length(tmp_path: Path, cache: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.parse

    from tests.test_agent import QUICK, TOKEN, Agent

    agent = Agent(tmp_path)
    try:
        monkeypatch.setenv("AC_TEST_AGENT_TOKEN", TOKEN)
        model, x = bert()
        target = Target(device="remote", url=agent.url, token_env="AC_TEST_AGENT_TOKEN",
                        seq_len=[16, 64], **FAST)
        result = measure_latency(model, x, target)
        assert set(result.workloads) == {"seq16", "seq64"}
        assert result.workloads["seq16"] < result.workloads["seq64"]
        assert result.latency_ms == pytest.approx(sum(result.workloads.values()) / 2)
        assert rows(cache) == 2 and measure_latency(model, x, target).cached  # keyed per length
        # The request: the shapes of one workload; a shape the graph cannot take is a 400.
        onnx_path = export_onnx(model, x, tmp_path / "bert.onnx", dynamic_sequence=True)
        shapes = json.dumps({"input_ids": [1, 16], "attention_mask": [1, 16]})
        code, body = agent.call(f"/measure?{QUICK}&{urllib.parse.urlencode({'shapes': shapes})}",
                                onnx_path.read_bytes())
        assert code == 200 and body["latency_ms"] > 0
        bad = json.dumps({"input_ids": [1, 16, 2]})
        code, body = agent.call(f"/measure?{QUICK}&{urllib.parse.urlencode({'shapes': bad})}",
                                onnx_path.read_bytes())
        assert code == 400 and "input_ids" in body["error"] and "2 dimensions, 3 given" in body["error"]
        code, body = agent.call(f"/measure?{QUICK}", onnx_path.read_bytes())  # no shapes: as before
        assert code == 400 and "dynamic dimension" in body["error"]
    finally:
        agent.stop()


@pytest.mark.slow
def test_a_serial_search_logs_each_length_and_optimizes_one(tmp_path: Path, cache: Path) -> None:
    import autocompress as ac
    from tests.searches import FAST_TARGET, logged_search, write_experiment

    path = write_experiment(
        tmp_path, "shapes", task="tests.test_shapes:bert_task", trials=2, concurrency=1, epochs=0,
        backend="serial", search_space={"layers": [{"types": ["Linear"], "knobs": {"bits": [8, None]}}]},
        objectives=[{"metric": "accuracy"}, {"metric": "latency_seq64_ms"}],
        target={**FAST_TARGET, "seq_len": [16, 64]})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = ac.search(path, tracking_uri=uri, echo=lambda m: None)
    assert {"latency_seq16_ms", "latency_seq64_ms"} <= set(result.baseline)
    _, parent, runs = logged_search(uri, "shapes")
    assert {"baseline_latency_seq16_ms", "baseline_latency_seq64_ms"} <= set(parent.data.metrics)
    for run in runs:
        m = run.data.metrics
        assert {"latency_seq16_ms", "latency_seq64_ms", "speedup_seq16", "speedup_seq64"} <= set(m)
        assert m["latency_ms"] == pytest.approx((m["latency_seq16_ms"] + m["latency_seq64_ms"]) / 2)
    assert "latency_seq64_ms" in result.front.columns
    from autocompress.tracking import read_front

    assert all("latency_seq64_ms" in row for row in read_front(uri, "shapes"))
