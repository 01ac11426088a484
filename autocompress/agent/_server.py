"""The device agent's HTTP server: the token, the upload limit, one measurement at a time and
a short queue (status codes in :mod:`autocompress.agent`). Torch-free."""

from __future__ import annotations

import hmac
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from autocompress.agent._measure import (
    DEFAULT_QUEUE,
    DEFAULT_TIMEOUT_S,
    BadRequest,
    device_facts,
    measure,
    parse_settings,
)


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
