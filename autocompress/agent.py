"""The remote device agent: times ONNX models on the machine it runs on, over HTTP.

Run it on the deployment machine (it needs only ``onnxruntime`` and ``numpy``: the
``autocompress[agent]`` extra; it never imports torch)::

    autocompress agent --host 0.0.0.0 --port 8765 --token-file ~/.autocompress-token

and point an experiment at it with ``target: {device: remote, url: http://HOST:8765,
token_env: AUTOCOMPRESS_AGENT_TOKEN}``.

Endpoints (every request needs ``Authorization: Bearer TOKEN``, else 401):

- ``GET /info``: device facts (CPU model, cores, runtime versions, platform) as JSON.
- ``POST /measure?threads=T&batch_size=B[&warmup=&min_runs=&max_runs=&budget_s=&rel_ci=&min_time_s=
  &fold_weight_qdq=0|1]`` with the raw ONNX model as the body: the timings as JSON
  (``latency_ms`` median, ``p90_ms``, ``iqr_ms``, ``runs``, ``ci_low_ms``, ``ci_high_ms``,
  ``threads``, ``batch_size``, ``stopped``), by the protocol of
  :mod:`autocompress.measure._timing`.

Errors are JSON ``{"error": ...}``: 400 bad model or settings, 401 bad or missing token, 404
unknown path, 411 no Content-Length, 413 upload too large, 503 busy (one measurement runs at a
time and at most ``--queue`` wait), 504 measurement took longer than ``--timeout-s``. The body
is parsed only by ONNX Runtime (never unpickled or executed as code); the agent keeps serving
after any bad request.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import platform
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DEFAULT_MAX_UPLOAD_MB = 256.0
DEFAULT_QUEUE = 2
DEFAULT_TIMEOUT_S = 120.0
MAX_BUDGET_S = 60.0
MAX_RUNS = 100_000

# name: (type, low, high): what a request may ask for. The defaults of the timing settings are
# TimingSettings' own, so a measurement here follows the same protocol as a local one.
SETTINGS: dict[str, tuple[type, float, float]] = {
    "threads": (int, 1, 1024),
    "batch_size": (int, 1, 65536),
    "warmup": (int, 0, 10_000),
    "min_runs": (int, 1, MAX_RUNS),
    "max_runs": (int, 1, MAX_RUNS),
    "budget_s": (float, 1e-6, MAX_BUDGET_S),
    "rel_ci": (float, 0.0, 0.999),
    "min_time_s": (float, 0.0, MAX_BUDGET_S),
    "fold_weight_qdq": (int, 0, 1),
}


def _defaults() -> dict[str, Any]:
    from autocompress.measure._timing import TimingSettings

    return {"threads": 1, "batch_size": 1, "fold_weight_qdq": 0,
            **{k: min(v, SETTINGS[k][2]) for k, v in TimingSettings().to_dict().items()}}


class BadRequest(Exception):
    """A client error; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def parse_settings(query: str) -> dict[str, Any]:
    """The measurement settings of a ``/measure`` query string (BadRequest when invalid)."""
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query),
                                       max_num_fields=len(SETTINGS))
    except ValueError as e:
        raise BadRequest(f"bad query string: {e}") from None
    out = _defaults()
    seen: set[str] = set()
    for key, raw in pairs:
        if key not in SETTINGS:
            raise BadRequest(f"unknown setting {key!r}; allowed: {sorted(SETTINGS)}")
        if key in seen:
            raise BadRequest(f"setting {key!r} given twice")
        seen.add(key)
        kind, low, high = SETTINGS[key]
        try:
            value = int(raw) if kind is int else float(raw)
        except ValueError:
            raise BadRequest(f"{key}={raw!r}; allowed: {'an integer' if kind is int else 'a number'} "
                             f"from {low:g} to {high:g}") from None
        if not low <= value <= high:  # also refuses NaN
            raise BadRequest(f"{key}={raw!r}; allowed: from {low:g} to {high:g}")
        out[key] = value
    from autocompress.measure._timing import TimingSettings

    try:
        TimingSettings.from_mapping(out)  # the protocol's own checks (max_runs >= min_runs, ...)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    return out


def device_facts() -> dict[str, Any]:
    """CPU model, cores, runtime versions and platform of this machine."""
    import numpy as np
    import onnxruntime as ort

    from autocompress.measure._machine import cpu_model

    cpu = cpu_model()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    return {"cpu": cpu, "cores": os.cpu_count() or 0, "usable_cores": usable,
            "onnxruntime": ort.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "machine": platform.machine(), "providers": ",".join(ort.get_available_providers())}


def _inputs(session: Any, batch_size: int) -> dict[str, Any]:
    """Random inputs of the model's declared shapes (a dynamic first dim becomes ``batch_size``)."""
    import numpy as np

    rng = np.random.default_rng(0)
    dtypes = {"tensor(float)": np.float32, "tensor(double)": np.float64,
              "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32}
    feed = {}
    for inp in session.get_inputs():
        if inp.type not in dtypes:
            raise BadRequest(f"input {inp.name!r} has type {inp.type}; supported: {sorted(dtypes)}")
        shape = []
        for axis, dim in enumerate(inp.shape):
            if isinstance(dim, int) and dim > 0:
                if axis == 0 and dim != batch_size:
                    raise BadRequest(f"input {inp.name!r} has a fixed batch dimension {dim}, but "
                                     f"batch_size={batch_size}")
                shape.append(dim)
            elif axis == 0:
                shape.append(batch_size)
            else:
                raise BadRequest(f"input {inp.name!r} has a dynamic dimension {dim!r} at axis "
                                 f"{axis}; export the model with a fixed shape there")
        dtype = dtypes[inp.type]
        if np.issubdtype(dtype, np.floating):
            feed[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feed[inp.name] = np.zeros(shape, dtype=dtype)
    return feed


def measure(model: bytes, settings: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Times the ONNX ``model`` bytes with ``settings`` (TimeoutError past ``timeout_s``)."""
    import onnxruntime as ort

    from autocompress.measure._timing import TimingSettings, time_runs
    from autocompress.measure.runtimes._ort import session_options

    opts = session_options(settings["threads"], bool(settings["fold_weight_qdq"]))
    try:
        session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises several types for malformed models
        raise BadRequest(f"not a loadable ONNX model: {str(e).strip()[:500]}") from None
    feed = _inputs(session, settings["batch_size"])
    run_options = ort.RunOptions()
    expired = threading.Event()

    def stop() -> None:
        expired.set()
        run_options.terminate = True  # makes the running (and every later) session.run fail

    timer = threading.Timer(timeout_s, stop)
    timer.daemon = True
    timer.start()
    try:
        session.run(None, feed, run_options)  # a first run surfaces shape / kernel errors as 400
    except Exception as e:
        timer.cancel()
        if expired.is_set():
            raise TimeoutError(f"measurement took longer than {timeout_s:g} s") from None
        raise BadRequest(f"the model does not run: {str(e).strip()[:500]}") from None
    try:
        t = time_runs(lambda: session.run(None, feed, run_options),
                      TimingSettings.from_mapping(settings))
    except Exception:
        if expired.is_set():
            raise TimeoutError(f"measurement took longer than {timeout_s:g} s") from None
        raise
    finally:
        timer.cancel()
    return {"latency_ms": t.latency_ms, "p90_ms": t.p90_ms, "iqr_ms": t.iqr_ms, "runs": t.runs,
            "ci_low_ms": t.ci_low_ms, "ci_high_ms": t.ci_high_ms, "stopped": t.stopped,
            "threads": settings["threads"], "batch_size": settings["batch_size"]}


class AgentServer(ThreadingHTTPServer):
    """Holds the token, limits and the one-at-a-time measurement slot."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], token: str, *, max_upload_bytes: int,
                 queue: int = DEFAULT_QUEUE, timeout_s: float = DEFAULT_TIMEOUT_S,
                 quiet: bool = False) -> None:
        super().__init__(address, Handler)
        self.token = token.encode()
        self.max_upload_bytes = max_upload_bytes
        self.capacity = 1 + queue  # one measuring + ``queue`` waiting
        self.timeout_s = timeout_s
        self.quiet = quiet
        self.admitted = 0
        self.admit_lock = threading.Lock()
        self.measure_lock = threading.Lock()
        self.facts = device_facts()

    def admit(self) -> bool:
        with self.admit_lock:
            if self.admitted >= self.capacity:
                return False
            self.admitted += 1
            return True

    def release(self) -> None:
        with self.admit_lock:
            self.admitted -= 1


class Handler(BaseHTTPRequestHandler):
    server: AgentServer
    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds a client may stall while sending
    server_version = "autocompress-agent/1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (BaseHTTPRequestHandler's name)
        if not self.server.quiet:
            super().log_message(format, *args)

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._reply(status, {"error": message})

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        ok = hmac.compare_digest(token.strip().encode(), self.server.token) and scheme.lower() == "bearer"
        if not ok:
            self._discard_body()
            self._error(401, "missing or wrong token (send 'Authorization: Bearer TOKEN')")
        return ok

    def _discard_body(self, limit: int = 16 << 20) -> None:
        """Reads and drops a small request body so the client sees the answer; else closes."""
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0 or length > limit:
            self.close_connection = True
            return
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 20))
            if not chunk:
                break
            length -= len(chunk)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if not self._authorized():
            return
        path = urllib.parse.urlsplit(self.path).path
        if path == "/info":
            self._reply(200, self.server.facts)
        else:
            self._error(404, f"unknown path {path!r}; GET /info or POST /measure")

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        if not self._authorized():
            return
        parts = urllib.parse.urlsplit(self.path)
        if parts.path != "/measure":
            self._discard_body()
            self._error(404, f"unknown path {parts.path!r}; GET /info or POST /measure")
            return
        try:
            settings = parse_settings(parts.query)
            length = self._content_length()
        except BadRequest as e:
            self._discard_body()
            self._error(e.status, str(e))
            return
        if not self.server.admit():
            self._discard_body()
            self._error(503, "busy: a measurement is running and the queue is full; retry later")
            return
        try:
            body = self.rfile.read(length)
            if len(body) != length:
                self.close_connection = True
                self._error(400, f"body ended after {len(body)} of {length} bytes")
                return
            with self.server.measure_lock:
                try:
                    result = measure(body, settings, self.server.timeout_s)
                except BadRequest as e:
                    self._error(e.status, str(e))
                    return
                except TimeoutError as e:
                    self._error(504, str(e))
                    return
                except Exception as e:  # never let one model take the agent down
                    self._error(500, f"measurement failed: {type(e).__name__}: {str(e)[:500]}")
                    return
            self._reply(200, result)
        finally:
            self.server.release()

    def _content_length(self) -> int:
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise BadRequest("send the ONNX model as the body with a Content-Length", 411)
        try:
            length = int(raw)
        except ValueError:
            raise BadRequest(f"bad Content-Length {raw!r}") from None
        if length <= 0:
            raise BadRequest("empty body; send the ONNX model bytes")
        if length > self.server.max_upload_bytes:
            raise BadRequest(f"upload of {length} bytes is over the agent's limit of "
                             f"{self.server.max_upload_bytes} bytes (--max-upload-mb)", 413)
        return length


def read_token(path: str | Path) -> str:
    """The token in ``path`` (stripped); ValueError when it is missing or empty."""
    try:
        token = Path(path).expanduser().read_text().strip()
    except OSError as e:
        raise ValueError(f"--token-file {path}: {e.strerror or e}") from None
    if not token:
        raise ValueError(f"--token-file {path}: the file is empty")
    return token


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--token-file", required=True, help="file holding the shared secret token")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                   help=f"largest accepted model in MiB (default {DEFAULT_MAX_UPLOAD_MB:g})")
    p.add_argument("--queue", type=int, default=DEFAULT_QUEUE,
                   help=f"measurements allowed to wait while one runs (default {DEFAULT_QUEUE})")
    p.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S,
                   help=f"abort a measurement after this many seconds (default {DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--quiet", action="store_true", help="do not log each request")


def run(args: argparse.Namespace) -> int:
    """Serves until interrupted; returns the exit status (2 on bad options)."""
    try:
        token = read_token(args.token_file)
        if not args.max_upload_mb > 0:
            raise ValueError(f"--max-upload-mb={args.max_upload_mb}; allowed: a number > 0")
        if args.queue < 0:
            raise ValueError(f"--queue={args.queue}; allowed: an integer >= 0")
        if not args.timeout_s > 0:
            raise ValueError(f"--timeout-s={args.timeout_s}; allowed: a number > 0")
    except ValueError as e:
        print(f"autocompress agent: error: {e}", file=sys.stderr)
        return 2
    try:
        mode = Path(args.token_file).expanduser().stat().st_mode
        if mode & 0o077:
            print(f"autocompress agent: warning: {args.token_file} is readable by other users "
                  f"(chmod 600 it)", file=sys.stderr)
    except OSError:
        pass
    server = AgentServer((args.host, args.port), token,
                         max_upload_bytes=int(args.max_upload_mb * (1 << 20)), queue=args.queue,
                         timeout_s=args.timeout_s, quiet=args.quiet)
    host, port = server.server_address[:2]
    print(f"autocompress agent listening on http://{host}:{port} ({server.facts['cpu']}, "
          f"onnxruntime {server.facts['onnxruntime']})", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="autocompress agent", description="the remote device agent")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
