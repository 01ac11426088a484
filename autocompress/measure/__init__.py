"""Measuring a model: accuracy, stored size, params, MACs and latency on a target.

Names are imported lazily, so that torch-free parts (``autocompress.measure._timing``, used by
the remote device agent) import without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "LatencyResult": "latency", "machine_facts": "latency", "measure_latency": "latency",
    "Metrics": "metrics", "measure": "metrics", "top1_accuracy": "metrics",
    "TensorSize": "size", "count_params": "size", "size_bytes": "size", "size_report": "size",
    "tensor_bytes": "size", "Target": "target",
}

__all__ = [
    "LatencyResult", "Metrics", "Target", "TensorSize", "count_params", "machine_facts", "measure",
    "measure_latency", "size_bytes", "size_report", "tensor_bytes", "top1_accuracy",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"autocompress.measure.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'autocompress.measure' has no attribute {name!r}")
