"""Per-layer sensitivity: the task metric after compressing one layer alone, without
fine-tuning, for each value its search space offers (HAWQ-V3, ModelOpt ``auto_quantize`` and
NNCF's mixed precision steer per-layer choices the same way, with measured sensitivity).

A *probe* compresses one layer by one knob value (each knob the knob table marks ``probed``:
``sparsity`` at a few strengths for each ``structure`` the layer's domain has, each ``bits``,
each ``rank``; ``act_bits`` with 8-bit weights), calibrates activation ranges, and measures on
a subset of the validation data (the first ``batches`` batches) the task metric and the
*distortion*: the squared error of the model's outputs against the uncompressed model's,
relative to their squared norm. The metric is what a user reads; the distortion is what the
seeding allocates with: it is continuous (a metric such as accuracy on a few hundred samples
does not move for most single-layer changes, so many settings would look free) and adds up
over layers for small changes, as
HAWQ's and ModelOpt's per-layer loss terms do. The profile is cached in
``$AUTOCOMPRESS_CACHE/sensitivity`` per task model (its weights' digest), search space and
subset, so a second search of the same task pays nothing. :mod:`autocompress.tune._seeds`
turns it into the search's first trials.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from autocompress.compress import KNOB_TABLE, LayerPlan, Plan, reconcile, same

SENSITIVITY_BATCHES = 8
RANGE_POINTS = 4  # probes of a range domain: this many evenly spaced values above its low end
_FORMAT = 2  # of the cached profiles (2: with the distortion)


@dataclass(frozen=True)
class Probe:
    """One layer compressed by one setting, alone, not fine-tuned.

    Attributes:
        layer: Module name.
        knobs: The ``LayerPlan`` values set (the others at their defaults).
        metric: The task metric on the subset.
        distortion: ``sum ||y - y0||^2 / sum ||y0||^2`` over the subset's outputs ``y`` against
            the uncompressed model's ``y0`` (NaN if the probe failed).
    """

    layer: str
    knobs: dict[str, Any]
    metric: float
    distortion: float = math.nan

    def label(self) -> str:
        """``bits=4`` or ``sparsity=0.5 structure=channel``."""
        return " ".join(f"{k}={v}" for k, v in self.knobs.items())


@dataclass(frozen=True)
class Sensitivity:
    """A model's sensitivity profile over a search space.

    Attributes:
        metric: The uncompressed model's metric on the subset.
        probes: One per (layer, setting).
        batches: Validation batches evaluated per probe.
        seconds: What measuring it cost (0 when read from the cache).
        cached: Read from the cache.
    """

    metric: float
    probes: tuple[Probe, ...]
    batches: int
    seconds: float = 0.0
    cached: bool = False

    def _find(self, layer: str, knob: str, value: Any, with_: dict[str, Any]) -> Probe | None:
        for p in self.probes:
            if p.layer == layer and knob in p.knobs and same(p.knobs[knob], value) and all(
                    same(p.knobs.get(k, KNOB_TABLE[k].default), v) for k, v in with_.items()):
                return p
        return None

    def drop(self, layer: str, knob: str, value: Any, **with_: Any) -> float | None:
        """The metric lost by setting ``knob`` to ``value`` on ``layer`` alone (never below 0),
        or None if that was not probed or the probe failed. ``with_``: other knobs of the
        probe (``structure``)."""
        p = self._find(layer, knob, value, with_)
        return None if p is None or math.isnan(p.metric) else max(0.0, self.metric - p.metric)

    def distortion(self, layer: str, knob: str, value: Any, **with_: Any) -> float | None:
        """The probe's output distortion (see :class:`Probe`), or None as for :meth:`drop`."""
        p = self._find(layer, knob, value, with_)
        return None if p is None or math.isnan(p.distortion) or math.isnan(p.metric) else p.distortion

    def to_csv(self) -> str:
        """``layer, setting, knobs (JSON), metric, drop, distortion`` per probe."""
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["layer", "setting", "knobs", "metric", "drop", "distortion"])
        for p in self.probes:
            writer.writerow([p.layer, p.label(), json.dumps(p.knobs), f"{p.metric:.6f}",
                             f"{self.metric - p.metric:.6f}", f"{p.distortion:.6g}"])
        return out.getvalue()

    def table(self) -> list[str]:
        """One line per layer: its worst and mildest probes, for the terminal."""
        lines = []
        for layer, probes in itertools.groupby(self.probes, key=lambda p: p.layer):
            cells = " ".join(f"{p.label()}:{self.metric - p.metric:+.3f}" for p in probes)
            lines.append(f"{layer}: {cells}")
        return lines


def probe_settings(slots: dict[str, Any]) -> list[dict[str, Any]]:
    """The settings probed on one layer, from its search-space slots (``{knob: Slot}``): each
    value of each ``probed`` knob of the table, with its ``probe_with`` values, once per value
    of its ``probe_across`` knob (that knob's default included), in table order."""
    values = {name: _candidates(name, slot.knob) for name, slot in slots.items()}
    settings: list[dict[str, Any]] = []
    for name, spec in KNOB_TABLE.items():
        if not spec.probed:
            continue
        across = spec.probe_across
        extras = [{}] if across is None else [
            {across: a} for a in [KNOB_TABLE[across].default, *values.get(across, [])]]
        settings += [_in_table_order({name: v, **dict(spec.probe_with), **extra})
                     for v in values.get(name, []) for extra in extras]
    return [s for s in settings if not LayerPlan(**reconcile(s)).is_identity]


def _in_table_order(knobs: dict[str, Any]) -> dict[str, Any]:
    return {name: knobs[name] for name in KNOB_TABLE if name in knobs}


def _candidates(name: str, knob: Any) -> list[Any]:
    """The non-default values of one knob's domain: its choices, or a few points of a range."""
    spec = KNOB_TABLE[name]
    if knob.kind == "range":
        low, high = knob.bounds()
        points = [knob.snap(low + (high - low) * (i + 1) / RANGE_POINTS) for i in range(RANGE_POINTS)]
        points = [spec.to_plan(int(p) if knob.integer else p) for p in points]
    else:
        points = [spec.to_plan(v) for v in (knob.choices if knob.kind == "choice" else (knob.value,))]
    return [v for i, v in enumerate(points)
            if not same(v, spec.default) and not any(same(v, w) for w in points[:i])]


def profile(task: Any, space: Any, *, batches: int = SENSITIVITY_BATCHES, use_cache: bool = True,
            echo: Callable[[str], None] | None = None) -> Sensitivity:
    """The sensitivity of ``task.model`` over the resolved search ``space`` (see the module
    docstring).

    Args:
        task: The task (its model, example inputs, validation data and metric).
        space: A :class:`~autocompress.config.ResolvedSpace` of that model.
        batches: Validation batches per evaluation.
        use_cache: Read and write the cache.
        echo: Progress lines (one at the start, one at the end).
    """
    key = _cache_key(task, space, batches)
    if use_cache and (hit := _cache_read(key)) is not None:
        return hit
    subset = list(itertools.islice(task.val_loader, batches))
    jobs = [(layer.name, s) for layer in space.layers for s in probe_settings(layer.knobs)]
    if echo:
        echo(f"sensitivity: {len(jobs)} probes ({len(space.layers)} layers, no fine-tuning) on "
             f"{sum(_count(b) for b in subset)} validation samples")
    start = time.perf_counter()
    base = _metric(task, task.model, subset)
    reference = _outputs(task.model, subset)
    probes = tuple(Probe(layer, s, *_probe(task, layer, s, subset, reference)) for layer, s in jobs)
    result = Sensitivity(base, probes, batches, time.perf_counter() - start)
    if use_cache:
        _cache_write(key, result)
    if echo:
        failed = [p for p in probes if math.isnan(p.metric)]
        echo(f"sensitivity: done in {result.seconds:.1f} s"
             + (f"; {len(failed)} probe(s) failed and are never chosen (e.g. {failed[0].layer}: "
                f"{failed[0].label()})" if failed else ""))
    return result


def _probe(task: Any, layer: str, setting: dict[str, Any], subset: list,
           reference: list[Any]) -> tuple[float, float]:
    """The probe's metric and distortion, or NaNs if compressing or evaluating it fails (a
    trial with that setting would fail the same way; it is then never allocated)."""
    from autocompress.compress import apply
    from autocompress.compress.quantize import calibrate

    try:
        model = apply(task.model, Plan({layer: LayerPlan(**setting)}), task.example_inputs)
        calibrate(model, [x for x, *_ in subset])
        model.eval()
        return _metric(task, model, subset), _distortion(_outputs(model, subset), reference)
    except Exception:  # noqa: BLE001 - a user's model or metric may refuse anything
        return math.nan, math.nan


def _outputs(model: Any, subset: list) -> list[Any]:
    """The model's float outputs on the subset's inputs, one flat fp32 tensor per batch."""
    import torch

    from autocompress._inputs import run
    from autocompress.compress import output_tensors

    with torch.no_grad():
        return [torch.cat([t.detach().float().flatten() for t in output_tensors(run(model, x))
                           if t.is_floating_point()]) for x, *_ in subset]


def _distortion(outputs: list[Any], reference: list[Any]) -> float:
    err = sum(float((y - y0).pow(2).sum()) for y, y0 in zip(outputs, reference, strict=True))
    norm = sum(float(y0.pow(2).sum()) for y0 in reference)
    return err / max(norm, 1e-30)


def _metric(task: Any, model: Any, subset: list) -> float:
    import torch

    from autocompress.measure import top1_accuracy

    with torch.no_grad():
        return float((task.metric or top1_accuracy)(model, subset))


def _count(batch: Any) -> int:
    y = batch[-1] if isinstance(batch, tuple | list) else batch
    return len(y)


# --- cache -------------------------------------------------------------------------------------


def _cache_dir() -> Path:
    root = os.environ.get("AUTOCOMPRESS_CACHE") or str(Path.home() / ".cache" / "autocompress")
    return Path(root).expanduser() / "sensitivity"


def _cache_key(task: Any, space: Any, batches: int) -> str:
    digest = hashlib.sha256()
    for name, tensor in task.model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(json.dumps([_FORMAT, task.name, space.describe(), batches], sort_keys=True,
                             default=str).encode())
    return digest.hexdigest()[:32]


def _cache_read(key: str) -> Sensitivity | None:
    path = _cache_dir() / f"{key}.json"
    try:
        data = json.loads(path.read_text())
        return Sensitivity(data["metric"], tuple(Probe(**p) for p in data["probes"]),
                           data["batches"], 0.0, cached=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _cache_write(key: str, result: Sensitivity) -> None:
    directory = _cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"metric": result.metric, "batches": result.batches,
                                   "probes": [asdict(p) for p in result.probes]}))
        os.replace(tmp, directory / f"{key}.json")
    except OSError:
        pass  # a read-only cache directory costs a re-measurement, nothing else
