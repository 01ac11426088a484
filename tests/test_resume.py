"""Interrupted searches: SIGKILL of the driver, then --resume; Ctrl-C stops gracefully."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from autocompress import cli
from autocompress.tracking import ROLE, read_trials
from tests.searches import write_experiment

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
TRIALS = 5


def _experiment(tmp_path: Path) -> Path:
    return write_experiment(tmp_path, "resumable", sampler="tpe", trials=TRIALS, epochs=2)


def _start_search(path: Path, tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "autocompress", "search", str(path), "--tracking-uri",
         f"sqlite:///{tmp_path / 'mlflow.db'}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )


def _wait_for_finished_trials(db: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if db.exists():
            try:
                with sqlite3.connect(db) as con:
                    done = con.execute(
                        "select count(*) from runs r join tags t on r.run_uuid = t.run_uuid "
                        "where t.key = 'autocompress.role' and t.value = 'trial' "
                        "and r.status = 'FINISHED'").fetchone()[0]
                if done >= n:
                    return
            except sqlite3.OperationalError:
                pass  # tables not created yet, or locked
        time.sleep(0.5)
    pytest.fail(f"no {n} finished trials within {timeout} s")


def _runs(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("resumable")
    parents = client.search_runs([exp.experiment_id], f"tags.`{ROLE}` = 'search'")
    return client, parents


def test_sigkill_then_resume_keeps_every_finished_trial(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = _experiment(tmp_path)
    proc = _start_search(path, tmp_path)
    _wait_for_finished_trials(tmp_path / "mlflow.db", 1, proc)
    os.kill(proc.pid, signal.SIGKILL)  # the driver only; no chance to clean up
    proc.wait(timeout=30)

    client, parents = _runs(tmp_path)
    killed_children = read_trials(client, parents[0].info.run_id)
    finished_before = {r.info.run_id for r in killed_children if r.info.status == "FINISHED"}
    assert 1 <= len(finished_before) < TRIALS

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    assert cli.main(["search", str(path), "--resume", "--tracking-uri",
                     f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 0

    client, parents = _runs(tmp_path)
    assert len(parents) == 1, "resume must reuse the parent run"
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = read_trials(client, parent.info.run_id)
    statuses = [r.info.status for r in children]
    assert statuses.count("FINISHED") == TRIALS
    assert "RUNNING" not in statuses
    assert finished_before <= {r.info.run_id for r in children if r.info.status == "FINISHED"}
    names = [r.info.run_name for r in children]
    assert len(names) == len(set(names)), "no trial is logged twice"

    storage, _, name = parent.data.tags["autocompress.study"].partition("#")
    study = optuna.load_study(study_name=name, storage=storage)
    states = [t.state.name for t in study.trials]
    assert "RUNNING" not in states
    assert states.count("COMPLETE") >= TRIALS


def test_ctrl_c_stops_gracefully_and_says_how_to_resume(tmp_path: Path) -> None:
    path = _experiment(tmp_path)
    proc = _start_search(path, tmp_path)
    _wait_for_finished_trials(tmp_path / "mlflow.db", 1, proc)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err

    client, parents = _runs(tmp_path)
    assert parents[0].info.status == "KILLED"
    assert "RUNNING" not in [r.info.status for r in read_trials(client, parents[0].info.run_id)]
