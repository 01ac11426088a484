"""Experiment files: loading, validation, overrides, round trip."""

from __future__ import annotations

import pickle
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autocompress.compress._layers import LayerInfo
from autocompress.config import (
    METRICS,
    ConfigError,
    Constraints,
    Experiment,
    Objective,
    SearchSettings,
    load_experiment,
)
from autocompress.finetune import FinetuneConfig
from autocompress.measure.target import Target

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "experiments").glob("*.yaml"))
LAYERS = [
    LayerInfo("features.0", "Conv2d", (16, 1, 3, 3), 160, 9216),
    LayerInfo("features.3", "Conv2d", (32, 16, 3, 3), 4640, 73728),
    LayerInfo("classifier.0", "Linear", (64, 128), 8256, 8192),
    LayerInfo("classifier.2", "Linear", (10, 64), 650, 640, is_output=True),
]
BASE = {
    "name": "test-exp",
    "task": "digits",
    "search_space": "../search_spaces/default.yaml",
    "objectives": [{"metric": "accuracy", "mode": "max"}, {"metric": "size_bytes", "mode": "min"}],
}


@pytest.fixture
def write(tmp_path):
    """Writes an experiment into tmp/exp/ next to a copy of the shipped search spaces."""
    spaces = tmp_path / "search_spaces"
    spaces.mkdir()
    for src in (ROOT / "search_spaces").glob("*.yaml"):
        (spaces / src.name).write_text(src.read_text())
    (tmp_path / "exp").mkdir()

    def _write(content: dict[str, Any] | str, name: str = "exp.yaml") -> Path:
        path = tmp_path / "exp" / name
        text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
        path.write_text(text)
        return path

    return _write


# --- shipped files -------------------------------------------------------------------------


def test_shipped_experiments_exist():
    assert {p.name for p in SHIPPED} >= {"digits.yaml", "mnist1d.yaml", "digits_smoke.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_experiment_loads_and_its_space_resolves(path):
    from tests.test_space import DECODER, TRANSFORMER, selected

    exp = load_experiment(path)
    assert exp.path == path
    space, layers = {"minilm": ("transformer.yaml", TRANSFORMER),
                     "smollm2": ("lm.yaml", DECODER)}.get(exp.task, ("default.yaml", LAYERS))
    assert exp.search_space.source == str(ROOT / "search_spaces" / space)
    resolved = exp.search_space.resolve(layers)
    assert [ls.name for ls in resolved.layers] == selected(Path(exp.search_space.source), layers)
    assert exp.metrics[0] == "accuracy" and exp.modes[0] == "max"


def test_digits_experiment_values():
    exp = load_experiment(ROOT / "experiments" / "digits.yaml")
    assert (exp.name, exp.task) == ("digits-cnn", "digits")
    assert exp.metrics == ["accuracy", "latency_ms", "size_bytes"]
    assert exp.directions == ["maximize", "minimize", "minimize"]
    assert exp.target == Target(device="cpu", runtime="onnxruntime", threads=1, batch_size=1)
    assert exp.search == SearchSettings(sampler="mutation", trials=20, concurrency=2, seed=0)
    assert exp.finetune == FinetuneConfig(epochs=3, lr=0.006, warmup=0.2, distill=True)
    assert exp.constraints == Constraints(max_accuracy_drop=0.05)
    assert exp.tracking_uri is None


def test_smoke_experiment_is_small():
    exp = load_experiment(ROOT / "experiments" / "digits_smoke.yaml")
    assert exp.search.trials == 4 and exp.search.concurrency == 2
    assert exp.finetune.epochs == 1
    assert exp.metrics == ["accuracy", "size_bytes"]
    assert exp.target.min_runs <= 5 and exp.target.budget_s <= 0.2


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_to_dict_round_trips(path, write):
    exp = load_experiment(path)
    again = load_experiment(write(exp.to_dict()))
    assert again == exp
    assert again.to_dict() == exp.to_dict()


# --- defaults, shorthands, overrides -------------------------------------------------------


def test_defaults_and_objective_shorthand(write):
    exp = load_experiment(write({**BASE, "objectives": ["accuracy", {"metric": "latency_ms"}]}))
    assert exp.modes == ["max", "min"]
    assert exp.target == Target() and exp.finetune == FinetuneConfig()
    assert exp.search == SearchSettings() and exp.constraints == Constraints()


def test_null_sections_mean_defaults(write):
    exp = load_experiment(write({**BASE, "target": None, "finetune": None}))
    assert exp.target == Target() and exp.finetune == FinetuneConfig()


def test_exponent_floats_without_a_dot(write):
    text = yaml.safe_dump(BASE) + "finetune: {lr: 1e-3, weight_decay: 5E-4}\n"
    exp = load_experiment(write(text))
    assert exp.finetune.lr == 0.001 and exp.finetune.weight_decay == 0.0005


def test_yaml_anchors_and_merge_keys(write):
    base = {k: v for k, v in BASE.items() if k != "search_space"}
    text = yaml.safe_dump(base) + textwrap.dedent("""\
        search_space:
          layers:
            - types: [Conv2d]
              knobs: &common {bits: [4, 8], sparsity: 0.25}
            - types: [Linear]
              knobs: {<<: *common, sparsity: 0.5}
    """)
    rules = load_experiment(write(text)).search_space.rules
    assert rules[1].knobs["sparsity"].value == 0.5
    assert rules[1].knobs["bits"] == rules[0].knobs["bits"]


def test_custom_task_and_inline_search_space(write):
    inline = {"layers": [{"types": ["Linear"], "share": True, "knobs": {"bits": [4, 8]}}]}
    path = write({**BASE, "task": "my_pkg.models:build_task", "search_space": inline})
    exp = load_experiment(path)
    assert exp.task == "my_pkg.models:build_task"
    assert exp.search_space.source == str(path)
    assert list(exp.search_space.resolve(LAYERS).distributions()) == ["rule0/bits"]


def test_overrides(write):
    exp = load_experiment(write(BASE), trials=3, concurrency=4, name="other")
    assert (exp.search.trials, exp.search.concurrency, exp.name) == (3, 4, "other")


@pytest.mark.parametrize("kwargs,option", [
    ({"trials": 0}, "--trials"), ({"concurrency": -1}, "--concurrency"),
    ({"trials": "5"}, "--trials"), ({"name": ""}, "--name"),
], ids=["trials-zero", "concurrency-negative", "trials-str", "name-empty"])
def test_bad_overrides_name_the_option(write, kwargs, option):
    with pytest.raises(ConfigError) as info:
        load_experiment(write(BASE), **kwargs)
    assert info.value.key == option and info.value.file is None
    assert str(info.value).startswith(f"{option}: ")


def test_dataclasses_validate_themselves():
    with pytest.raises(ValueError, match="metric='foo'"):
        Objective("foo")
    with pytest.raises(ValueError, match="mode='min' for accuracy"):
        Objective("accuracy", "min")
    assert Objective("macs").direction == "minimize"
    with pytest.raises(ValueError, match="sampler="):
        SearchSettings(sampler="grid")
    with pytest.raises(ValueError, match="max_accuracy_drop"):
        Constraints(max_accuracy_drop=float("nan"))
    assert set(METRICS) == {"accuracy", "latency_ms", "size_bytes", "params", "macs"}


def test_experiment_and_error_pickle(write):
    exp = load_experiment(write(BASE))
    assert pickle.loads(pickle.dumps(exp)) == exp
    assert isinstance(exp, Experiment)


# --- errors --------------------------------------------------------------------------------

_B = yaml.safe_dump(BASE, sort_keys=False)

BAD_EXPERIMENTS = {
    "unknown-top-key": (_B + "tracking: x\n", "tracking", "did you mean 'tracking_uri'"),
    "missing-name": ("task: digits\n", "name", "missing required key 'name'"),
    "name-not-string": (_B.replace("name: test-exp", "name: [a]"), "name",
                        "expected a string"),
    "bad-task": (_B.replace("task: digits", "task: 'my pkg'"), "task",
                 "'package.module:function'"),
    "objectives-empty": (_B.split("objectives:")[0] + "objectives: []\n", "objectives",
                         "expected a list of 1 to 3"),
    "objectives-four": (_B.split("objectives:")[0] + "objectives: [accuracy, latency_ms, "
                        "size_bytes, params]\n", "objectives", "allowed: 1 to 3"),
    "objectives-duplicate": (_B.split("objectives:")[0] + "objectives: [accuracy, accuracy]\n",
                             "objectives", "listed twice"),
    "objective-metric": (_B.split("objectives:")[0] + "objectives: [{metric: acuracy}]\n",
                         "objectives[0].metric", "did you mean 'accuracy'"),
    "objective-mode": (_B.split("objectives:")[0] + "objectives: [{metric: size_bytes, "
                       "mode: max}]\n", "objectives[0].mode", "allowed: 'min'"),
    "objective-key": (_B.split("objectives:")[0] + "objectives: [{metric: macs, mod: min}]\n",
                      "objectives[0].mod", "did you mean 'mode'"),
    "target-not-mapping": (_B + "target: cpu\n", "target", "expected a mapping"),
    "target-unknown": (_B + "target: {thread: 2}\n", "target.thread", "did you mean 'threads'"),
    "target-type": (_B + "target: {threads: two}\n", "target.threads", "expected an integer"),
    "target-range": (_B + "target: {threads: 0}\n", "target.threads", "allowed: an integer >= 1"),
    "target-device": (_B + "target: {device: tpu}\n", "target.device", "allowed: ['cpu'"),
    "target-runs": (_B + "target: {min_runs: 500, max_runs: 300}\n", "target.max_runs", "< min_runs=500"),
    "finetune-epochs": (_B + "finetune: {epochs: -1}\n", "finetune.epochs", ">= 0"),
    "finetune-bool": (_B + "finetune: {distill: maybe}\n", "finetune.distill",
                      "expected true or false"),
    "finetune-float": (_B + "finetune: {lr: fast}\n", "finetune.lr",
                       "allowed: a number > 0 or 'auto'"),
    "finetune-lr-list": (_B + "finetune: {lr: [0.1]}\n", "finetune.lr", "expected a number or a string"),
    "search-sampler": (_B + "search: {sampler: nsga3}\n", "search.sampler",
                       "did you mean 'nsga2'"),
    "search-trials": (_B + "search: {trials: 0}\n", "search.trials", "an integer >= 1"),
    "search-trials-bool": (_B + "search: {trials: true}\n", "search.trials",
                           "expected an integer, got bool"),
    "search-cpus": (_B + "search: {cpus_per_trial: 0}\n", "search.cpus_per_trial", "> 0"),
    "search-seed": (_B + "search: {seed: 1.5}\n", "search.seed", "an integer or null"),
    "constraints": (_B + "constraints: {max_accuracy_drop: -1}\n",
                    "constraints.max_accuracy_drop", ">= 0"),
    "constraints-key": (_B + "constraints: {max_drop: 0.1}\n", "constraints.max_drop",
                        "did you mean 'max_accuracy_drop'"),
    "tracking-uri": (_B + "tracking_uri: 5\n", "tracking_uri", "expected a string or null"),
    "version": (_B + "version: 3\n", "version", "not supported"),
    "space-missing": (_B.replace("default.yaml", "nope.yaml"), "search_space",
                      "search space file not found"),
    "space-type": (_B.replace("../search_spaces/default.yaml", "[1]"), "search_space",
                   "expected a path"),
    "space-inline": (_B.split("search_space:")[0] + "search_space: {layers: [{knobs: "
                     "{bits: 9}}]}\nobjectives: [accuracy]\n",
                     "search_space.layers[0].knobs.bits", "9 is out of range"),
}


@pytest.mark.parametrize("text,key,snippet", BAD_EXPERIMENTS.values(),
                         ids=BAD_EXPERIMENTS.keys())
def test_bad_experiment_raises_config_error_naming_file_and_key(write, text, key, snippet):
    path = write(text, name="bad_exp.yaml")
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert snippet in message, message
    assert "\n" not in message
    assert (info.value.file, info.value.key) == (str(path), key)


@pytest.mark.parametrize("text,snippet", [
    ("", "empty file"),
    ("- a\n- b\n", "expected a mapping"),
    ("name: [x\n", "invalid YAML at line 2"),
    ("name: a\nname: b\n", "duplicate key 'name'"),
    ("name: !!python/object:os.system x\n", "invalid YAML at line 1"),
], ids=["empty", "list", "syntax", "duplicate-key", "unsafe-tag"])
def test_bad_file_contents(write, text, snippet):
    path = write(text, name="broken.yaml")
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert str(info.value).startswith(f"{path}: ") and snippet in str(info.value)


def test_missing_experiment_file(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.yaml: file not found"):
        load_experiment(tmp_path / "missing.yaml")


def test_error_in_referenced_space_names_the_space_file(write, tmp_path):
    bad = tmp_path / "search_spaces" / "bad.yaml"
    bad.write_text(textwrap.dedent("""\
        layers:
          - knobs: {sparsity: {low: 0.0, high: 1.5}}
    """))
    with pytest.raises(ConfigError) as info:
        load_experiment(write({**BASE, "search_space": "../search_spaces/bad.yaml"}))
    assert str(info.value) == (f"{bad}: layers[0].knobs.sparsity: high=1.5 is out of range; "
                               f"allowed: a number in [0, 1)")


def test_inline_space_resolve_error_names_experiment_and_key(write):
    path = write({**BASE, "search_space": {"layers": [{"match": "head", "knobs": {"bits": 8}}]}})
    exp = load_experiment(path)
    with pytest.raises(ConfigError) as info:
        exp.search_space.resolve(LAYERS)
    assert str(info.value).startswith(f"{path}: search_space.layers[0].match: pattern 'head'")


# --- fuzz ----------------------------------------------------------------------------------

_values = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.integers(), st.floats(allow_nan=True),
    st.sampled_from(["digits", "pkg.mod:fn", "nsga2", "tpe", "cpu", "onnxruntime", "accuracy",
                     "max", "min", "", "../search_spaces/default.yaml", "nope.yaml", "\x00"]),
    st.text(max_size=5),
)


def _mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """``good`` four times in five, so that examples get past the first check."""
    return st.integers(0, 4).flatmap(lambda i: bad if i == 0 else good)


_good_values = {
    "device": st.sampled_from(["cpu", "cuda"]), "runtime": st.sampled_from(["torch", "ort"]),
    "threads": st.integers(0, 4), "min_runs": st.integers(1, 400), "budget_s": st.floats(0, 2),
    "sampler": st.sampled_from(["nsga2", "tpe", "mutation", "random"]), "trials": st.integers(0, 5),
    "seed": st.one_of(st.none(), st.integers()), "lr": st.floats(-1, 1), "distill": st.booleans(),
    "alpha": st.floats(0, 1.5), "max_accuracy_drop": st.one_of(st.none(), st.floats(-1, 1)),
}
_sections = {
    "target": ["device", "runtime", "threads", "batch_size", "warmup", "min_runs", "max_runs",
               "budget_s", "thread"],
    "search": ["sampler", "trials", "concurrency", "seed", "cpus_per_trial", "trial"],
    "finetune": ["epochs", "lr", "distill", "temperature", "alpha", "weight_decay", "epoch"],
    "constraints": ["max_accuracy_drop", "x"],
}


def _section(keys: list[str]) -> st.SearchStrategy:
    good = st.fixed_dictionaries({}, optional={
        k: _mostly(_good_values.get(k, st.integers(1, 3)), _values) for k in keys[:-1]})
    return _mostly(good, st.dictionaries(st.sampled_from(keys), _values, max_size=2) | _values)


_objective = _mostly(
    st.sampled_from(list(METRICS)) | st.fixed_dictionaries(
        {"metric": st.sampled_from([*METRICS, "acc"])},
        optional={"mode": st.sampled_from(["min", "max", "up"])}),
    _values,
)
_experiment = st.fixed_dictionaries(
    {"name": _mostly(st.just("x"), _values), "task": _mostly(st.just("a.b:c"), _values),
     "search_space": _mostly(
         st.sampled_from(["../search_spaces/default.yaml", "../search_spaces/x.yaml"])
         | st.just({"layers": [{"knobs": {"bits": [4, 8]}}]}),
         _values | st.dictionaries(st.sampled_from(["layers", "x"]), _values, max_size=1)),
     "objectives": _mostly(st.lists(_objective, min_size=1, max_size=4), _values)},
    optional={
        **{section: _section(keys) for section, keys in _sections.items()},
        "tracking_uri": _mostly(st.just("sqlite:///x.db"), _values),
        "version": _mostly(st.just(1), _values),
        "extra": _values,
    },
).map(lambda d: {k: v for k, v in d.items() if k != "extra" or v == 0})


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=_mostly(_experiment, _values | st.binary(max_size=30)))
def test_fuzz_load_experiment_only_raises_config_error(write, data):
    if isinstance(data, bytes):
        path = write("")
        path.write_bytes(data)
    else:
        path = write(yaml.safe_dump(data))
    try:
        exp = load_experiment(path)
    except ConfigError:
        return
    assert load_experiment(write(exp.to_dict(), name="again.yaml")) == exp
