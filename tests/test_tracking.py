"""SearchTracker against a SQLite store and a real ``mlflow server`` over HTTP (no Ray)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from autocompress.tracking import PARETO, ROLE, SearchTracker, read_front, read_trials
from autocompress.tracking._pareto import non_dominated_mask
from tests.searches import mlflow_server

BASELINE = {"accuracy": 0.95, "size_bytes": 1000.0, "latency_ms": 1.0}
OBJECTIVES = [("accuracy", "max"), ("size_bytes", "min")]


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server with proxied artifacts, on a free loopback port."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("http", marks=pytest.mark.slow)])
def tracking_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mlflow.db'}"
    return request.getfixturevalue("http_server")


def _metrics(accuracy: float, size: float) -> dict[str, float]:
    return {"accuracy": accuracy, "size_bytes": size, "latency_ms": 1.0, "params": 10,
            "macs": 10, "compression_ratio": BASELINE["size_bytes"] / size, "speedup": 1.0,
            "accuracy_drop": BASELINE["accuracy"] - accuracy, "epochs": 1}


def test_tracker_keeps_the_front_current(tracking_uri: str, tmp_path: Path) -> None:
    name = f"tracker-{tmp_path.name}"
    lines: list[str] = []
    tracker = SearchTracker.start(tracking_uri, name, {"task": "t", "search": {"trials": 5}},
                                  BASELINE, OBJECTIVES, max_accuracy_drop=0.1, echo=lines.append,
                                  total=5)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / "plan.json").write_text('{"version": 1, "layers": {}}')
    points = [(0.94, 500.0), (0.90, 200.0), (0.93, 600.0), (0.70, 50.0), (0.95, 400.0)]
    for i, (acc, size) in enumerate(points):
        tracker.trial_started(f"t{i}", {"fc": {"bits": 8}})
        tracker.trial_epoch(f"t{i}", 1, acc - 0.01)
        tracker.trial_finished(f"t{i}", _metrics(acc, size), f"plan {i}", artifacts)
    tracker.trial_started("bad", {})
    tracker.trial_failed("bad", "ValueError: boom", details="ValueError: boom\n\nTraceback ...")
    tracker.finish()

    client = MlflowClient(tracking_uri)
    parent = client.get_run(tracker.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags[ROLE] == "search"
    assert parent.data.metrics["baseline_accuracy"] == pytest.approx(0.95)
    assert parent.data.metrics["trials_failed"] == 1
    assert client.get_metric_history(tracker.parent_run_id, "hypervolume")
    runs = read_trials(client, tracker.parent_run_id)
    assert [r.info.status for r in runs] == ["FINISHED"] * 5 + ["FAILED"]
    assert runs[-1].data.tags["autocompress.error"] == "ValueError: boom"
    error_txt = client.download_artifacts(runs[-1].info.run_id, "error.txt", str(tmp_path))
    assert Path(error_txt).read_text().endswith("Traceback ...")

    # Tags equal an independent computation: (0.70, 50) is infeasible (drop 0.25 > 0.1),
    # (0.93, 600) is dominated by (0.94, 500), which is dominated by (0.95, 400).
    values = np.array(points)
    values[3] = np.nan
    expected = non_dominated_mask(values, ["max", "min"])
    assert [r.data.tags[PARETO] == "true" for r in runs[:5]] == list(expected)
    assert list(expected) == [False, True, False, False, True]

    front = read_front(tracking_uri, name)
    assert [r["accuracy"] for r in front] == [0.95, 0.90]
    assert front[0]["plan"] == {"version": 1, "layers": {}}
    assert any("FAILED: ValueError: boom" in line for line in lines)
    assert sum("*front*" in line for line in lines) == 3  # t0, t1 and t4 joined the front


def test_a_trial_without_an_objective_value_fails_instead_of_logging_nan(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lines: list[str] = []
    tracker = SearchTracker.start(uri, "no-objective", {"task": "t"}, BASELINE, OBJECTIVES,
                                  echo=lines.append)
    tracker.trial_started("t0", {})
    metrics = _metrics(0.9, 500.0)
    del metrics["size_bytes"]
    tracker.trial_finished("t0", metrics, "plan")
    tracker.finish()
    run = read_trials(MlflowClient(uri), tracker.parent_run_id)[0]
    assert run.info.status == "FAILED"
    assert "size_bytes" in run.data.tags["autocompress.error"]
    assert "size_bytes" not in run.data.metrics


def test_plots_are_redrawn_at_most_every_plots_every_s_and_at_the_end(tmp_path: Path,
                                                                      monkeypatch) -> None:
    """Drawing the parent run's plots takes about a second on the driver, between trials: a
    search redraws them at most every PLOTS_EVERY_S, and always when it ends; the CSV tables
    are current after every trial."""
    import autocompress.tracking._plots as plots

    drawn: list[int] = []
    real = plots.write_plots
    monkeypatch.setattr(plots, "write_plots", lambda trials, *a: drawn.append(len(trials))
                        or real(trials, *a))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = SearchTracker.start(uri, "plots", {"task": "t"}, BASELINE, OBJECTIVES,
                                  echo=lambda _: None)
    for i in range(3):
        tracker.trial_started(f"t{i}", {})
        tracker.trial_finished(f"t{i}", _metrics(0.9 - i / 100, 500.0 - i), f"plan {i}")
    assert drawn == [1]  # the first trial's, then not again within PLOTS_EVERY_S
    client = MlflowClient(uri)
    table = client.download_artifacts(tracker.parent_run_id, "trials.csv", str(tmp_path))
    assert len(Path(table).read_text().splitlines()) == 1 + 3
    monkeypatch.setattr("autocompress.tracking._writer.PLOTS_EVERY_S", 0.0)
    tracker.trial_started("t3", {})
    tracker.trial_finished("t3", _metrics(0.8, 100.0), "plan 3")
    tracker.finish()
    assert drawn == [1, 4, 4]
    names = {a.path for a in client.list_artifacts(tracker.parent_run_id)}
    assert {"pareto.html", "trials.csv", "pareto.csv"} <= names


def test_each_trial_says_how_its_latency_was_paired(tmp_path: Path) -> None:
    """The trials' pairings go to the parent run's ``latency_pairs.csv`` (how fast the machine
    was at each measurement) and to their tags; a retimed measurement says so."""
    import pandas as pd

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lines: list[str] = []
    tracker = SearchTracker.start(uri, "pairs", {"task": "t"}, BASELINE, OBJECTIVES,
                                  echo=lines.append)
    for i, (reference, retries, drift) in enumerate([(1.0, 0, 0.01), (1.4, 2, 0.22)]):
        tracker.trial_started(f"t{i}", {})
        latency = {"speedup": 2.0, "reference_ms": reference, "measured_ms": reference / 2,
                   "drift": drift, "retries": retries, "measured_at": 1e9 + i, "cached": False}
        tracker.trial_finished(f"t{i}", _metrics(0.9, 500.0), "plan", latency=latency)
    tracker.finish()
    client = MlflowClient(uri)
    pairs = pd.read_csv(client.download_artifacts(tracker.parent_run_id, "latency_pairs.csv",
                                                  str(tmp_path)))
    assert pairs["reference_ms"].tolist() == [1.0, 1.4] and pairs["retries"].tolist() == [0, 2]
    run = read_trials(client, tracker.parent_run_id)[1]
    assert run.data.tags["autocompress.latency.reference_ms"] == "1.4"
    assert run.data.tags["autocompress.latency.retries"] == "2"
    assert "timed 3x: the machine drifted, or ran slower than usual, by more than 10%" in lines[-1]
    assert "timed" not in lines[-2]
    # A resumed search keeps the earlier trials' pairs (from their tags).
    resumed = SearchTracker.resume(uri, tracker.parent_run_id, OBJECTIVES, echo=lines.append)
    assert resumed._pairs()["reference_ms"].astype(float).tolist() == [1.0, 1.4]
