"""Measuring a model: accuracy, stored size, params, MACs and latency on a target; the metric
registry (:mod:`~autocompress.measure._registry`) and the runtimes
(:mod:`~autocompress.measure.runtimes`).

Names are imported lazily, so that torch-free parts (``autocompress.measure._timing``, used by
the remote device agent) import without torch.
"""

from autocompress._lazy import lazy_exports

_EXPORTS = {
    "latency": ("LatencyResult", "PairedMeasurer", "check_target", "machine_facts", "measure_latency"),
    "metrics": ("Metrics", "measure", "top1_accuracy"),
    "size": ("TensorSize", "count_params", "planned_weight_bytes", "size_and_params", "size_bytes",
             "size_report", "tensor_bytes", "weight_storage"),
    "target": ("DEVICES", "Target"),
    "_timing": ("TimingSettings", "time_runs"),
    "_machine": ("cpu_model",),
    "_paired": ("DRIFT_LIMIT",),
    "_registry": ("METRICS", "METRIC_PATTERNS", "METRIC_TABLE", "OBJECTIVES", "TRIAL_METRICS",
                  "MetricSpec", "front_columns", "get_metric", "logged_metrics", "match_metric",
                  "objective_metrics", "objective_patterns", "plotted_metrics",
                  "register_metric", "relative_metrics", "trial_metrics"),
    "_workloads": ("workload_feeds",),
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
