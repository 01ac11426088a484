"""Lazy re-exports for package ``__init__`` files (Optuna's and SciPy's pattern).

Heavy dependencies (torch, Ray, MLflow) are imported when a name is first used, not when the
package is imported, so ``import autocompress`` and the torch-free device agent stay light.

Example (in ``autocompress/compress/__init__.py``):
    >>> __getattr__, __dir__, __all__ = lazy_exports(__name__, {"_plan": ("Plan", "LayerPlan")})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, Sequence[str]]) -> tuple[
        Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """Module-level ``__getattr__`` and ``__dir__`` that import a public name on first use, and
    the package's ``__all__``.

    Args:
        package: The package's ``__name__``.
        exports: Module (relative to ``package``, or absolute) to the public names it defines.
    """
    where = {name: module if module.startswith("autocompress") else f"{package}.{module}"
             for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *where})

    return __getattr__, __dir__, list(where)
