"""Runtimes that latency is measured on: ONNX Runtime, eager PyTorch, and a remote device agent.

See :mod:`autocompress.measure.runtimes._base` for the interface and ``_table.py`` for the
registry (``RUNTIMES``). Torch-free at import.
"""

from autocompress.measure.runtimes._base import LocalRuntime, Runtime, result_fields
from autocompress.measure.runtimes._ort import session_options
from autocompress.measure.runtimes._table import (
    RUNTIMES,
    RuntimeEntry,
    devices_of,
    get_runtime,
    register_runtime,
    runtime_names,
)

__all__ = ["RUNTIMES", "LocalRuntime", "Runtime", "RuntimeEntry", "devices_of", "get_runtime",
           "register_runtime", "result_fields", "runtime_names", "session_options"]
