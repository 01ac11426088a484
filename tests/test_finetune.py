"""Fine-tuning: it learns, distillation uses the teacher, divergence is caught."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from autocompress.compress import apply
from autocompress.compress._plan import LayerPlan, Plan
from autocompress.finetune import DivergedError, FinetuneConfig, finetune
from autocompress.tasks import Task
from tests.models import MLP, tiny_task


def untrained(task: Task) -> Task:
    """The same data with a freshly initialized model."""
    torch.manual_seed(1)
    return Task(model=MLP(), train_loader=task.train_loader, val_loader=task.val_loader,
                example_inputs=task.example_inputs)


def test_finetuning_improves_the_metric(tiny: Task) -> None:
    task = untrained(tiny)
    model = copy.deepcopy(task.model)
    before = task.evaluate(model)
    seen: list[tuple[int, float]] = []
    history = finetune(model, task, FinetuneConfig(epochs=3, lr=2e-2, distill=False),
                       on_epoch=lambda e, m: seen.append((e, m)))
    assert len(history) == 3
    assert seen == list(enumerate(history))
    assert history[-1] == task.evaluate(model)
    assert history[-1] > before + 0.3, (before, history)
    assert not model.training


def test_finetuning_recovers_a_compressed_model(tiny: Task) -> None:
    plan = Plan({"net.0": LayerPlan(sparsity=0.8), "net.2": LayerPlan(bits=2)})
    model = apply(tiny.model, plan, tiny.example_inputs)
    before = tiny.evaluate(model)
    history = finetune(model, tiny, FinetuneConfig(epochs=3, lr=3e-3, distill=True),
                       teacher=tiny.model)
    assert history[-1] > before
    zeros = (model.net[0].weight == 0).sum().item()
    assert zeros >= round(0.8 * model.net[0].weight.numel())


@pytest.mark.parametrize("epochs", [0, 1, 2])
def test_history_has_one_entry_per_epoch(tiny: Task, epochs: int) -> None:
    model = copy.deepcopy(tiny.model)
    history = finetune(model, tiny, FinetuneConfig(epochs=epochs, distill=False))
    assert len(history) == epochs
    assert all(0.0 <= m <= 1.0 for m in history)


class Constant(nn.Module):
    """A teacher that always predicts class 0, confidently."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.full((x.shape[0], 4), -5.0)
        logits[:, 0] = 5.0
        return logits


def test_pure_distillation_follows_the_teacher(tiny: Task) -> None:
    """With alpha = 1 the labels are ignored: the student learns whatever the teacher says."""
    config = FinetuneConfig(epochs=3, lr=2e-2, distill=True, alpha=1.0)
    task = untrained(tiny)
    student = copy.deepcopy(task.model)
    history = finetune(student, task, config, teacher=tiny.model)
    assert all(math.isfinite(m) for m in history)
    assert history[-1] > task.evaluate(task.model) + 0.3  # a good teacher teaches the task

    biased = copy.deepcopy(task.model)
    finetune(biased, task, config, teacher=Constant())
    x = torch.cat([x for x, _ in task.val_loader])
    assert (biased(x).argmax(dim=1) == 0).float().mean() > 0.95


def test_same_seed_same_run_and_distill_false_ignores_the_teacher(tiny: Task) -> None:
    """The data order is seeded even though the loader has its own generator."""
    task = untrained(tiny)
    config = FinetuneConfig(epochs=1, lr=5e-3, distill=False)
    a, b, c = (copy.deepcopy(task.model) for _ in range(3))
    ha = finetune(a, task, config, teacher=Constant(), seed=3)
    hb = finetune(b, task, config, teacher=tiny.model, seed=3)
    assert ha == hb
    assert_same_weights(a, b)
    finetune(c, task, config, seed=4)
    assert not torch.equal(a.net[0].weight, c.net[0].weight)


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("where", ["weights", "loss"])
def test_nan_raises_diverged(tiny: Task, where: str) -> None:
    model = copy.deepcopy(tiny.model)
    task = tiny
    if where == "weights":
        with torch.no_grad():
            model.net[2].weight[0, 0] = math.nan
    else:
        task = Task(model=model, train_loader=tiny.train_loader,
                    val_loader=tiny.val_loader, example_inputs=tiny.example_inputs,
                    loss_fn=lambda out, y: out.sum() * math.inf)
    with pytest.raises(DivergedError, match="in epoch 0"):
        finetune(model, task, FinetuneConfig(epochs=2, distill=where == "loss"),
                 teacher=tiny.model)


@pytest.mark.parametrize(("field", "value"), [
    ("epochs", -1), ("epochs", 1.5), ("epochs", True), ("lr", 0), ("lr", -1e-3),
    ("distill", "yes"), ("temperature", 0), ("alpha", 1.5), ("alpha", -0.1),
    ("weight_decay", -1.0),
])
def test_config_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^finetune\.{field}=.*; allowed: "):
        FinetuneConfig(**{field: value})


def test_tiny_task_is_learnable(tiny: Task) -> None:
    """The premise of these tests: the trained baseline is far better than chance (0.25)."""
    assert tiny.evaluate(tiny.model) > 0.85
    assert tiny.evaluate(untrained(tiny).model) < 0.5
    assert tiny_task(train=False).evaluate(tiny_task(train=False).model) < 0.5
