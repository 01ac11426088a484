"""The search engine: Optuna samplers, the Ray Tune trial, the driver, resume and Ray Client.

(Not named ``search``: ``autocompress.search`` is the function of the Python API.)
"""

from autocompress._lazy import lazy_exports

_EXPORTS = {
    "_driver": ("run_search",),
    "_result": ("SearchResult",),
    "_trial": ("run_trial", "TrialResult"),
    "_samplers": ("make_sampler",),
    "_sensitivity": ("profile",),
    "_remote": ("run_remote_search",),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
