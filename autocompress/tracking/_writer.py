"""MLflow logging of a search: one parent run, one nested child run per trial, a live front.

Only the driver writes (through :class:`SearchTracker`), so parallel trials never contend
for the SQLite store. The contract (DESIGN.md, "what MLflow holds"): the parent run has tag
``autocompress.role=search``, the experiment config, ``baseline_*`` metrics and the artifacts
``pareto.csv``, ``trials.csv`` and the Pareto plots; each child run has tags
``mlflow.parentRunId`` and ``autocompress.role=trial``, the flattened plan as params, the
metrics (per-epoch accuracy as steps), ``plan.json`` and the weights as artifacts, and
``autocompress.pareto=true|false``, kept current as the front changes.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from autocompress.measure import DRIFT_LIMIT, logged_metrics
from autocompress.tracking._names import (
    ERROR,
    FEASIBLE,
    LATENCY_FACTS,
    LATENCY_PREFIX,
    NODE,
    PARETO,
    PRUNED,
    ROLE,
    SUMMARY,
    TRIAL_METRICS,
)
from autocompress.tracking._pareto import hypervolume, non_dominated_mask, reference_point
from autocompress.tracking._reader import client_for, read_trials

# The parent run's Pareto plots take about a second to draw, on the driver, between trials;
# during a search they are redrawn at most this often (and always when the search ends). The
# CSV tables and counts are logged after every trial.
PLOTS_EVERY_S = 30.0


@dataclass
class TrialRecord:
    """What the driver knows about one trial."""

    key: str
    name: str
    run_id: str
    status: str = "RUNNING"
    metrics: dict[str, float] = field(default_factory=dict)
    summary: str = ""
    error: str = ""
    pareto: bool = False
    feasible: bool = True
    node: str = ""
    latency: dict[str, Any] = field(default_factory=dict)  # LatencyResult.to_dict()


class SearchTracker:
    """Writes a search to MLflow and keeps the Pareto front current.

    Args:
        client: MLflow client of the tracking store.
        experiment_id: MLflow experiment of the search.
        parent_run_id: The search's parent run.
        objectives: ``(metric, mode)`` pairs.
        max_accuracy_drop: Trials losing more accuracy are infeasible (never on the front).
        echo: Progress output (one line per event).
    """

    def __init__(self, client: MlflowClient, experiment_id: str, parent_run_id: str,
                 objectives: list[tuple[str, str]], baseline: Mapping[str, float],
                 max_accuracy_drop: float | None = None,
                 echo: Callable[[str], None] = print, total: int | None = None) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.objectives = objectives
        self.baseline = dict(baseline)
        self.max_accuracy_drop = max_accuracy_drop
        self.echo = echo
        self.total = total
        self.trials: dict[str, TrialRecord] = {}
        self._plotted_at: float | None = None  # time.monotonic() of the last plots

    @classmethod
    def start(cls, tracking_uri: str, experiment_name: str, config: dict[str, Any],
              baseline: Mapping[str, float], objectives: list[tuple[str, str]], *,
              max_accuracy_drop: float | None = None, facts: Mapping[str, str] | None = None,
              echo: Callable[[str], None] = print, total: int | None = None) -> SearchTracker:
        """Creates (or reuses) the MLflow experiment and opens a parent run for a new search."""
        client = client_for(tracking_uri)
        # MLflow 3's UI opens an experiment as GenAI or as model training by this tag.
        kind_tag, kind = "mlflow.experimentKind", "custom_model_development"
        exp = client.get_experiment_by_name(experiment_name)
        if exp is None:
            experiment_id = client.create_experiment(experiment_name, tags={kind_tag: kind})
        else:
            experiment_id = exp.experiment_id
            if kind_tag not in exp.tags:  # made by an older autocompress or by hand
                client.set_experiment_tag(experiment_id, kind_tag, kind)
        run = client.create_run(experiment_id, run_name=f"search-{time.strftime('%Y%m%d-%H%M%S')}",
                                tags={ROLE: "search", "autocompress.task": str(config.get("task"))})
        run_id = run.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in _flatten({
            k: config[k] for k in ("task", "objectives", "target", "search", "finetune", "constraints")
            if k in config}).items()]
        client.log_batch(run_id, params=params, tags=[RunTag(f"autocompress.{k}", str(v))
                                                      for k, v in (facts or {}).items()])
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"baseline_{k}", float(v), now, 0)
                                          for k, v in baseline.items()])
        client.log_text(run_id, json.dumps(config, indent=2, default=str), "experiment.json")
        return cls(client, experiment_id, run_id, objectives, baseline, max_accuracy_drop, echo, total)

    @classmethod
    def resume(cls, tracking_uri: str, parent_run_id: str, objectives: list[tuple[str, str]], *,
               max_accuracy_drop: float | None = None, echo: Callable[[str], None] = print,
               total: int | None = None) -> SearchTracker:
        """Reopens the parent run of an interrupted search and reloads its trials.

        Finished and failed trials are kept as they are; runs a killed driver left RUNNING
        are ended as KILLED (their trials are re-run, never counted twice).
        """
        client = client_for(tracking_uri)
        parent = client.get_run(parent_run_id)
        baseline = {k.removeprefix("baseline_"): v for k, v in parent.data.metrics.items()
                    if k.startswith("baseline_")}
        tracker = cls(client, parent.info.experiment_id, parent_run_id, objectives, baseline,
                      max_accuracy_drop, echo, total)
        for run in read_trials(client, parent_run_id):
            tags = run.data.tags
            status = "PRUNED" if tags.get(PRUNED) else run.info.status
            if status == "RUNNING":
                client.set_terminated(run.info.run_id, "KILLED")
                status = "KILLED"
            key = tags.get("autocompress.trial_key", run.info.run_id)
            tracker.trials[key] = TrialRecord(
                key, run.info.run_name, run.info.run_id, status,
                {k: v for k, v in run.data.metrics.items() if k in TRIAL_METRICS},
                tags.get(SUMMARY, ""), tags.get(ERROR, ""), tags.get(PARETO) == "true",
                tags.get(FEASIBLE, "true") == "true",
                latency={k.removeprefix(LATENCY_PREFIX): v for k, v in tags.items()
                         if k.startswith(LATENCY_PREFIX)})
        client.update_run(parent_run_id, status="RUNNING")
        return tracker

    def finished_count(self) -> int:
        """Trials that finished (FAILED and KILLED ones do not count)."""
        return sum(r.status == "FINISHED" for r in self.trials.values())

    def pruned_count(self) -> int:
        """Trials stopped early (they do not count toward the search's trials)."""
        return sum(r.status == "PRUNED" for r in self.trials.values())

    def ended_count(self) -> int:
        """Trials that ran to an end, finished or failed."""
        return sum(r.status in ("FINISHED", "FAILED") for r in self.trials.values())

    # --- trial events ---------------------------------------------------------------------

    def trial_started(self, key: str, params: Mapping[str, Any]) -> TrialRecord:
        """Opens a nested child run for a trial with its sampled parameters."""
        name = f"trial-{len(self.trials):03d}"
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            "mlflow.parentRunId": self.parent_run_id, ROLE: "trial", "autocompress.trial_key": key,
        })
        flat = _flatten(params)
        if flat:
            self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in flat.items()])
        record = TrialRecord(key, name, run.info.run_id)
        self.trials[key] = record
        return record

    def trial_epoch(self, key: str, epoch: int, accuracy: float) -> None:
        """Logs the metric after one fine-tuning epoch (as step ``epoch``)."""
        self.client.log_metric(self.trials[key].run_id, "accuracy", accuracy,
                               step=epoch, timestamp=int(time.time() * 1000))

    def trial_node(self, key: str, node: str) -> None:
        """Records the Ray node a trial runs on (tag ``autocompress.node``), once."""
        rec = self.trials[key]
        if node and node != rec.node:
            rec.node = node
            self.client.set_tag(rec.run_id, NODE, node)

    def trial_finished(self, key: str, metrics: Mapping[str, float], summary: str,
                       artifacts: Path | None = None, latency: Mapping[str, Any] | None = None) -> None:
        """Logs final metrics and artifacts, closes the run and updates the front.

        Args:
            latency: The measurement's facts (``LatencyResult.to_dict()``), logged as tags
                ``autocompress.latency.<key>`` (runs, why timing stopped, runtime version, ...).
        """
        rec = self.trials[key]
        missing = [m for m, _ in self.objectives if metrics.get(m) is None]
        if missing:  # an objective Optuna would see as NaN: the trial failed, say why
            self.trial_failed(key, f"the trial produced no value for objective(s) {missing}")
            return
        rec.metrics = {k: float(metrics[k]) for k in logged_metrics(metrics)}  # + per workload
        rec.summary, rec.latency = summary, dict(latency or {})
        rec.feasible = (self.max_accuracy_drop is None
                        or rec.metrics.get("accuracy_drop", 0.0) <= self.max_accuracy_drop + 1e-12)
        steps = int(metrics.get("epochs", 0))
        now = int(time.time() * 1000)
        self.client.log_batch(
            rec.run_id,
            metrics=[Metric(k, v, now, steps if k == "accuracy" else 0) for k, v in rec.metrics.items()],
            tags=[RunTag(SUMMARY, summary[:5000]), RunTag(FEASIBLE, str(rec.feasible).lower()),
                  *[RunTag(f"autocompress.latency.{k}", str(facts[k])[:5000])
                    for facts in [latency or {}] for k in LATENCY_FACTS if k in facts]],
        )
        if artifacts is not None:
            self.client.log_artifacts(rec.run_id, str(artifacts))
        rec.status = "FINISHED"
        self._update_front(key)
        self.client.set_terminated(rec.run_id, "FINISHED")
        self._report(rec)
        self._log_parent_artifacts()

    def trial_pruned(self, key: str, reason: str, epochs: int, accuracy: float | None,
                     summary: str = "") -> None:
        """Ends a trial stopped early as PRUNED (tag ``autocompress.pruned`` = the reason, run
        status FINISHED): it does not count toward the search's trials, nor the front. Its
        last metric is logged at step ``epochs``: the epoch it was in when it stopped (a
        trial stopped halfway through epoch 2 logs it at step 2; the reason says where)."""
        rec = self.trials.get(key) or self.trial_started(key, {})
        rec.status, rec.summary, rec.feasible = "PRUNED", summary, False
        if accuracy is not None:
            self.client.log_metric(rec.run_id, "accuracy", float(accuracy), step=epochs,
                                   timestamp=int(time.time() * 1000))
        self.client.log_batch(rec.run_id, tags=[
            RunTag(PRUNED, reason[:5000] or "pruned"), RunTag(PARETO, "false"),
            RunTag(FEASIBLE, "false"), RunTag(SUMMARY, summary[:5000])])
        self.client.set_terminated(rec.run_id, "FINISHED")
        self.echo(f"{self._progress()} {rec.name} PRUNED: {reason}")

    def trial_failed(self, key: str, error: str, details: str | None = None) -> None:
        """Ends a trial's run as FAILED.

        Args:
            key: The trial.
            error: Its root cause, one line (``Type: message``): the run's error tag.
            details: The whole error text (the traceback), logged as ``error.txt``.
        """
        rec = self.trials.get(key) or self.trial_started(key, {})
        rec.status, rec.error = "FAILED", error
        self.client.set_tag(rec.run_id, ERROR, error[:5000])
        self.client.set_tag(rec.run_id, PARETO, "false")
        if details:
            self.client.log_text(rec.run_id, details, "error.txt")
        self.client.set_terminated(rec.run_id, "FAILED")
        self.echo(f"{self._progress()} {rec.name} FAILED: {error[:300]}")
        self._log_parent_artifacts()

    def finish(self, status: str = "FINISHED") -> None:
        """Ends runs still open (as KILLED) and the parent run with ``status``."""
        for rec in self.trials.values():
            if rec.status == "RUNNING":
                rec.status = "KILLED"
                self.client.set_terminated(rec.run_id, "KILLED")
        if self.trials:
            self._log_parent_artifacts(plots=True)
        self.client.set_terminated(self.parent_run_id, status)

    # --- the front ------------------------------------------------------------------------

    def table(self) -> pd.DataFrame:
        """One row per trial: name, run id, status, metrics, front membership, plan summary."""
        rows = [{"trial": r.name, "run_id": r.run_id, "status": r.status, **r.metrics,
                 "feasible": r.feasible, "pareto": r.pareto, "summary": r.summary, "error": r.error}
                for r in self.trials.values()]
        per_workload = sorted({k for r in self.trials.values() for k in r.metrics}
                              - set(TRIAL_METRICS))  # latency_<workload>_ms, ...
        return pd.DataFrame(rows, columns=["trial", "run_id", "status", *TRIAL_METRICS,
                                           *per_workload, "feasible", "pareto", "summary", "error"])

    def front(self) -> pd.DataFrame:
        """The Pareto-optimal feasible finished trials, best first objective first."""
        df = self.table()
        df = df[df["pareto"]]
        metric, mode = self.objectives[0]
        return df.sort_values(metric, ascending=mode == "min").reset_index(drop=True)

    def _update_front(self, new_key: str) -> None:
        done = [r for r in self.trials.values() if r.status == "FINISHED"]
        metrics = [m for m, _ in self.objectives]
        values = np.array([[r.metrics.get(m, np.nan) for m in metrics] for r in done], dtype=float)
        values[[not r.feasible for r in done]] = np.nan  # infeasible: never on the front
        values = values.reshape(len(done), len(metrics))
        directions = [mode for _, mode in self.objectives]
        mask = non_dominated_mask(values, directions)
        if all(m in self.baseline for m in metrics):
            # Hypervolume relative to the baseline (see pareto.reference_point): grows as the
            # front improves; logged per finished trial so the UI shows the search converge.
            ref = reference_point([self.baseline[m] for m in metrics], directions)
            self.client.log_metric(self.parent_run_id, "hypervolume",
                                   hypervolume(values, directions, ref), step=len(done))
        for rec, on_front in zip(done, mask, strict=True):
            if bool(on_front) != rec.pareto or rec.key == new_key:  # only tags that change
                rec.pareto = bool(on_front)
                self.client.set_tag(rec.run_id, PARETO, str(rec.pareto).lower())

    def _log_parent_artifacts(self, plots: bool = False) -> None:
        """The trial table, the front and the counts on the parent run; the plots too when
        ``plots`` or when the last ones are :data:`PLOTS_EVERY_S` old."""
        from autocompress.tracking._plots import write_plots

        table = self.table()
        now = time.monotonic()
        plots = plots or self._plotted_at is None or now - self._plotted_at >= PLOTS_EVERY_S
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            table.to_csv(out / "trials.csv", index=False)
            front = self.front()
            front.to_csv(out / "pareto.csv", index=False)
            self._pairs().to_csv(out / "latency_pairs.csv", index=False)
            finished = table[table["status"] == "FINISHED"]
            if len(finished) and plots:
                write_plots(finished, self.baseline, out)
                self._plotted_at = now
            self.client.log_artifacts(self.parent_run_id, tmp)
        self.client.set_tag(self.parent_run_id, "autocompress.front_size", str(len(front)))
        counts = table["status"].value_counts()
        for status in ("FINISHED", "FAILED", "PRUNED"):
            self.client.log_metric(self.parent_run_id, f"trials_{status.lower()}",
                                   int(counts.get(status, 0)))
        hits = table.loc[table["status"] == "FINISHED", "latency_cache_hit"].dropna()
        if len(hits):
            self.client.log_metric(self.parent_run_id, "latency_cache_hits", int(hits.sum()))
            self.client.log_metric(self.parent_run_id, "latency_cache_hit_rate", float(hits.mean()))

    def _progress(self) -> str:
        counts = pd.Series([r.status for r in self.trials.values()]).value_counts()
        total = f"/{self.total}" if self.total else ""
        pruned = int(counts.get("PRUNED", 0))
        return (f"[{int(counts.get('FINISHED', 0))}{total} done, {int(counts.get('RUNNING', 0))} "
                f"running, {int(counts.get('FAILED', 0))} failed"
                f"{f', {pruned} pruned' if pruned else ''}]")

    def _pairs(self) -> pd.DataFrame:
        """How each finished trial's latency was timed: when, the baseline's median timed in
        the same window (how fast the machine was then), the trial's own, their ratio, how
        much the baseline drifted while timing and how often that retimed it
        (``latency_pairs.csv``; see :mod:`autocompress.measure._paired`)."""
        columns = ["measured_at", "reference_ms", "measured_ms", "speedup", "drift", "slowdown",
                   "retries", "cached"]
        rows = [{"trial": r.name, **{c: r.latency.get(c) for c in columns}}
                for r in self.trials.values() if r.status == "FINISHED" and r.latency]
        return pd.DataFrame(rows, columns=["trial", *columns])

    def _report(self, rec: TrialRecord) -> None:
        m = rec.metrics
        front = sum(r.pareto for r in self.trials.values())
        retries = 0 if m.get("latency_cache_hit") else int(rec.latency.get("retries") or 0)
        retimed = (f", timed {retries + 1}x: the machine drifted, or ran slower than usual, by "
                   f"more than {100 * DRIFT_LIMIT:.0f}% while timing" if retries else "")
        post = m.get("accuracy_post_training")
        tuned = (f" ({post:.4f} after compression)"
                 if post is not None and np.isfinite(post) and post != m.get("accuracy") else "")
        self.echo(f"{self._progress()} {rec.name}: accuracy {m.get('accuracy', float('nan')):.4f}"
                  f"{tuned} size {m.get('size_bytes', 0) / 1024:.1f} KiB "
                  f"({m.get('compression_ratio', 0):.1f}x) "
                  f"latency {m.get('latency_ms', 0):.4f} ms ({m.get('speedup', 0):.2f}x"
                  f"{', cached' if m.get('latency_cache_hit') else ''}{retimed})"
                  f"{'' if rec.feasible else ' [infeasible]'}{' *front*' if rec.pareto else ''}"
                  f"  front: {front} | {rec.summary}")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "/" if key else ""))
        elif isinstance(v, list | tuple) and v and all(isinstance(x, Mapping) for x in v):
            for i, x in enumerate(v):
                out.update(_flatten(x, f"{key}/{i}/"))
        else:
            out[key] = v
    return out


