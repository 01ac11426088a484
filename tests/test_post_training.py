"""The post-training metric: every trial is measured right after compression, before
fine-tuning, and never ends below it; ``finetune: {epochs: 0}``; the fine-tuning defaults; the
first (epoch 0) report; trials stopped before training once finished trials show how much
fine-tuning recovers."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from autocompress.compress import LayerPlan, Plan, apply
from autocompress.finetune import DEFAULT_LR, FinetuneConfig, finetune
from autocompress.measure import Target
from autocompress.tasks import Task
from autocompress.tune import EpochReport, TrialFinished, TrialPruned
from autocompress.tune._trial import (
    RecoveryBook,
    TrialContext,
    prune_reason,
    run_trial,
    search_trial,
)
from tests.searches import FAST_TARGET, logged_search, write_experiment

TARGET = Target(**FAST_TARGET)
MILD = Plan({"net.0": LayerPlan(bits=8), "net.2": LayerPlan(bits=8)})
HARSH = Plan({"net.0": LayerPlan(bits=2, sparsity=0.9), "net.2": LayerPlan(bits=2, sparsity=0.9)})


def counting(task: Task) -> tuple[Task, list[float]]:
    """``task`` with a metric that records every evaluation."""
    seen: list[float] = []

    def metric(model: torch.nn.Module, loader) -> float:
        from autocompress.measure import top1_accuracy

        seen.append(top1_accuracy(model, loader))
        return seen[-1]

    return replace(task, metric=metric), seen


# --- the guarantee ------------------------------------------------------------------------------

@pytest.mark.parametrize("keep_best", [True, False])
def test_a_bad_learning_rate_cannot_lower_a_trial_below_its_post_training_metric(
        tiny: Task, keep_best: bool) -> None:
    config = FinetuneConfig(epochs=2, lr=10.0, keep_best=keep_best, device="cpu")
    result = run_trial(tiny, MILD, config, TARGET)
    compressed = apply(tiny.model, MILD, tiny.example_inputs)
    assert result.post_training == tiny.evaluate(compressed)  # measured before fine-tuning
    assert result.history and max(result.history) < result.post_training  # it did hurt
    assert result.metrics.accuracy == result.post_training  # and nothing of it is left
    assert result.restored is not keep_best  # keep_best already ended on the starting weights
    assert result.trial_metrics()["finetune_gain"] == 0.0


def test_a_diverging_fine_tune_leaves_the_post_training_model(tiny: Task) -> None:
    task = replace(tiny, loss_fn=lambda out, y: out.sum() * math.inf)
    result = run_trial(task, MILD, FinetuneConfig(epochs=2, distill=False, device="cpu"), TARGET)
    assert result.restored and result.history == []
    assert result.metrics.accuracy == result.post_training > 0.5


def test_fine_tuning_that_helps_is_kept(tiny: Task) -> None:
    config = FinetuneConfig(epochs=2, lr=3e-3, device="cpu")
    result = run_trial(tiny, HARSH, config, TARGET)
    assert not result.restored
    assert result.metrics.accuracy > result.post_training
    gain = result.trial_metrics()["finetune_gain"]
    assert gain == pytest.approx(result.metrics.accuracy - result.post_training) and gain > 0


# --- the first report ---------------------------------------------------------------------------

def test_the_post_training_metric_is_the_first_report_and_evaluated_once(tiny: Task) -> None:
    task, seen = counting(tiny)
    events: list[tuple[float, float]] = []
    checks: list[tuple[float, float]] = []
    result = run_trial(task, HARSH, FinetuneConfig(epochs=2, lr=3e-3, device="cpu"), TARGET,
                       on_epoch=lambda e, m: events.append((e + 1, m)),
                       on_post_training=lambda m: events.append((0, m)),
                       stop=lambda done, m: checks.append((done, m)))
    assert events == [(0, result.post_training), *enumerate(result.history, 1)]
    assert checks[0] == (0, result.post_training)  # stop sees it before any training
    # Once after compression, once per epoch (and halfway through the second, for stop), once
    # by measure(): keep_best and stop reuse the post-training evaluation.
    assert len(seen) == 1 + 2 + 1 + 1
    assert seen[0] == result.post_training


# --- epochs 0 -------------------------------------------------------------------------------

def test_epochs_0_builds_no_optimizer_chooses_no_lr_and_evaluates_once(
        tiny: Task, monkeypatch: pytest.MonkeyPatch) -> None:
    from autocompress.finetune import _loop

    def refuse(*args, **kwargs):
        raise AssertionError("nothing may be set up for training with epochs 0")

    monkeypatch.setattr(_loop, "make_optimizer", refuse)
    monkeypatch.setattr(_loop, "choose_lr", refuse)
    task, seen = counting(tiny)
    result = run_trial(task, MILD, FinetuneConfig(epochs=0, lr="auto"), TARGET,
                       on_post_training=refuse, stop=refuse)
    assert len(seen) == 1
    assert result.history == [] and result.finetune_seconds == 0.0 and not result.restored
    assert result.post_training == result.metrics.accuracy == seen[0]
    assert finetune(copy.deepcopy(tiny.model), tiny, FinetuneConfig(epochs=0)) == []


def test_a_search_trial_with_epochs_0_reports_nothing_before_its_result(
        tiny: Task, tmp_path: Path) -> None:
    event, reports = _search_trial(tiny, tmp_path, MILD, epochs=0)
    assert isinstance(event, TrialFinished) and reports == []
    assert event.metrics["accuracy_post_training"] == event.metrics["accuracy"]
    assert event.metrics["epochs"] == 0


# --- defaults -------------------------------------------------------------------------------

def test_defaults_suit_a_pretrained_model() -> None:
    config = FinetuneConfig()
    assert (config.optimizer, config.warmup, config.grad_clip, config.keep_best, config.lr) == (
        "adamw", 0.1, 1.0, True, None)
    assert FinetuneConfig(**config.to_dict()) == config


def test_the_learning_rate_is_the_experiments_else_the_tasks_else_the_default(
        tiny: Task, monkeypatch: pytest.MonkeyPatch) -> None:
    from autocompress.finetune import _loop

    used: list[float] = []
    real = _loop.make_optimizer
    monkeypatch.setattr(_loop, "make_optimizer",
                        lambda config, params: used.append(config.lr) or real(config, params))
    hinted = replace(tiny, finetune_lr=3e-5)
    for task, config in [(tiny, FinetuneConfig(epochs=1)), (hinted, FinetuneConfig(epochs=1)),
                         (hinted, FinetuneConfig(epochs=1, lr=0.01))]:
        finetune(copy.deepcopy(tiny.model), task, config)
    assert used == [DEFAULT_LR, 3e-5, 0.01]


@pytest.mark.parametrize("value", [0, -1e-3, math.inf, "1e-3", True])
def test_a_bad_task_learning_rate_is_refused(tiny: Task, value: object) -> None:
    with pytest.raises(ValueError, match=r"^Task\.finetune_lr="):
        replace(tiny, finetune_lr=value)


def test_the_minilm_task_suggests_a_small_learning_rate() -> None:
    from autocompress.tasks.minilm import FINETUNE_LR

    assert 1e-6 <= FINETUNE_LR <= 1e-4


# --- stopping before training -------------------------------------------------------------------

def test_before_training_only_the_recovery_seen_stops_a_trial() -> None:
    assert prune_reason(0.9, 0.3, 0.05, 0, 2) is None  # nothing known yet: it may recover
    reason = prune_reason(0.9, 0.3, 0.05, 0, 2, recovery=0.1)
    assert reason is not None and reason.startswith("accuracy 0.3000 right after compression")
    assert "gained at most 0.100" in reason
    assert prune_reason(0.9, 0.3, 0.05, 0, 2, recovery=0.5) is None  # 0.6 < 0.05 + 1.5 * 0.5
    assert prune_reason(0.9, 0.3, None, 0, 2, recovery=0.1) is None  # no constraint
    assert prune_reason(0.9, 0.3, 0.05, 0, 0, recovery=0.1) is None  # nothing to train anyway
    assert prune_reason(0.9, 0.8, 0.05, 0, 2, recovery=0.1) is None  # within reach


def test_the_recovery_book_learns_from_post_training_metrics() -> None:
    book = RecoveryBook()
    for post, final in [(0.5, 0.88), (0.6, 0.9), (0.7, 0.89)]:
        assert book.largest(0) is None
        book.record({0: post, 1: final - 0.01}, final, floor=0.85)
    assert book.largest(0) == pytest.approx(0.38)
    book.record({0: 0.95}, 0.96, floor=0.85)  # never below the floor: nothing to learn
    assert len(book.gains[0]) == 3


class Book:
    """A recovery book that has seen fine-tuning recover at most ``gain`` from any point."""

    def __init__(self, gain: float | None) -> None:
        self.gain, self.recorded = gain, []

    def largest(self, done: float) -> float | None:
        return self.gain

    def record(self, checks, final, floor) -> None:
        self.recorded.append((dict(checks), final))


def _search_trial(task: Task, tmp_path: Path, plan: Plan, epochs: int = 2,
                  book: Book | None = None, max_drop: float = 0.05
                  ) -> tuple[object, list[EpochReport]]:
    from autocompress.config import load_experiment

    exp = load_experiment(write_experiment(tmp_path, "t", epochs=epochs,
                                           constraints={"max_accuracy_drop": max_drop}))
    exp = replace(exp, finetune=replace(exp.finetune, lr=3e-3, device="cpu"))
    reports: list[EpochReport] = []
    ctx = TrialContext(reports.append, None, book or Book(None))
    space = SimpleNamespace(plan_from_params=lambda params: plan)
    event = search_trial({}, ctx, task=task, space=space, exp=exp,  # type: ignore[arg-type]
                         baseline={"accuracy": task.evaluate(task.model)})
    return event, reports


def test_a_trial_beyond_any_recovery_seen_is_stopped_before_training(tiny: Task,
                                                                     tmp_path: Path) -> None:
    event, reports = _search_trial(tiny, tmp_path, HARSH, book=Book(0.01))
    assert isinstance(event, TrialPruned) and event.epochs == 0
    assert "right after compression" in event.reason
    assert reports == [EpochReport(0, event.accuracy)]  # the post-training metric, nothing more


def test_a_finished_trial_reports_and_records_its_post_training_metric(tiny: Task,
                                                                       tmp_path: Path) -> None:
    book = Book(None)
    event, reports = _search_trial(tiny, tmp_path, HARSH, book=book, max_drop=0.5)
    assert isinstance(event, TrialFinished)
    post = event.metrics["accuracy_post_training"]
    assert reports[0] == EpochReport(0, post) and [r.epoch for r in reports] == [0, 1, 2]
    assert event.metrics["accuracy"] >= post
    assert event.metrics["finetune_gain"] == pytest.approx(event.metrics["accuracy"] - post)
    (checks, final), = book.recorded
    assert checks[0] == post and final == event.metrics["accuracy"]


# --- a search -------------------------------------------------------------------------------

def test_no_trial_of_a_search_ends_below_its_post_training_metric(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serial: dict) -> None:
    """A step size that hurts mild plans and helps harsh ones (one setting shared by all
    layers), keep_best off: the search's trials end at or above their post-training metric,
    as MLflow holds them, and the first value of each trial's accuracy history (step 0) is
    that metric."""
    import autocompress as ac

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ac.search("tests.models:tiny_task", name="post", space={"layers": [
        {"share": True, "knobs": {"bits": [2, 8], "sparsity": [0.0, 0.8]}}]},
        objectives=["accuracy", "size_bytes"], trials=4, warm_start=False,
        finetune={"epochs": 1, "lr": 0.05, "keep_best": False}, tracking_uri=uri,
        echo=lambda _: None, target=FAST_TARGET, **serial)
    client, _, runs = logged_search(uri, "post")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    gains = sorted(r.data.metrics["finetune_gain"] for r in runs)
    assert gains[0] == 0.0 < gains[-1]  # the 8-bit trials were restored, the pruned ones gained
    for run in runs:
        m = run.data.metrics
        assert m["accuracy"] >= m["accuracy_post_training"], m
        assert m["finetune_gain"] == pytest.approx(m["accuracy"] - m["accuracy_post_training"])
        history = client.get_metric_history(run.info.run_id, "accuracy")
        first = min(history, key=lambda h: (h.step, h.timestamp))
        assert first.step == 0 and first.value == m["accuracy_post_training"]


def test_a_post_training_search_trains_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               serial: dict) -> None:
    """``finetune: {epochs: 0}`` end to end: no learning rate chosen (even ``auto``), no
    optimizer, every trial finished at its post-training metric."""
    import autocompress as ac
    from autocompress.finetune import _loop

    def refuse(*args, **kwargs):
        raise AssertionError("a post-training search trains nothing")

    monkeypatch.setattr(_loop, "make_optimizer", refuse)
    monkeypatch.setattr("autocompress.finetune.choose_lr", refuse)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ac.search("tests.models:tiny_task", name="post0", space={"layers": [
        {"share": True, "knobs": {"bits": [2, 8], "sparsity": [0.0, 0.8]}}]},
        objectives=["accuracy", "size_bytes"], trials=3, warm_start=False,
        finetune={"epochs": 0, "lr": "auto"}, tracking_uri=uri, echo=lambda _: None,
        target=FAST_TARGET, **serial)
    client, _, runs = logged_search(uri, "post0")
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        m = run.data.metrics
        assert m["accuracy"] == m["accuracy_post_training"] and m["finetune_gain"] == 0.0
        assert m["finetune_seconds"] == 0.0
        assert len(client.get_metric_history(run.info.run_id, "accuracy")) == 1
