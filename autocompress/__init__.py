"""autocompress: search per-layer compression plans for a trained PyTorch model.

Example:
    >>> import autocompress as ac
    >>> result = ac.search(task, space="search_spaces/default.yaml", trials=24)  # doctest: +SKIP
    >>> ac.export(result.front.run_id[0], format="onnx", out="dist/")  # doctest: +SKIP

Every public name is imported on first use, so ``import autocompress`` imports neither torch
nor Ray.
"""

from autocompress._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "tasks._task": ("Task",),
    "compress._plan": ("Plan", "LayerPlan", "PlanError"),
    "_errors": ("ConfigError",),
    "config._experiment": ("Experiment", "load_experiment"),
    "config._space": ("load_search_space",),
    "tune._result": ("SearchResult",),
    "_api": ("search", "export"),
    "deploy._packed": ("load_packed",),
}

__getattr__, __dir__, _names = lazy_exports(__name__, _EXPORTS)
__all__ = [*_names, "__version__"]
