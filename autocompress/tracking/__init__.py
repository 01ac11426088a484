"""MLflow: the single writer of a search (:class:`SearchTracker`), readers, names, the Pareto
front and its plots."""

from autocompress._lazy import lazy_exports

_WHERE = {
    "ROLE": "autocompress.tracking._names",
    "PARENT": "autocompress.tracking._names",
    "PARETO": "autocompress.tracking._names",
    "FEASIBLE": "autocompress.tracking._names",
    "SUMMARY": "autocompress.tracking._names",
    "ERROR": "autocompress.tracking._names",
    "NODE": "autocompress.tracking._names",
    "TRIAL_KEY": "autocompress.tracking._names",
    "STUDY": "autocompress.tracking._names",
    "LATENCY_PREFIX": "autocompress.tracking._names",
    "TRIAL_METRICS": "autocompress.tracking._names",
    "LATENCY_FACTS": "autocompress.tracking._names",
    "SearchTracker": "autocompress.tracking._writer",
    "open_store": "autocompress.tracking._reader",
    "latest_search": "autocompress.tracking._reader",
    "read_trials": "autocompress.tracking._reader",
    "read_front": "autocompress.tracking._reader",
    "non_dominated_mask": "autocompress.tracking._pareto",
    "non_dominated_rank": "autocompress.tracking._pareto",
    "hypervolume": "autocompress.tracking._pareto",
    "reference_point": "autocompress.tracking._pareto",
    "pareto_front": "autocompress.tracking._pareto",
    "write_plots": "autocompress.tracking._plots",
}
__all__ = list(_WHERE)

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
