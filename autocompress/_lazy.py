"""Lazy re-exports for package ``__init__`` files (Optuna's and SciPy's pattern).

Heavy dependencies (torch, Ray, MLflow) are imported when a name is first used, not when the
package is imported, so ``import autocompress`` and the torch-free device agent stay light.

Example:
    >>> __getattr__, __dir__ = lazy_exports(__name__, {"Plan": "autocompress.compress._plan"})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, where: Mapping[str, str]) -> tuple[Callable[[str], Any],
                                                                   Callable[[], list[str]]]:
    """Module-level ``__getattr__`` and ``__dir__`` that import ``name`` from ``where[name]``.

    Args:
        package: The package's ``__name__``.
        where: Public name to the module that defines it.
    """

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *where})

    return __getattr__, __dir__
