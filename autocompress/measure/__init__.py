"""Measuring a model: accuracy, stored size, params, MACs and latency on a target."""

from autocompress.measure.latency import LatencyResult, machine_facts, measure_latency
from autocompress.measure.metrics import Metrics, measure, top1_accuracy
from autocompress.measure.size import (
    TensorSize,
    count_params,
    size_bytes,
    size_report,
    tensor_bytes,
)
from autocompress.measure.target import Target

__all__ = [
    "LatencyResult", "Metrics", "Target", "TensorSize", "count_params", "machine_facts", "measure",
    "measure_latency", "size_bytes", "size_report", "tensor_bytes", "top1_accuracy",
]
