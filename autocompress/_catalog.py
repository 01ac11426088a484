"""The names the command line lists (built-in tasks, export formats), kept where importing them
costs nothing: ``autocompress --help`` starts without torch.

Each table is the one place its names are declared; the packages that implement them read it.
"""

from __future__ import annotations

# The built-in tasks, one module each in ``autocompress/tasks/`` (imported on first use), so
# that adding or editing one does not invalidate the others' cached baselines. A new task: one
# module with a ``@register_task`` function (``digits.py`` is the one to copy), plus its name here.
BUILTIN_TASKS = ("digits", "minilm", "mnist1d")

# Export formats and the file each writes (``autocompress export --format``).
EXPORT_FILES = {"onnx": "model.onnx", "torchscript": "model.pt", "packed": "model.acpk"}
