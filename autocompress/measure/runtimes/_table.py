"""The runtime registry: which :class:`~autocompress.measure.runtimes._base.Runtime` serves a
``target.runtime`` on a ``target.device``. Plain data (classes are imported on first use), so
validating a config's ``target`` imports no runtime."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

__all__ = ["RUNTIMES", "RuntimeEntry", "devices_of", "get_runtime", "register_runtime", "runtime_names"]


@dataclass(frozen=True)
class RuntimeEntry:
    """One registered runtime.

    Attributes:
        name: The ``target.runtime`` value it serves.
        devices: The ``target.device`` values it serves.
        where: ``"module:Class"`` of its :class:`Runtime`, imported on first use.
    """

    name: str
    devices: tuple[str, ...]
    where: str

    def load(self) -> Any:
        module, _, cls = self.where.partition(":")
        return getattr(importlib.import_module(module), cls)()


# The runtimes, one file each. A new runtime is one file with a Runtime subclass plus one line
# here (``_torch.py`` is the smallest to copy).
RUNTIMES: list[RuntimeEntry] = [
    RuntimeEntry("onnxruntime", ("cpu", "cuda"), "autocompress.measure.runtimes._ort:OnnxRuntime"),
    RuntimeEntry("torch", ("cpu", "cuda"), "autocompress.measure.runtimes._torch:TorchRuntime"),
    RuntimeEntry("onnxruntime", ("remote",), "autocompress.measure.runtimes._remote:RemoteAgent"),
]
_LOADED: dict[tuple[str, str], Any] = {}


def register_runtime(name: str, devices: tuple[str, ...], where: str) -> None:
    """Registers a runtime class ``where`` (``"module:Class"``) for ``name`` on ``devices``."""
    taken = [d for e in RUNTIMES if e.name == name for d in e.devices if d in devices]
    if taken:
        raise RuntimeError(f"runtime {name!r} is already registered for devices {taken}")
    RUNTIMES.append(RuntimeEntry(name, tuple(devices), where))


def runtime_names() -> list[str]:
    """The ``target.runtime`` values, in registration order."""
    return list(dict.fromkeys(e.name for e in RUNTIMES))


def devices_of(name: str) -> list[str]:
    """The ``target.device`` values runtime ``name`` serves."""
    return [d for e in RUNTIMES if e.name == name for d in e.devices]


def get_runtime(target: Any) -> Any:
    """The runtime serving ``target.runtime`` on ``target.device`` (one instance per pair).

    Raises:
        ValueError: No runtime serves that pair (the message lists what does).
    """
    key = (target.runtime, target.device)
    if key not in _LOADED:
        entry = next((e for e in RUNTIMES if e.name == key[0] and key[1] in e.devices), None)
        if entry is None:
            raise ValueError(f"target.runtime={key[0]!r} with device: {key[1]}; allowed: "
                             f"{[e.name for e in RUNTIMES if key[1] in e.devices]}")
        _LOADED[key] = entry.load()
    return _LOADED[key]
