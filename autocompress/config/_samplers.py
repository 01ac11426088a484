"""The sampler registry: the names ``search.sampler`` accepts, known without importing the
search (``config`` sits below ``tune`` in the layer order) or Optuna.

Each entry is a builder ``fn(settings: SearchSettings, constraint) -> optuna sampler``;
``constraint`` is an Optuna ``constraints_func`` (or None) the sampler should honour. The
built-ins register themselves in :mod:`autocompress.tune._samplers`, imported on first
:meth:`~autocompress._registry.Registry.get`. A user's sampler is one
``@SAMPLERS.register("name")`` function, seen by validation and the command line's help from then on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autocompress._registry import Registry

__all__ = ["SAMPLERS", "SamplerBuilder"]

SamplerBuilder = Callable[[Any, Any], Any]

_BUILTIN = "autocompress.tune._samplers"
SAMPLERS: Registry[SamplerBuilder] = Registry(
    "sampler", builtins={"nsga2": _BUILTIN, "tpe": _BUILTIN, "mutation": _BUILTIN,
                         "random": _BUILTIN})
