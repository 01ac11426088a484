"""Runtimes that latency is measured on: ONNX Runtime, eager PyTorch, and a remote device agent.

See :mod:`autocompress.measure.runtimes._base` for the interface and the registry.
"""

from autocompress.measure.runtimes._base import (
    RUNTIMES,
    Runtime,
    RuntimeEntry,
    devices_of,
    get_runtime,
    register_runtime,
    runtime_names,
)

__all__ = ["RUNTIMES", "Runtime", "RuntimeEntry", "devices_of", "get_runtime", "register_runtime",
           "runtime_names"]
