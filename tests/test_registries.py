"""The one-table-per-concept registries: knobs, metrics, compression methods, samplers, tasks,
runtimes. Each table must agree with the code that produces or consumes what it declares."""

from __future__ import annotations

import dataclasses

import pytest

from autocompress.compress import LayerPlan, list_methods
from autocompress.config import KNOB_TABLE, KNOBS, METRICS, Knob, load_search_space
from autocompress.measure import Metrics
from autocompress.measure._registry import (
    METRIC_TABLE,
    MetricSpec,
    front_columns,
    objective_metrics,
    register_metric,
    relative_metrics,
    trial_metrics,
)
from autocompress.tracking import TRIAL_METRICS
from autocompress.tracking._plots import pairs
from autocompress.tune import TrialResult

# --- knobs -------------------------------------------------------------------------------------


def test_knob_table_is_the_layer_plan() -> None:
    assert KNOBS == tuple(f.name for f in dataclasses.fields(LayerPlan))
    for f in dataclasses.fields(LayerPlan):
        assert KNOB_TABLE[f.name].default == f.default, f.name


def test_a_layer_plan_at_the_defaults_is_the_identity_and_every_knob_changes_it() -> None:
    assert LayerPlan().is_identity
    changed = {"sparsity": 0.5, "bits": 4, "rank": 0.5, "act_bits": 8}
    for name, value in changed.items():
        lp = LayerPlan(**{name: value})
        assert not lp.is_identity, name
        assert KNOB_TABLE[name].token(lp), name
    assert KNOB_TABLE["bits"].token(LayerPlan(bits="fp16")) == "fp16"
    assert KNOB_TABLE["scheme"].token(LayerPlan(bits=4, scheme="pow2")) == "pow2"


@pytest.mark.parametrize("name", [k for k in KNOBS if not isinstance(KNOB_TABLE[k].default, bool)])
def test_every_knob_rejects_a_boolean_and_names_its_allowed_values(name: str) -> None:
    """Every knob but a boolean one (drop)."""
    with pytest.raises(ValueError, match=f"{name}=True is out of range; allowed: "):
        LayerPlan(**{name: True})


def test_mildest_values_come_from_the_table() -> None:
    assert KNOB_TABLE["bits"].mildest_value(Knob("choice", choices=(2, 4, None))) == 4
    # 8 first (the warm start), then fewer bits, then fp16, bf16 and fp32
    assert KNOB_TABLE["bits"].mildest_value(Knob("choice", choices=("fp16", 4, 8, None))) == 8
    assert KNOB_TABLE["bits"].mildest_value(Knob("choice", choices=("bf16", 2, "fp16"))) == 2
    assert KNOB_TABLE["bits"].mildest_value(Knob("choice", choices=(None, "bf16", "fp16"))) == "fp16"
    assert KNOB_TABLE["scheme"].mildest_value(Knob("choice", choices=("pow2", "uniform"))) == "uniform"
    assert KNOB_TABLE["rank"].mildest_value(Knob("choice", choices=(0.25, None))) is None
    assert KNOB_TABLE["sparsity"].mildest_value(Knob("range", low=0.1, high=0.9, step=0.1)) == 0.1
    assert KNOB_TABLE["structure"].mildest_value(Knob("fixed", value="channel")) == "channel"


def test_a_value_a_layer_refuses_is_dropped_from_its_domain() -> None:
    from autocompress.compress import LayerInfo

    layers = [LayerInfo("a", "Linear", (4, 4), 20, 16), LayerInfo("b", "Linear", (2, 4), 10, 8, True)]
    space = load_search_space({"layers": [{"knobs": {"structure": ["channel", "unstructured"]}}]})
    resolved = space.resolve(layers)
    domains = {ls.name: ls.knobs["structure"].knob for ls in resolved.layers}
    assert domains["a"].choices == ("channel", "unstructured")
    assert domains["b"] == Knob("fixed", value="unstructured")


# --- metrics -----------------------------------------------------------------------------------


def test_every_registered_metric_is_produced() -> None:
    measured = {f.name for f in dataclasses.fields(Metrics) if f.name != "latency"}
    by_producer: dict[str, set[str]] = {}
    for spec in METRIC_TABLE.values():
        by_producer.setdefault(spec.producer, set()).add(spec.name)
    assert by_producer["measure"] == measured
    assert by_producer["relative"] == set(relative_metrics(
        {"accuracy": 0.9, "size_bytes": 10, "latency_ms": 1.0},
        {"accuracy": 1.0, "size_bytes": 40, "latency_ms": 2.0}))
    result = TrialResult(plan=None, model=None, metrics=None)  # type: ignore[arg-type]
    assert by_producer["trial"] == set(result.trial_metrics())
    assert set(TRIAL_METRICS) == set(METRIC_TABLE) == set(trial_metrics())


def test_objectives_plots_and_tables_read_the_registry() -> None:
    assert METRICS == objective_metrics()
    assert all(METRIC_TABLE[m].objective for m in METRICS)
    assert [x for x, _ in pairs()] == [m.name for m in METRIC_TABLE.values() if m.plotted]
    assert [name for name, _, _ in front_columns()] == [
        "accuracy", "accuracy_drop", "size_bytes", "compression_ratio", "latency_ms", "speedup"]


def test_relative_metrics_are_ratios_and_differences() -> None:
    out = relative_metrics({"accuracy": 0.9, "size_bytes": 10, "latency_ms": 0.5},
                           {"accuracy": 1.0, "size_bytes": 40, "latency_ms": 2.0})
    assert out == {"accuracy_drop": pytest.approx(0.1), "compression_ratio": 4.0, "speedup": 4.0}
    assert relative_metrics({"accuracy": 1.0}, {})["speedup"] is None


def test_a_metric_is_registered_once_and_checked() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_metric(METRIC_TABLE["accuracy"])
    with pytest.raises(ValueError, match="direction"):
        MetricSpec("x", "up", "", "measure", "x")
    with pytest.raises(ValueError, match="relative"):
        MetricSpec("x", "max", "", "relative", "x")


# --- compression methods -----------------------------------------------------------------------


def test_methods_are_registered_in_their_order() -> None:
    assert list_methods() == ["lowrank", "prune", "quantize"]
