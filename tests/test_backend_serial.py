"""The serial backend: a search in this process, without Ray, logged and resumed as on Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autocompress._errors import ConfigError
from autocompress.tune import BACKENDS, EpochReport, TrialFailed, TrialFinished, TrialPruned
from autocompress.tune._events import from_report, to_report
from tests.searches import ROOT, logged_search, write_experiment

# Runs in a fresh interpreter, so that `sys.modules` tells whether anything imported Ray.
SCRIPT = """
import json, sys
import autocompress as ac

path, uri = sys.argv[1], sys.argv[2]
first = ac.search(path, tracking_uri=uri, backend="serial", trials=3, echo=lambda m: None)
again = ac.search(path, tracking_uri=uri, backend="serial", trials=4, resume=True,
                  echo=lambda m: None)
print(json.dumps({"first": len(first.trials), "front": len(first.front),
                  "finished": int((again.trials.status == "FINISHED").sum()),
                  "same_parent": first.parent_run_id == again.parent_run_id,
                  "storage": again.study_storage, "study": again.study_name,
                  "ray": sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))}))
"""


@pytest.mark.slow  # ~40 s: two small searches in a fresh interpreter
def test_a_serial_search_logs_resumes_and_never_imports_ray(tmp_path: Path) -> None:
    path = write_experiment(tmp_path, "serial", trials=3, concurrency=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path), uri], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ray"] == []
    assert out["first"] == 3 and out["front"] >= 1
    assert out["same_parent"] and out["finished"] == 4  # resumed: one more trial

    import optuna

    study = optuna.load_study(study_name=out["study"], storage=out["storage"])
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    assert states.count("COMPLETE") == 4 and "RUNNING" not in states
    _, parent, runs = logged_search(uri, "serial")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    assert all("accuracy" in r.data.metrics and r.data.params for r in runs)
    assert parent.data.tags.get("autocompress.role") == "search"


def test_the_serial_backend_refuses_a_cluster_address(tmp_path: Path) -> None:
    from autocompress.config import load_experiment

    with pytest.raises(ConfigError, match="serial backend"):
        BACKENDS.get("serial")(address="10.0.0.1:6379").check(
            load_experiment(write_experiment(tmp_path, "x")))


def test_an_unknown_backend_names_the_allowed() -> None:
    with pytest.raises(ConfigError, match="did you mean 'serial'"):
        BACKENDS.get("serail", key="search.backend")
    assert set(BACKENDS.names()) >= {"ray", "serial"}


@pytest.mark.parametrize("event", [
    EpochReport(2, 0.9, "host/node"),
    TrialPruned("too far below", 1.5, 0.4, "conv1:s50", "host/node"),
    TrialFinished({"accuracy": 0.9, "size_bytes": 100.0, "epochs": 2}, "conv1:b8", "h",
                  {"runs": 3}),
], ids=lambda e: type(e).__name__)
def test_events_round_trip_through_ray_reports(event) -> None:
    back = from_report(to_report(event))
    if isinstance(event, TrialFinished):  # a report carries the metrics and the protocol keys
        assert back.metrics.items() >= event.metrics.items()
        assert (back.summary, back.node, back.latency) == (event.summary, event.node, event.latency)
        assert back.values(["accuracy", "size_bytes"]) == [0.9, 100.0]
    else:
        assert back == event


def test_a_report_of_no_event() -> None:
    assert from_report({"training_iteration": 1}) is None
    assert from_report(None) is None
    assert TrialFailed("ValueError: x").details is None


def test_an_unknown_backend_in_an_experiment_fails_before_anything_is_written(tmp_path: Path) -> None:
    from dataclasses import replace

    from autocompress.config import load_experiment
    from autocompress.tune import run_search

    exp = load_experiment(write_experiment(tmp_path, "x"))
    with pytest.raises(ConfigError, match="unknown search backend 'serail'") as e:
        run_search(replace(exp, search=replace(exp.search, backend="serail")),
                   tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert e.value.key == "search.backend"
    assert not (tmp_path / "mlflow.db").exists()
