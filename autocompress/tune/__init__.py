"""The search engine: Optuna samplers, the trial, the driver, the search backends (Ray Tune,
serial), the measurement service, resume and Ray Client.

(Not named ``search``: ``autocompress.search`` is the function of the Python API.)
"""

from autocompress._lazy import lazy_exports

_EXPORTS = {
    "_driver": ("run_search",),
    "_result": ("SearchResult",),
    "_trial": ("run_trial", "TrialResult"),
    "_samplers": ("make_sampler",),
    "_sensitivity": ("profile",),
    "_backend": ("BACKENDS", "SearchBackend", "SearchJob"),
    "_events": ("EpochReport", "TrialFinished", "TrialPruned", "TrialFailed"),
    "_ray_client": ("run_remote_search", "client_address"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
