"""MLflow: the single writer of a search (:class:`SearchTracker`), readers, names, the Pareto
front and its plots."""

from autocompress._lazy import lazy_exports

_EXPORTS = {
    "_names": (
        "ROLE", "PARENT", "PARETO", "FEASIBLE", "SUMMARY", "ERROR", "NODE", "TRIAL_KEY", "STUDY",
        "LATENCY_PREFIX", "TRIAL_METRICS", "LATENCY_FACTS",
    ),
    "_writer": ("SearchTracker",),
    "_reader": ("open_store", "latest_search", "read_trials", "read_front", "check_store_driver"),
    "_pareto": (
        "non_dominated_mask", "non_dominated_rank", "hypervolume", "reference_point",
        "pareto_front",
    ),
    "_plots": ("write_plots",),
    "_ui": ("serve_ui",),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
