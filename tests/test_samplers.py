"""The samplers' use of the accuracy constraint, and the front-mutation sampler (plain Optuna,
no Ray)."""

from __future__ import annotations

import warnings

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution

from autocompress.config._experiment import SearchSettings
from autocompress.tune._mutation import FrontMutationSampler
from autocompress.tune._samplers import (
    VALUES_ATTR,
    AccuracyDropConstraint,
    SamplerFactory,
    sampler_names,
)

SPACE = {"a/bits": CategoricalDistribution([3, 4, 5, 6, 8, None]),
         "a/sparsity": FloatDistribution(0.0, 0.8, step=0.05),
         "b/bits": CategoricalDistribution([3, 4, 5, 6, 8, None]),
         "b/rank": CategoricalDistribution([None, 0.5, 0.25])}


@pytest.fixture(autouse=True)
def _quiet():
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _tell(study: optuna.Study, trial: optuna.Trial, values: list[float]) -> None:
    """As the search's Searcher tells Optuna: the values as a user attribute first."""
    trial.set_user_attr(VALUES_ATTR, values)
    study.tell(trial, values)


@pytest.mark.parametrize("sampler", ["nsga2", "tpe", "mutation"])
def test_the_constraint_sees_the_values_the_trial_is_told(sampler: str) -> None:
    """Optuna evaluates a sampler's constraint before it stores the values: a trial within the
    allowed drop must be recorded feasible (<= 0), one beyond it infeasible."""
    constraint = AccuracyDropConstraint(0, 0.99, 0.05)
    make = {"nsga2": lambda: optuna.samplers.NSGAIISampler(constraints_func=constraint),
            "tpe": lambda: optuna.samplers.TPESampler(constraints_func=constraint),
            "mutation": lambda: FrontMutationSampler(constraints_func=constraint)}[sampler]
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make())
    for accuracy in (0.98, 0.90):
        _tell(study, study.ask(SPACE), [accuracy, 1.0])
    assert [t.system_attrs["constraints"] for t in study.trials] == [
        pytest.approx((-0.04,)), pytest.approx((0.04,))]


def test_mutation_samples_neighbours_of_the_feasible_front() -> None:
    """After the first trials, each plan is a front member with 1-3 parameters moved, inside
    the space, never a plan already tried; infeasible and dominated trials are not parents."""
    constraint = AccuracyDropConstraint(0, 0.99, 0.05)
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=FrontMutationSampler(seed=0, explore=0.0,
                                                             constraints_func=constraint))
    seeds = [({"a/bits": 8, "a/sparsity": 0.0, "b/bits": 8, "b/rank": None}, [0.99, 100.0]),
             ({"a/bits": 4, "a/sparsity": 0.5, "b/bits": 4, "b/rank": 0.5}, [0.97, 20.0]),
             ({"a/bits": 3, "a/sparsity": 0.8, "b/bits": 3, "b/rank": 0.25}, [0.50, 5.0]),
             ({"a/bits": 6, "a/sparsity": 0.2, "b/bits": 8, "b/rank": None}, [0.95, 120.0])]
    for params, values in seeds:
        study.enqueue_trial(params)
        _tell(study, study.ask(SPACE), values)
    parents = [seeds[0][0], seeds[1][0]]  # the feasible front
    tried = [dict(p) for p, _ in seeds]
    for _ in range(30):
        trial = study.ask(SPACE)
        params = trial.params
        assert params not in tried
        tried.append(params)
        moved = min(sum(params[k] != p[k] for k in SPACE) for p in parents)
        assert 1 <= moved <= 3
        for k, dist in SPACE.items():
            assert dist._contains(dist.to_internal_repr(params[k]))
        _tell(study, trial, [0.0, 1000.0])  # dominated: the front stays the two parents


def test_mutation_never_repeats_a_plan_under_other_parameters() -> None:
    """Parameters the plan ignores (here: a's sparsity when a keeps fp32 weights, say) do not
    make a new plan: with ``plan_key`` every trial is a plan not tried before."""
    def plan_key(params: dict) -> tuple:
        a_sparsity = params["a/sparsity"] if params["a/bits"] is not None else "ignored"
        return (params["a/bits"], a_sparsity, params["b/bits"], params["b/rank"])

    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=FrontMutationSampler(seed=1, explore=0.0, plan_key=plan_key))
    first = {"a/bits": None, "a/sparsity": 0.0, "b/bits": None, "b/rank": None}
    for params, values in ((first, [0.99, 100.0]), ({**first, "a/sparsity": 0.4, "b/bits": 8}, [0.98, 60.0])):
        study.enqueue_trial(params)
        _tell(study, study.ask(SPACE), values)
    plans = [plan_key(t.params) for t in study.trials]
    for _ in range(25):
        trial = study.ask(SPACE)
        assert plan_key(trial.params) not in plans
        plans.append(plan_key(trial.params))
        _tell(study, trial, [0.0, 1000.0])


def test_a_shift_moves_one_knob_the_same_way_on_every_layer() -> None:
    """A shift changes one knob on all five layers, all in the same direction of its listed
    order (a range by one or two steps), clipped at the ends, and nothing else."""
    from autocompress.tune._mutation import knob_groups

    layers = [f"l{i}" for i in range(5)]
    space = {**{f"{n}/bits": CategoricalDistribution([3, 4, 5, 6, 8, None]) for n in layers},
             **{f"{n}/sparsity": FloatDistribution(0.0, 0.8, step=0.05) for n in layers}}
    parent = {**{f"{n}/bits": 4 for n in layers}, **{f"{n}/sparsity": 0.5 for n in layers}}
    parent["l0/bits"], parent["l4/sparsity"] = 3, 0.8  # at the ends
    order = [3, 4, 5, 6, 8, None]
    sampler = FrontMutationSampler(seed=3)
    seen = set()
    for _ in range(40):
        for group in knob_groups(list(space)):
            params = dict(parent)
            sampler._shift(params, space, group)
            changed = {k for k in space if params[k] != parent[k]}
            assert changed <= set(group) and len(changed) >= 4
            if group[0].endswith("bits"):
                moves = {order.index(params[k]) - order.index(parent[k]) for k in changed}
                assert moves in ({1}, {-1})
                assert (params["l0/bits"] == 3) == (moves == {-1})  # clipped going down
            else:
                moves = {round(params[k] - parent[k], 6) for k in changed}
                assert moves in ({0.05}, {0.1}, {-0.05}, {-0.1}, {0.1, 0.05}), moves
                assert params["l4/sparsity"] <= 0.8
            seen.add((group[0], frozenset(moves)))
    assert len(seen) == 6  # bits up / down, sparsity +-1 / +-2 steps


def test_shifts_are_among_the_search_moves(monkeypatch) -> None:
    """With shifts forced, the first plan after two parents moves one knob on every layer."""
    import autocompress.tune._mutation as mutation

    monkeypatch.setattr(mutation, "_SHIFT_P", 1.0)
    layers = [f"l{i}" for i in range(4)]
    space = {f"{n}/bits": CategoricalDistribution([3, 4, 5, 6, 8, None]) for n in layers}
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=FrontMutationSampler(seed=0, explore=0.0))
    for bits, values in ((5, [0.99, 10.0]), (8, [0.995, 100.0])):
        study.enqueue_trial({k: bits for k in space})
        _tell(study, study.ask(space), values)
    params = study.ask(space).params
    assert len(set(params.values())) == 1 and params["l0/bits"] in (4, 6, None)


def test_knob_groups_are_per_knob_and_skip_lone_parameters() -> None:
    from autocompress.tune._mutation import knob_groups

    assert knob_groups(["a/bits", "a/rank", "b/bits", "c.d/bits", "b/sparsity"]) == [
        ["a/bits", "b/bits", "c.d/bits"]]


def test_the_search_gives_the_sampler_its_plan_key(tiny) -> None:
    from autocompress.compress._registry import describe_layers
    from autocompress.config._space import load_search_space
    from autocompress.tune._samplers import make_sampler, plan_key

    space = load_search_space({"layers": [{"knobs": {
        "bits": [4, None], "sparsity": [0.0, 0.5], "structure": ["unstructured", "channel"]}}]},
        source="inline.yaml").resolve(describe_layers(tiny.model, tiny.example_inputs))
    settings = type("S", (), {"sampler": "mutation", "seed": 0, "trials": 8})()
    sampler = make_sampler(settings, ["accuracy", "size_bytes"], 0.05, 0.9, space)
    params = {name: None if name.endswith("/bits") else 0.0 for name in space.params()}
    channel = {**params, **{n: "channel" for n in space.params() if n.endswith("/structure")}}
    unstructured = {**params, **{n: "unstructured" for n in space.params() if n.endswith("/structure")}}
    assert sampler.plan_key(channel) == sampler.plan_key(unstructured) == plan_key(space, channel)


def test_crowding_prefers_the_ends_and_the_gaps() -> None:
    from autocompress.tune._mutation import crowding

    values = np.array([[0.99, 100.0], [0.98, 60.0], [0.97, 50.0], [0.90, 10.0]])
    weights = crowding(values)
    assert weights[0] == weights[3] == weights.max()  # the two ends
    assert weights[2] > weights[1]  # beside the widest gap (50 -> 10)
    assert list(crowding(values[:2])) == [1.0, 1.0]


@pytest.mark.parametrize("name", sampler_names())
def test_every_searcher_pickles_and_comes_back_working(name: str, tmp_path) -> None:
    """Ray Tune cloudpickles the searcher (the Tuner's state, checkpoints): it must hold no
    lock or thread (optuna 5.1's NSGA-II sampler holds one), and come back with its study,
    its running trials and a sampler that suggests."""
    import ray.cloudpickle as cloudpickle

    from autocompress.tune._ray_backend import _searcher_class

    def space(trial: optuna.Trial) -> None:
        for key, dist in SPACE.items():
            trial._suggest(key, dist)

    factory = SamplerFactory(SearchSettings(sampler=name, trials=6), ("accuracy", "size_bytes"),
                             0.05, 0.99)
    searcher = _searcher_class()(space=space, metric=["accuracy", "size_bytes"],
                                 mode=["max", "min"], sampler=factory, study_name="s",
                                 storage=f"sqlite:///{tmp_path / 'study.db'}", trials=6)
    assert isinstance(searcher.suggest("t1"), dict)
    back = cloudpickle.loads(cloudpickle.dumps(searcher))
    assert type(back._sampler) is type(searcher._sampler)
    back.on_trial_complete("t1", {"accuracy": 0.98, "size_bytes": 10.0})
    assert [t.state for t in back._ot_study.trials] == [optuna.trial.TrialState.COMPLETE]
    assert isinstance(back.suggest("t2"), dict) and back.live == {"t2"}
    path = tmp_path / "searcher.pkl"  # Ray's own checkpoint of a searcher
    back.save(str(path))
    again = _searcher_class().__new__(_searcher_class())
    again.restore(str(path))
    assert set(again._ot_trials) == {"t1", "t2"} and again.ended == 1
