"""Tasks: the model, data and metric a search works on; built-in tasks one module each.

Names are imported on first use, so that ``import autocompress.tasks``, the :class:`Task`
contract and the task registry's names (``TASKS``) import neither torch nor ONNX (the built-in
tasks do).
"""

from autocompress._lazy import lazy_exports

_EXPORTS = {
    "_task": ("Task",),
    "_registry": ("TASKS", "cache_dir", "list_tasks", "load_task", "register_task",
                  "remembered_task", "remember_task"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
