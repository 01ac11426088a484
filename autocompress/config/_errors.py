"""Errors in user input (experiment and search space files) and the helpers that report them.

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
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "did_you_mean", "read_yaml"]


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


class _StrictLoader(yaml.SafeLoader):
    """A safe YAML loader that rejects duplicate keys and reads ``1e-3`` as a float.

    PyYAML follows YAML 1.1, where a float needs a dot (``1e-3`` is the string "1e-3");
    learning rates are written that way often enough to accept it.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor" may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key; SafeLoader reports it below
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"""),
    list("-+0123456789"),
)


def read_yaml(path: str | os.PathLike) -> Any:
    """Reads one YAML document with a safe loader.

    Args:
        path: The file to read.

    Returns:
        The parsed document (None for an empty file).

    Raises:
        ConfigError: The file is missing or unreadable, or is not valid YAML (the message
            gives the line and column).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", file=path) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, expected a YAML file", file=path) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"not a UTF-8 text file ({e.reason} at byte {e.start})",
                          file=path) from None
    except (OSError, ValueError) as e:  # permissions, name too long, embedded NUL byte
        raise ConfigError(f"cannot read: {e}", file=path) from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_message(e), file=path) from None
    except RecursionError:
        raise ConfigError("invalid YAML: nested too deeply", file=path) from None


def _yaml_message(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    what = f"{context}: {problem}" if context and problem != context else problem
    if mark is None:
        return f"invalid YAML: {what}"
    return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {what}"
