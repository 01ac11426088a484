"""One registry type for every table of named things: compression methods, weight formats,
tasks, runtimes, metrics, samplers, search backends and export formats.

A :class:`Registry` maps a name to an entry. Entries are added with :meth:`Registry.register`
(as a decorator or a call); a name can be registered once. Built-in entries may be declared
lazily, as ``{name: module}``: their names are known without importing anything (the command
line's ``--help`` lists them without torch) and the module, which registers the entry, is
imported on first :meth:`Registry.get`. :meth:`Registry.names` is read at call time, so an entry
registered after import (a user's metric, method or task) is seen by validation, the command
line's choices and its help alike.

Torch-free.

Example:
    >>> colors = Registry("color")
    >>> @colors.register("red")
    ... def red() -> str:
    ...     return "#f00"
    >>> colors.get("red")()
    '#f00'
    >>> colors.get("rde")
    Traceback (most recent call last):
    ...
    autocompress._registry.UnknownNameError: unknown color 'rde' (did you mean 'red'?); allowed: red
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar, overload

from autocompress._errors import ConfigError, did_you_mean

__all__ = ["Registry", "UnknownNameError"]

T = TypeVar("T")
_MISSING: Any = object()


class UnknownNameError(ConfigError, KeyError):
    """A name no entry of a registry has (a :class:`ConfigError`: exit 2 on the command line;
    also a :class:`KeyError`, for code that looks names up)."""

    def __str__(self) -> str:
        return self._format()


class Registry(Generic[T]):
    """Named entries of one kind (module docstring).

    Args:
        kind: What an entry is, for messages (``"compression method"``).
        builtins: ``{name: module}`` of built-in entries, each registered by importing its
            module, on first use.
    """

    def __init__(self, kind: str, builtins: Mapping[str, str] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._lazy: dict[str, str] = dict(builtins or {})
        self._order: dict[str, None] = dict.fromkeys(self._lazy)  # names, as declared

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, entry: T) -> T: ...

    def register(self, name: str, entry: Any = _MISSING) -> Any:
        """Adds ``entry`` under ``name``; without ``entry``, a decorator that adds what it
        decorates and returns it unchanged.

        Raises:
            ValueError: ``name`` is already registered.
        """
        if entry is _MISSING:
            return lambda obj: self.register(name, obj)
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        self._lazy.pop(name, None)
        self._order.setdefault(name)
        return entry

    def unregister(self, name: str) -> None:
        """Removes ``name`` (tests, and a user replacing an entry)."""
        self._entries.pop(name, None)
        self._lazy.pop(name, None)
        self._order.pop(name, None)

    def names(self) -> tuple[str, ...]:
        """Every name, registered or declared built-in, in declaration order; imports nothing."""
        return tuple(self._order)

    def get(self, name: str, *, file: str | os.PathLike | None = None,
            key: str | None = None) -> T:
        """The entry named ``name`` (a built-in's module is imported on first use).

        Args:
            name: The entry's name.
            file: The file the name came from, for the error.
            key: The key the name came from, for the error.

        Raises:
            UnknownNameError: No such name; the message has the closest name and the allowed.
        """
        if name not in self._entries and name in self._lazy:
            importlib.import_module(self._lazy[name])
            if name not in self._entries:
                raise RuntimeError(f"{self._lazy[name]} did not register {self.kind} {name!r}")
        if name not in self._entries:
            raise self.unknown(name, file=file, key=key)
        return self._entries[name]

    def unknown(self, name: object, *, file: str | os.PathLike | None = None,
                key: str | None = None) -> UnknownNameError:
        """The error :meth:`get` raises for ``name`` (the closest name and the allowed), for
        callers that check with ``in`` and raise their own type."""
        names = self.names()
        return UnknownNameError(f"unknown {self.kind} {name!r}{did_you_mean(name, names)}; "
                                f"allowed: {', '.join(map(str, names)) or '(none)'}",
                                file=file, key=key)

    def load_all(self) -> dict[str, T]:
        """Every entry, by name, in :meth:`names` order (imports every built-in)."""
        return dict(self.items())

    def values(self) -> list[T]:
        """Every entry, in :meth:`names` order (imports every built-in)."""
        return [self.get(name) for name in self.names()]

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs, in :meth:`names` order (imports every built-in)."""
        return [(name, self.get(name)) for name in self.names()]

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self.names())})"
