"""Runtimes that latency is measured on: ONNX Runtime, OpenVINO, eager PyTorch, TorchScript, and a
remote device agent.

See :mod:`autocompress.measure.runtimes._base` for the interface and ``_table.py`` for the
registry (``RUNTIMES``). Torch-free at import.
"""

from autocompress.measure.runtimes._base import LocalRuntime, RefusedPlan, Runtime, result_fields
from autocompress.measure.runtimes._ort import session_options
from autocompress.measure.runtimes._table import (
    RUNTIMES,
    RuntimeEntry,
    devices_of,
    get_runtime,
    register_runtime,
    runtime_names,
)

__all__ = ["RUNTIMES", "LocalRuntime", "RefusedPlan", "Runtime", "RuntimeEntry", "devices_of", "get_runtime",
           "register_runtime", "result_fields", "runtime_names", "session_options"]
