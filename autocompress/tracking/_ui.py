"""The MLflow UI on a search's store, as a child process that stops with everything it started.

``mlflow ui`` starts a web server with workers and job consumers; stopping ``autocompress ui``
(Ctrl-C, SIGTERM, SIGHUP) stops all of them: SIGTERM to the server's process group and to
descendants that left it, SIGKILL to whatever is left after a grace period.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def serve_ui(tracking_uri: str, host: str, port: int) -> int:
    """Runs the MLflow UI on ``tracking_uri`` until it exits or this process gets Ctrl-C,
    SIGTERM or SIGHUP (``autocompress ui``).

    The server runs in a session of its own, and stopping stops all of it (``mlflow ui`` starts
    a web server with workers and job consumers): SIGTERM to the whole process group, SIGKILL
    to whatever is left after a grace period.

    Returns:
        The server's exit code when it exits by itself, else 128 + the signal's number (130 for
        Ctrl-C, 143 for SIGTERM, 129 for SIGHUP).
    """
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
           "--host", host, "--port", str(port)]
    # workflowType: MLflow 3.x opens experiments in its GenAI mode unless told otherwise.
    print(f"autocompress: MLflow UI on http://{host}:{port}/#/experiments?"
          "workflowType=machine_learning (Ctrl-C to stop)", file=sys.stderr)
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    # Only the main thread may set signal handlers (cmd_ui may be called from another one).
    previous = ({s: signal.getsignal(s) for s in handled}
                if threading.current_thread() is threading.main_thread() else {})

    def stop(signum: int, _frame) -> None:
        raise _UiStop(signum)

    child = None
    try:
        if previous:
            signal.signal(signal.SIGTERM, stop)
            signal.signal(signal.SIGHUP, stop)
        child = subprocess.Popen(cmd, start_new_session=True)
        code = child.wait()
        code = 128 - code if code < 0 else code  # killed by a signal sent to it alone
    except _UiStop as e:
        code = 128 + e.signum
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    finally:
        for signum in previous:  # a second signal must not cut the clean-up short
            signal.signal(signum, signal.SIG_IGN)
        try:
            if child is not None:  # also after the server exited: its workers may not have
                _stop_process_group(child)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    return code


class _UiStop(Exception):
    """A stop signal (SIGTERM, SIGHUP) arrived while ``autocompress ui`` waited on the server."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = int(signum)


_UI_GRACE_S = 8.0


def _stop_process_group(child, grace_s: float = _UI_GRACE_S) -> None:
    """Stops ``child`` (the leader of its own process group) and all its descendants.

    SIGTERM to the group and to descendants that left it; after ``grace_s`` seconds, SIGKILL
    to whatever still runs. Returns once the group is gone (or after the SIGKILL).
    """
    pgid = child.pid
    tree = _descendants(child.pid) if child.poll() is None else []
    _signal_tree(pgid, tree, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while child.poll() is None or _group_alive(pgid) or any(map(_running, tree)):
        if time.monotonic() > deadline:
            _signal_tree(pgid, [p for p in tree if _running(p)], signal.SIGKILL)
            break
        time.sleep(0.1)
    child.wait()


def _signal_tree(pgid: int, pids: list[int], signum: int) -> None:
    """Sends ``signum`` to process group ``pgid`` and to those of ``pids`` outside it."""
    try:
        os.killpg(pgid, signum)
    except OSError:  # the group is gone
        pass
    for pid in pids:
        try:
            if os.getpgid(pid) != pgid:
                os.kill(pid, signum)
        except OSError:
            pass


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (from ``/proc``; none where there is no ``/proc``)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        for children in Path(f"/proc/{todo.pop()}/task").glob("*/children"):
            try:
                kids = [int(k) for k in children.read_text().split()]
            except (OSError, ValueError):
                continue
            found += kids
            todo += kids
    return found


def _running(pid: int) -> bool:
    """Whether ``pid`` (one found in ``/proc``) still exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (OSError, IndexError):
        return False


def _group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` still has a member that is not a zombie."""
    if Path("/proc/self").exists():
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
