"""Per-layer sensitivity: the damage of compressing one layer alone, without fine-tuning,
for each value its search space offers (HAWQ-V3, ModelOpt ``auto_quantize`` and NNCF's mixed
precision steer per-layer choices the same way, with measured sensitivity).

A *probe* compresses one layer by one setting: each value of each knob the knob table marks
``probed`` (``sparsity`` at a few strengths for each ``structure`` the layer's domain has, each
``bits``, each ``rank``; ``act_bits`` with 8-bit weights), repeated over its
``probe_variants`` (the calibrated variants the domain offers: ``pruner`` magnitude / wanda /
sparsegpt, ``quantizer`` rtn / gptq / awq with each ``group_size``, ``decomposition`` svd /
whitened). Its *distortion* is what the seeding allocates with: the squared error of the
model's outputs against the uncompressed model's, relative to their squared norm, on the
first ``batches`` validation batches. It is continuous (a metric such as accuracy on a few
hundred samples does not move for most single-layer changes, so many settings would look
free) and adds up over layers for small changes, as HAWQ's and ModelOpt's per-layer loss
terms do.

Two kinds of probes measure it:

- **layer-local** (every setting of a Linear or conv whose values are all ``local`` in the
  knob table: weight bits / quantizer / group size, unstructured and 2:4 sparsity with each
  pruner, rank with svd / whitened): one hooked pass over ``samples`` calibration inputs
  gives every layer's input statistics; each probe then compresses a copy of the layer
  alone and computes its relative output error ``e = tr(D H D^T) / tr(W H W^T)``
  (:mod:`autocompress.tune._local_probes`), with no model forward. The model-level
  distortion is ``g * e``, with one gain ``g`` per layer measured by putting the compressed
  layer of its median-error probe into the model for one evaluation (first order, the output
  error a layer's perturbation causes grows with its local error at a rate set by what
  follows it: the layers after it, normalizations, the head). The local error ``e`` is kept
  (``Probe.local``); the metric of a local probe is not measured (NaN).
- **model-level** (shapes that other layers see: ``structure: channel``; activations:
  ``act_bits``; layers without calibration inputs: embeddings; Tucker / CP; a local
  computation that raised): the layer compressed in a copy of the model, its metric and
  distortion on the same validation batches.

Measured on all-MiniLM-L6-v2: see the README's search section (the gain mapping is first order:
predictions within 0.16-1.08x of the measured distortion, median 0.7). The
profile is cached in ``$AUTOCOMPRESS_CACHE/sensitivity`` per task model (its weights'
digest), search space, subset and calibration size, so a second search of the same task pays
nothing. :mod:`autocompress.tune._seeds` turns it into the search's first trials.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from autocompress.compress import KNOB_TABLE, LayerPlan, block_importance, reconcile, same
from autocompress.tune._local_probes import is_local
from autocompress.tune._profile_run import ProfileRun, Progress, count

SENSITIVITY_BATCHES = 1  # validation batches of a model-level evaluation
PROFILE_SAMPLES = 128  # calibration samples of the layer-local probes
RANGE_POINTS = 4  # probes of a range domain: this many evenly spaced values above its low end
_FORMAT = 3  # of the cached profiles (2: with the distortion; 3: layer-local probes, variants)


@dataclass(frozen=True)
class Probe:
    """One layer compressed by one setting, alone, not fine-tuned.

    Attributes:
        layer: Module name.
        knobs: The ``LayerPlan`` values set (the others at their defaults).
        metric: The task metric on the subset (NaN: not measured, a layer-local probe, or
            the probe failed).
        distortion: ``sum ||y - y0||^2 / sum ||y0||^2`` over the subset's outputs ``y`` against
            the uncompressed model's ``y0``, measured or (a layer-local probe) predicted from
            ``local`` (NaN if the probe failed).
        local: The layer's relative output error on the calibration inputs (NaN: a
            model-level probe).
    """

    layer: str
    knobs: dict[str, Any]
    metric: float
    distortion: float = math.nan
    local: float = math.nan

    def label(self) -> str:
        """``bits=4`` or ``sparsity=0.5 structure=channel``."""
        return " ".join(f"{k}={v}" for k, v in self.knobs.items())


@dataclass(frozen=True)
class Sensitivity:
    """A model's sensitivity profile over a search space.

    Attributes:
        metric: The uncompressed model's metric on the subset.
        probes: One per (layer, setting).
        batches: Validation batches of a model-level evaluation.
        seconds: What measuring it cost (0 when read from the cache).
        cached: Read from the cache.
        importance: Where the space may drop blocks: each block's Block Influence
            (:func:`~autocompress.compress.block_importance`, low: the first to drop).
    """

    metric: float
    probes: tuple[Probe, ...]
    batches: int
    seconds: float = 0.0
    cached: bool = False
    importance: dict[str, float] = field(default_factory=dict)

    @cached_property
    def _by_layer(self) -> dict[str, list[Probe]]:
        out: dict[str, list[Probe]] = {}
        for p in self.probes:
            out.setdefault(p.layer, []).append(p)
        return out

    def _find(self, layer: str, knob: str, value: Any, with_: dict[str, Any]) -> Probe | None:
        for p in self._by_layer.get(layer, ()):
            if knob in p.knobs and same(p.knobs[knob], value) and all(
                    same(p.knobs.get(k, KNOB_TABLE[k].default), v) for k, v in with_.items()):
                return p
        return None

    def drop(self, layer: str, knob: str, value: Any, **with_: Any) -> float | None:
        """The metric lost by setting ``knob`` to ``value`` on ``layer`` alone (never below 0),
        or None if that was not probed, not measured on the model (a layer-local probe) or
        the probe failed. ``with_``: other knobs of the probe (``structure``, ``pruner``)."""
        p = self._find(layer, knob, value, with_)
        return None if p is None or math.isnan(p.metric) else max(0.0, self.metric - p.metric)

    def distortion(self, layer: str, knob: str, value: Any, **with_: Any) -> float | None:
        """The probe's output distortion (see :class:`Probe`), or None if that was not probed
        or the probe failed. A model-level setting is probed with its default variants only
        (:func:`profile`): a variant's prediction there reads the default's."""
        p = self._find(layer, knob, value, with_)
        if p is None and any(k in KNOB_TABLE[knob].probe_variants for k in with_):
            p = self._find(layer, knob, value, {k: v for k, v in with_.items()
                                                if k not in KNOB_TABLE[knob].probe_variants})
        return None if p is None or math.isnan(p.distortion) else p.distortion

    def works(self, layer: str, knob: str, value: Any) -> bool:
        """Whether some probe of ``layer`` with ``knob`` at ``value`` succeeded (the method
        exists and takes the layer)."""
        return any(knob in p.knobs and same(p.knobs[knob], value) and not math.isnan(p.distortion)
                   for p in self._by_layer.get(layer, ()))

    def to_csv(self) -> str:
        """``layer, setting, knobs (JSON), metric, drop, distortion, local`` per probe."""
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["layer", "setting", "knobs", "metric", "drop", "distortion", "local"])
        for p in self.probes:
            writer.writerow([p.layer, p.label(), json.dumps(p.knobs), f"{p.metric:.6f}",
                             f"{self.metric - p.metric:.6f}", f"{p.distortion:.6g}",
                             f"{p.local:.6g}"])
        return out.getvalue()

    def table(self) -> list[str]:
        """One line per layer: each probe's metric drop (model-level) or distortion
        (layer-local, ``~``), for the terminal."""
        lines = []
        for layer, probes in itertools.groupby(self.probes, key=lambda p: p.layer):
            cells = " ".join(f"{p.label()}:" + (f"~{p.distortion:.2g}" if math.isnan(p.metric)
                                                 else f"{self.metric - p.metric:+.3f}")
                             for p in probes)
            lines.append(f"{layer}: {cells}")
        return lines


def probe_settings(slots: dict[str, Any], allocated_only: bool = False) -> list[dict[str, Any]]:
    """The settings probed on one layer, from its search-space slots (``{knob: Slot}``): each
    value of each ``probed`` knob of the table (only the ``allocated`` ones with
    ``allocated_only``), with its ``probe_with`` values, once per value of its
    ``probe_across`` knob (that knob's default included) and per combination of the values
    of its ``probe_variants`` the slots offer (defaults left out of the setting), in table
    order; settings the cross-knob rules change are probed as repaired, once."""
    values = {name: _candidates(name, slot.knob) for name, slot in slots.items()}
    settings: list[dict[str, Any]] = []
    for name, spec in KNOB_TABLE.items():
        if not spec.probed or (allocated_only and not spec.allocated):
            continue
        over = [spec.probe_across] if spec.probe_across else []
        over += [k for k in spec.probe_variants if values.get(k)]
        grids = [[KNOB_TABLE[k].default, *values.get(k, [])] for k in over]
        for v in values.get(name, []):
            for combo in itertools.product(*grids):
                extra = {k: c for k, c in zip(over, combo, strict=True)
                         if k == spec.probe_across or not same(c, KNOB_TABLE[k].default)}
                setting = _in_table_order(reconcile({name: v, **dict(spec.probe_with), **extra}))
                setting = {k: x for k, x in setting.items()
                           if k in (name, spec.probe_across, *dict(spec.probe_with))
                           or not same(x, KNOB_TABLE[k].default)}
                if setting not in settings:
                    settings.append(setting)
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


def profile(task: Any, space: Any, *, batches: int = SENSITIVITY_BATCHES,
            samples: int = PROFILE_SAMPLES, allocated_only: bool = False, use_cache: bool = True,
            echo: Callable[[str], None] | None = None) -> Sensitivity:
    """The sensitivity of ``task.model`` over the resolved search ``space`` (see the module
    docstring).

    Args:
        task: The task (its model, example inputs, training and validation data, metric).
        space: A :class:`~autocompress.config.ResolvedSpace` of that model.
        batches: Validation batches per model-level evaluation.
        samples: Calibration samples (training inputs) of the layer-local probes.
        allocated_only: Probe only the knobs the first trials' allocation spends, and measure
            distortions only, no metric (what the search uses: half the evaluations;
            ``autocompress sensitivity`` probes every ``probed`` knob, with its metric).
        use_cache: Read and write the cache.
        echo: Progress lines (at the start, every few seconds, at the end).
    """
    subset = list(itertools.islice(task.val_loader, batches))
    result = _profile(task, space, subset, batches, samples, allocated_only, use_cache, echo)
    if space.sets("drop"):  # cheap (one pass): not cached
        blocks = [ls.name for ls in space.layers if "drop" in ls.knobs and ls.knobs["drop"].param]
        result = replace(result, importance=block_importance(task.model, [x for x, *_ in subset], blocks))
    return result


def _profile(task: Any, space: Any, subset: list, batches: int, samples: int,
             allocated_only: bool, use_cache: bool, echo: Callable[[str], None] | None) -> Sensitivity:
    """:func:`profile`'s probes (from the cache when it has them)."""
    key = _cache_key(task, space, batches, samples, allocated_only)
    if use_cache and (hit := _cache_read(key)) is not None:
        return hit
    jobs = {layer.name: [s for s in probe_settings(layer.knobs, allocated_only)
                         if not _variant(s) or is_local(task.model.get_submodule(layer.name), s)]
            for layer in space.layers}
    local = {n: [is_local(task.model.get_submodule(n), s) for s in settings]
             for n, settings in jobs.items()}
    progress = Progress(sum(map(len, jobs.values())), echo)
    if echo:
        echo(f"sensitivity: {progress.total} probes ({len(jobs)} layers, no fine-tuning): "
             f"{sum(map(sum, local.values()))} layer-local on the input statistics of "
             f"{samples} calibration samples (one pass), the rest and one per layer on the model "
             f"({sum(count(b) for b in subset)} validation samples)")
    run = ProfileRun(task, subset, samples, [n for n, flags in local.items() if any(flags)], progress)
    run.with_metric = not allocated_only
    probes = tuple(Probe(name, s, *m) for name, settings in jobs.items()
                   for s, m in zip(settings, run.layer(name, settings), strict=True) if m)
    result = Sensitivity(run.base, probes, batches, run.progress.elapsed())
    if use_cache:
        _cache_write(key, result)
    if echo:
        run.progress.line(force=True)
        failed = [p for p in probes if math.isnan(p.distortion)]
        echo(f"sensitivity: done in {result.seconds:.1f} s"
             + (f"; {len(failed)} probe(s) failed and are never chosen (e.g. {failed[0].layer}: "
                f"{failed[0].label()})" if failed else ""))
    return result


def _variant(setting: dict[str, Any]) -> bool:
    """Whether ``setting`` sets a ``probe_variants`` knob off its default: probed only where
    layer-local (a model-level probe costs an evaluation; its prediction reads the default's)."""
    return any(k in spec.probe_variants and not same(v, KNOB_TABLE[k].default)
               for spec in KNOB_TABLE.values() if spec.probed for k, v in setting.items())


# --- cache -------------------------------------------------------------------------------------


def _cache_dir() -> Path:
    root = os.environ.get("AUTOCOMPRESS_CACHE") or str(Path.home() / ".cache" / "autocompress")
    return Path(root).expanduser() / "sensitivity"


def _cache_key(task: Any, space: Any, batches: int, samples: int, allocated_only: bool) -> str:
    digest = hashlib.sha256()
    for name, tensor in task.model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(json.dumps([_FORMAT, task.name, space.describe(), batches, samples,
                              allocated_only], sort_keys=True, default=str).encode())
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
