"""The Plan: JSON round trip, validation of every knob, unknown keys, versions."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autocompress.compress._knobs import reconcile
from autocompress.compress._plan import PLAN_VERSION, LayerPlan, Plan, PlanError

layer_plans = st.builds(
    LayerPlan,
    sparsity=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    structure=st.sampled_from(["unstructured", "channel"]),
    bits=st.sampled_from([None, 2, 3, 4, 5, 6, 7, 8, "fp16", "bf16"]),
    scheme=st.sampled_from(["uniform", "pow2"]),
    rank=st.none() | st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
    act_bits=st.sampled_from([None, 8]),
).map(lambda lp: LayerPlan(**reconcile(lp.to_dict())))  # e.g. act_bits 8 needs integer bits
layer_names = st.text(alphabet="abcxyz_.0123456789", min_size=1, max_size=16)
plans = st.builds(Plan, layers=st.dictionaries(layer_names, layer_plans, max_size=6))


@settings(max_examples=150, deadline=None)
@given(plans, st.sampled_from([None, 2]))
def test_json_round_trip(plan: Plan, indent: int | None) -> None:
    text = plan.to_json(indent=indent)
    back = Plan.from_json(text)
    assert back == plan
    assert back.to_json(indent=indent) == text
    assert hash(back) == hash(plan)
    assert Plan.from_dict(json.loads(text)) == plan


@settings(max_examples=100, deadline=None)
@given(layer_plans)
def test_layer_plan_dict_round_trip_and_identity(lp: LayerPlan) -> None:
    assert LayerPlan.from_dict(lp.to_dict()) == lp
    identity = lp.sparsity == 0 and lp.bits is None and lp.rank is None and lp.act_bits is None
    assert lp.is_identity == identity
    assert Plan({"x": lp}).is_identity == identity


def test_the_documented_example_parses() -> None:
    text = """{"version": 1,
     "layers": {"features.0": {"sparsity": 0.5, "structure": "channel", "bits": 8, "rank": null},
                "classifier": {"sparsity": 0.0, "structure": "unstructured", "bits": null,
                               "rank": 0.25}}}"""
    plan = Plan.from_json(text)
    assert plan.layers["features.0"] == LayerPlan(sparsity=0.5, structure="channel", bits=8)
    assert plan.layers["classifier"] == LayerPlan(rank=0.25)
    assert plan.summary() == "features.0: s0.50ch b8 | classifier: r0.25"
    assert plan.flatten()["features.0/bits"] == 8
    assert Plan.from_dict({"layers": {}}).version == PLAN_VERSION  # version defaults to current


@pytest.mark.parametrize(("knob", "value", "allowed"), [
    ("sparsity", 1.0, "[0, 1)"),
    ("sparsity", -0.1, "[0, 1)"),
    ("sparsity", math.nan, "[0, 1)"),
    ("sparsity", "0.5", "[0, 1)"),
    ("sparsity", True, "[0, 1)"),
    ("structure", "filter", "['unstructured', 'channel', '2:4']"),
    ("structure", None, "['unstructured', 'channel', '2:4']"),
    ("bits", 1, "2..8"),
    ("bits", 9, "2..8"),
    ("bits", 16, "2..8"),
    ("bits", "8", "2..8"),
    ("bits", True, "2..8"),
    ("bits", 8.0, "2..8"),
    ("bits", "fp4", "'fp16', 'bf16', 'fp8'"),
    ("bits", "FP16", "'fp16', 'bf16'"),
    ("scheme", "log", "['uniform', 'pow2']"),
    ("scheme", None, "['uniform', 'pow2']"),
    ("rank", 0.0, "(0, 1]"),
    ("rank", 1.5, "(0, 1]"),
    ("rank", math.nan, "(0, 1]"),
    ("rank", True, "(0, 1]"),
    ("act_bits", 4, "8 or null"),
    ("act_bits", 16, "8 or null"),
])
def test_each_knob_names_itself_and_its_range(knob: str, value: object, allowed: str) -> None:
    with pytest.raises(PlanError) as err:
        LayerPlan(**{knob: value})
    message = str(err.value)
    assert message.startswith(f"{knob}={value!r} is out of range")
    assert allowed in message.partition("; allowed: ")[2]


def test_errors_from_json_name_the_layer() -> None:
    with pytest.raises(PlanError, match=r"^layers\.conv1: bits=12 is out of range; allowed: "):
        Plan.from_dict({"version": 1, "layers": {"conv1": {"bits": 12}}})


@pytest.mark.parametrize(("data", "pattern"), [
    pytest.param({"layers": {"fc": {"sparsty": 0.5}}},
                 r"layers\.fc: unknown key 'sparsty' \(did you mean 'sparsity'\?\); allowed: ",
                 id="layer-knob"),
    pytest.param({"layers": {"fc": {"bit": 4}}}, r"unknown key 'bit' \(did you mean 'bits'\?\)",
                 id="layer-knob-short"),
    pytest.param({"layers": {"fc": {"colour": 4}}}, r"unknown key 'colour'; allowed: \[",
                 id="layer-knob-no-close-match"),
    pytest.param({"version": 1, "layer": {}}, r"unknown key 'layer' \(did you mean 'layers'\?\)",
                 id="top-level"),
])
def test_unknown_keys_suggest_the_closest(data: dict, pattern: str) -> None:
    with pytest.raises(PlanError, match=pattern):
        Plan.from_dict(data)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_other_versions_are_refused(version: object) -> None:
    with pytest.raises(PlanError, match=rf"plan version {version!r} is not supported; expected 1"):
        Plan.from_dict({"version": version, "layers": {}})


@pytest.mark.parametrize(("text", "pattern"), [
    pytest.param("{not json", "not valid JSON", id="not-json"),
    pytest.param("[1, 2]", "a plan is a mapping", id="list"),
    pytest.param('{"layers": [1]}', "a plan is a mapping", id="layers-list"),
    pytest.param('{"layers": {"fc": 0.5}}', r"layers\.fc: expected a mapping of knobs, got float",
                 id="layer-not-mapping"),
])
def test_malformed_documents(text: str, pattern: str) -> None:
    with pytest.raises(PlanError, match=pattern):
        Plan.from_json(text)


def test_validate_names_the_unknown_layer_and_the_valid_ones() -> None:
    plan = Plan({"features.O": LayerPlan(bits=8)})
    with pytest.raises(PlanError) as err:
        plan.validate(["features.0", "classifier"])
    message = str(err.value)
    assert "'features.O'" in message and "did you mean 'features.0'" in message
    assert "['features.0', 'classifier']" in message
    Plan({"classifier": LayerPlan(bits=8)}).validate(["features.0", "classifier"])


def test_active_drops_identity_entries() -> None:
    plan = Plan({"a": LayerPlan(), "b": LayerPlan(rank=0.5), "c": LayerPlan(structure="channel")})
    assert list(plan.active()) == ["b"]
    assert plan.summary() == "b: r0.50"
    assert Plan({"a": LayerPlan()}).summary() == "(no compression)"
