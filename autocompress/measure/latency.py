"""Latency of the deployable model, measured on the target runtime.

Protocol: build the deployable artifact the target's runtime runs (the ONNX file for
``onnxruntime``, the baked eager module for ``torch``; :mod:`autocompress.measure.runtimes`),
fix the runtime's intra-op threads to ``target.threads``, run ``warmup`` untimed inferences on
a batch of ``target.batch_size``, then time single inferences with ``time.perf_counter`` until
``min_runs`` are done and either the 95% confidence interval of the median is within
``±target.rel_ci`` of the median or ``budget_s`` is spent, never more than ``max_runs`` (the
loop and its :class:`~autocompress.measure._timing.TimingSettings` are shared with the remote
device agent). The median is reported as ``latency_ms``; p90, the inter-quartile range
(spread), the interval, the thread count, batch size, runtime version and CPU model are
recorded with it.

With several workloads (``target.seq_len``, a decoder LM's prefill and decode steps:
:mod:`autocompress.measure._workloads`) each is timed by this protocol on its own batch and
cached under its own key, and ``latency_ms`` is their ``target.aggregate`` (a decoder's:
the decode step); the result's ``workloads`` has each median.

With ``device: remote`` the exported ONNX model is sent to a device agent
(``autocompress agent``, see :mod:`autocompress.agent`) which runs the same protocol there.

A search (and ``autocompress trial`` and ``export``) times every model **paired** with the
baseline (:class:`PairedMeasurer`, :mod:`autocompress.measure._paired`): the speed-up is the
ratio of medians timed interleaved in one window, and ``latency_ms`` is the baseline's latency
when the search first timed it divided by that ratio, so that no number carries the machine's
drift between two measurements. The latency cache then stores ratios to the baseline, and a hit
is put on the current baseline's clock.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from autocompress.compress import bake
from autocompress.measure import cache as latency_cache
from autocompress.measure._machine import machine_facts
from autocompress.measure._paired import DRIFT_LIMIT, PairedTiming, time_paired_steady
from autocompress.measure._results import LatencyResult, Prepared, combine, combined_ms
from autocompress.measure._workloads import dynamic_sequence, workload_feeds, workload_key
from autocompress.measure.runtimes import get_runtime, result_fields
from autocompress.measure.runtimes._base import Runtime
from autocompress.measure.runtimes._remote import target_facts
from autocompress.measure.target import Target
from autocompress.onnxgraph import export_causal_lm, export_onnx, is_causal_lm

__all__ = ["LatencyResult", "PairedMeasurer", "Prepared", "check_target", "machine_facts",
           "measure_latency", "measure_prepared", "prepare", "target_facts"]


def prepare(model: nn.Module, example_inputs: Any, target: Target) -> Prepared:
    """Builds the deployable form of ``model`` for ``target``, its input batches (one per
    workload: :func:`~autocompress.measure._workloads.workload_feeds`) and its latency-cache key.

    The key is derived from the exported ONNX graph with weight values left out (see
    :mod:`autocompress.measure.cache`), for the ``torch`` runtime too; a model that cannot be
    exported to ONNX is measured on ``torch`` without caching. With several workloads the key
    leaves out ``seq_len`` and ``aggregate`` (each workload's key has its input shapes:
    :func:`~autocompress.measure._workloads.workload_key`), so a length is measured once
    whatever other lengths a target names.

    Raises:
        ConfigError: A ``target.seq_len`` the model cannot take (key ``target.seq_len``).
    """
    runtime = get_runtime(target)
    feeds = workload_feeds(model, example_inputs, target)
    batch = next(iter(feeds.values()))
    options = runtime.export_options(target)
    if dynamic_sequence(model, target):
        options = {**options, "dynamic_sequence": True}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            export = export_causal_lm if is_causal_lm(model) else export_onnx
            path = export(model, example_inputs, Path(tmp) / "model.onnx", **options)
        except Exception:
            if runtime.artifact == "onnx":
                raise
            return Prepared(batch, module=bake(model), feeds=feeds)
        shapes = target.to_dict()
        if list(feeds) != [""]:
            shapes = {k: v for k, v in shapes.items() if k not in ("seq_len", "aggregate")}
        key = latency_cache.cache_key(latency_cache.graph_signature(path), shapes,
                                      runtime.cache_facts(target))
        if runtime.artifact == "onnx":
            return Prepared(batch, onnx=path.read_bytes(), key=key, feeds=feeds)
    return Prepared(batch, module=bake(model), key=key, feeds=feeds)


def measure_prepared(prepared: Prepared, target: Target, use_cache: bool = True,
                     while_timing: Callable[[], AbstractContextManager] = nullcontext) -> LatencyResult:
    """Times every workload of ``prepared`` on ``target`` in this process, or takes it from
    the latency cache, and combines them (:func:`~autocompress.measure._results.combine`).

    Args:
        use_cache: Take an earlier measurement of the same key from the cache and store this
            one there. False always measures.
        while_timing: The context the timing (not a cache hit) runs in; the measurement
            service passes its training gate.
    """
    check_target(target)
    runtime = get_runtime(target)
    results = {}
    for name in prepared.workloads:
        one = prepared.for_feed(name)
        key = workload_key(prepared.key, name, one.batch) if use_cache and prepared.key else None
        hit = latency_cache.lookup(key) if key else None
        if hit is not None:
            results[name] = LatencyResult.from_dict(hit, cached=True)
            continue
        with while_timing():
            result = replace(runtime.measure(one, target), measured_at=time.time())
        if key:
            latency_cache.store(key, result.to_dict())
        results[name] = result
    return combine(results, target.aggregate)


def measure_latency(model: nn.Module, example_inputs: Any, target: Target,
                    use_cache: bool = True) -> LatencyResult:
    """Times the deployable form of ``model`` on ``target`` in this process (see the module
    docstring): :func:`prepare`, then :func:`measure_prepared`.

    Args:
        use_cache: Take an earlier measurement of the same architecture and precision on the
            same target from the latency cache (``autocompress.measure.cache``), and store
            this one there. False always measures (e.g. to verify an export).
    """
    check_target(target)
    return measure_prepared(prepare(model, example_inputs, target), target, use_cache)


def check_target(target: Target) -> None:
    """Refuses a runtime/device combination this machine cannot run.

    Raises:
        ValueError: ``device: cuda`` without a CUDA device (``torch``) or without ONNX
            Runtime's CUDA execution provider (``onnxruntime``); the message names the key.
    """
    get_runtime(target).check(target)



Timed = Callable[[], AbstractContextManager]
USUAL_AFTER = 3  # measurements of the reference before its usual speed is known


class PairedMeasurer:
    """Times models paired with a reference model (the baseline), see the module docstring.

    Until :meth:`set_reference` is called, and on runtimes that time elsewhere (the remote
    device agent), it measures unpaired (:func:`measure_prepared`). Called like a
    :data:`~autocompress.measure.metrics.Measurer`; :meth:`reference` is the measurer of the
    baseline itself. Each workload (sequence length, prefill, decode) is paired with the
    reference's same workload, on that workload's own clock, and the results combined as
    :func:`measure_prepared` combines them.

    Args:
        target: The target every measurement is for.
    """

    def __init__(self, target: Target) -> None:
        self.target = target
        self.runtime = get_runtime(target)
        self.reference_ms: float | None = None  # the reference's clock (its combined latency)
        self.clocks: dict[str, float] = {}  # each workload's clock
        self._reference: dict[str, Callable[[], object]] = {}
        self._reference_key: str | None = None
        self._warm: set[str] = set()
        # The reference's medians of the last measurements, per workload: how fast it usually
        # runs now (a rolling window, so a machine that is slower for good is soon the usual).
        self._recent: dict[str, deque[float]] = {}

    def set_reference(self, prepared: Prepared, latency_ms: float | Mapping[str, float] | None = None,
                      while_timing: Timed = nullcontext) -> LatencyResult | None:
        """Makes ``prepared`` the reference, kept loaded, and its latency the clock
        ``latency_ms`` is given on: ``latency_ms`` (a resumed search's, an export's logged
        baseline: its ``latency_ms``, or ``{workload: ms}`` of each workload), or else timed
        alone now (never from the cache: it is the clock) and returned. With several
        workloads and one logged ``latency_ms``, the reference is timed now and each
        workload's clock scaled so that they combine to ``latency_ms``.
        """
        check_target(self.target)
        result = None
        workloads = prepared.workloads
        logged = latency_ms if isinstance(latency_ms, Mapping) else None
        if logged is not None and not set(workloads) <= set(logged):
            raise ValueError(f"reference latencies for {sorted(logged)}; the target's workloads "
                             f"are {list(workloads)}")
        if logged is None and (latency_ms is None or len(workloads) > 1):
            result = self._time_reference(prepared, while_timing)
        if logged is not None:
            self.clocks = {name: float(logged[name]) for name in workloads}
        else:
            assert result is not None or latency_ms is not None
            scale = 1.0 if latency_ms is None or result is None else latency_ms / result.latency_ms
            self.clocks = ({workloads[0]: float(latency_ms)} if result is None  # type: ignore[arg-type]
                           else {name: ms * scale for name, ms in _medians(result).items()})
        self.reference_ms = combined_ms(self.clocks, self.target.aggregate)
        if latency_ms is not None:
            result = None
        if self.can_pair:
            self._reference = {name: self.runtime.runner(prepared.for_feed(name), self.target)
                               for name in workloads}
            self._reference_key = prepared.key
            self._warm = set()
            self._recent = {name: deque(maxlen=5) for name in workloads}
        return result

    def _time_reference(self, prepared: Prepared, while_timing: Timed) -> LatencyResult:
        if not self.can_pair:  # as unpaired as the trials: the cache too
            return measure_prepared(prepared, self.target, True, while_timing)
        results = {}
        for name in prepared.workloads:
            with while_timing():
                results[name] = replace(self.runtime.measure(prepared.for_feed(name), self.target),
                                        measured_at=time.time())
        return combine(results, self.target.aggregate)

    @property
    def can_pair(self) -> bool:
        """Whether the runtime times in this process (the remote agent times one model per
        request elsewhere: its measurements are not paired)."""
        cls = type(self.runtime)
        return cls.runner is not Runtime.runner and cls.measure is Runtime.measure

    def measure(self, prepared: Prepared, use_cache: bool = True,
                while_timing: Timed = nullcontext) -> LatencyResult:
        """Times each workload of ``prepared`` interleaved with the reference's (or takes the
        ratio from the cache), or unpaired without a reference; combined."""
        if not self._reference or self.reference_ms is None:
            return measure_prepared(prepared, self.target, use_cache, while_timing)
        if set(prepared.workloads) != set(self._reference):
            raise ValueError(f"workloads {list(prepared.workloads)}; the reference has "
                             f"{list(self._reference)}")
        return combine({name: self._measure_one(prepared, name, use_cache, while_timing)
                        for name in prepared.workloads}, self.target.aggregate)

    def _measure_one(self, prepared: Prepared, name: str, use_cache: bool,
                     while_timing: Timed) -> LatencyResult:
        """Workload ``name`` of ``prepared``, paired with the reference's."""
        one = prepared.for_feed(name)
        key = self._pair_key(prepared, name, one.batch) if use_cache else None
        hit = latency_cache.lookup(key) if key else None
        if hit is not None and not math.isnan(hit.get("speedup", math.nan)):
            return self._on_clock(hit, name, cached=True)
        recent = self._recent[name]
        usual = statistics.median(recent) if len(recent) >= USUAL_AFTER else None
        run = self.runtime.runner(one, self.target)
        with while_timing():
            t = time_paired_steady(self._reference[name], run,
                                   self.target.timing, reference_warm=name in self._warm,
                                   usual_ms=usual)
        self._warm.add(name)  # the reference stays loaded, and warm, between measurements
        recent.append(t.reference.latency_ms)
        if not (t.speedup > 0 and t.candidate.latency_ms > 0):
            raise RuntimeError(f"paired timing gave no usable ratio ({t.reference.latency_ms} ms "
                               f"against {t.candidate.latency_ms} ms): is the clock running?")
        result = self._result(t, name, result_fields(run))
        if key and t.unsteadiness <= DRIFT_LIMIT:  # a ratio timed on a busy machine: not kept
            latency_cache.store(key, result.to_dict())
        return result

    def __call__(self, model: nn.Module, example_inputs: Any, target: Target) -> LatencyResult:
        return self.measure(prepare(model, example_inputs, target))

    def reference(self, model: nn.Module, example_inputs: Any, target: Target) -> LatencyResult:
        """Sets ``model`` as the reference, timing it now; a measurer (for the baseline)."""
        result = self.set_reference(prepare(model, example_inputs, target))
        assert result is not None
        return result

    def _pair_key(self, prepared: Prepared, name: str, batch: Any) -> str | None:
        if prepared.key is None or self._reference_key is None:
            return None
        return hashlib.sha256(f"paired:{workload_key(prepared.key, name, batch)}:"
                              f"{workload_key(self._reference_key, name, batch)}".encode()).hexdigest()

    def _result(self, t: PairedTiming, name: str, fields: dict[str, Any]) -> LatencyResult:
        timed = LatencyResult.of(
            t.candidate, self.target, self.runtime.facts(self.target), speedup=t.speedup,
            reference_ms=t.reference.latency_ms, measured_ms=t.candidate.latency_ms,
            drift=t.drift, slowdown=t.slowdown, retries=t.retries, measured_at=time.time(),
            **fields)
        return self._on_clock(timed.to_dict(), name)

    def _on_clock(self, timed: dict[str, Any], name: str, cached: bool = False) -> LatencyResult:
        """A paired result with its times on workload ``name``'s clock: latency = the
        reference's latency / speedup; p90, IQR and the interval scaled alike."""
        r = LatencyResult.from_dict(timed)
        latency = self.clocks[name] / r.speedup
        scale = latency / r.latency_ms
        return replace(r, latency_ms=latency, p90_ms=r.p90_ms * scale, iqr_ms=r.iqr_ms * scale,
                       ci_low_ms=r.ci_low_ms * scale, ci_high_ms=r.ci_high_ms * scale,
                       cached=cached)


def _medians(result: LatencyResult) -> dict[str, float]:
    """``{workload: median}`` of a combined result (``{"": latency_ms}`` for one batch)."""
    return dict(result.workloads) or {"": result.latency_ms}
