"""The knob table: its cross-knob rules (one list, read by check and by reconcile), the policy
fields that drive the sensitivity probes, the first trials and the driver, and the torch-free
config and Task contract.

The rule tests are parametrized over ``KNOB_RULES``: a new rule joins them without editing
this file.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from autocompress.compress import KNOB_RULES, KNOB_TABLE, KNOBS, LayerPlan, Plan, PlanError, reconcile
from autocompress.compress._knobs import broken_rule, seed_knob
from autocompress.compress._registry import describe_layers
from autocompress.config import load_search_space
from tests.models import MODELS

ROOT = Path(__file__).resolve().parents[1]

# A few values of every knob (defaults first); the values the rules' examples use join them.
_GRID: dict[str, list[Any]] = {
    "sparsity": [0.0, 0.5],
    "structure": ["unstructured", "channel"],
    "bits": [None, 2, 3, 4, 6, 8, "fp16", "bf16"],
    "scheme": ["uniform", "pow2"],
    "rank": [None, 0.5],
    "decomposition": ["svd", "tucker"],
    "act_bits": [None, 8, "dynamic"],
}


def _grid() -> list[dict[str, Any]]:
    values = {name: list(_GRID.get(name, [spec.default])) for name, spec in KNOB_TABLE.items()}
    for rule in KNOB_RULES:
        for name, value in rule.example.items():
            if value not in values[name]:
                values[name].append(value)
    return [dict(zip(values, combo, strict=True)) for combo in itertools.product(*values.values())]


def _filled(values: dict[str, Any]) -> dict[str, Any]:
    return {name: values.get(name, spec.default) for name, spec in KNOB_TABLE.items()}


# --- the rules ---------------------------------------------------------------------------------


def test_the_rule_list_is_well_formed() -> None:
    assert KNOB_RULES
    for rule in KNOB_RULES:
        assert rule.knob in KNOB_TABLE
        assert set(rule.example) <= set(KNOB_TABLE)
        assert all(KNOB_TABLE[k].valid(v) for k, v in rule.example.items())  # each value valid


@pytest.mark.parametrize("rule", KNOB_RULES, ids=lambda r: f"{r.knob}:{json.dumps(dict(r.example))}")
def test_check_refuses_each_rule_with_its_message(rule) -> None:
    assert broken_rule(rule.example) is rule  # its example breaks it, and no earlier rule
    lp = LayerPlan(**rule.example)  # each value is valid alone
    message = rule.message(_filled(rule.example))
    with pytest.raises(PlanError, match=f"^{re.escape(message)}$"):
        lp.check_combination()
    with pytest.raises(PlanError, match=re.escape(message)):
        Plan.from_dict({"layers": {"fc": dict(rule.example)}})
    with pytest.raises(PlanError, match=re.escape(message)):
        Plan({"fc": lp})


@pytest.mark.parametrize("rule", KNOB_RULES, ids=lambda r: f"{r.knob}:{json.dumps(dict(r.example))}")
def test_reconcile_repairs_each_rule_by_its_knob(rule) -> None:
    values = dict(rule.example)
    repaired = reconcile(values)
    assert values == dict(rule.example)  # the input is not changed
    assert repaired[rule.knob] == KNOB_TABLE[rule.knob].default
    assert {k: v for k, v in repaired.items() if k != rule.knob} == {
        k: v for k, v in values.items() if k != rule.knob}
    assert not rule.broken(_filled(repaired))
    LayerPlan(**repaired).check_combination()  # consistent


def test_check_and_reconcile_agree_on_every_combination() -> None:
    """A combination passes the check exactly when reconcile leaves it alone, reconcile's
    result always passes, and a rule applies only while its knob is off its default (what the
    repair relies on)."""
    for values in _grid():
        lp = LayerPlan(**values)
        try:
            lp.check_combination()
            refused = None
        except PlanError as e:
            refused = str(e)
        repaired = reconcile(dict(values))
        assert (refused is None) == (repaired == values), (values, refused)
        LayerPlan(**repaired).check_combination()
        for rule in KNOB_RULES:
            if rule.applies(values):
                assert values[rule.knob] != KNOB_TABLE[rule.knob].default, (rule, values)


# --- the policy fields -------------------------------------------------------------------------


def test_policy_fields_name_knobs_of_the_table() -> None:
    for spec in KNOB_TABLE.values():
        assert spec.modifies in (None, *KNOBS)
        assert spec.probe_across in (None, *KNOBS)
        assert all(k in KNOBS and KNOB_TABLE[k].valid(v) for k, v in spec.probe_with)
        assert spec.seed in (None, "width", "amount", "cut")
        assert not spec.integer_kernels or spec.speed_only
    for role in ("width", "amount", "cut"):
        assert sum(spec.seed == role for spec in KNOB_TABLE.values()) == 1
    assert KNOB_TABLE[seed_knob("cut").name].valid(seed_knob("cut").seed_value)


def _mlp_space(knobs: dict[str, Any]) -> Any:
    spec = MODELS["mlp"]
    layers = describe_layers(spec.build(), spec.example_inputs())
    return load_search_space({"layers": [{"types": ["Linear"], "knobs": knobs}]},
                             source="inline.yaml").resolve(layers)


_KNOBS = {"sparsity": [0.0, 0.5], "structure": ["unstructured", "channel"], "bits": [4, 8, None],
          "rank": [None, 0.5], "act_bits": [None, 8]}


def test_the_probes_follow_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    from autocompress.tune._sensitivity import probe_settings

    layer = _mlp_space(_KNOBS).layers[0]
    probed = {k for s in probe_settings(layer.knobs) for k in s}
    assert {"sparsity", "structure", "bits", "rank", "act_bits"} == probed
    assert {"sparsity": 0.5, "structure": "channel"} in probe_settings(layer.knobs)  # across
    assert {"bits": 8, "act_bits": 8} in probe_settings(layer.knobs)  # with
    monkeypatch.setitem(KNOB_TABLE, "rank", replace(KNOB_TABLE["rank"], probed=False))
    monkeypatch.setitem(KNOB_TABLE, "act_bits", replace(KNOB_TABLE["act_bits"], probe_with=(("bits", 4),)))
    monkeypatch.setitem(KNOB_TABLE, "sparsity", replace(KNOB_TABLE["sparsity"], probe_across=None))
    settings = probe_settings(layer.knobs)
    assert not any("rank" in s for s in settings)
    assert {"bits": 4, "act_bits": 8} in settings
    assert [s for s in settings if "sparsity" in s] == [{"sparsity": 0.5}]


def _fake_profile(space: Any) -> Any:
    from autocompress.tune._sensitivity import Probe, Sensitivity, probe_settings

    rng = random.Random(0)
    probes = [Probe(ls.name, s, 0.9 - rng.random() / 10, rng.random())
              for ls in space.layers for s in probe_settings(ls.knobs)]
    return Sensitivity(0.9, tuple(probes), 1)


def test_only_allocated_knobs_are_allocated(monkeypatch: pytest.MonkeyPatch) -> None:
    from autocompress.tune._seeds import layer_options

    space = _mlp_space(_KNOBS)
    layer, shape = space.layers[0], (32, 16)
    sens = _fake_profile(space)
    options = layer_options(layer, shape, sens)
    assert options and any("bits" in o.knobs and o.knobs["bits"] is not None for o in options)
    assert all("act_bits" not in o.knobs for o in options)  # speed, not size
    # A modifier never spends without the knob it modifies (channel at sparsity 0).
    assert all(not (o.knobs.get("structure") == "channel" and not o.knobs.get("sparsity"))
               for o in options)
    monkeypatch.setitem(KNOB_TABLE, "bits", replace(KNOB_TABLE["bits"], allocated=False))
    assert all("bits" not in o.knobs for o in layer_options(layer, shape, sens))


def test_the_recipes_follow_the_seed_roles(monkeypatch: pytest.MonkeyPatch) -> None:
    from autocompress.tune._seeds import calibration_points

    space = _mlp_space({"sparsity": {"low": 0.0, "high": 0.9, "step": 0.05}, "bits": [4, 8],
                        "rank": {"low": 0.1, "high": 1.0, "step": 0.05}})
    first = space.layers[0].name
    points = calibration_points(space)
    assert [p[f"{first}/sparsity"] for p in points] == [0.5, 0.75, 0.9]
    assert all(p[f"{first}/bits"] == 4 for p in points)
    # Give the "amount" role to rank: the calibration plans now cut the rank instead.
    monkeypatch.setitem(KNOB_TABLE, "sparsity", replace(KNOB_TABLE["sparsity"], seed=None))
    monkeypatch.setitem(KNOB_TABLE, "rank", replace(KNOB_TABLE["rank"], seed="amount"))
    points = calibration_points(space)
    assert [p[f"{first}/rank"] for p in points] == [0.5, 0.75, 0.9]
    assert all(p[f"{first}/sparsity"] == 0.0 for p in points)


def test_speed_only_knobs_are_left_out_without_a_latency_objective(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from autocompress.measure.target import Target
    from autocompress.tune._driver import _without_knobs_that_cannot_pay

    space = _mlp_space(_KNOBS)
    exp = SimpleNamespace(target=Target(runtime="onnxruntime"), metrics=["accuracy", "size_bytes"])
    notes: list[str] = []
    out = _without_knobs_that_cannot_pay(space, exp, notes.append)
    assert not out.sets("act_bits") and out.sets("rank")
    assert notes == ["act_bits left out of the search: quantized activations buy speed only, and "
                     "no objective measures it (objectives: accuracy, size_bytes)"]
    monkeypatch.setitem(KNOB_TABLE, "act_bits", replace(KNOB_TABLE["act_bits"], speed_only=False,
                                                          integer_kernels=False))
    monkeypatch.setitem(KNOB_TABLE, "rank", replace(KNOB_TABLE["rank"], speed_only=True,
                                                      about="factorizations"))
    notes.clear()
    out = _without_knobs_that_cannot_pay(space, exp, notes.append)
    assert out.sets("act_bits") and not out.sets("rank")
    assert notes[0].startswith("rank left out of the search: factorizations buy speed only")
    # With latency measured, a speed-only knob without integer_kernels stays on any runtime.
    exp = SimpleNamespace(target=Target(runtime="torch"), metrics=["accuracy", "latency_ms"])
    assert _without_knobs_that_cannot_pay(space, exp, notes.append).sets("rank")


# --- torch-free config and Task contract -------------------------------------------------------


def test_config_and_the_task_contract_import_neither_torch_nor_onnx() -> None:
    """Reading an experiment and importing the Task contract leave torch and onnx unimported;
    building a Task (the user's model brings torch) still leaves onnx out."""
    code = textwrap.dedent(f"""
        import sys

        import autocompress.config
        import autocompress.tasks
        from autocompress.config import load_experiment
        from autocompress.finetune import FinetuneConfig
        from autocompress.tasks import Task

        exp = load_experiment({str(ROOT / "experiments" / "digits.yaml")!r})
        assert isinstance(exp.finetune, FinetuneConfig)
        heavy = [m for m in ("torch", "onnx", "onnxruntime") if m in sys.modules]
        assert not heavy, heavy

        import torch
        from autocompress import Task as PublicTask

        assert PublicTask is Task
        x, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
        task = Task(model=torch.nn.Linear(3, 2), train_loader=[(x, y)], val_loader=[(x, y)],
                    example_inputs=x[:1])
        task.loss(task.model(x), y)
        assert "onnx" not in sys.modules
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
