"""Checks shared by the config parsers: types, keys, and dataclasses built from mappings with
their ``ValueError`` turned into a :class:`ConfigError` naming the dotted key."""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from autocompress._errors import ConfigError, did_you_mean


def build(cls: type, raw: Any, where: str, *, optional: bool = True) -> Any:
    """Builds the dataclass ``cls`` from a mapping, with ConfigErrors keyed under ``where``."""
    if raw is None and optional:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"expected a mapping of {field_names(cls)}, got {type_name(raw)}",
                          key=where)
    check_keys(raw, field_names(cls), where)
    annotations = hints(cls)
    for f in fields(cls):
        if f.name in raw:
            check_type(raw[f.name], annotations[f.name], f"{where}.{f.name}")
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"missing required key {f.name!r}", key=f"{where}.{f.name}")
    return construct(cls, where, **raw)



def construct(cls: type, where: str, **kwargs: Any) -> Any:
    """``cls(**kwargs)``, its ValueError turned into a ConfigError keyed by the bad field."""
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        raise from_value_error(e, where, field_names(cls)) from None



def from_value_error(e: ValueError, where: str, names: list[str]) -> ConfigError:
    """Finds the field a dataclass complained about (``target.threads=0; ...``)."""
    message = str(e)
    m = re.match(r"(?:\w+\.)?(\w+)(=|: )", message)
    if m and m[1] in names:
        key = f"{where}.{m[1]}" if where else m[1]
        text = message[m.start(1):] if m[2] == "=" else message[m.end():]
        return ConfigError(text, key=key)
    return ConfigError(message, key=where or None)



_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               type(None): "null"}



def check_type(value: Any, hint: Any, key: str) -> None:
    """Checks ``value`` against a simple annotation (``int``, ``float``, ``str | None``, ...)."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if any(is_instance(value, t) for t in allowed):
        return
    words = " or ".join(_TYPE_WORDS.get(t, getattr(t, "__name__", str(t))) for t in allowed)
    raise ConfigError(f"expected {words}, got {type_name(value)} {value!r}", key=key)



def is_instance(value: Any, t: Any) -> bool:
    if t is float:
        return is_number(value)
    if t is int:
        return is_int(value)
    if t is type(None):
        return value is None
    if typing.get_origin(t) is tuple:  # ``tuple[int, ...]``: a YAML list, or one value of it
        args = typing.get_args(t)
        return isinstance(value, list | tuple) or (
            len(args) == 2 and args[1] is Ellipsis and is_instance(value, args[0]))
    return isinstance(t, type) and isinstance(value, t)



def check_keys(data: Mapping[Any, Any], allowed: Iterable[str], where: str,
               what: str = "key") -> None:
    """Refuses a key of ``data`` not in ``allowed`` (with a did-you-mean), keyed under ``where``."""
    allowed = list(allowed)
    for key in data:
        if key not in allowed:
            path = f"{where}.{key}" if where else str(key)
            raise ConfigError(f"unknown {what} {key!r}{did_you_mean(key, allowed)}; "
                              f"allowed: {allowed}", key=path)


def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)



def field_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if f.init and f.name != "path"]



def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)



def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)



def is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False



def type_name(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """``re.compile`` (its own cache serves the many layer names one pattern is matched to)."""
    return re.compile(pattern)


def matches(pattern: str, name: str) -> bool:
    """Whether module ``name`` is ``pattern``, or full-matches it for a ``re:`` pattern."""
    if pattern.startswith("re:"):
        return compile_pattern(pattern[3:]).fullmatch(name) is not None
    return pattern == name
