"""The search engine: Optuna samplers, the Ray Tune trial, the driver, resume and Ray Client.

(Not named ``search``: ``autocompress.search`` is the function of the Python API.)
"""

from autocompress._lazy import lazy_exports

_WHERE = {
    "run_search": "autocompress.tune._driver",
    "SearchResult": "autocompress.tune._result",
    "run_trial": "autocompress.tune._trial",
    "TrialResult": "autocompress.tune._trial",
    "make_sampler": "autocompress.tune._samplers",
    "run_remote_search": "autocompress.tune._remote",
}
__all__ = list(_WHERE)

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
