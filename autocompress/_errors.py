"""Errors in user input (files, keys, options, arguments) and the helpers that report them.

A :class:`ConfigError` says which file and which key is wrong, on one line, e.g.
``search_spaces/x.yaml: layers[1].knobs.sparsity: high=1.5 is out of range; allowed: [0, 1)``.
The command line maps it to exit code 2.

Example:
    >>> str(ConfigError("expected an integer, got str", file="exp.yaml", key="search.trials"))
    'exp.yaml: search.trials: expected an integer, got str'
"""

from __future__ import annotations

import difflib
import os
import re
import traceback
from collections.abc import Iterable
from typing import Any

__all__ = ["ConfigError", "did_you_mean", "root_cause", "root_cause_of_text"]


class ConfigError(ValueError):
    """Bad user input: an experiment or search space file, or a command-line override.

    Attributes:
        message: What is wrong and, where it helps, what is allowed.
        file: The file the bad value came from, or None (inline mapping, command line).
        key: Dotted key path of the bad value, e.g. ``layers[1].knobs.sparsity``, or None.
    """

    def __init__(self, message: str, file: str | os.PathLike | None = None,
                 key: str | None = None) -> None:
        self.message = message
        self.file = None if file is None else str(file)
        self.key = key or None
        super().__init__(self._format())

    def __str__(self) -> str:
        return self._format()

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep file and key when the error crosses a process boundary (Ray pickles errors).
        return (type(self), (self.message, self.file, self.key))

    def located(self, file: str | os.PathLike | None = None, prefix: str = "") -> ConfigError:
        """A copy with ``file`` filled in (if not already set) and ``prefix`` put before the key.

        Args:
            file: The file the value came from.
            prefix: Key path of the enclosing mapping, e.g. ``search_space``.
        """
        key = ".".join(p for p in (prefix, self.key) if p).replace(".[", "[") or None
        return type(self)(self.message, self.file if self.file is not None else file, key)

    def _format(self) -> str:
        parts = [p for p in (self.file, self.key, self.message) if p]
        return re.sub(r"\s*\n\s*", " ", ": ".join(parts))


def did_you_mean(name: object, options: Iterable[object]) -> str:
    """A hint naming the closest of ``options`` to ``name``, or an empty string.

    Example:
        >>> did_you_mean("sparsty", ["sparsity", "bits"])
        " (did you mean 'sparsity'?)"
    """
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


ROOT_CAUSE_WIDTH = 300  # characters of a root-cause line (an MLflow tag, a progress line)


def root_cause(error: BaseException) -> str:
    """The innermost exception of ``error``'s chain as one line, ``Type: message``: the one
    Python prints first (followed through ``raise ... from`` and, unless suppressed, the
    exception being handled when it was raised).

    Example:
        >>> try:
        ...     try:
        ...         {}["bits"]
        ...     except KeyError as e:
        ...         raise RuntimeError("trial failed") from e
        ... except RuntimeError as e:
        ...     root_cause(e)
        "KeyError: 'bits'"
    """
    seen = {id(error)}
    while True:
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        error = inner
    line = traceback.format_exception_only(error)[-1].strip()
    return _one_line(line)


_HEADER = re.compile(r"^Failure # \d+ \(occurred at [^)]*\)\s*$")
_EXCEPTION_LINE = re.compile(
    r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Stopped))(?:\(\w+\))?: ?(.*)$")


def root_cause_of_text(text: str) -> str:
    """One ``Type: message`` line from an error's text when only the text is left (Ray's error
    file of a trial whose process died): the first exception line of the text (Python prints
    the innermost first) that is not Ray's wrapper, else its first meaningful line."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not _HEADER.match(ln)]
    for ln in lines:
        m = _EXCEPTION_LINE.match(ln)
        if m and not m.group(1).startswith("ray."):
            return _one_line(ln)
    return _one_line(lines[0] if lines else "the trial failed (no error text)")


def _one_line(text: str) -> str:
    text = re.sub(r"\s*\n\s*", " ", text.strip())
    return text if len(text) <= ROOT_CAUSE_WIDTH else text[: ROOT_CAUSE_WIDTH - 1] + "…"
