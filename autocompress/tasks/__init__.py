"""Tasks: the model, data and metric a search works on; built-in tasks one module each."""

from autocompress.tasks._registry import cache_dir, list_tasks, load_task, register_task
from autocompress.tasks._task import Task

__all__ = ["Task", "cache_dir", "list_tasks", "load_task", "register_task"]
