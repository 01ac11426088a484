"""Search spaces: loading, validation, resolving against layers, sampling with Optuna."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autocompress.compress._layers import KINDS, LayerInfo, Refusal
from autocompress.compress._plan import LayerPlan, Plan
from autocompress.config import (
    KNOBS,
    LAYER_TYPES,
    ConfigError,
    Knob,
    ResolvedSpace,
    SearchSpace,
    did_you_mean,
    load_search_space,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "search_spaces").glob("*.yaml"))

LAYERS = [
    LayerInfo("features.0", "Conv2d", (16, 1, 3, 3), 160, 9216),
    LayerInfo("features.3", "Conv2d", (32, 16, 3, 3), 4640, 73728),
    LayerInfo("classifier.0", "Linear", (64, 128), 8256, 8192),
    LayerInfo("classifier.2", "Linear", (10, 64), 650, 640, is_output=True),
]
CONV1D_ONLY = [
    LayerInfo("net.0", "Conv1d", (8, 1, 5), 48, 1000),
    LayerInfo("net.2", "Conv1d", (10, 8, 3), 250, 500, is_output=True),
]
MLP_ONLY = [
    LayerInfo("fc1", "Linear", (32, 40), 1312, 1280),
    LayerInfo("fc2", "Linear", (10, 32), 330, 320, is_output=True),
]
# A BERT-like encoder block: embeddings, attention, FFN (residual-stream layers refuse channel).
_RESIDUAL = (Refusal("structure", "channel", "residual stream"),)
TRANSFORMER = [
    LayerInfo("emb", "Embedding", (100, 16), 1600, 0,
              refusals=(Refusal("structure", "channel", "vocabulary"), Refusal("act_bits", None, "ids"))),
    LayerInfo("q", "Linear", (16, 16), 272, 256), LayerInfo("k", "Linear", (16, 16), 272, 256),
    LayerInfo("v", "Linear", (16, 16), 272, 256),
    LayerInfo("o", "Linear", (16, 16), 272, 256, refusals=_RESIDUAL),
    LayerInfo("ffn1", "Linear", (32, 16), 544, 512),
    LayerInfo("ffn2", "Linear", (16, 32), 528, 512, is_output=True, refusals=_RESIDUAL),
]
# A decoder LM as the causal_lm task wraps it (two Llama layers, the output layer tied to the
# embedding: its weight follows the embedding's plan).
DECODER = [
    LayerInfo("lm.model.embed_tokens", "Embedding", (100, 16), 1600, 0,
              refusals=(Refusal("structure", "channel", "vocabulary"), Refusal("act_bits", None, "ids"))),
    *[LayerInfo(f"lm.model.layers.{i}.{part}", "Linear", shape, shape[0] * shape[1], shape[0] * shape[1])
      for i in range(2) for part, shape in (
          ("self_attn.q_proj", (16, 16)), ("self_attn.k_proj", (8, 16)), ("self_attn.v_proj", (8, 16)),
          ("self_attn.o_proj", (16, 16)), ("mlp.gate_proj", (32, 16)), ("mlp.up_proj", (32, 16)),
          ("mlp.down_proj", (16, 32)))],
    LayerInfo("lm.lm_head", "Linear", (100, 16), 1600, 1600, is_output=True,
              refusals=tuple(Refusal(k, None, "tied to lm.model.embed_tokens")
                             for k in ("bits", "sparsity", "rank"))),
]
# The models each shipped space is meant for: the general ones fit any model.
MEANT_FOR = {"transformer.yaml": {"transformer"}, "lm.yaml": {"decoder"}}
MODELS = {"cnn": LAYERS, "conv1d": CONV1D_ONLY, "mlp": MLP_ONLY, "transformer": TRANSFORMER,
          "decoder": DECODER}
# Layers a shipped space leaves out on purpose: the tied output layer follows the embedding.
NOT_SELECTED = {"lm.yaml": {"lm.lm_head"}}


def selected(path: Path, layers: list[LayerInfo]) -> list[str]:
    """The names of ``layers`` that the shipped space at ``path`` resolves."""
    return [la.name for la in layers if la.name not in NOT_SELECTED.get(path.name, ())]


def space(*rules: dict[str, Any]) -> SearchSpace:
    return load_search_space({"layers": list(rules)}, source="inline.yaml")


def ask(study: optuna.Study, resolved: ResolvedSpace) -> tuple[optuna.Trial, Plan]:
    trial = study.ask()
    plan = resolved.suggest(trial)
    study.tell(trial, 0.0)
    return trial, plan


# --- shipped files -------------------------------------------------------------------------


def test_shipped_spaces_exist():
    assert {p.name for p in SHIPPED} >= {"default.yaml", "mixed_precision.yaml",
                                         "prune_lowrank.yaml"}


def test_layer_types_match_layers_module():
    assert LAYER_TYPES == KINDS


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_space_loads_resolves_and_samples(path, model):
    if model not in MEANT_FOR.get(path.name, MODELS):
        pytest.skip(f"{path.name} is meant for {sorted(MEANT_FOR[path.name])}")
    layers = MODELS[model]
    loaded = load_search_space(path)
    assert loaded.source == str(path)
    resolved = loaded.resolve(layers)
    assert [ls.name for ls in resolved.layers] == selected(path, layers)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(5):
        trial, plan = ask(study, resolved)
        plan.validate([layer.name for layer in layers])
        assert set(trial.params) == set(resolved.distributions())
        assert resolved.plan_from_params(trial.params) == plan


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_space_round_trips_through_dict(path):
    loaded = load_search_space(path)
    again = load_search_space(yaml.safe_load(yaml.safe_dump(loaded.to_dict())))
    assert again == loaded


def test_documented_example_loads_and_resolves():
    import textwrap

    import autocompress.config._space as module

    doc = module.__doc__
    example = yaml.safe_load(textwrap.dedent(doc[doc.index("::") + 2:doc.index("Rules apply")]))
    resolved = load_search_space(example).resolve(LAYERS)
    assert [ls.name for ls in resolved.layers] == ["features.3"]


# --- rules ---------------------------------------------------------------------------------


def test_later_rule_overrides_earlier_per_layer_and_knob():
    resolved = space(
        {"knobs": {"sparsity": {"low": 0.0, "high": 0.5}, "bits": [4, 8]}},
        {"match": "classifier.0", "knobs": {"sparsity": 0.25}},
    ).resolve(LAYERS)
    by_name = {ls.name: ls for ls in resolved.layers}
    fc = by_name["classifier.0"].knobs
    assert fc["sparsity"].param is None and fc["sparsity"].knob.value == 0.25
    assert fc["bits"].param == "classifier.0/bits"
    assert by_name["features.0"].knobs["sparsity"].param == "features.0/sparsity"
    plan = resolved.suggest(optuna.create_study().ask())
    assert plan.layers["classifier.0"].sparsity == 0.25


def test_layers_without_knobs_are_not_in_plan_and_other_knobs_keep_defaults():
    resolved = space({"types": ["Linear"], "knobs": {"bits": [8]}}).resolve(LAYERS)
    plan = resolved.suggest(optuna.create_study().ask())
    assert set(plan.layers) == {"classifier.0", "classifier.2"}
    assert plan.layers["classifier.0"] == LayerPlan(bits=8)


def test_match_regex_list_exclude_and_types():
    rule = {"match": ["re:features\\..*", "classifier.0"], "exclude": ["re:.*\\.3"],
            "knobs": {"bits": [4, 8]}}
    assert [ls.name for ls in space(rule).resolve(LAYERS).layers] == ["features.0",
                                                                    "classifier.0"]
    typed = {"types": "Conv2d", "knobs": {"bits": 8}}
    assert [ls.name for ls in space(typed).resolve(LAYERS).layers] == ["features.0",
                                                                     "features.3"]


def test_regex_must_match_whole_name():
    with pytest.raises(ConfigError, match="matches no layer"):
        space({"match": "re:features", "knobs": {"bits": 8}}).resolve(LAYERS)


def test_share_gives_one_param_for_all_layers():
    resolved = space(
        {"knobs": {"sparsity": {"low": 0.0, "high": 0.9, "step": 0.1}}},
        {"types": ["Conv2d"], "share": True, "knobs": {"bits": [2, 4, 8]}},
        {"name": "fcs", "types": ["Linear"], "share": True, "knobs": {"bits": [4, 8]}},
    ).resolve(LAYERS)
    params = resolved.distributions()
    assert "rule1/bits" in params and "fcs/bits" in params
    assert not any(p.endswith("/bits") and p.split("/")[0] in {x.name for x in LAYERS}
                   for p in params)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        _, plan = ask(study, resolved)
        assert plan.layers["features.0"].bits == plan.layers["features.3"].bits
        assert plan.layers["classifier.0"].bits == plan.layers["classifier.2"].bits


def test_shared_rule_partly_overridden_keeps_sharing_for_the_rest():
    resolved = space(
        {"share": True, "knobs": {"bits": [2, 4, 8]}},
        {"match": "features.0", "knobs": {"bits": None}},
    ).resolve(LAYERS)
    assert list(resolved.distributions()) == ["rule0/bits"]
    plan = resolved.suggest(optuna.create_study().ask())
    assert plan.layers["features.0"].bits is None


# --- sampling ------------------------------------------------------------------------------


def test_suggest_is_deterministic_with_a_seeded_sampler():
    resolved = load_search_space(ROOT / "search_spaces" / "default.yaml").resolve(LAYERS)

    def plans(seed: int) -> list[Plan]:
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
        return [ask(study, resolved)[1] for _ in range(6)]

    assert plans(0) == plans(0)
    assert plans(0) != plans(1)


def test_categorical_none_round_trips_through_optuna():
    resolved = space({"knobs": {"bits": [None, 8], "act_bits": [None, 8]}}).resolve(LAYERS)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        trial, plan = ask(study, resolved)
        seen.add(plan.layers["features.0"].bits)
        assert study.trials[-1].params == trial.params
    assert seen == {None, 8}


def test_fp16_bf16_and_pow2_load_from_yaml_and_sample_valid_plans(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("layers:\n  - knobs:\n      bits: [4, 8, fp16, bf16, null]\n"
                    "      scheme: [uniform, pow2]\n      act_bits: [null, 8]\n")
    resolved = load_search_space(path).resolve(LAYERS)
    assert resolved.params()["features.0/bits"].choices == (4, 8, "fp16", "bf16", None)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(60):
        trial, plan = ask(study, resolved)  # Plan(...) checks every combination
        assert resolved.plan_from_params(trial.params) == plan
        for lp in plan.layers.values():
            seen.add((lp.bits, lp.scheme, lp.act_bits))
            assert lp.act_bits is None or isinstance(lp.bits, int)  # fp16/bf16/fp32: no a8
            assert lp.scheme == "uniform" or lp.bits == 4  # pow2 needs 3..6 (8 falls back)
    assert {("fp16", "uniform", None), ("bf16", "uniform", None), (4, "pow2", 8),
            (4, "pow2", None)} <= seen
    # The warm start stays 8-bit uniform weights.
    assert set(resolved.warm_start_params().values()) == {8, "uniform", None}


def test_full_space_has_every_knob():
    knobs = load_search_space(Path(__file__).resolve().parents[1] / "search_spaces" / "full.yaml")
    assert {k for rule in knobs.rules for k in rule.knobs} == set(KNOBS)


def test_stepped_floats_are_snapped_to_the_grid():
    resolved = space({"knobs": {"sparsity": {"low": 0.0, "high": 0.9, "step": 0.05}}})
    resolved = resolved.resolve(LAYERS)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        _, plan = ask(study, resolved)
        for lp in plan.layers.values():
            assert lp.sparsity == round(lp.sparsity, 2)


def test_int_and_log_ranges():
    resolved = space(
        {"knobs": {"bits": {"low": 2, "high": 8, "step": 2},
                   "rank": {"low": 0.05, "high": 0.5, "log": True}}},
    ).resolve(LAYERS)
    dists = resolved.distributions()
    assert isinstance(dists["features.0/bits"], optuna.distributions.IntDistribution)
    assert dists["features.0/rank"].log
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        _, plan = ask(study, resolved)
        assert all(lp.bits in (2, 4, 6, 8) and 0.05 <= lp.rank <= 0.5
                   for lp in plan.layers.values())


def test_full_rank_means_no_factorization():
    resolved = space({"knobs": {"rank": {"low": 0.5, "high": 1.0, "step": 0.5}}}).resolve(LAYERS)
    ranks = {resolved.plan_from_params({f"{x.name}/rank": 1.0 for x in LAYERS})
             .layers["features.0"].rank,
             resolved.plan_from_params({f"{x.name}/rank": 0.5 for x in LAYERS})
             .layers["features.0"].rank}
    assert ranks == {None, 0.5}


def test_suggest_with_a_trial_like_object():
    class FirstChoice:
        def __init__(self) -> None:
            self.names: list[str] = []

        def suggest_float(self, name, low, high, *, step=None, log=False):
            self.names.append(name)
            return high

        def suggest_int(self, name, low, high, *, step=1, log=False):
            self.names.append(name)
            return low

        def suggest_categorical(self, name, choices):
            self.names.append(name)
            return choices[0]

    resolved = space({"match": "features.0",
                      "knobs": {"sparsity": {"low": 0.1, "high": 0.3, "step": 0.1},
                                "bits": {"low": 4, "high": 8}, "structure": ["channel"]}})
    trial = FirstChoice()
    plan = resolved.resolve(LAYERS).suggest(trial)
    assert trial.names == ["features.0/sparsity", "features.0/structure", "features.0/bits"]
    assert plan.layers["features.0"] == LayerPlan(sparsity=0.3, structure="channel", bits=4)


# --- output layer --------------------------------------------------------------------------


def test_output_layer_never_gets_channel():
    resolved = space({"knobs": {"sparsity": {"low": 0.1, "high": 0.9},
                                "structure": ["unstructured", "channel"]}}).resolve(LAYERS)
    assert "classifier.2/structure" not in resolved.distributions()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    structures = set()
    for _ in range(15):
        _, plan = ask(study, resolved)
        assert plan.layers["classifier.2"].structure == "unstructured"
        structures.add(plan.layers["features.0"].structure)
    assert structures == {"unstructured", "channel"}


@pytest.mark.parametrize("structure", ["channel", ["channel"]], ids=["fixed", "only-choice"])
def test_output_layer_asked_only_channel_gets_unstructured(structure):
    resolved = space({"knobs": {"sparsity": 0.5, "structure": structure}}).resolve(LAYERS)
    plan = resolved.suggest(optuna.create_study().ask())
    assert plan.layers["classifier.2"].structure == "unstructured"
    assert plan.layers["classifier.0"].structure == "channel"


def test_output_layer_in_shared_rule_maps_channel_to_unstructured():
    resolved = space({"share": True, "knobs": {"sparsity": 0.5,
                                               "structure": ["channel"]}}).resolve(LAYERS)
    assert list(resolved.distributions()) == ["rule0/structure"]
    plan = resolved.suggest(optuna.create_study().ask())
    assert plan.layers["classifier.2"].structure == "unstructured"
    assert plan.layers["features.3"].structure == "channel"


# --- plan_from_params ----------------------------------------------------------------------


def test_plan_from_params_accepts_ray_nested_form():
    resolved = load_search_space(ROOT / "search_spaces" / "default.yaml").resolve(LAYERS)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    trial, plan = ask(study, resolved)
    nested: dict[str, dict[str, Any]] = {}
    for name, value in trial.params.items():
        layer, knob = name.split("/")
        nested.setdefault(layer, {})[knob] = value
    nested["unrelated"] = {"key": 1}
    assert resolved.plan_from_params(nested) == plan


def test_plan_from_params_rejects_missing_or_foreign_values():
    resolved = space({"knobs": {"bits": [4, 8]}}).resolve(LAYERS)
    params = {f"{x.name}/bits": 4 for x in LAYERS}
    assert resolved.plan_from_params(params).layers["features.0"].bits == 4
    with pytest.raises(ConfigError, match="no value for parameter 'features.3/bits'"):
        resolved.plan_from_params({"features.0/bits": 4})
    with pytest.raises(ConfigError, match="outside its domain"):
        resolved.plan_from_params({**params, "features.0/bits": 3})


def test_describe_lists_every_layer_and_knob():
    resolved = load_search_space(ROOT / "search_spaces" / "prune_lowrank.yaml").resolve(LAYERS)
    described = resolved.describe()
    assert [d["layer"] for d in described] == [x.name for x in LAYERS]
    assert described[0]["knobs"]["sparsity"] == {
        "param": "features.0/sparsity", "kind": "range", "low": 0.0, "high": 0.8, "step": 0.1,
        "log": False}
    assert described[-1]["knobs"]["structure"]["kind"] == "fixed"


# --- errors --------------------------------------------------------------------------------


def test_config_error_format_and_pickle():
    e = ConfigError("bad\nthing", file="x.yaml", key="layers[0]")
    assert str(e) == "x.yaml: layers[0]: bad thing"
    assert str(ConfigError("bad")) == "bad"
    assert isinstance(e, ValueError)
    again = pickle.loads(pickle.dumps(e))
    assert (again.file, again.key, str(again)) == ("x.yaml", "layers[0]", str(e))
    assert str(e.located("y.yaml", "search_space")) == "x.yaml: search_space.layers[0]: bad thing"
    assert did_you_mean("sparsty", KNOBS) == " (did you mean 'sparsity'?)"
    assert did_you_mean("zzz", KNOBS) == ""


BAD_SPACES = {
    "unknown-rule-key": ("layers:\n  - knob: {bits: 8}\n", "layers[0].knob", "'knobs'"),
    "unknown-knob": ("layers:\n  - knobs: {sparsty: 0.5}\n", "layers[0].knobs.sparsty",
                     "did you mean 'sparsity'"),
    "high-out-of-range": ("layers:\n  - knobs: {bits: 8}\n  - knobs:\n      sparsity: "
                          "{low: 0.0, high: 1.5}\n", "layers[1].knobs.sparsity",
                          "high=1.5 is out of range; allowed:"),
    "low-above-high": ("layers:\n  - knobs: {rank: {low: 0.8, high: 0.2}}\n",
                       "layers[0].knobs.rank", "low=0.8 > high=0.2"),
    "rank-zero": ("layers:\n  - knobs: {rank: {low: 0.0, high: 0.5}}\n",
                  "layers[0].knobs.rank", "low=0.0 is out of range"),
    "range-missing-high": ("layers:\n  - knobs: {rank: {low: 0.1}}\n", "layers[0].knobs.rank",
                           "'low' and 'high'"),
    "range-unknown-key": ("layers:\n  - knobs: {rank: {low: 0.1, hihg: 0.5}}\n",
                          "layers[0].knobs.rank.hihg", "did you mean 'high'"),
    "range-on-structure": ("layers:\n  - knobs: {structure: {low: 0, high: 1}}\n",
                           "layers[0].knobs.structure", "range is not allowed"),
    "bits-float-range": ("layers:\n  - knobs: {bits: {low: 2.5, high: 8}}\n",
                         "layers[0].knobs.bits", "expected an integer"),
    "step-not-multiple": ("layers:\n  - knobs: {sparsity: {low: 0.0, high: 0.5, step: 0.3}}\n",
                          "layers[0].knobs.sparsity", "not a multiple of step"),
    "step-and-log": ("layers:\n  - knobs: {rank: {low: 0.1, high: 0.5, step: 0.1, log: true}}\n",
                     "layers[0].knobs.rank", "both a step and log"),
    "log-from-zero": ("layers:\n  - knobs: {sparsity: {low: 0.0, high: 0.5, log: true}}\n",
                      "layers[0].knobs.sparsity", "log=true needs low > 0"),
    "bad-choice": ("layers:\n  - knobs: {bits: [4, 9, null]}\n", "layers[0].knobs.bits[1]",
                   "9 is out of range"),
    "bool-choice": ("layers:\n  - knobs: {bits: [4, true]}\n", "layers[0].knobs.bits[1]",
                    "True is not allowed"),
    "duplicate-choice": ("layers:\n  - knobs: {bits: [4, 4]}\n", "layers[0].knobs.bits[1]",
                         "listed twice"),
    "empty-choices": ("layers:\n  - knobs: {bits: []}\n", "layers[0].knobs.bits",
                      "empty list"),
    "bad-structure": ("layers:\n  - knobs: {structure: [unstructured, filter]}\n",
                      "layers[0].knobs.structure[1]", "'filter' is out of range"),
    "bad-fixed": ("layers:\n  - knobs: {act_bits: 4}\n", "layers[0].knobs.act_bits",
                  "4 is out of range"),
    "bits-fp4": ("layers:\n  - knobs: {bits: [4, fp4, null]}\n", "layers[0].knobs.bits[1]",
                 "'fp4' is out of range; allowed: an integer in 2..8, 'fp16', 'bf16', 'fp8' or "
                 "null"),
    "bits-string-range": ("layers:\n  - knobs: {bits: {low: 4, high: fp16}}\n",
                          "layers[0].knobs.bits", "high='fp16'; expected an integer"),
    "bad-scheme": ("layers:\n  - knobs: {scheme: [uniform, log]}\n", "layers[0].knobs.scheme[1]",
                   "'log' is out of range; allowed: one of ['uniform', 'pow2']"),
    "bad-type": ("layers:\n  - types: [Conv3d]\n    knobs: {bits: 8}\n", "layers[0].types",
                 "unknown layer type 'Conv3d'"),
    "bad-regex": ("layers:\n  - match: 're:features[0'\n    knobs: {bits: 8}\n",
                  "layers[0].match", "bad regular expression"),
    "bad-share": ("layers:\n  - share: sometimes\n    knobs: {bits: 8}\n", "layers[0].share",
                  "expected true or false"),
    "no-knobs": ("layers:\n  - match: fc\n", "layers[0].knobs", "expected a mapping of knobs"),
    "rule-not-mapping": ("layers:\n  - fc\n", "layers[0]", "expected a rule mapping"),
    "no-rules": ("layers: []\n", "layers", "non-empty list of rules"),
    "unknown-top-key": ("layer:\n  - knobs: {bits: 8}\n", "layer", "did you mean 'layers'"),
    "reserved-name": ("layers:\n  - name: rule3\n    knobs: {bits: 8}\n", "layers[0].name",
                      "reserved"),
    "duplicate-name": ("layers:\n  - {name: a, knobs: {bits: 8}}\n  - {name: a, knobs: "
                       "{bits: 4}}\n", "layers[1].name", "used twice"),
    "bad-version": ("version: 2\nlayers:\n  - knobs: {bits: 8}\n", "version", "not supported"),
}


@pytest.mark.parametrize("text,key,snippet", BAD_SPACES.values(), ids=BAD_SPACES.keys())
def test_bad_space_raises_config_error_naming_file_and_key(tmp_path, text, key, snippet):
    path = tmp_path / "bad_space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_search_space(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert snippet in message
    assert "\n" not in message
    assert info.value.file == str(path) and info.value.key == key


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("layers:\n  - knobs: {bits: [4, 8}\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: invalid YAML at line 2"):
        load_search_space(path)


@pytest.mark.parametrize("text", ["", "# only a comment\n"], ids=["empty", "comment"])
def test_empty_file(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"empty\.yaml: empty search space"):
        load_search_space(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: file not found"):
        load_search_space(tmp_path / "nope.yaml")


def test_rule_selecting_nothing_names_pattern_and_layers():
    with pytest.raises(ConfigError) as info:
        space({"knobs": {"bits": 8}}, {"match": "classifer.0", "knobs": {"bits": 4}}).resolve(
            LAYERS)
    message = str(info.value)
    assert message.startswith("inline.yaml: layers[1].match: pattern 'classifer.0'")
    assert "did you mean 'classifier.0'" in message
    assert "features.0 (Conv2d), features.3 (Conv2d)" in message


def test_rule_whose_types_select_nothing():
    with pytest.raises(ConfigError) as info:
        space({"name": "convs", "types": ["Conv1d"], "knobs": {"bits": 8}}).resolve(LAYERS)
    message = str(info.value)
    assert message.startswith("inline.yaml: layers[0]: rule 'convs' (types ['Conv1d']) "
                              "selects no layer")
    assert "classifier.2 (Linear)" in message


def test_exclude_that_matches_nothing_is_fine():
    resolved = space({"exclude": ["head"], "knobs": {"bits": 8}}).resolve(MLP_ONLY)
    assert len(resolved.layers) == 2


def test_knob_contains_and_snap():
    knob = Knob("range", low=0.0, high=0.9, step=0.05)
    assert knob.contains(0.8500000000000001) and not knob.contains(0.86)
    assert knob.snap(0.8500000000000001) == 0.85
    assert not Knob("choice", choices=(4, 8)).contains(True)


# --- fuzz ----------------------------------------------------------------------------------

_plausible = st.sampled_from([None, 0.0, 0.05, 0.1, 0.25, 0.5, 0.9, 1.0, 1.5, -1, 2, 4, 8, 9,
                              True, "unstructured", "channel", "fp16", "pow2"])
_scalars = st.one_of(
    _plausible, st.integers(), st.floats(allow_nan=True), st.text(max_size=5),
    st.sampled_from(["Conv2d", "Linear", "re:.*", "re:features.*", "re:[", "features.0", "",
                     "rule0"]),
)
_ranges = st.one_of(
    st.fixed_dictionaries({"low": _plausible, "high": _plausible},
                          optional={"step": _plausible, "log": st.booleans()}),
    st.dictionaries(st.sampled_from(["low", "high", "step", "log", "lo"]), _scalars, max_size=4),
)
_knob_values = st.one_of(_plausible, _ranges, st.lists(_plausible, max_size=4),
                         st.lists(_scalars, max_size=3), _scalars)
_knobs = st.dictionaries(st.sampled_from([*KNOBS, "sparsty"]), _knob_values, max_size=4)
_GOOD_KNOBS = {
    "sparsity": [0.5, [0.0, 0.5], {"low": 0.0, "high": 0.9, "step": 0.05},
                 {"low": 0.1, "high": 0.5, "log": True}],
    "structure": ["channel", ["unstructured", "channel"], ["channel"]],
    "bits": [None, 8, [2, 4, None], {"low": 2, "high": 8}, {"low": 2, "high": 8, "step": 3},
             [4, 8, "fp16", "bf16", None], "bf16"],
    "scheme": ["pow2", ["uniform", "pow2"]],
    "rank": [None, 1.0, [None, 0.5], {"low": 0.1, "high": 1.0, "step": 0.3}],
    "act_bits": [None, [None, 8]],
}
_good_knobs = st.dictionaries(
    st.sampled_from(KNOBS),
    st.one_of(*(st.sampled_from(v) for v in _GOOD_KNOBS.values()), _knob_values),
    min_size=1, max_size=5)
_good_rules = st.fixed_dictionaries({"knobs": _good_knobs}, optional={
    "match": st.sampled_from(["features.0", "re:features.*", ["classifier.0", "re:.*2"]]),
    "types": st.sampled_from([["Conv2d"], "Linear", ["Conv1d", "Linear"]]),
    "exclude": st.sampled_from([["features.0"], "re:.*0"]), "share": st.booleans(),
    "name": st.sampled_from(["a", "b"])})
_rules = st.one_of(
    st.fixed_dictionaries({"knobs": _knobs}, optional={
        "match": st.one_of(_scalars, st.lists(_scalars, max_size=2)),
        "types": st.one_of(st.sampled_from(LAYER_TYPES), st.lists(_scalars, max_size=2)),
        "exclude": st.lists(_scalars, max_size=2), "share": st.booleans(),
        "name": st.one_of(_scalars, st.sampled_from(["a", "b"]))}),
    st.dictionaries(st.sampled_from(["knobs", "match", "types", "kobs", "share"]),
                    st.one_of(_scalars, _knobs), max_size=3),
    _scalars,
)
_spaces = st.one_of(
    st.fixed_dictionaries({"layers": st.lists(_good_rules, min_size=1, max_size=3)}),
    st.fixed_dictionaries({"layers": st.lists(st.one_of(_good_rules, _rules), max_size=3)},
                          optional={"version": st.one_of(st.just(1), _scalars)}),
    st.dictionaries(st.text(max_size=6), _scalars, max_size=2),
    _scalars,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_spaces)
def test_fuzz_load_and_resolve_only_raise_config_error(data, tmp_path_factory):
    """Loads a mapping directly, anything else through a YAML file."""
    source: Any = data
    if not isinstance(data, dict):
        source = tmp_path_factory.getbasetemp() / "fuzz_space.yaml"
        source.write_text(yaml.safe_dump(data))
    try:
        loaded = load_search_space(source)
    except ConfigError:
        return
    try:
        resolved = loaded.resolve(LAYERS)
    except ConfigError:
        return
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial, plan = ask(study, resolved)
    assert resolved.plan_from_params(trial.params) == plan
    assert load_search_space(loaded.to_dict()) == loaded
