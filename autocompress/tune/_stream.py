"""Streaming a search's output from the cluster to the Ray Client: a :class:`Progress` actor
holds the lines, a :class:`Forward` stream on the cluster sends them there line by line."""

from __future__ import annotations

import io
import threading
from typing import Any


class Progress:
    """A Ray actor that holds the search's output until the client takes it."""

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.started = False
        self.closed = False

    def start(self) -> None:
        self.started = True

    def put(self, text: str) -> None:
        self.chunks.append(text)

    def close(self) -> None:
        self.closed = True

    def take(self) -> tuple[list[str], bool, bool]:
        """``(chunks, started, closed)``: what was put since the last call, and the task's state."""
        chunks, self.chunks = self.chunks, []
        return chunks, self.started, self.closed



class Forward(io.TextIOBase):
    """A text stream that sends whole lines to the :class:`Progress` actor.

    Every line waits until the actor has it, so that nothing is still on the way when the task
    ends. Whatever cannot be sent goes to the original stream (the worker's log on the node).
    """

    def __init__(self, progress: Any, original: Any) -> None:
        super().__init__()
        self.progress, self.original = progress, original
        self.buffer_ = ""
        self.lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.original.fileno()

    def write(self, text: str) -> int:
        with self.lock:
            self.buffer_ += text
            head, newline, self.buffer_ = self.buffer_.rpartition("\n")
            if newline:
                self._send(head + newline)
        return len(text)

    def flush(self) -> None:
        with self.lock:
            if self.buffer_:
                self._send(self.buffer_)
                self.buffer_ = ""

    def _send(self, text: str) -> None:
        import ray

        try:
            ray.get(self.progress.put.remote(text))
        except Exception:  # noqa: BLE001  (the client went away: keep the line in the log)
            self.original.write(text)
