"""Names in the MLflow store: the tags autocompress writes and reads (DESIGN.md, "what MLflow
holds"). The metric names come from the metric registry (:mod:`autocompress.measure`)."""

from autocompress.measure import TRIAL_METRICS

__all__ = ["ERROR", "FEASIBLE", "LATENCY_FACTS", "LATENCY_PREFIX", "NODE", "PARENT", "PARETO",
           "PRUNED", "ROLE", "STUDY", "SUMMARY", "TRIAL_KEY", "TRIAL_METRICS"]

ROLE = "autocompress.role"  # "search" on a parent run, "trial" on a child run
PARENT = "mlflow.parentRunId"
PARETO = "autocompress.pareto"  # "true" | "false", kept current as the front changes
FEASIBLE = "autocompress.feasible"
SUMMARY = "autocompress.summary"  # the plan in one line
ERROR = "autocompress.error"  # why a trial failed
NODE = "autocompress.node"  # the Ray node a trial ran on
PRUNED = "autocompress.pruned"  # why a trial was stopped early (it cannot meet the constraint)
TRIAL_KEY = "autocompress.trial_key"
STUDY = "autocompress.study"  # "<optuna storage>#<study name>" on a parent run
LATENCY_PREFIX = "autocompress.latency."
# TRIAL_METRICS (imported above): every registered metric, read live; a finished trial logs
# them all.
# Facts of a trial's latency measurement, logged as tags autocompress.latency.<key>.
LATENCY_FACTS = ("runs", "stopped", "ci_low_ms", "ci_high_ms", "runtime", "runtime_version", "device",
                 "threads", "batch_size", "cpu", "gpu", "cached", "speedup", "reference_ms",
                 "measured_ms", "drift", "slowdown", "retries", "measured_at", "graph", "fused_ops",
                 "graph_note")
