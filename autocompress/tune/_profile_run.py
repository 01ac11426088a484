"""The sensitivity profile's measurements (:mod:`autocompress.tune._sensitivity`): the
uncompressed model's outputs, the calibration statistics, each layer's probes (layer-local or
on the model) and its gain, with progress lines."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from autocompress.compress import KNOB_TABLE, LayerPlan, Plan, PlanError
from autocompress.tune._local_probes import input_shapes, is_local, local_error, measured_distortion

PROGRESS_SECONDS = 5.0  # between progress lines
# A calibrated variant is not probed where its naive setting's local error is below this
# (0.1% of the layer's output energy: 8-bit weights, mild sparsity); its prediction then
# reads the naive one's, which it can only improve on.
VARIANT_FLOOR = 1e-3


def _naive(setting: dict[str, Any]) -> dict[str, Any]:
    """``setting`` with its ``probe_variants`` knobs at their defaults (left out)."""
    variants = {k for spec in KNOB_TABLE.values() for k in spec.probe_variants}
    return {k: v for k, v in setting.items() if k not in variants}


class Progress:
    """Counts probes and prints a line every :data:`PROGRESS_SECONDS`."""

    def __init__(self, total: int, echo: Callable[[str], None] | None) -> None:
        self.total, self.echo = total, echo
        self.done = {"local": 0, "model": 0, "gain": 0}
        self.start = self.last = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def tick(self, kind: str) -> None:
        self.done[kind] += 1
        self.line()

    def note(self, what: str) -> None:
        if self.echo:
            self.echo(f"sensitivity: {what} in {self.elapsed():.0f} s")

    def line(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self.echo and (force or now - self.last >= PROGRESS_SECONDS):
            self.last = now
            done = self.done
            self.echo(f"sensitivity: {done['local'] + done['model']}/{self.total} probes "
                      f"({done['local']} layer-local, {done['model']} model-level; "
                      f"{done['gain']} layer gains measured), {now - self.start:.0f} s")


class ProfileRun:
    """One profile's measurements: the baseline, the calibration statistics, the probes."""

    def __init__(self, task: Any, subset: list, samples: int, names: list[str],
                 progress: Progress) -> None:
        from autocompress.compress import Calibration, input_stats

        self.task, self.subset, self.progress = task, subset, progress
        self.with_metric = True
        model = task.model
        self.base = task_metric(task, model, subset)
        self.reference = outputs(model, subset)
        self.stats: dict[str, Any] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        if names:
            found = input_stats(model, [model.get_submodule(n) for n in names],
                                Calibration.from_task(task, samples))
            self.stats = {n: found[model.get_submodule(n)] for n in names}
            self.shapes = input_shapes(model, names, task.example_inputs)
            progress.note(f"input statistics of {len(names)} layers")


    def distortion(self, model: Any) -> float:
        return distortion_of(outputs(model, self.subset), self.reference)

    def layer(self, name: str, settings: list[dict[str, Any]]
              ) -> list[tuple[float, float, float] | None]:
        """``(metric, distortion, local error)`` of each probe of one layer: the local ones
        scaled by the layer's gain (metric NaN), the others measured on the model (local
        error NaN); NaNs where a probe failed; None where a variant was not worth probing
        (:data:`VARIANT_FLOOR`)."""
        module = self.task.model.get_submodule(name)
        local: dict[int, tuple[float, Any]] = {}
        measured: dict[int, tuple[float, float]] = {}
        skipped: set[int] = set()
        for i, s in enumerate(settings):
            naive = _naive(s)
            j = settings.index(naive) if naive != s and naive in settings else None
            if j in local and local[j][0] < VARIANT_FLOOR:
                skipped.add(i)
                self.progress.tick("local")
                continue
            if name in self.stats and is_local(module, s):
                try:
                    local[i] = local_error(name, module, s, self.shapes[name], self.stats[name])
                except PlanError:  # the method refuses it: a trial would fail the same way
                    local[i] = (math.nan, None)
                except Exception:  # noqa: BLE001 - not expressible locally: run the model,
                    if naive != s:  # but not for a variant whose method needs more than the
                        local[i] = (math.nan, None)  # Gram matrix (AWQ's input rows): unprobed
                if i in local:
                    self.progress.tick("local")
                    continue
            measured[i] = model_probe(self.task, name, s, self.subset, self.reference,
                                 self.with_metric)
            self.progress.tick("model")
        gain = self._gain(name, local)
        return [None if i in skipped else (math.nan, gain * local[i][0], local[i][0])
                if i in local else (*measured[i], math.nan) for i in range(len(settings))]

    def _gain(self, name: str, local: dict[int, tuple[float, Any]]) -> float:
        """Model-level distortion per unit of local error, from the probe at the median
        positive local error, measured with its compressed layer in the model."""
        ranked = sorted((err, i) for i, (err, _) in local.items() if err > 0 and math.isfinite(err))
        if not ranked:
            return 0.0
        err, i = ranked[len(ranked) // 2]
        import torch

        with torch.no_grad():
            measured = measured_distortion(self.task.model, name, local[i][1], self.distortion)
        self.progress.tick("gain")
        return measured / err


def model_probe(task: Any, layer: str, setting: dict[str, Any], subset: list,
           reference: list[Any], with_metric: bool = True) -> tuple[float, float]:
    """The probe's metric (NaN without ``with_metric``) and distortion measured on the model
    (the layer compressed in a copy), or NaNs if compressing or evaluating it fails (a trial
    with that setting would fail the same way; it is then never allocated)."""
    from autocompress.compress import apply
    from autocompress.compress.quantize import calibrate

    try:
        model = apply(task.model, Plan({layer: LayerPlan(**setting)}), task.example_inputs)
        calibrate(model, [x for x, *_ in subset])
        model.eval()
        metric = task_metric(task, model, subset) if with_metric else math.nan
        return metric, distortion_of(outputs(model, subset), reference)
    except Exception:  # noqa: BLE001 - a user's model or metric may refuse anything
        return math.nan, math.nan


def outputs(model: Any, subset: list) -> list[Any]:
    """The model's float outputs on the subset's inputs, one flat fp32 tensor per batch."""
    import torch

    from autocompress._inputs import run
    from autocompress.compress import output_tensors

    with torch.no_grad():
        return [torch.cat([t.detach().float().flatten() for t in output_tensors(run(model, x))
                           if t.is_floating_point()]) for x, *_ in subset]


def distortion_of(outputs: list[Any], reference: list[Any]) -> float:
    err = sum(float((y - y0).pow(2).sum()) for y, y0 in zip(outputs, reference, strict=True))
    norm = sum(float(y0.pow(2).sum()) for y0 in reference)
    return err / max(norm, 1e-30)


def task_metric(task: Any, model: Any, subset: list) -> float:
    import torch

    from autocompress.measure import top1_accuracy

    with torch.no_grad():
        return float((task.metric or top1_accuracy)(model, subset))


def count(batch: Any) -> int:
    y = batch[-1] if isinstance(batch, tuple | list) else batch
    return len(y)
