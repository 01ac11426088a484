"""The latency cache: same structure and precision → measured once; anything else → measured."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autocompress.compress import apply
from autocompress.compress._plan import LayerPlan, Plan
from autocompress.measure import Target, measure_latency
from autocompress.measure.cache import graph_signature
from autocompress.measure.latency import prepare
from autocompress.onnxgraph import export_onnx
from tests.models import MODELS
from tests.runtimes import LOCAL_RUNTIMES

TARGET = Target(warmup=1, min_runs=3, max_runs=8, budget_s=0.05)


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "latency_cache.db"
    monkeypatch.setenv("AUTOCOMPRESS_LATENCY_CACHE", str(path))
    return path


def build(seed: int, plan: dict | None = None, **widths: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    spec = MODELS["conv2d"]
    model = spec.build(**widths)
    return apply(model, Plan(plan or {}), spec.example_inputs()) if plan else model


def measure(model: torch.nn.Module, target: Target = TARGET):
    return measure_latency(model, MODELS["conv2d"].example_inputs(), target)


@pytest.mark.parametrize("runtime", LOCAL_RUNTIMES)
def test_same_structure_different_weights_is_a_hit(own_cache: Path, runtime: str) -> None:
    target = Target(**{**TARGET.to_dict(), "runtime": runtime})
    first = measure(build(0), target)
    second = measure(build(1), target)
    assert not first.cached and second.cached and own_cache.exists()
    assert (second.latency_ms, second.runs, second.cpu) == (first.latency_ms, first.runs, first.cpu)


def test_same_int8_plan_different_weights_is_a_hit() -> None:
    plan = {"conv2": LayerPlan(bits=8), "head": LayerPlan(bits=8)}
    assert not measure(build(0, plan)).cached
    assert measure(build(1, plan)).cached


@pytest.mark.parametrize("other", [
    pytest.param({"plan": {"conv2": LayerPlan(bits=8)}}, id="int8-weights"),
    pytest.param({"plan": {"conv2": LayerPlan(bits=8, act_bits=8)}}, id="int8-activations"),
    pytest.param({"plan": {"conv1": LayerPlan(sparsity=0.5, structure="channel")}}, id="pruned"),
])
def test_different_precision_or_structure_is_a_miss(other: dict) -> None:
    assert not measure(build(0)).cached
    assert not measure(build(0, other["plan"])).cached


def test_different_target_is_a_miss() -> None:
    assert not measure(build(0)).cached
    assert not measure(build(0), Target(warmup=1, min_runs=3, max_runs=8, budget_s=0.05,
                                        batch_size=2)).cached
    assert measure(build(2), Target(warmup=1, min_runs=3, max_runs=8, budget_s=0.05,
                                    batch_size=2)).cached


def test_every_runtime_has_its_own_key() -> None:
    """The same model on another runtime is another measurement."""
    keys = {runtime: prepare(build(0), MODELS["conv2d"].example_inputs(),
                             Target(**{**TARGET.to_dict(), "runtime": runtime})).key
            for runtime in LOCAL_RUNTIMES}
    assert None not in keys.values() and len(set(keys.values())) == len(LOCAL_RUNTIMES)
    assert not measure(build(0)).cached and measure(build(1)).cached
    for runtime in [r for r in LOCAL_RUNTIMES if r != TARGET.runtime]:
        assert not measure(build(0), Target(**{**TARGET.to_dict(), "runtime": runtime})).cached


def test_cache_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOCOMPRESS_LATENCY_CACHE", "0")
    assert not measure(build(0)).cached
    assert not measure(build(0)).cached


def test_signature_ignores_values_not_shapes(tmp_path: Path) -> None:
    x = MODELS["conv2d"].example_inputs()
    sigs = [graph_signature(export_onnx(m, x, tmp_path / f"{i}.onnx"))
            for i, m in enumerate([build(0), build(1), build(0, c1=4)])]
    assert sigs[0] == sigs[1] != sigs[2]
