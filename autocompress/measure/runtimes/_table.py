"""The runtime registry: which :class:`~autocompress.measure.runtimes._base.Runtime` serves a
``target.runtime`` on a ``target.device``. Plain data (classes are imported on first use), so
validating a config's ``target`` imports no runtime; read at call time, so a runtime registered
after import is a valid ``target.runtime`` from then on.

Example:
    >>> RUNTIMES.get("torch").devices
    ('cpu', 'cuda')
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from autocompress._registry import Registry

__all__ = ["RUNTIMES", "RuntimeEntry", "devices_of", "get_runtime", "register_runtime", "runtime_names"]


@dataclass(frozen=True)
class RuntimeEntry:
    """One registered runtime.

    Attributes:
        name: The ``target.runtime`` value it serves.
        classes: ``{target.device: "module:Class"}`` of the :class:`Runtime` serving each
            device, imported on first use.
    """

    name: str
    classes: Mapping[str, str] = field(default_factory=dict)

    @property
    def devices(self) -> tuple[str, ...]:
        """The ``target.device`` values it serves."""
        return tuple(self.classes)

    def load(self, device: str) -> Any:
        """A new instance of the class serving ``device``."""
        module, _, cls = self.classes[device].partition(":")
        return getattr(importlib.import_module(module), cls)()


RUNTIMES: Registry[RuntimeEntry] = Registry("runtime")
_LOADED: dict[tuple[str, str], Any] = {}


def register_runtime(name: str, devices: tuple[str, ...] | list[str], where: str) -> RuntimeEntry:
    """Registers a runtime class ``where`` (``"module:Class"``) as ``name`` on ``devices``.

    Raises:
        ValueError: ``name`` is already registered.
    """
    return RUNTIMES.register(name, RuntimeEntry(name, dict.fromkeys(devices, where)))


# The runtimes, one file each. A new runtime is one file with a Runtime subclass plus one
# registration here (``_torch.py`` is the smallest to copy), or a user's register_runtime call.
_ORT = "autocompress.measure.runtimes._ort:OnnxRuntime"
RUNTIMES.register("onnxruntime", RuntimeEntry("onnxruntime", {
    "cpu": _ORT, "cuda": _ORT, "remote": "autocompress.measure.runtimes._remote:RemoteAgent"}))
register_runtime("openvino", ("cpu",), "autocompress.measure.runtimes._openvino:OpenVinoRuntime")
register_runtime("torch", ("cpu", "cuda"), "autocompress.measure.runtimes._torch:TorchRuntime")
register_runtime("torchscript", ("cpu", "cuda"),
                 "autocompress.measure.runtimes._torchscript:TorchScriptRuntime")


def runtime_names() -> list[str]:
    """The ``target.runtime`` values, in registration order (read now)."""
    return list(RUNTIMES.names())


def devices_of(name: str) -> list[str]:
    """The ``target.device`` values runtime ``name`` serves (none for an unknown name)."""
    return list(RUNTIMES.get(name).devices) if name in RUNTIMES else []


def get_runtime(target: Any) -> Any:
    """The runtime serving ``target.runtime`` on ``target.device`` (one instance per pair).

    Raises:
        UnknownNameError: No runtime of that name (did-you-mean in the message).
        ValueError: The runtime does not serve that device (the message lists what does).
    """
    key = (target.runtime, target.device)
    if key not in _LOADED:
        entry = RUNTIMES.get(target.runtime, key="target.runtime")
        if target.device not in entry.classes:
            raise ValueError(f"target.runtime={key[0]!r} with device: {key[1]}; allowed: "
                             f"{[n for n in runtime_names() if key[1] in devices_of(n)]}")
        _LOADED[key] = entry.load(target.device)
    return _LOADED[key]
