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
from collections.abc import Iterable
from typing import Any

__all__ = ["ConfigError", "did_you_mean"]


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
