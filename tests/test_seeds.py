"""Sensitivity-guided first trials and multi-fidelity pruning (the search's sample efficiency)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from autocompress.compress import LayerPlan
from autocompress.compress._registry import describe_layers
from autocompress.config._space import load_search_space
from autocompress.tune._seeds import Option, allocate, seed_points, to_params, weight_bytes
from autocompress.tune._sensitivity import Sensitivity, probe_settings, profile
from autocompress.tune._trial import MIN_RECOVERIES, RecoveryBook, prune_reason


def _space(task, knobs: dict):
    layers = describe_layers(task.model, task.example_inputs)
    return load_search_space({"layers": [{"knobs": knobs}]}, source="inline.yaml").resolve(layers), layers


@pytest.fixture()
def identity_task(tiny, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The tiny task's trained MLP with an identity Linear inserted after its first ReLU
    (layer "2"; the function is unchanged): magnitude pruning to 75% removes only zeros there
    and 3-bit weights store it exactly, so it is insensitive, while the trained first layer
    ("0") is not."""
    import copy

    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path))
    net = copy.deepcopy(tiny.model.net)
    identity = torch.nn.Linear(32, 32)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(32))
        identity.bias.zero_()
    task = copy.copy(tiny)
    task.model = torch.nn.Sequential(net[0], net[1], identity, *net[2:]).eval()
    return task


def test_the_profile_finds_the_insensitive_layer(identity_task) -> None:
    space, _ = _space(identity_task, {"sparsity": [0.0, 0.75], "bits": [3, None]})
    sens = profile(identity_task, space, batches=2)
    assert sens.metric > 0.8
    # Linear layers are probed layer-locally: no metric, a local error and a distortion that
    # see none where the function is unchanged.
    assert sens.drop("2", "sparsity", 0.75) is None
    probes = {(p.layer, p.label()): p for p in sens.probes}
    assert probes["2", "bits=3"].local == pytest.approx(0.0, abs=1e-10)
    assert sens.distortion("2", "sparsity", 0.75) == pytest.approx(0.0, abs=1e-10)
    assert sens.distortion("2", "bits", 3) == pytest.approx(0.0, abs=1e-10)
    assert sens.distortion("0", "sparsity", 0.75) > 0.01
    assert 0 < sens.distortion("0", "bits", 3) < sens.distortion("0", "sparsity", 0.75)
    assert probes["0", "bits=3"].local < probes["0", "sparsity=0.75 structure=unstructured"].local
    assert {p.layer for p in sens.probes} == {"0", "2", "3", "5", "7"}
    again = profile(identity_task, space, batches=2)  # from the cache, same numbers
    assert again.cached and again.to_csv() == sens.to_csv()
    assert "2,sparsity=0.75 structure=unstructured" in sens.to_csv()


def test_probe_settings_cover_each_value_once() -> None:
    from autocompress.config._domain import Knob
    from autocompress.config._resolve import Slot

    slots = {"sparsity": Slot("a/s", Knob("range", low=0.0, high=0.8, step=0.2)),
             "structure": Slot("a/st", Knob("choice", choices=("unstructured", "channel"))),
             "bits": Slot("a/b", Knob("choice", choices=(4, 8, None))),
             "act_bits": Slot("a/a", Knob("choice", choices=(None, 8)))}
    settings = probe_settings(slots)
    assert {"sparsity": 0.8, "structure": "channel"} in settings
    assert {"sparsity": 0.2, "structure": "unstructured"} in settings
    assert {"bits": 4} in settings and {"bits": 8, "act_bits": 8} in settings
    assert len(settings) == 4 * 2 + 2 + 1


def test_the_allocation_meets_its_budget_and_is_optimal() -> None:
    options = {
        "a": [Option({}, 0.0, 100), Option({"bits": 4}, 0.01, 30), Option({"bits": 2}, 0.2, 15)],
        "b": [Option({}, 0.0, 200), Option({"bits": 4}, 0.05, 60), Option({"bits": 2}, 0.06, 30)],
        "c": [Option({}, 0.0, 50), Option({"bits": 4}, 0.001, 15)],
    }
    for budget in (45, 60, 75, 105, 140, 200, 350):
        got = allocate(options, budget)
        combos = [dict(zip(options, c, strict=True)) for c in itertools.product(*options.values())]
        feasible = [c for c in combos if sum(o.cost for o in c.values()) <= budget]
        if not feasible:
            assert got is None
            continue
        assert got is not None and sum(o.cost for o in got.values()) <= budget
        best = min(sum(o.damage for o in c.values()) for c in feasible)
        assert sum(o.damage for o in got.values()) == pytest.approx(best)
    assert allocate(options, 44) is None  # below the cheapest plan


def test_weight_bytes_matches_the_stored_size(tiny) -> None:
    """Exact where the weight is stored dense or with a bitmap; the delta layout's cost
    depends on where the zeros fall, which planning prices as random positions."""
    from autocompress.compress import Plan, apply
    from autocompress.measure import size_bytes, size_report

    x = tiny.example_inputs
    for lp in (LayerPlan(bits=4), LayerPlan(sparsity=0.5, bits=3), LayerPlan(rank=0.5, bits=8),
               LayerPlan(sparsity=0.5), LayerPlan(bits="fp16"), LayerPlan(sparsity=0.75, bits="bf16"),
               LayerPlan(bits=4, scheme="pow2"), LayerPlan(sparsity=0.95, bits=4)):
        new = apply(tiny.model, Plan({"net.6": lp}), x)
        change = size_bytes(new) - size_bytes(tiny.model)
        predicted = weight_bytes((4, 16), lp)
        if any(r.layout.kind == "delta" for r in size_report(new) if r.name.startswith("net.6.")):
            assert abs(change + 4 * 4 * 16 - predicted) <= 0.15 * predicted + 2, lp
        else:
            assert change == predicted - 4 * 4 * 16, lp


def test_seed_points_are_params_of_the_space(identity_task) -> None:
    space, layers = _space(identity_task, {"sparsity": {"low": 0.0, "high": 0.9, "step": 0.1},
                                           "bits": [3, 4, 8, None]})
    sens = profile(identity_task, space, batches=2)
    points = seed_points(space, sens, {la.name: la.shape for la in layers}, 6)
    assert 2 <= len(points) <= 6
    for p in points:
        assert set(p) == set(space.params())
        plan = space.plan_from_params(p)  # raises on a value outside a domain
        assert plan.layers
    uniform = [p for p in points if len({v for k, v in p.items() if k.endswith("/bits")}) == 1
               and len({v for k, v in p.items() if k.endswith("/sparsity")}) == 1]
    assert uniform, "no uniform recipe among the first trials"
    assert to_params(space, {}) == {k: (None if k.endswith("/bits") else 0.0) for k in space.params()}


def test_channel_recipes_cut_75_50_then_25_percent_at_4_bits(identity_task) -> None:
    space, layers = _space(identity_task, {"sparsity": {"low": 0.0, "high": 0.8, "step": 0.05},
                                           "structure": ["unstructured", "channel"],
                                           "bits": [3, 5, 8, None]})
    sens = profile(identity_task, space, batches=2)
    points = seed_points(space, sens, {la.name: la.shape for la in layers}, 12)
    plans = [space.plan_from_params(p) for p in points]
    channel = [p for p in plans if any(lp.structure == "channel" for lp in p.layers.values())
               and len({(lp.sparsity, lp.bits) for lp in p.layers.values()
                        if lp.structure == "channel"}) == 1]
    cut = [next(lp.sparsity for lp in p.layers.values() if lp.structure == "channel")
           for p in channel]
    assert cut[:3] == [0.75, 0.5, 0.25], cut
    offered = {ls.name for ls in space.layers if "channel" in ls.knobs["structure"].knob.choices}
    assert offered and offered != {ls.name for ls in space.layers}  # the output layer cannot
    for p in channel[:3]:
        for name, lp in p.layers.items():
            assert lp.bits == 3  # the nearest to 4 (the smaller on ties)
            assert (lp.structure == "channel") == (name in offered)
            assert lp.sparsity == (0.0 if name not in offered else lp.sparsity)
    # Fewer seeds, fewer channel recipes: the 75% one first.
    few = [space.plan_from_params(p) for p in
           seed_points(space, sens, {la.name: la.shape for la in layers}, 4)]
    assert sum(any(lp.structure == "channel" for lp in p.layers.values()) for p in few) >= 1


def test_no_channel_recipes_where_no_layer_offers_channels(identity_task) -> None:
    space, layers = _space(identity_task, {"sparsity": [0.0, 0.5, 0.75], "bits": [4, None]})
    sens = profile(identity_task, space, batches=2)
    for p in seed_points(space, sens, {la.name: la.shape for la in layers}, 12):
        assert all(lp.structure == "unstructured" for lp in space.plan_from_params(p).layers.values())


def test_the_lr_calibration_plans_are_4_bits_and_more_and_more_pruned(identity_task) -> None:
    from autocompress.tune._seeds import calibration_points

    def plans(knobs: dict) -> list[set]:
        space, _ = _space(identity_task, knobs)
        return [{(lp.bits, lp.sparsity, lp.structure, lp.rank) for lp in
                 space.plan_from_params(p).layers.values()} for p in calibration_points(space)]

    assert plans({"sparsity": {"low": 0.0, "high": 0.95, "step": 0.05}, "bits": [3, 4, 8, None],
                  "structure": ["unstructured", "channel"]}) == [
        {(4, 0.5, "unstructured", None)}, {(4, 0.75, "unstructured", None)},
        {(4, 0.9, "unstructured", None)}]
    # The nearest values a domain has (the smaller on ties), each plan once.
    assert plans({"sparsity": {"low": 0.0, "high": 0.3, "step": 0.1}, "bits": [3, 5, 8, None],
                  "rank": [None, 0.5]}) == [{(3, 0.3, "unstructured", None)}]
    assert plans({"sparsity": [0.0, 0.5]}) == [{(None, 0.5, "unstructured", None)}]


def test_prune_reason() -> None:
    assert prune_reason(0.99, 0.5, 0.02, 0, 2) is None  # never before training
    assert prune_reason(0.99, 0.5, 0.02, 2, 2) is None  # nor at the end
    assert prune_reason(0.99, 0.5, None, 1, 2) is None  # nor without a constraint
    assert prune_reason(0.99, 0.95, 0.02, 1, 2) is None  # 4 pt < 2.5 x 2 pt
    reason = prune_reason(0.99, 0.93, 0.02, 1, 2)
    assert reason and "after 1 of 2 epochs" in reason


def test_recoveries_seen_tighten_the_rule() -> None:
    # finished trials gained at most 1 pt in their last epoch: a trial 4 pt down after the
    # first needs 2 pt (more than 1.5 x 1 pt): stopped; one 3 pt down may still make it
    reason = prune_reason(0.99, 0.95, 0.02, 1, 2, recovery=0.01)
    assert reason and "gained at most 0.010" in reason and "0.035" in reason
    assert prune_reason(0.99, 0.96, 0.02, 1, 2, recovery=0.01) is None
    # a large recovery never loosens the static rule, a tiny one leaves max_drop / 4 of slack
    assert prune_reason(0.99, 0.93, 0.02, 1, 2, recovery=0.2) is not None
    assert prune_reason(0.99, 0.9655, 0.02, 1, 2, recovery=0.0) is None
    assert prune_reason(0.99, 0.9645, 0.02, 1, 2, recovery=0.0) is not None


def test_recovery_book() -> None:
    book = RecoveryBook()
    floor = 0.95  # baseline 0.99, max drop 0.04

    def record(metrics: list[float], final: float) -> None:  # checks after epochs 0, 1, 1.5, 2
        book.record(dict(zip((0, 1, 1.5, 2), metrics)), final, floor)

    record([0.5, 0.80, 0.88, 0.90], 0.93)  # gained 13 pt after epoch 1, 5 halfway, 3 after 2
    record([0.5, 0.85, 0.94, 0.955], 0.96)
    assert MIN_RECOVERIES == 3 and book.largest(1) is None  # 2 finished trials: too few
    # Mild trials (above the floor after epoch 1) teach nothing about recovering from there.
    for _ in range(3):
        record([0.96, 0.97, 0.97, 0.97], 0.975)
    assert book.largest(1) is None
    record([0.6, 0.90, 0.91, 0.92], 0.95)
    assert book.largest(1) == pytest.approx(0.13)
    assert book.largest(1.5) == pytest.approx(0.05)
    assert book.largest(2) is None  # only two trials were below the floor after epoch 2
    record([0.5, 0.70, 0.85, 0.90], 0.96)
    assert book.largest(2) == pytest.approx(0.06)
    assert book.largest(0) == pytest.approx(0.46)  # from the post-training metric: 0.5 -> 0.96
    assert book.largest(3) is None  # nothing after the last epoch


def test_the_rule_halfway_through_an_epoch() -> None:
    # halfway through the second of two epochs: 1.75 x the allowed drop (2 pt)
    assert prune_reason(0.99, 0.956, 0.02, 1.5, 2) is None
    reason = prune_reason(0.99, 0.954, 0.02, 1.5, 2)
    assert reason and "after 1.5 of 2 epochs" in reason


def test_a_resumed_search_runs_no_first_trial_twice(tmp_path: Path) -> None:
    import optuna

    from autocompress.tune._driver import _not_run_yet

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    study.enqueue_trial({"a/bits": 4})
    trial = study.ask({"a/bits": optuna.distributions.CategoricalDistribution([4, 8])})
    study.tell(trial, 1.0)
    assert _not_run_yet([{"a/bits": 4}, {"a/bits": 8}], storage, "s") == [{"a/bits": 8}]


def test_sensitivity_drop_is_none_for_an_unprobed_value() -> None:
    sens = Sensitivity(0.9, (), 1)
    assert sens.drop("x", "bits", 4) is None


@pytest.mark.slow
def test_hopeless_trials_are_pruned_not_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                serial: dict) -> None:
    """Every plan destroys the tiny task (2-bit, 90% sparse): each is stopped after its first
    of two epochs, PRUNED in MLflow and in Optuna, and the search gives up after its cap."""
    import optuna
    from mlflow import MlflowClient

    import autocompress as ac

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    notes: list[str] = []
    result = ac.search("tests.models:tiny_task", space={"layers": [
        {"knobs": {"bits": [2], "sparsity": [0.9]}}]}, objectives=["accuracy", "size_bytes"],
        trials=1, concurrency=1, warm_start=False, finetune={"epochs": 2},
        constraints={"max_accuracy_drop": 0.001}, tracking_uri=uri, echo=notes.append,
        target={"threads": 1, "warmup": 1, "min_runs": 3, "max_runs": 5, "budget_s": 0.01}, **serial)
    assert len(result.front) == 0 or all(result.front["trial"].isna())
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(result.experiment.name).experiment_id],
                              "tags.`autocompress.role` = 'trial'")
    assert len(runs) == 12  # the cap: 4 * 1 + 8
    assert all(r.data.tags.get("autocompress.pruned", "").startswith("accuracy") for r in runs)
    study = optuna.load_study(study_name=result.study_name, storage=result.study_storage)
    assert {t.state for t in study.trials} == {optuna.trial.TrialState.PRUNED}
    assert any("stopped after 12 trials, 12 of them pruned" in n for n in notes)


def test_the_sensitivity_command_prints_the_profile(capsys, monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    from autocompress.cli import main

    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path))
    assert main(["sensitivity", "--task", "tests.models:tiny_task", "--batches", "1", "--csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "layer,setting,knobs,metric,drop,distortion,local"
    assert any(line.startswith("net.6,bits=3,") for line in lines)


@pytest.mark.slow
def test_lr_auto_is_chosen_once_logged_and_used_by_every_trial(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              serial: dict) -> None:
    from mlflow import MlflowClient

    import autocompress as ac
    from autocompress.finetune import LR_CANDIDATES

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    notes: list[str] = []
    result = ac.search("tests.models:tiny_task", space={"layers": [
        {"knobs": {"bits": [4, 8], "sparsity": [0.0, 0.5]}}]}, objectives=["accuracy", "size_bytes"],
        trials=2, concurrency=1, warm_start=False, finetune={"epochs": 1, "lr": "auto"},
        tracking_uri=uri, echo=notes.append,
        target={"threads": 1, "warmup": 1, "min_runs": 3, "max_runs": 5, "budget_s": 0.01}, **serial)
    chosen = result.experiment.finetune.lr
    assert chosen in LR_CANDIDATES
    assert any(n.startswith(f"finetune.lr: auto: lr {chosen:g} (") for n in notes), notes
    client = MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["autocompress.finetune.lr"] == f"{chosen:g}"
    csv = Path(client.download_artifacts(result.parent_run_id, "lr_choice.csv", str(tmp_path)))
    lines = csv.read_text().splitlines()
    assert lines[0] == "lr,metric" and [float(x.split(",")[0]) for x in lines[1:]] == list(LR_CANDIDATES)
    assert len(result.trials) == 2  # the trials ran with result.experiment, lr included
