"""Runs a search on a Ray cluster through Ray Client (``--address ray://HOST:PORT``).

With Ray Client this process is only a client: Ray Tune would run its driver, and with it our
driver-side MLflow callback (the search's only MLflow writer) and the Optuna study, on the
cluster anyway. So the whole search goes there, as it would with ``ray job submit``: this
module connects through Ray Client, ships the working directory (the user's task code) with
Ray's ``runtime_env={"working_dir": ...}`` and runs :func:`autocompress.search.run_search` as
one Ray task (``num_cpus=0``) on the node that runs the Ray Client server, the head node. That
task is the driver of the search (``address="auto"``: it is already inside the cluster); the
trials run wherever Ray puts them, as with ``--address auto``.

What follows from it, and is checked before anything is written:

- The MLflow store must be reachable from the cluster: only a tracking server (``http://``,
  ``https://``, ``databricks``) is accepted, and the head node must be able to reach it.
- The Optuna study lives on the head node, in a directory that outlives the job (the job's
  working directory is a fresh temporary one each time), so that ``--resume`` finds it:
  ``$AUTOCOMPRESS_STUDY_DIR`` on the head node, default ``~/.autocompress/optuna``, one SQLite
  file per tracking server (see :func:`study_storage_for`).
- Progress lines (everything the search writes to stdout and stderr on the cluster) come back
  through a small actor and are printed to stderr here as they arrive, so that ``--json``
  output on stdout stays parseable.
- Ctrl-C cancels the task, which makes the search stop gracefully there (open runs end as
  KILLED, the search is resumable); a second Ctrl-C disconnects at once, which ends the job
  like ``kill -9`` would (also resumable).

The client must stay connected for the whole search: when it goes away, so does the job.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from autocompress._errors import ConfigError
from autocompress.config import Experiment
from autocompress.tune._ray import host_port
from autocompress.tune._result import SearchResult
from autocompress.tune._stream import Forward, Progress

CLIENT_SCHEME = "ray://"

# MLflow tracking URIs the cluster can write to and this machine can read back.
SERVER_URI_PREFIXES = ("http://", "https://", "databricks")

# Not shipped to the cluster with the working directory, besides what .gitignore/.rayignore
# and Ray's own defaults (.git, .venv, venv, __pycache__) leave out: local MLflow and Optuna
# stores, the search's own state, caches. Ray refuses a package of 512 MiB or more.
WORKING_DIR_EXCLUDES = [
    ".git", ".venv", "venv", "__pycache__", "*.pyc", ".autocompress", "mlruns", "mlartifacts",
    "*.db", "*.db-journal", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis", ".tox",
    ".nox", "node_modules", "*.egg-info", ".ipynb_checkpoints",
]

STUDY_DIR_ENV = "AUTOCOMPRESS_STUDY_DIR"

# How long to wait, after Ctrl-C, for the search on the cluster to end its runs.
STOP_GRACE_S = 120.0


def client_address(address: str | None) -> str | None:
    """The Ray Client address a search should go through, or None for a direct one.

    Args:
        address: ``--address``; when None, ``$RAY_ADDRESS`` (which ``ray.init`` would use).
    """
    address = address or os.environ.get("RAY_ADDRESS")
    return address if address and address.startswith(CLIENT_SCHEME) else None


def run_remote_search(exp: Experiment, *, tracking_uri: str, address: str | None = None,
                      resume: bool = False,
                      echo: Callable[[str], None] | None = None) -> SearchResult:
    """Runs :func:`~autocompress.search.run_search` of ``exp`` on the cluster at ``address``.

    Same contract as ``run_search``: a :class:`ConfigError` leaves no trace in MLflow, and an
    interrupted search (``KeyboardInterrupt``) keeps its finished trials and can be resumed
    the same way (``resume=True`` with the same address and tracking URI).

    Args:
        exp: The validated experiment; it is sent to the cluster as it is.
        tracking_uri: An MLflow tracking server both this machine and the cluster reach.
        address: ``ray://HOST:PORT`` of the cluster's Ray Client server (default
            ``$RAY_ADDRESS``).
        resume: Continue the latest search of ``exp.name``.
        echo: Progress output of this side; default prints to stderr. The search's own output
            (from the cluster, stdout and stderr) goes to this process's stderr.

    Returns:
        The search's result, rebuilt here from plain data.

    Raises:
        ConfigError: Not a tracking server, a bad or unreachable address, Ray Client not
            installed, a cluster that cannot reach the tracking server, or any error
            ``run_search`` raises on the cluster (bad task, search space, nothing to resume).
        KeyboardInterrupt: The search was interrupted (Ctrl-C).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    echo = echo or (lambda msg: print(f"autocompress: {msg}", file=sys.stderr, flush=True))
    address = client_address(address)
    if address is None:
        raise ConfigError("expected a Ray Client address, ray://HOST:PORT", key="--address")
    check_tracking_uri(tracking_uri)
    check_client_address(address)
    server_host = urllib.parse.urlsplit(tracking_uri).hostname or ""
    if _is_loopback_host(server_host) and not _is_loopback_host(host_port(address[len(CLIENT_SCHEME):])[0]):
        echo(f"warning: the cluster must reach the tracking server at {tracking_uri}, which is a "
             f"loopback address; it resolves to the head node there, not to this machine")
    try:
        _connect(address, echo)
        # With Ray Client, "this node" is the node of the Ray Client server: the head node.
        head = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        progress = ray.remote(num_cpus=0)(Progress).options(scheduling_strategy=head).remote()
        task = ray.remote(num_cpus=0, max_retries=0)(_search_on_cluster)
        echo(f"running the search on the head node of the cluster at {address}")
        ref = task.options(scheduling_strategy=head).remote(exp, tracking_uri, resume, progress)
        interrupted, started = _follow(ref, progress, echo)
        if interrupted and not started:
            raise KeyboardInterrupt
        if interrupted:
            where = f" {exp.path}" if exp.path else ""
            echo(f"resume through the cluster with: autocompress search{where} --resume "
                 f"--address {address} --tracking-uri {tracking_uri}")
            raise KeyboardInterrupt
        try:
            plain = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, ConfigError):
                raise e.cause from None
            raise
    finally:
        ray.shutdown()
    return SearchResult(exp, plain["parent_run_id"], plain["baseline"],
                        pd.DataFrame(**plain["trials"]), pd.DataFrame(**plain["front"]),
                        plain["study_storage"], plain["study_name"])


def check_tracking_uri(tracking_uri: str) -> None:
    """Refuses an MLflow store the cluster cannot write to and this machine cannot read back.

    Raises:
        ConfigError: A ``sqlite:///``, ``file:`` or plain path store.
    """
    if tracking_uri.startswith(SERVER_URI_PREFIXES):
        return
    raise ConfigError(
        f"{tracking_uri!r} is a store on this machine, but a search through Ray Client "
        f"(ray://) runs on the cluster, which cannot write to it; start an MLflow tracking "
        f"server that both reach (mlflow server --backend-store-uri sqlite:///mlflow.db "
        f"--artifacts-destination ./mlartifacts --host 0.0.0.0 --port 5000) and pass "
        f"--tracking-uri http://SERVER:5000", key="--tracking-uri")


def check_client_address(address: str) -> None:
    """Refuses a Ray Client address that cannot work, before connecting.

    Raises:
        ConfigError: Ray Client is not installed, ``address`` is not ``ray://HOST:PORT``, or
            nothing listens there (probed with a plain TCP connection: Ray Client itself
            retries for a long time).
    """
    if importlib.util.find_spec("grpc") is None:
        raise ConfigError(f"{address}: Ray Client needs grpcio, which is not installed; "
                          f'pip install "autocompress[cluster]"', key="--address")
    host, port = host_port(address[len(CLIENT_SCHEME):])
    if not host or port is None:
        raise ConfigError(f"{address!r} is not a Ray Client address; allowed: ray://HOST:PORT of "
                          f"the head node's Ray Client server (e.g. ray://10.0.0.1:10001)",
                          key="--address")
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as e:
        raise ConfigError(f"cannot reach a Ray Client server at {address} ({e.strerror or e}); "
                          f"start the head node with 'ray start --head --ray-client-server-port "
                          f"{port}' or give its ray://HOST:PORT", key="--address") from None


def study_storage_for(tracking_uri: str, directory: str | os.PathLike | None = None) -> str:
    """The Optuna storage of the searches run through Ray Client against ``tracking_uri``.

    One SQLite file per tracking server (each search has its own study in it), in
    ``directory``, default ``$AUTOCOMPRESS_STUDY_DIR`` or ``~/.autocompress/optuna``; created
    if missing. Evaluated on the head node. ``run_search`` records the URL in the parent run
    (tag ``autocompress.study``), and ``--resume`` reads it from there.

    Example:
        >>> study_storage_for("http://10.0.0.5:5000", "/srv/studies")
        'sqlite:////srv/studies/10.0.0.5-5000.db'
    """
    if directory is None:
        directory = os.environ.get(STUDY_DIR_ENV) or Path.home() / ".autocompress" / "optuna"
    parsed = urllib.parse.urlsplit(tracking_uri)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{parsed.netloc}{parsed.path}" or tracking_uri)
    name = name.strip("-.") or "mlflow"
    folder = Path(directory).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / name}.db"


# --- on the cluster ----------------------------------------------------------------------------


def _search_on_cluster(exp: Experiment, tracking_uri: str, resume: bool,
                       progress: Any) -> dict[str, Any]:
    """The Ray task: runs the search here, on the head node, and returns its result as plain data.

    Its working directory is the shipped copy of the client's one, which is also on
    ``sys.path``, so the task module imports as it did on the client.
    """
    import ray

    from autocompress.tune import _driver as search

    ray.get(progress.start.remote())
    out = Forward(progress, sys.stdout)
    err = Forward(progress, sys.stderr)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            _check_reachable(tracking_uri)
            # Not .autocompress/optuna.db of the working directory: on the cluster that is the
            # job's temporary copy, which a later --resume (a new job) would not find.
            result = search.run_search(exp, tracking_uri=tracking_uri, address="auto",
                                       resume=resume, study_storage=study_storage_for(tracking_uri))
        return {"parent_run_id": result.parent_run_id, "baseline": dict(result.baseline),
                "trials": result.trials.to_dict("split"), "front": result.front.to_dict("split"),
                "study_storage": result.study_storage, "study_name": result.study_name}
    finally:
        out.flush()
        err.flush()
        ray.get(progress.close.remote())


def _check_reachable(tracking_uri: str) -> None:
    """Refuses a tracking server this node cannot reach (any HTTP answer will do)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=10).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise ConfigError(f"the cluster's head node ({socket.gethostname()}) cannot reach the "
                          f"MLflow tracking server at {tracking_uri} ({reason}); give one it can "
                          f"reach", key="--tracking-uri") from None


# --- on the client ----------------------------------------------------------------------------


def _connect(address: str, echo: Callable[[str], None], attempts: int = 3) -> None:
    """Connects through Ray Client, shipping the working directory to the cluster.

    The Ray Client server starts one process per connection, and that start fails now and then
    (ray-project/ray#63202: forking the multi-threaded gRPC proxy); nothing runs on the cluster
    yet at that point, so the connection is simply tried again.
    """
    import ray

    runtime_env = {"working_dir": os.getcwd(), "excludes": WORKING_DIR_EXCLUDES}
    for attempt in range(1, attempts + 1):
        try:
            with warnings.catch_warnings():  # Ray Client warns of a timeout before it raises it
                warnings.simplefilter("ignore")
                ray.init(address, runtime_env=runtime_env, log_to_driver=False,
                         logging_level=logging.ERROR)
            return
        except ImportError as e:  # Ray Client's own check for grpcio
            raise ConfigError(f"{address}: Ray Client is not installed ({e}); "
                              f'pip install "autocompress[cluster]"', key="--address") from None
        except ConnectionAbortedError as e:  # the server's session failed to start
            if attempt == attempts:
                message = re.sub(r"\s+", " ", str(e)).strip()
                raise ConfigError(f"the Ray Client server at {address} failed to start a session "
                                  f"{attempts} times: {message}", key="--address") from None
            echo(f"the Ray Client server at {address} failed to start a session; trying again")
            ray.shutdown()
        except ConnectionError as e:
            raise ConfigError(f"cannot connect to the Ray Client server at {address} ({e}); if "
                              f"the cluster uses token authentication, set RAY_AUTH_MODE=token "
                              f"and RAY_AUTH_TOKEN (or ~/.ray/auth_token) here too",
                              key="--address") from None
        except (RuntimeError, ValueError) as e:
            # Python or Ray version mismatch, a working directory too large to ship
            # (RuntimeEnvSetupError is a RuntimeError).
            message = re.sub(r"\s+", " ", str(e)).strip()
            raise ConfigError(f"cannot run a search through Ray Client at {address}: "
                              f"{type(e).__name__}: {message}", key="--address") from None


def _follow(ref: Any, progress: Any, echo: Callable[[str], None]) -> tuple[bool, bool]:
    """Prints the search's output until its task ends.

    The first Ctrl-C cancels the task (a ``KeyboardInterrupt`` there, which ``run_search``
    turns into a graceful stop) and waits for it to end its runs; a second one stops waiting.
    Ctrl-C only sets a flag that the loop checks between calls: a ``KeyboardInterrupt`` in the
    middle of a Ray Client call can leave the connection hanging.

    Returns:
        ``(interrupted, started)``: whether Ctrl-C was pressed, and whether the task had started
        running on the cluster.
    """
    import ray

    stop = threading.Event()

    def on_sigint(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # the second Ctrl-C
        stop.set()

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if main else None
    cancelled_at: float | None = None
    started = False
    try:
        while True:
            if stop.is_set() and cancelled_at is None:
                cancelled_at = time.monotonic()
                echo("stopping the search on the cluster (Ctrl-C again to disconnect at once)")
                ray.cancel(ref, recursive=False)
            chunks, started, closed = ray.get(progress.take.remote())
            _write(chunks)
            if closed:
                return cancelled_at is not None, started
            ready, _ = ray.wait([ref], timeout=0.5)
            if ready:
                if cancelled_at is None or not started:  # ended, or never ran
                    chunks, started, _ = ray.get(progress.take.remote())
                    _write(chunks)
                    return cancelled_at is not None, started
                time.sleep(0.5)  # a cancelled task's result is ready at once; wait for close()
            if cancelled_at is not None and time.monotonic() - cancelled_at > STOP_GRACE_S:
                echo(f"the search on the cluster did not stop within {STOP_GRACE_S:.0f} s; "
                     f"disconnecting ends it")
                return True, started
    except KeyboardInterrupt:
        echo("disconnecting: the search on the cluster ends with this client")
        return True, started
    finally:
        if main:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def _write(chunks: list[str]) -> None:
    for text in chunks:
        sys.stderr.write(text)
    sys.stderr.flush()


def _is_loopback_host(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host == "::1"
