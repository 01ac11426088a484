"""A search through Ray Client (``--address ray://HOST:PORT``).

The end-to-end test runs the command line as a user would, against a real Ray head node with
a Ray Client server and a real ``mlflow server``, both started on this machine for the test:
a search is interrupted (SIGINT, as Ctrl-C sends) after its first trial, then resumed through
the same path. Its task module exists only in the project directory the command runs from, so
the trials can import it only if the working directory was shipped to the cluster.

The Ray head is isolated from any other Ray on this machine: its own temporary directory
(where ``ray start`` also records its address), its own ports and token authentication with
a token of its own; only the processes it started are stopped (never ``ray stop``).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from autocompress import cli
from autocompress.config import ConfigError
from autocompress.tracking import TRIAL_METRICS
from autocompress.tune._ray_client import client_address, study_storage_for
from tests.searches import free_ports, logged_search, mlflow_server, write_experiment

ROOT = Path(__file__).resolve().parents[1]
TRIALS = 4
NAME = "through-ray-client"


# --- fast: what is refused or decided before connecting --------------------------------------


def test_study_storage_is_one_file_per_tracking_server_that_outlives_the_job(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOCOMPRESS_STUDY_DIR", str(tmp_path / "studies"))
    assert study_storage_for("http://10.0.0.5:5000") == f"sqlite:///{tmp_path}/studies/10.0.0.5-5000.db"
    assert (tmp_path / "studies").is_dir()
    assert study_storage_for("https://mlflow.example.com/team/", tmp_path).endswith(
        "/mlflow.example.com-team.db")
    assert study_storage_for("databricks", tmp_path) == f"sqlite:///{tmp_path}/databricks.db"
    monkeypatch.delenv("AUTOCOMPRESS_STUDY_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert study_storage_for("http://h:1") == f"sqlite:///{tmp_path}/home/.autocompress/optuna/h-1.db"


def test_ray_client_addresses_come_from_address_or_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert client_address("ray://head:10001") == "ray://head:10001"
    assert client_address("auto") is None and client_address("10.0.0.1:6379") is None
    assert client_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert client_address(None) == "ray://head:10001"
    assert client_address("auto") is None  # --address wins


def test_missing_ray_client_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "grpc" else find_spec(name, *a))
    monkeypatch.chdir(tmp_path)
    exp = write_experiment(tmp_path, "no-grpc")
    code = cli.main(["search", str(exp), "--address", "ray://127.0.0.1:1",
                     "--tracking-uri", "http://127.0.0.1:1"])
    err = capfd.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "--address" in err and 'pip install "autocompress[cluster]"' in err
    assert list(tmp_path.iterdir()) == [exp]


def test_run_search_itself_still_refuses_ray_client_addresses() -> None:
    from autocompress.tune._ray import _check_address

    with pytest.raises(ConfigError) as e:
        _check_address("ray://head:10001")
    assert e.value.key == "--address"


# --- slow: a real cluster and a real tracking server ------------------------------------------


def _ray_processes(marker: str) -> list[int]:
    """The processes whose command line contains ``marker`` (our Ray's temporary directory)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


@contextlib.contextmanager
def ray_head(env: dict[str, str], num_cpus: int = 3, timeout: float = 90) -> Iterator[str]:
    """A Ray head node with a Ray Client server (``ray start --head --block``); yields its
    ``ray://`` address. Stops exactly the processes it started, also when the test fails."""
    # Short: Ray's Unix socket paths under it must stay within 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="acray-", dir="/tmp"))
    options = ("port", "node-manager-port", "object-manager-port", "runtime-env-agent-port",
               "dashboard-agent-grpc-port", "dashboard-agent-listen-port", "metrics-export-port")
    client_port, *ports = free_ports(1 + len(options))  # all different
    ray = Path(sys.executable).with_name("ray")
    cmd = [str(ray) if ray.exists() else "ray", "start", "--head", "--block",
           "--disable-usage-stats", "--include-dashboard=false", f"--num-cpus={num_cpus}",
           f"--temp-dir={temp}", f"--ray-client-server-port={client_port}"]
    cmd += [f"--{option}={port}" for option, port in zip(options, ports, strict=True)]
    log = (temp / "ray-start.log").open("w")
    proc = subprocess.Popen(cmd, env=env, cwd=temp, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", client_port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ray start failed: {(temp / 'ray-start.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield f"ray://127.0.0.1:{client_port}"
    finally:
        if proc.poll() is None:
            proc.terminate()  # `ray start --block` drains the node and stops what it started
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for pid in _ray_processes(str(temp)):  # e.g. workers in a session of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


class _Lines:
    """Collects a process's stderr lines in a thread; ``wait_for`` a pattern."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.lines.append("")  # end of stream
            self.changed.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(
                lambda: any(re.search(pattern, x) for x in self.lines) or "" in self.lines, timeout)

    @property
    def text(self) -> str:
        return "".join(self.lines)


@pytest.mark.slow
def test_search_through_ray_client_interrupt_and_resume(tmp_path: Path) -> None:
    project = tmp_path / "project"  # the user's directory: the task module lives only here
    project.mkdir()
    shutil.copy(ROOT / "tests" / "models.py", project / "rc_models.py")
    (project / "mlflow.db").write_bytes(b"not shipped")  # excluded from the working directory
    exp = write_experiment(project, NAME, task="rc_models:tiny_task", trials=TRIALS,
                           concurrency=2, epochs=2)
    studies = tmp_path / "studies"
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(auth, PYTHONPATH=str(ROOT))
    head_env = {**env, "AUTOCOMPRESS_STUDY_DIR": str(studies)}

    with mlflow_server(tmp_path / "mlflow") as uri, ray_head(head_env) as address:
        argv = [sys.executable, "-m", "autocompress", "search", str(exp), "--address", address,
                "--tracking-uri", uri]
        proc = subprocess.Popen(argv, cwd=project, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            err = _Lines(proc.stderr)
            assert err.wait_for(rf"\[1/{TRIALS} done", timeout=180), err.text
            os.kill(proc.pid, signal.SIGINT)  # Ctrl-C
            try:
                assert proc.wait(timeout=150) == 130, err.text
            except subprocess.TimeoutExpired:
                pytest.fail(f"still running 150 s after SIGINT:\n{err.text}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.thread.join(timeout=10)
        assert "stopping the search on the cluster" in err.text
        assert "interrupted:" in err.text, err.text  # run_search stopped gracefully there
        assert f"--resume --address {address} --tracking-uri {uri}" in err.text

        _, parent, trials = logged_search(uri, NAME)
        assert parent.info.status == "KILLED"
        finished_before = sum(t.info.status == "FINISHED" for t in trials)
        assert 1 <= finished_before < TRIALS
        study = parent.data.tags["autocompress.study"]
        assert study.startswith(f"sqlite:///{studies}/127.0.0.1-"), study

        resumed = subprocess.run([*argv, "--resume"], cwd=project, env=env, capture_output=True,
                                 text=True, timeout=240)
        assert resumed.returncode == 0, resumed.stderr
        assert f"resuming search {parent.info.run_id}" in resumed.stderr
        assert f"search {NAME!r} finished: {TRIALS} trials finished" in resumed.stdout
        assert "Pareto front" in resumed.stdout

        client, parent, trials = logged_search(uri, NAME)
        assert parent.info.status == "FINISHED"
        assert parent.data.tags["autocompress.study"] == study  # the same Optuna study
        finished = [t for t in trials if t.info.status == "FINISHED"]
        assert len(finished) == TRIALS
        assert {t.info.status for t in trials} <= {"FINISHED", "KILLED"}
        for run in finished:
            assert set(TRIAL_METRICS) <= set(run.data.metrics)
            files = {f.path for f in client.list_artifacts(run.info.run_id)}
            assert {"plan.json", "model.pt"} <= files, files

    assert Path(study.removeprefix("sqlite:///").partition("#")[0]).is_file()
    # Only a client: nothing of the search was written in the project directory.
    assert sorted(p.name for p in project.iterdir()) == sorted(["rc_models.py", "mlflow.db",
                                                                exp.name])
