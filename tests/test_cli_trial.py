"""The ``layers`` and ``trial`` commands, run in-process on the tiny user task."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from autocompress.cli import main
from autocompress.compress._plan import Plan
from autocompress.finetune import FinetuneConfig
from autocompress.measure import Target
from autocompress.tasks import Task
from autocompress.tune._trial import run_trial
from tests.models import tiny_task

TASK = "tests.models:tiny_task"
PLAN = {"version": 1, "layers": {"net.0": {"sparsity": 0.5, "structure": "channel"},
                                 "net.2": {"bits": 8}, "net.4": {"rank": 0.5}}}


def test_layers_json(capsys) -> None:
    assert main(["layers", "--task", TASK, "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)
    assert [la["name"] for la in layers] == ["net.0", "net.2", "net.4", "net.6"]
    refusals = layers[0].pop("refusals")
    assert layers[0] == {"name": "net.0", "type": "Linear", "shape": [32, 16],
                         "params": 16 * 32 + 32, "macs": 16 * 32, "is_output": False}
    # tucker/cp are for convs; 16 inputs take no group of 32 or more
    assert [(r["knob"], r["value"]) for r in refusals] == [
        ("decomposition", "tucker"), ("decomposition", "cp"),
        ("group_size", 32), ("group_size", 64), ("group_size", 128)]
    assert {"name", "type", "shape", "params", "macs"} <= set(layers[-1])
    assert layers[-1]["is_output"] is True


def test_layers_table(capsys) -> None:
    assert main(["layers", "--task", TASK]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["name", "type", "shape", "params", "macs"]
    assert out[1].split()[:5] == ["net.0", "Linear", "32x16", "544", "512"]
    assert out[-2].split()[5].rstrip(";") == "output"  # then what it refuses
    model = tiny_task(train=False).model
    params = sum(p.numel() for p in model.parameters())
    size = sum(p.numel() * 4 for p in model.parameters()) / 1024
    assert out[-1] == f"4 layers; the model stores {params:,} parameters, {size:.1f} KiB"


def test_trial_json(capsys, tmp_path: Path) -> None:
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(PLAN))
    assert main(["trial", "--task", TASK, "--plan", str(plan_file), "--epochs", "1",
                 "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # progress goes to stderr, stdout is pure JSON
    assert "epoch 1/1" in captured.err
    assert set(result) == {"baseline", "compressed", "plan"}
    base, comp = result["baseline"], result["compressed"]
    for key in ("accuracy", "latency_ms", "size_bytes", "params", "macs"):
        assert key in base and key in comp
    assert comp["compression_ratio"] == pytest.approx(base["size_bytes"] / comp["size_bytes"])
    assert comp["speedup"] == pytest.approx(base["latency_ms"] / comp["latency_ms"])
    assert comp["accuracy_drop"] == pytest.approx(base["accuracy"] - comp["accuracy"])
    assert comp["compression_ratio"] > 1 and comp["params"] < base["params"]
    assert comp["accuracy"] > 0.5
    assert result["plan"]["layers"]["net.2"]["bits"] == 8


@pytest.mark.parametrize(("content", "pattern"), [
    pytest.param(None, "cannot read plan", id="missing-file"),
    pytest.param("{not json", "not valid JSON", id="not-json"),
    pytest.param('{"layers": {"net.0": {"bits": 12}}}', r"layers\.net\.0: bits=12",
                 id="bad-knob"),
    pytest.param('{"layers": {"net.9": {"bits": 8}}}', "unknown layer 'net.9'",
                 id="unknown-layer"),
    pytest.param('{"version": 7, "layers": {}}', "plan version 7", id="bad-version"),
])
def test_bad_plan_file_exits_2_naming_the_file(capsys, tmp_path: Path, content: str | None,
                                               pattern: str) -> None:
    plan_file = tmp_path / "my-plan.json"
    if content is not None:
        plan_file.write_text(content)
    code = main(["trial", "--task", TASK, "--plan", str(plan_file), "--epochs", "1", "--json"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    err = captured.err.strip().splitlines()[-1]
    assert err.startswith(f"autocompress: error: {plan_file}: ")
    assert re.search(pattern, err), err


def test_plan_refused_by_apply_names_the_file(capsys, tmp_path: Path) -> None:
    plan_file = tmp_path / "my-plan.json"
    plan_file.write_text('{"layers": {"net.6": {"sparsity": 0.5, "structure": "channel"}}}')
    code = main(["trial", "--task", TASK, "--plan", str(plan_file), "--epochs", "1"])
    assert code == 2
    assert str(plan_file) in capsys.readouterr().err


def test_run_trial_leaves_the_task_model_untouched(tiny: Task) -> None:
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    plan = Plan.from_dict(PLAN)
    target = Target(warmup=1, min_runs=3, max_runs=5, budget_s=0.05)
    result = run_trial(tiny, plan, FinetuneConfig(epochs=2), target)
    assert result.plan == plan and len(result.history) == 2
    assert result.metrics.accuracy == result.history[-1]
    assert result.metrics.params < sum(p.numel() for p in tiny.model.parameters())
    assert result.model.net[0].out_features == 16 and result.seconds > 0
    for k, v in tiny.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_task_exits_2(capsys) -> None:
    assert main(["layers", "--task", "tests.models:no_such_fn"]) == 2
    assert "no function 'no_such_fn'" in capsys.readouterr().err
