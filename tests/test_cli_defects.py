"""Regression tests of command-line defects.

- A plan file that is not UTF-8 text is bad input (exit 2), not a traceback.
- A database tracking URI whose Python driver is not installed is bad input naming
  ``--tracking-uri`` and the package to install, and ``search`` refuses it before Ray starts.
- SIGTERM to ``autocompress ui`` stops the whole MLflow server, workers included.
- The experiments autocompress creates open in the MLflow UI as model-training experiments.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from autocompress import cli
from autocompress.tracking._writer import SearchTracker

ROOT = Path(__file__).resolve().parents[1]
KIND_TAG = "mlflow.experimentKind"
KIND = "custom_model_development"
BASELINE = {"accuracy": 0.95, "size_bytes": 1000.0, "latency_ms": 1.0, "p90_ms": 1.2}
OBJECTIVES = [("accuracy", "max"), ("size_bytes", "min")]

# A database store whose SQLAlchemy dialect needs a driver this environment lacks.
_STORES = [("mysql://u:secret@127.0.0.1:1/db", "MySQLdb", "mysqlclient"),
           ("mysql+pymysql://u:secret@127.0.0.1:1/db", "pymysql", "PyMySQL"),
           ("postgresql+psycopg2://u:secret@127.0.0.1:1/db", "psycopg2", "psycopg2-binary"),
           ("mssql+pymssql://u:secret@127.0.0.1:1/db", "pymssql", "pymssql")]
MISSING = next(((uri, package) for uri, module, package in _STORES
                if importlib.util.find_spec(module) is None), None)
needs_missing_driver = pytest.mark.skipif(MISSING is None,
                                          reason="every database driver is installed")


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("autocompress: error: ")
    return err[0]


def test_a_plan_that_is_not_utf8_text_is_bad_input(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def no_task(*_args, **_kwargs):
        raise AssertionError("the plan must be read before the task is loaded")

    monkeypatch.setattr("autocompress.tasks.load_task", no_task)
    plan = tmp_path / "bad.json"
    plan.write_bytes(b"\xff\xfe\x00")

    code = cli.main(["trial", "--task", "digits", "--plan", str(plan)])

    line = _error_line(capsys)
    assert code == 2, line
    assert str(plan) in line
    assert "not a UTF-8 text file" in line


@needs_missing_driver
@pytest.mark.parametrize("command", ["pareto", "report"])
def test_a_store_without_its_driver_is_bad_input(command: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    uri, package = MISSING
    monkeypatch.chdir(tmp_path)

    code = cli.main([command, "x", "--tracking-uri", uri])

    line = _error_line(capsys)
    assert code == 2, line
    assert "--tracking-uri" in line
    assert f"pip install {package}" in line
    assert "secret" not in line  # the password is not printed


@needs_missing_driver
def test_search_refuses_a_store_without_its_driver_before_starting_ray(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def no_ray(*_args, **_kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr("autocompress.tune._ray_backend._connect_ray", no_ray)
    monkeypatch.chdir(tmp_path)
    uri, package = MISSING
    exp = tmp_path / "exp.yaml"  # the tiny task builds in a second; digits trains a baseline
    exp.write_text(yaml.safe_dump({
        "name": "no-driver", "task": "tests.models:tiny_task",
        "search_space": str(ROOT / "search_spaces" / "default.yaml"),
        "objectives": [{"metric": "accuracy"}, {"metric": "size_bytes"}],
        "search": {"trials": 2}, "finetune": {"epochs": 1}}))

    code = cli.main(["search", str(exp), "--tracking-uri", uri])

    line = _error_line(capsys)
    assert code == 2, line
    assert "--tracking-uri" in line and f"pip install {package}" in line
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "optuna.db").exists()


def test_new_experiments_open_as_model_training(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    SearchTracker.start(uri, "kind-new", {"task": "t"}, BASELINE, OBJECTIVES, echo=lambda _: None)

    assert MlflowClient(uri).get_experiment_by_name("kind-new").tags.get(KIND_TAG) == KIND


def test_existing_experiments_get_the_kind_unless_they_have_one(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_experiment("untagged")
    client.create_experiment("chosen", tags={KIND_TAG: "genai_development"})

    for name in ("untagged", "chosen"):
        SearchTracker.start(uri, name, {"task": "t"}, BASELINE, OBJECTIVES, echo=lambda _: None)

    assert client.get_experiment_by_name("untagged").tags.get(KIND_TAG) == KIND
    assert client.get_experiment_by_name("chosen").tags.get(KIND_TAG) == "genai_development"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for children in Path(f"/proc/{todo.pop()}/task").glob("*/children"):
            try:
                kids = [int(k) for k in children.read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def _running(pid: int) -> bool:
    """Exists and is not a zombie (an orphan's zombie waits on init, which we do not control)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_sigterm_to_ui_stops_the_whole_mlflow_server(tmp_path: Path) -> None:
    port = _free_port()
    exe = Path(sys.executable).with_name("autocompress")
    ui = subprocess.Popen([str(exe), "ui", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
                           "--port", str(port)], cwd=tmp_path,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tree: list[int] = []
    try:
        deadline = time.monotonic() + 600  # 35 s idle; 225 s seen beside a Ray test on 2 cores
        while True:
            assert ui.poll() is None, f"autocompress ui exited with {ui.returncode}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the MLflow UI never answered"
                time.sleep(0.5)
        tree = _descendants(ui.pid)
        assert tree, "no MLflow server process below autocompress ui"

        ui.send_signal(signal.SIGTERM)

        assert ui.wait(timeout=20) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 5
        while any(map(_running, tree)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in tree if _running(p)], "MLflow server processes outlived the UI"
    finally:
        for pid in [ui.pid, *tree]:
            if _running(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        ui.wait()


def test_help_lists_what_the_registries_hold(capsys) -> None:
    """``--help`` names every registered built-in task, sampler and export format (it listed
    the tasks of two releases ago), and the ``--task`` help of every command does too."""
    from autocompress.deploy import FORMATS
    from autocompress.tasks import list_tasks
    from autocompress.tune._samplers import sampler_names

    for argv in (["--help"], ["search", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        text = " ".join(capsys.readouterr().out.split())
        for name in (*list_tasks(), *sampler_names(), *FORMATS):
            assert name in text, (argv, name)
    for command in ("layers", "sensitivity", "trial"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert all(name in text for name in list_tasks()), command
