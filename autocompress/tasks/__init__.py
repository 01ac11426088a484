"""Tasks: the model, data and metric a search works on."""

from autocompress.tasks import builtin  # noqa: F401  (registers the built-in tasks)
from autocompress.tasks._registry import cache_dir, list_tasks, load_task, register_task
from autocompress.tasks._task import Task

__all__ = ["Task", "cache_dir", "list_tasks", "load_task", "register_task"]
