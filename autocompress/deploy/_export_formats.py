"""The export-format registry: one record per format says which file it writes, how, how the
file is loaded back for verification, which runtime runs it and how it is saved as an MLflow
model. :func:`~autocompress.deploy.export_run` and the command line's ``--format`` read it, at
call time.

Torch-free: the names are known without importing the formats (the command line's ``--help``
lists them without torch); the built-ins register themselves in
:mod:`autocompress.deploy._artifacts`, imported on first use. A new format is one
:class:`ExportFormat` registered with ``EXPORT_FORMATS.register(name, record)`` (in
``_artifacts.py``, or a module of its own named in ``builtins`` below).

Example:
    >>> "onnx" in EXPORT_FORMATS
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autocompress._registry import Registry

__all__ = ["DEFAULT_TOLERANCE", "EXPORT_FORMATS", "FORMATS", "ExportFormat"]

# Largest allowed |artifact metric - logged metric| when an export is verified (half a point of
# accuracy for a metric that is a fraction; why not zero: autocompress.deploy._export).
DEFAULT_TOLERANCE = 0.005


@dataclass(frozen=True)
class ExportFormat:
    """One export format.

    Attributes:
        name: Its ``--format`` name.
        file: The file it writes (``model.onnx``).
        runtime: The runtime its file runs on (``onnxruntime``, ``torch``): the artifact's
            latency is timed there.
        write: ``write(rebuilt, path)`` writes the artifact of a rebuilt trial.
        load: ``load(path) -> nn.Module`` loads it back, to be verified (the task's metric on
            its outputs) and timed.
        save_mlflow: ``save_mlflow(loaded, path, local_dir, signature, rebuilt)`` saves it as
            an MLflow model in ``local_dir`` (for ``--register``).
        times_model: Its runtime times the rebuilt model, exporting the same file itself
            (``onnx``), rather than the loaded artifact.
    """

    name: str
    file: str
    runtime: str
    write: Callable[[Any, Path], None]
    load: Callable[[Path], Any]
    save_mlflow: Callable[[Any, Path, Path, Any, Any], None]
    times_model: bool = False


_BUILTIN = "autocompress.deploy._artifacts"
EXPORT_FORMATS: Registry[ExportFormat] = Registry(
    "export format", builtins={"onnx": _BUILTIN, "torchscript": _BUILTIN, "packed": _BUILTIN})
FORMATS = EXPORT_FORMATS  # the older name of the same registry
