"""Reading YAML config files strictly: duplicate keys refused, ``1e-3`` read as a number, and
every failure a :class:`~autocompress._errors.ConfigError` naming the file."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from autocompress._errors import ConfigError


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
