"""The task registry (built-in and registered tasks), user tasks from
``"package.module:function"``, and the baseline cache.

Torch-free at import: the names of the built-in tasks are known without importing them (the
command line's ``--help`` lists them without torch). A new built-in task is one module with a
``@register_task`` function (``digits.py`` is the one to copy) plus its name in ``TASKS``'s
``builtins``; a user's task registered with ``@register_task`` is seen from then on.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from autocompress._errors import ConfigError
from autocompress._registry import Registry, UnknownNameError

if TYPE_CHECKING:
    from torch import nn

    from autocompress.tasks._task import Task

TaskFactory = Callable[..., "Task"]  # fn(seed: int = 0) -> Task

# The built-in tasks, one module each (imported on first use), so that adding or editing one
# does not invalidate the others' cached baselines.
TASKS: Registry[TaskFactory] = Registry("task", builtins={
    name: f"autocompress.tasks.{name}"
    for name in ("digits", "digits_resnet", "minilm", "mnist1d", "smollm2")})


def register_task(name: str) -> Callable[[TaskFactory], TaskFactory]:
    """Registers a task factory ``fn(seed: int = 0) -> Task`` as ``name``.

    Raises:
        ValueError: ``name`` is already registered.
    """
    return TASKS.register(name)


def list_tasks() -> list[str]:
    """The names of the built-in and registered tasks, sorted (imports none of them)."""
    return sorted(TASKS.names())


def load_task(ref: str | Task, seed: int = 0) -> Task:
    """A task from a built-in name (``digits``, ``mnist1d``) or ``"package.module:function"``;
    a :class:`Task` object is returned as it is.

    Raises:
        ConfigError: Unknown built-in name, module or function that cannot be imported, or a
            function that does not return a Task.
    """
    from autocompress.tasks._task import Task

    if isinstance(ref, Task):
        return ref
    if ":" not in ref:
        try:
            factory = TASKS.get(ref, key="task")
        except UnknownNameError as e:
            raise UnknownNameError(f"{e.message}; or give 'package.module:function'",
                                   key="task") from None
        return factory(seed=seed)
    module_name, _, fn_name = ref.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like uvicorn: "app:make" resolves from the cwd
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001  (any import-time failure is the user's task's)
        raise ConfigError(f"cannot import task module {module_name!r}: {type(e).__name__}: {e}",
                          key="task") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"module {module_name!r} has no function {fn_name!r}", key="task")
    task = fn()
    if not isinstance(task, Task):
        raise ConfigError(f"{ref}() returned {type(task).__name__}, expected autocompress.Task",
                          key="task")
    return task


# In-memory tasks of the searches this process ran, by parent run id, so that exporting one of
# their trials in the same session needs no ``task=`` (the MLflow log holds only the name).
_SESSION_TASKS: dict[str, Task] = {}


def remember_task(parent_run_id: str, task: Task) -> None:
    """Keeps the in-memory ``task`` of search ``parent_run_id`` for this process's exports."""
    _SESSION_TASKS[parent_run_id] = task


def remembered_task(parent_run_id: str) -> Task | None:
    """The in-memory task a search of this process ran on, or None."""
    return _SESSION_TASKS.get(parent_run_id)


def cache_dir() -> Path:
    """Where trained baselines are cached: ``$AUTOCOMPRESS_CACHE`` or ``~/.cache/autocompress``."""
    return Path(os.environ.get("AUTOCOMPRESS_CACHE", Path.home() / ".cache" / "autocompress"))


def cached_baseline(name: str, seed: int, model: nn.Module, train: Callable[[nn.Module], None],
                    code: ModuleType) -> tuple[nn.Module, bool]:
    """Loads ``model``'s trained weights from the cache, or trains and caches them.

    The key is task name + seed + a hash of the autocompress version and the source of
    ``code`` (the task's module), so editing a task retrains its baseline.

    Returns:
        ``(model, was_cached)``.
    """
    import torch

    import autocompress

    digest = hashlib.sha256((autocompress.__version__ + inspect.getsource(code)).encode())
    path = cache_dir() / "baselines" / f"{name}-seed{seed}-{digest.hexdigest()[:12]}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), True
    train(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)  # atomic: concurrent processes never read half a file
    return model.eval(), False
