"""Rebuilding a trial's compressed model from what MLflow holds, without re-running anything.

A trial run holds its plan (``plan.json``) and its compressed weights (``model.pt``, the
state dict of the baked model: masks and quantization folded in); its parent search run holds
the experiment (``experiment.json``: task reference, seed, target). The task is loaded (its
baseline comes from the cache), the plan is applied to get the compressed architecture
(channels removed, layers factorized, quantizers and masks in place), and the logged weights
are loaded into it:

- a parametrized weight's logged values go to ``parametrizations.weight.original``; its mask
  becomes ``weight != 0`` where the knob table says the layer's plan keeps a mask
  (``KnobSpec.masks``: unstructured sparsity), and stays all-ones elsewhere;
- buffers load as they are: a ``quantizer: awq`` layer's input scale (``input_scale.factor``,
  all ones after ``apply(..., Calibration.empty())``) gets the trial's ``1/s``, and its
  logged weight is already ``W diag(s)``, quantized;
- quantizing already-quantized values is the identity: the largest magnitude of ``q * scale``
  is ``qmax * scale``, so the recomputed scale and integer values are the logged ones (pow2:
  the largest magnitude is the calibrated scale, whose first candidate quantizes the logged
  values with zero error; fp16/bf16: rounding a representable value gives it back).

The result is the trial's model again: same outputs, same ``size_bytes``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch import nn
from torch.nn.utils import parametrize

from autocompress._errors import ConfigError
from autocompress.compress import Plan
from autocompress.tracking import LATENCY_PREFIX, ROLE, SUMMARY, open_store

PARENT = "mlflow.parentRunId"


@dataclass
class Rebuilt:
    """A trial's compressed model, rebuilt from MLflow.

    Attributes:
        model: The compressed model (parametrized: masks and fake quantization live), eval mode.
        task: The experiment's task (its validation data and metric).
        plan: The trial's plan.
        metrics: The metrics logged for the trial.
        experiment: The experiment config the search ran with (``experiment.json``).
        run_id: The trial run.
        parent_run_id: The search (parent) run.
        experiment_name: The MLflow experiment.
        trial: The trial's run name, e.g. ``trial-016``.
        baseline: The search's ``baseline_*`` metrics, without the prefix.
        summary: The plan in one line as the search logged it (layers in model order).
        latency: The facts of the trial's logged latency (``autocompress.latency.*`` tags,
            without the prefix: ``graph``, the graph form that was timed, ...).
    """

    model: nn.Module
    task: Any
    plan: Plan
    metrics: dict[str, float]
    experiment: dict[str, Any]
    run_id: str
    parent_run_id: str
    experiment_name: str
    trial: str
    baseline: dict[str, float] = field(default_factory=dict)
    summary: str = ""
    latency: dict[str, str] = field(default_factory=dict)

    @property
    def target(self):
        """The experiment's latency target."""
        from autocompress.measure import Target

        return Target(**self.experiment.get("target", {}))


def quiet_downloads() -> None:
    """Turns off MLflow's per-file download progress bars (noise on stderr)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def get_trial_run(client: MlflowClient, run_id: str):
    """The trial run ``run_id``.

    Raises:
        ConfigError: No such run, not an autocompress trial, or a trial that did not finish.
    """
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise ConfigError(f"no MLflow run with id {run_id!r} in this tracking store "
                              "(see `autocompress pareto EXPERIMENT` for run ids)") from None
        raise
    role = run.data.tags.get(ROLE)
    if role != "trial" or PARENT not in run.data.tags:
        what = "the parent run of a search" if role == "search" else "not an autocompress trial"
        raise ConfigError(f"run {run_id!r} is {what}; pass the run id of a trial "
                          "(see `autocompress pareto EXPERIMENT`)")
    if run.info.status != "FINISHED":
        raise ConfigError(f"trial run {run_id!r} ended with status {run.info.status}; only "
                          "finished trials have weights to export")
    return run


def download_text(client: MlflowClient, run_id: str, path: str) -> str:
    """The text of artifact ``path`` of run ``run_id``."""
    quiet_downloads()
    with tempfile.TemporaryDirectory() as tmp:
        return Path(client.download_artifacts(run_id, path, tmp)).read_text()


def rebuild_from_run(run_id: str, tracking_uri: str, task: Any = None) -> Rebuilt:
    """Rebuilds the compressed model of trial run ``run_id`` (see the module docstring).

    Args:
        run_id: An autocompress trial run (``autocompress pareto`` lists them).
        tracking_uri: The MLflow tracking store the search logged to.
        task: The task the search ran on, as a :class:`~autocompress.Task`; needed when it was
            an in-memory task (the log holds only its name); default: load the logged task.

    Raises:
        ConfigError: Unknown run id, a run that is not a finished autocompress trial, or a task
            that cannot be loaded.
    """
    from autocompress.compress import Calibration, apply
    from autocompress.config import IN_MEMORY_PREFIX
    from autocompress.tasks import load_task, remembered_task

    client = open_store(tracking_uri, must_exist=True)
    run = get_trial_run(client, run_id)
    parent_id = run.data.tags[PARENT]
    config = json.loads(download_text(client, parent_id, "experiment.json"))
    if task is None and str(config["task"]).startswith(IN_MEMORY_PREFIX):
        task = remembered_task(parent_id)  # searched in this process
        if task is None:
            raise ConfigError(f"trial run {run_id!r} was searched on an in-memory task "
                              f"({config['task']}), which the log cannot rebuild; pass the same "
                              f"task: autocompress.export(run_id, ..., task=task)", key="task")
    plan = Plan.from_json(download_text(client, run_id, "plan.json"))
    quiet_downloads()
    with tempfile.TemporaryDirectory() as tmp:
        state = torch.load(client.download_artifacts(run_id, "model.pt", tmp), weights_only=True)

    task = load_task(task if task is not None else config["task"],
                     seed=(config.get("search") or {}).get("seed") or 0)
    # The logged weights replace what calibration would compute: set up the structure only.
    model = apply(task.model, plan, task.example_inputs, calibration=Calibration.empty())
    load_baked_state(model, state, plan)
    parent = client.get_run(parent_id)
    return Rebuilt(
        model=model, task=task, plan=plan, metrics=dict(run.data.metrics), experiment=config,
        run_id=run_id, parent_run_id=parent_id,
        experiment_name=client.get_experiment(run.info.experiment_id).name,
        trial=run.info.run_name or run_id,
        baseline={k.removeprefix("baseline_"): v for k, v in parent.data.metrics.items()
                  if k.startswith("baseline_")},
        summary=run.data.tags.get(SUMMARY) or plan.summary(),
        latency={k.removeprefix(LATENCY_PREFIX): v for k, v in run.data.tags.items()
                 if k.startswith(LATENCY_PREFIX)},
    )


def load_baked_state(model: nn.Module, state: dict[str, torch.Tensor], plan: Plan) -> None:
    """Loads a baked state dict (``bake(model).state_dict()``) into a compressed ``model``.

    Args:
        model: ``apply(baseline, plan, ...)``: the compressed architecture, parametrized.
        state: The trial's logged weights.
        plan: The trial's plan (which layers had unstructured masks).

    Raises:
        RuntimeError: The weights do not fit the architecture (the task's model changed since
            the search).
    """
    from autocompress.compress import leaves, needs_masks, plan_after_drops, weight_compression

    plan = plan_after_drops(model, plan)  # named as in the model: dropped blocks renumber
    masked = {id(leaf) for name, lp in plan.active().items()
              if needs_masks(lp) for leaf in leaves(model, name)}
    mapped = {}
    for key, value in state.items():
        owner, _, attr = key.rpartition(".")
        mod = model.get_submodule(owner)
        if attr == "weight" and parametrize.is_parametrized(mod, "weight"):
            key = f"{owner + '.' if owner else ''}parametrizations.weight.original"
            if id(mod) in masked:
                mask: torch.Tensor = weight_compression(mod).mask  # type: ignore[assignment]
                mask.copy_(value != 0)
        mapped[key] = value
    try:
        missing, unexpected = model.load_state_dict(mapped, strict=False)
    except RuntimeError as e:
        raise RuntimeError(f"the logged weights do not fit the model rebuilt from the plan "
                           f"(did the task's model change since the search?): {e}") from None
    missing = [k for k in missing if not k.endswith(".mask")]  # masks were set above
    if missing or unexpected:
        raise RuntimeError(f"the logged weights do not fit the model rebuilt from the plan: "
                           f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.eval()
