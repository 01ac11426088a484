"""Tasks: the model, data and metric a search works on; built-in tasks one module each.

Names are imported on first use, so that the task registry's names (``TASKS``) load without
torch.
"""

from autocompress._lazy import lazy_exports

_EXPORTS = {
    "_registry": ("TASKS", "cache_dir", "list_tasks", "load_task", "register_task"),
    "_task": ("Task",),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
