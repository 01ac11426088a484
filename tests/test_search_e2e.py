"""End to end: a real search (Ray Tune + Optuna) logged to a temporary MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import yaml
from mlflow.tracking import MlflowClient

from autocompress import cli
from autocompress.config import load_experiment
from autocompress.tracking import PARETO, ROLE, TRIAL_METRICS, read_front, read_trials
from autocompress.tracking._pareto import non_dominated_mask
from tests.searches import logged_search, write_experiment

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture
def tiny_experiment(tmp_path: Path) -> Path:
    """A 4-trial, 2-concurrent search on the user task ``tests.models:tiny_task``."""
    exp = {
        "name": "tiny-e2e",
        "task": "tests.models:tiny_task",
        "search_space": str(ROOT / "search_spaces" / "default.yaml"),
        "objectives": [{"metric": "accuracy", "mode": "max"},
                       {"metric": "size_bytes", "mode": "min"}],
        "target": {"runtime": "onnxruntime", "threads": 1, "batch_size": 1, "warmup": 2,
                   "min_runs": 5, "max_runs": 20, "budget_s": 0.05},
        "search": {"sampler": "nsga2", "trials": 4, "concurrency": 2, "seed": 0},
        "finetune": {"epochs": 1, "lr": 0.001, "distill": True},
        "constraints": {"max_accuracy_drop": 0.5},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def test_search_logs_everything_to_mlflow(tiny_experiment: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cli.main(["search", str(tiny_experiment), "--tracking-uri", uri, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny-e2e")
    parents = client.search_runs([exp.experiment_id], f"tags.`{ROLE}` = 'search'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_id == out["parent_run_id"]
    assert {"baseline_accuracy", "baseline_size_bytes", "baseline_latency_ms"} <= set(
        parent.data.metrics)
    parent_files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"pareto.csv", "trials.csv", "experiment.json", "pareto.html",
            "pareto_size_bytes.png", "pareto_latency_ms.png"} <= parent_files

    trials = read_trials(client, parent.info.run_id)
    assert len(trials) == 4
    for run in trials:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert set(TRIAL_METRICS) <= set(run.data.metrics)
        assert any(k.endswith("/bits") for k in run.data.params)
        files = {f.path for f in client.list_artifacts(run.info.run_id)}
        assert {"plan.json", "model.pt", "metrics.json"} <= files
        history = client.get_metric_history(run.info.run_id, "accuracy")
        assert len(history) >= 2  # per-epoch value(s) plus the final one
        # The measurement protocol and the measuring machine are logged with each trial.
        tags = run.data.tags
        assert tags["autocompress.latency.runtime"] == "onnxruntime"
        assert tags["autocompress.latency.runtime_version"] == onnxruntime.__version__
        assert tags["autocompress.latency.threads"] == "1" and tags["autocompress.latency.batch_size"] == "1"
        assert tags["autocompress.latency.cpu"] and int(tags["autocompress.latency.runs"]) >= 5
        hit = run.data.metrics["latency_cache_hit"]
        assert hit in (0, 1) and tags["autocompress.latency.cached"] == str(bool(hit))
    assert parent.data.metrics["latency_cache_hits"] == sum(
        r.data.metrics["latency_cache_hit"] for r in trials)

    # The pareto tags equal an independent non-dominated computation over the child runs.
    values = np.array([[r.data.metrics["accuracy"], r.data.metrics["size_bytes"]]
                       for r in trials])
    feasible = np.array([r.data.metrics["accuracy_drop"] <= 0.5 for r in trials])
    values[~feasible] = np.nan
    expected = non_dominated_mask(values, ["max", "min"])
    tags = np.array([r.data.tags[PARETO] == "true" for r in trials])
    np.testing.assert_array_equal(tags, expected)
    assert tags.any()

    front = read_front(uri, "tiny-e2e")
    assert {r["run_id"] for r in front} == {r.info.run_id for r, t in zip(trials, tags) if t}
    assert all(r["plan"]["version"] == 1 for r in front)
    assert len(out["front"]) == len(front)


def test_pareto_command_json(tiny_experiment: Path, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cli.main(["search", str(tiny_experiment), "--tracking-uri", uri, "--trials", "2"]) == 0
    capsys.readouterr()
    assert cli.main(["pareto", "tiny-e2e", "--tracking-uri", uri, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all({"run_id", "accuracy", "size_bytes", "plan"} <= set(r) for r in rows)
    assert cli.main(["pareto", "tiny-e2e", "--tracking-uri", uri,
                     "--max-accuracy-drop", "-1"]) == 0
    assert cli.main(["pareto", "no-such-experiment", "--tracking-uri", uri]) == 2


def test_shipped_experiments_load() -> None:
    for path in (ROOT / "experiments").glob("*.yaml"):
        exp = load_experiment(path)
        assert exp.search.trials >= 1


def test_failed_trials_are_isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plans that factorize the head fail in the trial (the task's metric refuses them); the
    search goes on. (Rank on the grouped conv is never sampled: the layer refuses it.)"""
    import optuna

    monkeypatch.chdir(tmp_path)
    path = write_experiment(
        tmp_path, "failing", task="tests.models:grouped_task", trials=6, seed=3,
        search_space={"layers": [{"match": "conv", "knobs": {"rank": [None, 0.5], "bits": [4, 8]}},
                                 {"match": "head", "knobs": {"rank": [None, 0.5]}}]})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cli.main(["search", str(path), "--tracking-uri", uri]) == 0

    client, parent, trials = logged_search(uri, "failing")
    assert len(trials) == 6
    statuses = {r.info.run_id: r.info.status for r in trials}
    for run in trials:
        assert "conv/rank" not in run.data.params  # refused by the grouped conv: never sampled
        factorized = run.data.params["head/rank"] != "None"
        assert run.info.status == ("FAILED" if factorized else "FINISHED")
        if factorized:
            # The root cause first, one line; the whole traceback is an artifact of the run.
            error = run.data.tags["autocompress.error"]
            assert error == "RuntimeError: this task's metric refuses a factorized head"
            assert run.data.tags[PARETO] == "false"
            text = Path(client.download_artifacts(run.info.run_id, "error.txt", str(tmp_path)))
            assert text.read_text().startswith(error + "\n\nTraceback (most recent call last)")
    assert "FINISHED" in statuses.values() and "FAILED" in statuses.values()
    assert parent.data.metrics["trials_failed"] == list(statuses.values()).count("FAILED")

    study_ref = parent.data.tags["autocompress.study"]
    storage, _, name = study_ref.partition("#")
    study = optuna.load_study(study_name=name, storage=storage)
    states = sorted(t.state.name for t in study.trials)
    assert states == sorted("FAIL" if s == "FAILED" else "COMPLETE" for s in statuses.values())


def test_a_crashed_worker_fails_only_its_trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial whose process dies (os._exit) ends FAILED; the other trials finish."""
    monkeypatch.chdir(tmp_path)
    path = write_experiment(tmp_path, "crashing", task="tests.models:crashing_task", trials=5,
                            seed=1, search_space={"layers": [{"match": "net.6",
                                                              "knobs": {"bits": [4, 8]}}]})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cli.main(["search", str(path), "--tracking-uri", uri]) == 0

    _, _, trials = logged_search(uri, "crashing")
    assert len(trials) == 5
    for run in trials:
        crashed = run.data.params["net.6/bits"] == "4"
        assert run.info.status == ("FAILED" if crashed else "FINISHED"), run.data.params
        if crashed:  # no exception to send: Ray's text, its header left out
            error = run.data.tags["autocompress.error"]
            assert error and "\n" not in error and not error.startswith("Failure #"), error
    assert {r.info.status for r in trials} == {"FAILED", "FINISHED"}
