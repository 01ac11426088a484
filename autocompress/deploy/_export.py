"""Exporting a trial: a deployable artifact, verified against what the trial logged.

``export_run(run_id, fmt, out_dir, tracking_uri)`` rebuilds the trial's model from MLflow
(:mod:`autocompress.deploy._rebuild`), writes one artifact and checks it with its own
runtime; what each format writes, loads and runs on is its record in the export-format
registry (:mod:`~autocompress.deploy._export_formats`; the built-ins, ``onnx``, ``torchscript``
and ``packed``, are in :mod:`~autocompress.deploy._artifacts`).

Verification: the task's metric is computed from the loaded artifact's outputs on the task's
validation data and compared with the metric logged for the trial; a difference larger than
``tolerance`` (default 0.005, half a point of accuracy for a metric that is a fraction) is an
error. Why a tolerance and not equality: with its default graph optimizations (what a plain
``InferenceSession`` does, and what verification uses) ONNX Runtime folds BatchNorm into the
convs and replaces int8-weight MatMuls by its own ``MatMulNBits`` kernels, so its outputs
differ from PyTorch's (``max_output_diff`` records by how much: about 1e-5 without those
kernels, 0.13 on logits up to 23 for a digits model with quantized Linear layers) and a
validation sample near a decision boundary may flip (1 of 360 digits images = 0.0028).
``torchscript`` and ``packed`` reproduce the metric exactly. The rebuilt model's
``size_bytes`` must equal the logged one exactly (it is computed, not measured).

Latency is re-measured, never copied: ``latency_ms``/``p90_ms`` on the experiment's target
with the search's protocol (comparable with the logged value and the baseline), and
``artifact_latency_ms`` with the artifact's own runtime on the target's device, threads and
batch size (for ``onnx`` on an ``onnxruntime`` target both are one timing: ``measure_latency``
exports the same graph; with ``act_bits: 8`` layers only the calibrated ranges of the tensors
between them differ, as the artifact is calibrated on the task's calibration batches). The
latency cache is bypassed, so these are new timings, not the search's looked up again. The
target's timing is paired with the baseline, as the search's were: ``latency_ms`` is on the
clock of the search's logged baseline latency (the baseline's logged latency / the speed-up
measured now), so it and ``speedup`` compare with the logged ones whatever the machine's
speed today; the raw medians of this timing are ``measured_ms`` (the model) and
``reference_ms`` (the baseline, in the same window), and an artifact timed on another runtime
is put on the same clock. Every other number printed and written to ``export.json`` is
measured here; the search's appear only as ``logged_*``. ``export.json`` describes the latest
export into its directory: export each format into its own directory.

The artifact and ``export.json`` are written to a temporary directory inside ``out_dir`` and
moved into place only after verification (and registration) succeeded, so a failed export
leaves nothing behind.

Registry (``register="NAME"``): the artifact is saved as an MLflow model (``onnx`` flavour for
``onnx``; ``pytorch`` flavour of the loaded module for ``torchscript`` and ``packed``, the
``.acpk`` file added as an extra file), logged as a LoggedModel of the trial's experiment
whose source run is the trial (and listed as the trial run's output), and registered as a new
version of ``NAME`` with ``run_id`` = the trial run (the registry UI links the version to it).
The trial run itself is not reopened or changed otherwise. Version tags hold the
re-measured metrics, the plan (``autocompress.plan``), the source trial and search runs and the
experiment; the description says the same in a sentence. Nothing is downloaded (pip
requirements are given, not inferred), so it works offline on the default SQLite store.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autocompress.deploy._export_formats import DEFAULT_TOLERANCE, EXPORT_FORMATS, ExportFormat
from autocompress.deploy._rebuild import Rebuilt, rebuild_from_run

METRIC_TAGS = ("accuracy", "accuracy_drop", "size_bytes", "compression_ratio", "latency_ms",
               "speedup", "file_bytes")


class VerificationError(RuntimeError):
    """The exported artifact does not reproduce the trial's logged results."""


def export_run(run_id: str, fmt: str, out_dir: str | os.PathLike, tracking_uri: str,
               register: str | None = None, tolerance: float = DEFAULT_TOLERANCE,
               task: Any = None) -> dict[str, Any]:
    """Exports trial ``run_id`` as ``fmt`` into ``out_dir``, verified (see the module docstring).

    Args:
        run_id: A finished trial run (``autocompress pareto`` lists the front's).
        fmt: A registered export format: ``onnx``, ``torchscript``, ``packed``.
        out_dir: Directory for the artifact and ``export.json`` (created if needed).
        tracking_uri: The MLflow store the search logged to.
        register: Register the artifact as a new version of this MLflow registered model.
        tolerance: Largest allowed ``|artifact metric - logged metric|``.
        task: The search's task object, for a search that ran on an in-memory task.

    Returns:
        The content of ``export.json``: ``path``, ``format``, the re-measured metrics, the
        logged ones as ``logged_*``, ``run_id``, ``plan`` (and ``registered`` with
        ``register``).

    Raises:
        ConfigError: Unknown format (``UnknownNameError``, with did-you-mean), unknown run
            id, or a run that is not a finished trial.
        VerificationError: The artifact's metric or size differs from the logged one.
    """
    spec = EXPORT_FORMATS.get(fmt, key="--format")
    rebuilt = rebuild_from_run(run_id, tracking_uri, task)
    out_dir = Path(out_dir)
    created = [d for d in (out_dir, *out_dir.parents) if not d.exists()]  # removed on failure
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
    done = False
    try:
        path = tmp / spec.file
        spec.write(rebuilt, path)
        form = graph_form(rebuilt, path) if spec.runtime == "onnxruntime" else {}
        loaded = spec.load(path)
        result = _verify(rebuilt, fmt, loaded, tolerance)
        result.update(form)
        result.update(_timings(rebuilt, spec, loaded))
        result.update({"path": str((out_dir / spec.file).resolve()), "format": fmt,
                       "file_bytes": path.stat().st_size})
        result = {**{k: result[k] for k in ("path", "format")}, **_derived(rebuilt, result), **result,
                  **_provenance(rebuilt)}
        if register:
            result["registered"] = register_artifact(register, path, spec, loaded, rebuilt, result,
                                                     tracking_uri)
        (tmp / "export.json").write_text(json.dumps(result, indent=2))
        for name in (spec.file, "export.json"):  # the artifact first: export.json vouches for it
            os.replace(tmp / name, out_dir / name)
        done = True
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            for d in created:  # deepest first; only the directories this call made
                d.rmdir()


def graph_form(rebuilt: Rebuilt, path: Path) -> dict[str, str]:
    """Rewrites the ONNX file ``path`` in the graph form the target timed, and says which.

    ``target.graph: fused``: ONNX Runtime's transformer fusions
    (:func:`~autocompress.onnxgraph.fuse`); ``best``: the form the trial's logged latency says
    was timed (``autocompress.latency.graph``); ``plain``: the file as exported. A fused graph
    whose outputs differ from the plain one's on the example inputs is not written (the plain
    file stays, with the reason), as the timing did. The file is then verified as any other.

    Returns:
        ``graph`` (the form written), ``fused_ops`` and ``graph_note``; {} for ``plain``.
    """
    from autocompress._inputs import to_numpy_feed
    from autocompress.onnxgraph import fuse, verify_fused

    wanted = rebuilt.target.graph
    if wanted == "best":
        wanted = rebuilt.latency.get("graph") or "plain"
    if wanted != "fused":
        return {"graph": "plain"} if rebuilt.target.graph != "plain" else {}
    plain = path.read_bytes()
    fused = fuse(plain)
    reason = verify_fused(plain, fused.onnx, to_numpy_feed(rebuilt.task.example_inputs))
    if reason is not None:
        return {"graph": "plain", "fused_ops": fused.summary,
                "graph_note": f"fused graph not used: {reason}"}
    path.write_bytes(fused.onnx)
    return {"graph": "fused", "fused_ops": fused.summary}


def _verify(rebuilt: Rebuilt, fmt: str, loaded: nn.Module, tolerance: float) -> dict[str, Any]:
    """The artifact's metric (checked against the logged one) and the model's size."""
    from autocompress.measure import size_bytes

    accuracy = float(rebuilt.task.evaluate(loaded))
    logged = rebuilt.metrics.get("accuracy")
    if logged is None or not abs(accuracy - logged) <= tolerance:
        raise VerificationError(
            f"the exported {fmt} model scores {accuracy:.4f} on the validation data but the trial "
            f"logged {_fmt(logged)}; the difference exceeds the tolerance {tolerance}")
    size = size_bytes(rebuilt.model)
    if size != rebuilt.metrics.get("size_bytes"):
        raise VerificationError(f"the rebuilt model stores {size} bytes but the trial logged "
                                f"{_fmt(rebuilt.metrics.get('size_bytes'))}")
    return {"accuracy": accuracy, "logged_accuracy": logged, "tolerance": tolerance,
            "max_output_diff": _max_output_diff(loaded, rebuilt),
            "validation_samples": _count_samples(rebuilt.task.val_loader),
            "size_bytes": size, "logged_size_bytes": rebuilt.metrics.get("size_bytes")}


def _fmt(value: float | None) -> str:
    return "nothing" if value is None else f"{value:.4f}" if value < 1 else f"{value:,.0f}"


def _timings(rebuilt: Rebuilt, spec: ExportFormat, loaded: nn.Module) -> dict[str, Any]:
    target = rebuilt.target
    latency, artifact = _time_artifact(rebuilt, spec, loaded)
    if artifact is not None and artifact is not latency and latency.paired:
        clock = latency.latency_ms / latency.measured_ms  # timed alone: onto the same clock
        artifact = replace(artifact, latency_ms=artifact.latency_ms * clock,
                           p90_ms=artifact.p90_ms * clock)
    return {"latency_ms": latency.latency_ms, "p90_ms": latency.p90_ms,
            "measured_ms": latency.measured_ms, "reference_ms": latency.reference_ms,
            "paired_speedup": latency.speedup,
            "logged_latency_ms": rebuilt.metrics.get("latency_ms"),
            "latency_target": f"{target.runtime}/{target.device}, {target.threads} thread(s), "
                              f"batch {target.batch_size}",
            "latency_runtime": target.runtime, "artifact_runtime": spec.runtime,
            "artifact_latency_ms": artifact and artifact.latency_ms,
            "artifact_p90_ms": artifact and artifact.p90_ms}


def _derived(rebuilt: Rebuilt, m: dict[str, Any]) -> dict[str, float | None]:
    """``accuracy_drop``, ``compression_ratio`` and ``speedup`` of the re-measured values."""
    from autocompress.measure import relative_metrics

    return relative_metrics(m, rebuilt.baseline)


def _provenance(rebuilt: Rebuilt) -> dict[str, Any]:
    return {"run_id": rebuilt.run_id, "trial": rebuilt.trial, "parent_run_id": rebuilt.parent_run_id,
            "experiment": rebuilt.experiment_name, "task": rebuilt.experiment.get("task"),
            "plan": rebuilt.plan.to_dict()}


def _time_artifact(rebuilt: Rebuilt, spec: ExportFormat, loaded: nn.Module):
    """``(latency on the experiment's target, latency of the artifact on its own runtime)``.

    Both are measured now: the latency cache is bypassed (it would return the search's number
    for the same graph). The first is timed paired with the baseline, on the clock of the
    search's logged baseline latency (as the search timed it): its speed-up is the paired
    ratio. The second is None where the artifact's runtime cannot run on the target's device
    (TorchScript or packed on a remote ONNX Runtime agent).
    """
    from autocompress.measure import measure_latency
    from autocompress.measure.latency import PairedMeasurer, prepare

    target, x = rebuilt.target, rebuilt.task.example_inputs
    paired = PairedMeasurer(target)
    paired.set_reference(prepare(rebuilt.task.model, x, target),
                         latency_ms=rebuilt.baseline.get("latency_ms"))
    latency = paired.measure(prepare(rebuilt.model, x, target), use_cache=False)
    if spec.runtime == target.runtime:
        # for onnx: the same graph was timed (calibrated on the example inputs instead of the
        # calibration batches, so only the ranges between act_bits 8 layers differ)
        return latency, latency
    if target.device == "remote":
        return latency, None
    own = replace(target, runtime=spec.runtime)
    return latency, measure_latency(rebuilt.model if spec.times_model else loaded, x, own,
                                    use_cache=False)


@torch.no_grad()
def _max_output_diff(loaded: nn.Module, rebuilt: Rebuilt) -> float | None:
    """Largest ``|artifact output - trial model output|`` over the validation inputs (for the
    record; the pass/fail criterion is the metric). None for non-tensor outputs."""
    from autocompress._inputs import run
    from autocompress.compress import bake

    reference = bake(rebuilt.model)
    worst = 0.0
    for x, *_ in rebuilt.task.val_loader:
        a, b = run(loaded, x), run(reference, x)
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return None
        worst = max(worst, float((a - b).abs().max()))
    return worst


def _count_samples(loader) -> int | None:
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


def register_artifact(name: str, path: Path, spec: ExportFormat, loaded: nn.Module,
                      rebuilt: Rebuilt, result: dict[str, Any], tracking_uri: str) -> dict[str, Any]:
    """Logs ``path`` as an MLflow model of the trial and registers it as a new version of ``name``.

    Returns:
        ``{name, version, run_id, model_id, model_uri}`` of the new version.
    """
    from mlflow.entities import LoggedModelOutput
    from mlflow.exceptions import MlflowException
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    fmt = spec.name
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    x = rebuilt.task.example_inputs
    with torch.no_grad():
        signature = infer_signature(x.numpy(), loaded(x).numpy())
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "model"
        spec.save_mlflow(loaded, path, local, signature, rebuilt)
        experiment_id = client.get_run(rebuilt.run_id).info.experiment_id
        logged_model = client.create_logged_model(
            experiment_id, name=f"{rebuilt.trial}-{fmt}", source_run_id=rebuilt.run_id,
            tags={"autocompress.format": fmt}, model_type=fmt)
        client.log_model_artifacts(logged_model.model_id, str(local))
        client.finalize_logged_model(logged_model.model_id, "READY")
    # Listed as an output of the trial run, so the run's page shows the model too.
    client.log_outputs(rebuilt.run_id, [LoggedModelOutput(logged_model.model_id, step=0)])
    try:
        client.create_registered_model(
            name, description="Compressed models exported by autocompress from Pareto-optimal trials.")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {f"autocompress.{k}": str(result[k]) for k in METRIC_TAGS if result.get(k) is not None}
    tags.update({
        "autocompress.plan": json.dumps(rebuilt.plan.to_dict(), separators=(",", ":")),
        "autocompress.format": fmt, "autocompress.source_run_id": rebuilt.run_id,
        "autocompress.search_run_id": rebuilt.parent_run_id,
        "autocompress.experiment": rebuilt.experiment_name,
        "autocompress.task": str(rebuilt.experiment.get("task")),
        "autocompress.latency_target": result["latency_target"],
    })
    version = client.create_model_version(
        name, source=logged_model.artifact_location, run_id=rebuilt.run_id, tags=tags,
        description=_describe(rebuilt, result), model_id=logged_model.model_id)
    return {"name": name, "version": int(version.version), "run_id": version.run_id,
            "model_id": logged_model.model_id, "model_uri": f"models:/{name}/{version.version}"}


def _describe(rebuilt: Rebuilt, r: dict[str, Any]) -> str:
    ratio = f" ({r['compression_ratio']:.1f}x smaller)" if r.get("compression_ratio") else ""
    return (f"{rebuilt.trial} (run {rebuilt.run_id}) of search {rebuilt.parent_run_id} (experiment "
            f"{rebuilt.experiment_name!r}, task {rebuilt.experiment.get('task')!r}), exported as "
            f"{r['format']} and verified: accuracy {r['accuracy']:.4f} (logged "
            f"{r['logged_accuracy']:.4f}, tolerance {r['tolerance']}) on "
            f"{r['validation_samples']} validation samples; size {r['size_bytes']:,} bytes{ratio}; "
            f"latency {r['latency_ms']:.4f} ms on {r['latency_target']}. "
            f"Plan: {rebuilt.summary}")
