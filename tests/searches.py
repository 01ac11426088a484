"""Small real searches for the end-to-end tests: an experiment file, a real MLflow tracking
server, and reading MLflow back."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from mlflow.tracking import MlflowClient

from autocompress.tracking import ROLE, read_trials

ROOT = Path(__file__).resolve().parents[1]
FAST_TARGET = {"warmup": 1, "min_runs": 3, "max_runs": 5, "budget_s": 0.01}


def write_experiment(directory: Path, name: str, *, task: str = "tests.models:tiny_task",
                     search_space: str | dict | None = None, sampler: str = "random",
                     trials: int = 4, concurrency: int = 2, seed: int = 0, epochs: int = 1,
                     backend: str = "ray", **extra: Any) -> Path:
    """Writes ``<directory>/<name>.yaml``: a fast search, accuracy vs size, short timing.

    Args:
        search_space: A mapping, a path, or None for ``search_spaces/default.yaml``.
        backend: ``search.backend``: ``ray`` or ``serial`` (in the test's process, no Ray).
        extra: Further top-level keys (e.g. ``constraints``), or replacements.
    """
    exp = {
        "name": name, "task": task,
        "search_space": search_space or str(ROOT / "search_spaces" / "default.yaml"),
        "objectives": [{"metric": "accuracy"}, {"metric": "size_bytes"}],
        "target": FAST_TARGET,
        "search": {"sampler": sampler, "trials": trials, "concurrency": concurrency, "seed": seed,
                   "backend": backend},
        "finetune": {"epochs": epochs},
        **extra,
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def logged_search(uri: str, name: str) -> tuple[MlflowClient, Any, list]:
    """``(client, parent run, trial runs oldest first)`` of the only search of experiment ``name``."""
    client = MlflowClient(uri)
    parents = client.search_runs([client.get_experiment_by_name(name).experiment_id],
                                 f"tags.`{ROLE}` = 'search'")
    assert len(parents) == 1, f"expected one search, found {len(parents)}"
    return client, parents[0], read_trials(client, parents[0].info.run_id)


def free_ports(n: int) -> list[int]:
    """``n`` different TCP ports free on the loopback interface now.

    All are bound at once: ports picked one after another can repeat, since the kernel may
    hand out a port again as soon as the socket that held it is closed.
    """
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    return free_ports(1)[0]


@contextlib.contextmanager
def mlflow_server(root: Path, timeout: float = 300) -> Iterator[str]:
    """A real ``mlflow server`` (SQLite backend, proxied artifacts under ``root``) on a free
    loopback port; yields its URL and stops it on exit."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("mlflow server exited at start-up") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start within {timeout:.0f} s") from None
                time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
