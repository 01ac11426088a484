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

With ``device: remote`` the exported ONNX model is sent to a device agent
(``autocompress agent``, see :mod:`autocompress.agent`) which runs the same protocol there.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import fields
from pathlib import Path
from typing import Any

from torch import nn

from autocompress._inputs import repeat_to
from autocompress.compress._bake import bake, export_onnx
from autocompress.measure import cache as latency_cache
from autocompress.measure._machine import machine_facts
from autocompress.measure._results import LatencyResult, Prepared
from autocompress.measure.runtimes._remote import target_facts
from autocompress.measure.runtimes._table import get_runtime
from autocompress.measure.target import Target

__all__ = ["LatencyResult", "Prepared", "check_target", "machine_facts", "measure_latency",
           "measure_prepared", "prepare", "target_facts"]


def prepare(model: nn.Module, example_inputs: Any, target: Target) -> Prepared:
    """Builds the deployable form of ``model`` for ``target`` and its latency-cache key.

    The key is derived from the exported ONNX graph with weight values left out (see
    :mod:`autocompress.measure.cache`), for the ``torch`` runtime too; a model that cannot be
    exported to ONNX is measured on ``torch`` without caching.
    """
    runtime = get_runtime(target)
    batch = repeat_to(example_inputs, target.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = export_onnx(model, example_inputs, Path(tmp) / "model.onnx")
        except Exception:
            if runtime.artifact == "onnx":
                raise
            return Prepared(batch, module=bake(model))
        key = latency_cache.cache_key(latency_cache.graph_signature(path), target.to_dict(),
                                      runtime.cache_facts(target))
        if runtime.artifact == "onnx":
            return Prepared(batch, onnx=path.read_bytes(), key=key)
    return Prepared(batch, module=bake(model), key=key)


def measure_prepared(prepared: Prepared, target: Target, use_cache: bool = True,
                     while_timing: Callable[[], AbstractContextManager] = nullcontext) -> LatencyResult:
    """Times ``prepared`` on ``target`` in this process, or takes it from the latency cache.

    Args:
        use_cache: Take an earlier measurement of the same key from the cache and store this
            one there. False always measures.
        while_timing: The context the timing (not a cache hit) runs in; the measurement
            service passes its training gate.
    """
    check_target(target)
    use_cache = use_cache and prepared.key is not None
    hit = cached_result(prepared) if use_cache else None
    if hit is not None:
        return hit
    with while_timing():
        result = get_runtime(target).measure(prepared, target)
    if use_cache:
        latency_cache.store(str(prepared.key), result.to_dict())
    return result


def cached_result(prepared: Prepared) -> LatencyResult | None:
    """The latency cache's result for ``prepared`` (``cached=True``), or None."""
    hit = latency_cache.lookup(str(prepared.key)) if prepared.key is not None else None
    if hit is None:
        return None
    known = {f.name for f in fields(LatencyResult)}
    return LatencyResult(**{**{k: v for k, v in hit.items() if k in known}, "cached": True})


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

