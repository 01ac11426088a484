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

_WHERE = {
    "Task": "autocompress.tasks._task",
    "Plan": "autocompress.compress._plan",
    "LayerPlan": "autocompress.compress._plan",
    "PlanError": "autocompress.compress._plan",
    "ConfigError": "autocompress.config._errors",
    "Experiment": "autocompress.config._experiment",
    "load_experiment": "autocompress.config._experiment",
    "load_search_space": "autocompress.config._space",
    "SearchResult": "autocompress.tune._result",
    "search": "autocompress._api",
    "export": "autocompress._api",
    "load_packed": "autocompress.deploy._packed",
}

__all__ = [*_WHERE, "__version__"]

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
