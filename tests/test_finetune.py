"""Fine-tuning: it learns, distillation uses the teacher, divergence is caught; optimizers,
schedules, distillation losses, inputs of any form, devices (``gpu`` tests need CUDA)."""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from autocompress.compress import apply
from autocompress.compress._plan import LayerPlan, Plan
from autocompress.finetune import (
    DivergedError,
    FinetuneConfig,
    distill_loss_name,
    finetune,
    output_tensor,
    resolve_device,
)
from autocompress.tasks import Task
from tests.models import MLP, synthetic_classification, tiny_task

ROOT = Path(__file__).resolve().parents[1]


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


def _masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".mask")}


class Snoop:
    """Records the masks of a model after every training step and every evaluation."""

    def __init__(self, task: Task, model: nn.Module) -> None:
        self.task, self.model, self.seen = task, model, []

    def gate(self) -> contextlib.AbstractContextManager:
        @contextlib.contextmanager
        def record():
            yield
            self.seen.append(_masks(self.model))
        return record()


@pytest.mark.parametrize("regrow", [0.0, 0.5, 1.0])
def test_pruned_weights_regrow_in_the_first_part_of_training_only(tiny: Task,
                                                                  regrow: float) -> None:
    plan = Plan({"net.0": LayerPlan(sparsity=0.8, bits=4), "net.2": LayerPlan(sparsity=0.5)})
    model = apply(tiny.model, plan, tiny.example_inputs)
    start = _masks(model)
    snoop = Snoop(tiny, model)
    finetune(model, tiny, FinetuneConfig(epochs=2, lr=3e-2, regrow=regrow, keep_best=False),
             teacher=tiny.model, step_gate=snoop.gate)
    steps = len(tiny.train_loader)
    # Gates: the steps of epoch 1, its evaluation, the steps of epoch 2, its evaluation.
    per_step = [m for i, m in enumerate(snoop.seen) if i not in (steps, 2 * steps + 1)]
    assert len(per_step) == 2 * steps
    window = round(regrow * 2 * steps)
    for masks in snoop.seen:  # the count of pruned weights never changes
        for k, m in masks.items():
            assert int(m.sum()) == int(start[k].sum()), k
    changed = [i for i in range(1, len(per_step))
               if any(not torch.equal(per_step[i][k], per_step[i - 1][k]) for k in start)]
    assert all(i < window for i in changed), (changed, window)
    if regrow:
        assert changed, "a large learning rate moves some pruned weight back in"
    else:
        assert all(torch.equal(m[k], start[k]) for m in snoop.seen for k in start)
    # The stored weight is zero exactly where the mask is, and the masks are the kept
    # weights' largest magnitudes as of the last change.
    for name in ("net.0", "net.2"):
        layer = model.get_submodule(name)
        mask = layer.parametrizations.weight[0].mask
        assert torch.equal(layer.weight != 0, mask) or (layer.weight[mask] == 0).sum() < 3
        assert (layer.weight[~mask] == 0).all()


def test_masks_are_rechosen_at_most_max_refreshes_times(tiny: Task, monkeypatch) -> None:
    import autocompress.finetune._loop as ft

    monkeypatch.setattr(ft, "MAX_REFRESHES", 2)
    model = apply(tiny.model, Plan({"net.0": LayerPlan(sparsity=0.8)}), tiny.example_inputs)
    snoop = Snoop(tiny, model)
    finetune(model, tiny, FinetuneConfig(epochs=2, lr=3e-2, regrow=1.0), teacher=tiny.model,
             step_gate=snoop.gate)
    changes = sum(not torch.equal(a["net.0.parametrizations.weight.0.mask"],
                                  b["net.0.parametrizations.weight.0.mask"])
                  for a, b in zip(snoop.seen, snoop.seen[1:]))
    assert 1 <= changes <= 2


def test_lr_auto_fine_tunes_a_copy_per_candidate_and_keeps_the_best(tiny: Task) -> None:
    from autocompress.finetune import LR_CANDIDATES, choose_lr

    plan = Plan({"net.0": LayerPlan(sparsity=0.8, bits=3), "net.2": LayerPlan(bits=2)})
    model = apply(tiny.model, plan, tiny.example_inputs)
    state = copy.deepcopy(model.state_dict())
    config = FinetuneConfig(epochs=1, lr="auto")
    choice = choose_lr(model, tiny, config, teacher=tiny.model, seed=3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # untouched
    assert list(choice.scores) == list(LR_CANDIDATES)
    for lr, metric in choice.scores.items():  # each is a plain fine-tuning at that rate
        alone = copy.deepcopy(model)
        assert metric == finetune(alone, tiny, replace(config, lr=lr), teacher=tiny.model,
                                  seed=3)[-1]
    best = max(choice.scores.values())
    assert choice.scores[choice.lr] == best
    assert choice.lr == min(lr for lr, m in choice.scores.items() if m == best)  # ties: smaller
    assert f"lr {choice.lr:g} (" in choice.summary()
    # finetune itself resolves "auto" the same way, then trains at the chosen rate.
    auto = copy.deepcopy(model)
    fixed = copy.deepcopy(model)
    assert finetune(auto, tiny, config, teacher=tiny.model, seed=3) == finetune(
        fixed, tiny, replace(config, lr=choice.lr), teacher=tiny.model, seed=3)


def test_lr_auto_without_epochs_chooses_nothing(tiny: Task, monkeypatch) -> None:
    import autocompress.finetune._loop as ft

    monkeypatch.setattr(ft, "choose_lr", lambda *a, **k: pytest.fail("nothing to choose"))
    assert finetune(copy.deepcopy(tiny.model), tiny, FinetuneConfig(epochs=0, lr="auto")) == []


def test_lr_auto_skips_diverging_rates_and_fails_clearly_when_all_diverge(tiny: Task) -> None:
    from autocompress.finetune import choose_lr

    model = copy.deepcopy(tiny.model)
    choice = choose_lr(model, tiny, FinetuneConfig(epochs=1), candidates=(1e-3, 1e30))
    assert choice.scores[1e30] is None and choice.lr == 1e-3
    assert "1e+30: diverged" in choice.summary()
    with pytest.raises(ValueError, match=r"diverged at every candidate \[1e\+30\]; give "
                                         r"finetune.lr a number"):
        choose_lr(model, tiny, FinetuneConfig(epochs=1), candidates=(1e30,))


def test_regrowth_passes_the_gradient_through_the_mask_and_keeps_the_count() -> None:
    from autocompress.compress._modules import Regrowth, weight_compression

    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(12.0).view(3, 4) - 5.4)  # magnitudes all different
    wc = weight_compression(layer)
    wc.mask.copy_(layer.weight.abs() > 3)  # keeps 6 of 12: -5.4, -4.4, -3.4, 3.6, 4.6, 5.6
    original = layer.parametrizations.weight.original
    layer(torch.ones(1, 4)).sum().backward()
    assert (original.grad[~wc.mask] == 0).all()  # fixed masks: the pruned get no gradient
    original.grad = None
    with Regrowth(layer) as regrowth:
        assert wc.regrow
        layer(torch.ones(1, 4)).sum().backward()
        assert (original.grad != 0).all()  # dynamic: every weight gets the gradient
        with torch.no_grad():
            original[1, 1] = 100.0  # was pruned (-0.4)
        regrowth.refresh()
        assert wc.mask[1, 1] and int(wc.mask.sum()) == 6
        assert not wc.mask[0, 2]  # the smallest kept weight (-3.4) went
    assert not wc.regrow
    assert torch.equal(layer.weight == 0, ~wc.mask)


@pytest.mark.parametrize("epochs", [0, 1, 2])
def test_history_has_one_entry_per_epoch(tiny: Task, epochs: int) -> None:
    model = copy.deepcopy(tiny.model)
    history = finetune(model, tiny, FinetuneConfig(epochs=epochs, distill=False))
    assert len(history) == epochs
    assert all(0.0 <= m <= 1.0 for m in history)


def test_stop_is_asked_after_each_epoch_and_halfway_through_the_later_ones(tiny: Task) -> None:
    """``stop`` sees (0, before), (1, after epoch 1), (1.5, halfway through epoch 2), (2, ...),
    (2.5, ...), never the end; the halfway metric is the model's there, and asking it does
    not change the training (dropout draws included); a reason raised halfway stops there."""
    from autocompress.finetune import TrainingStopped

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 4))
    task = Task(model=model, train_loader=tiny.train_loader, val_loader=tiny.val_loader,
                example_inputs=tiny.example_inputs)
    config = FinetuneConfig(epochs=3, lr=1e-2, distill=False)
    seen: list[tuple[float, float]] = []
    watched, plain = copy.deepcopy(model), copy.deepcopy(model)
    history = finetune(watched, task, config, stop=lambda d, m: seen.append((d, m)))
    assert [d for d, _ in seen] == [0, 1, 1.5, 2, 2.5]
    assert [m for d, m in seen if d in (1, 2)] == history[:2]
    assert seen[2][1] not in history  # evaluated there, not a copy of an epoch's metric
    assert finetune(plain, task, config) == history
    assert_same_weights(watched, plain)

    stopped = copy.deepcopy(model)
    with pytest.raises(TrainingStopped) as info:
        finetune(stopped, task, config, stop=lambda d, m: "far below" if d == 1.5 else None)
    assert info.value.epochs == 1.5 and info.value.reason == "far below"
    # One epoch of fine-tuning: nothing halfway (the first epoch is never judged inside).
    seen.clear()
    finetune(copy.deepcopy(model), task, replace(config, epochs=1), stop=lambda d, m: seen.append((d, m)))
    assert [d for d, _ in seen] == [0]


class Constant(nn.Module):
    """A teacher that always predicts class 0, confidently."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.full((x.shape[0], 4), -5.0)
        logits[:, 0] = 5.0
        return logits


def test_pure_distillation_follows_the_teacher(tiny: Task) -> None:
    """With alpha = 1 the labels are ignored: the student learns whatever the teacher says."""
    # keep_best off: following a teacher that is always wrong must not be undone.
    config = FinetuneConfig(epochs=3, lr=2e-2, distill=True, alpha=1.0, keep_best=False)
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


# --- optimizers, schedules, gradient clipping -------------------------------------------------

@pytest.mark.parametrize(("field", "value"), [
    ("optimizer", "lamb"), ("optimizer", None), ("schedule", "linear"), ("warmup", -0.1),
    ("warmup", 1.0), ("warmup", True), ("grad_clip", 0), ("grad_clip", -1.0), ("grad_clip", "1"),
    ("device", "tpu"), ("device", "cuda:0"), ("amp", "yes"), ("amp", 1), ("distill_loss", "l1"),
    ("lr", math.inf), ("temperature", math.nan), ("regrow", -0.1), ("regrow", 1.5),
    ("regrow", "half"), ("regrow", True),
])
def test_new_config_fields_are_validated(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^finetune\.{field}=.*; allowed: "):
        FinetuneConfig(**{field: value})


def test_config_defaults_and_round_trip() -> None:
    config = FinetuneConfig()
    assert (config.optimizer, config.schedule, config.warmup, config.grad_clip, config.device,
            config.amp, config.distill_loss, config.keep_best, config.lr) == (
        "adamw", "cosine", 0.1, 1.0, "auto", False, "auto", True, None)
    custom = FinetuneConfig(optimizer="sgd", schedule="constant", warmup=0.1, grad_clip=1.0,
                            device="cpu", amp=True, distill_loss="cosine")
    assert FinetuneConfig(**custom.to_dict()) == custom


def test_an_experiment_names_the_bad_finetune_key() -> None:
    from autocompress._errors import ConfigError
    from autocompress.config._checks import build

    with pytest.raises(ConfigError, match=r"^finetune\.optimizer: optimizer='lamb'; allowed: \['adam'"):
        build(FinetuneConfig, {"optimizer": "lamb"}, "finetune")
    with pytest.raises(ConfigError, match=r"^finetune\.grad_clip: expected a number or null"):
        build(FinetuneConfig, {"grad_clip": "big"}, "finetune")
    assert build(FinetuneConfig, {"warmup": 0.1, "amp": True}, "finetune").warmup == 0.1


@pytest.mark.parametrize("config", [
    FinetuneConfig(epochs=3, lr=2e-2, distill=False, optimizer="adamw", weight_decay=0.01),
    FinetuneConfig(epochs=3, lr=0.5, distill=False, optimizer="sgd"),
    FinetuneConfig(epochs=3, lr=2e-2, distill=False, warmup=0.3),
    FinetuneConfig(epochs=3, lr=2e-2, distill=False, schedule="constant"),
    FinetuneConfig(epochs=3, lr=2e-2, distill=False, grad_clip=0.5),
    FinetuneConfig(epochs=3, lr=0.5, distill=True, optimizer="sgd", warmup=0.2,
                   schedule="constant", grad_clip=1.0),
], ids=["adamw", "sgd", "warmup", "constant", "grad_clip", "all"])
def test_optimizers_and_schedules_train(tiny: Task, config: FinetuneConfig) -> None:
    task = untrained(tiny)
    model = copy.deepcopy(task.model)
    before = task.evaluate(model)
    history = finetune(model, task, config, teacher=tiny.model)
    assert not torch.equal(model.net[0].weight, task.model.net[0].weight)
    assert all(math.isfinite(m) for m in history)
    assert history[-1] > before + 0.15, (before, history)


def test_the_learning_rate_warms_up_then_follows_the_schedule(tiny: Task,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """8 steps per epoch, 2 epochs: a quarter of the steps warm up linearly, then cosine (per
    step, down towards zero) or constant."""
    seen: list[float] = []
    step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    model = copy.deepcopy(tiny.model)
    finetune(model, tiny, FinetuneConfig(epochs=2, lr=1.0e-3, distill=False, warmup=0.25))
    assert len(seen) == 16
    assert seen[:4] == pytest.approx([1e-3 * k / 5 for k in range(1, 5)])
    assert seen[4] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(seen[4:], seen[5:], strict=False))
    assert seen[-1] < 0.05e-3
    seen.clear()
    finetune(model, tiny, FinetuneConfig(epochs=2, lr=1.0e-3, distill=False, warmup=0.25,
                                         schedule="constant"))
    assert seen[4:] == pytest.approx([1e-3] * 12)


def test_grad_clip_bounds_the_update(tiny: Task) -> None:
    """With SGD (no momentum buildup beyond the steps taken) a tiny gradient norm bound keeps
    the weights where they were; without it they move."""
    clipped, free = copy.deepcopy(tiny.model), copy.deepcopy(tiny.model)
    config = FinetuneConfig(epochs=1, lr=0.1, distill=False, optimizer="sgd", schedule="constant",
                            grad_clip=None, keep_best=False)
    finetune(clipped, tiny, replace(config, grad_clip=1e-6))
    finetune(free, tiny, config)
    moved = [(p - q).norm().item() for p, q in zip(clipped.parameters(), tiny.model.parameters(),
                                                   strict=True)]
    assert max(moved) < 1e-5
    assert (free.net[0].weight - tiny.model.net[0].weight).norm() > 1e-3


# --- distillation losses ----------------------------------------------------------------------

class Embedder(nn.Module):
    """Maps 16 features to an 8-dim embedding; ``as_dict`` returns a Hugging Face-like dict."""

    def __init__(self, seed: int, as_dict: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(16, 8)
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor):
        out = self.proj(x)
        return {"last_hidden_state": out, "pooler_output": out.mean(dim=1)} if self.as_dict else out


def embedding_task(tiny: Task, **fields) -> Task:
    """The tiny data with an embedding model and a task loss of its own (not cross-entropy)."""
    return Task(model=Embedder(0), train_loader=tiny.train_loader, val_loader=tiny.val_loader,
                example_inputs=tiny.example_inputs,
                loss_fn=lambda out, y: out_tensor(out).pow(2).mean() * 0.0,
                metric=lambda model, loader: 0.0, **fields)


def out_tensor(out):
    return out["last_hidden_state"] if isinstance(out, dict) else out


def test_auto_distill_loss_depends_on_the_task(tiny: Task) -> None:
    assert distill_loss_name(FinetuneConfig(), tiny) == "kl"
    assert distill_loss_name(FinetuneConfig(), embedding_task(tiny)) == "mse"
    assert distill_loss_name(FinetuneConfig(distill_loss="cosine"), tiny) == "cosine"
    assert distill_loss_name(FinetuneConfig(distill_loss="kl"), embedding_task(tiny)) == "kl"
    own = embedding_task(tiny, distill_loss=lambda s, t: (s - t).abs().mean())
    assert distill_loss_name(FinetuneConfig(distill_loss="mse"), own) == "task"


def _gap(student: nn.Module, teacher: nn.Module, task: Task) -> tuple[float, float]:
    """Mean squared distance and mean cosine similarity of the two embeddings on val data."""
    x = torch.cat([x for x, _ in task.val_loader])
    with torch.no_grad():
        s, t = out_tensor(student(x)), out_tensor(teacher(x))
    return F.mse_loss(s, t).item(), F.cosine_similarity(s, t, dim=-1).mean().item()


@pytest.mark.parametrize("loss", ["auto", "mse", "cosine"])
@pytest.mark.parametrize("as_dict", [False, True], ids=["tensor", "dict-output"])
def test_embedding_distillation_pulls_the_student_to_the_teacher(tiny: Task, loss: str,
                                                                 as_dict: bool) -> None:
    task = embedding_task(tiny)
    student, teacher = Embedder(0, as_dict), Embedder(1, as_dict)
    mse, cos = _gap(student, teacher, task)
    finetune(student, task, FinetuneConfig(epochs=3, lr=2e-2, alpha=1.0, distill_loss=loss),
             teacher=teacher)
    mse_after, cos_after = _gap(student, teacher, task)
    assert cos_after > max(cos, 0.0) + 0.5, (cos, cos_after)
    if loss != "cosine":  # cosine ignores the norms
        assert mse_after < mse / 5, (mse, mse_after)


def test_kl_on_logits_matches_hinton(tiny: Task) -> None:
    """``kl`` is T^2 * KL(softmax(t/T) || softmax(s/T)), per sample; (N, L, C) logits count every
    position as a sample."""
    from autocompress.finetune._losses import distill_fn as _distill_fn

    fn = _distill_fn(FinetuneConfig(temperature=2.0, distill_loss="kl"), tiny)
    s, t = torch.randn(6, 4), torch.randn(6, 4)
    expected = sum(F.kl_div(F.log_softmax(s[i] / 2, -1), F.softmax(t[i] / 2, -1), reduction="sum")
                   for i in range(6)) / 6 * 4
    assert fn(s, t).item() == pytest.approx(expected.item(), rel=1e-5)
    assert fn(s.view(2, 3, 4), t.view(2, 3, 4)).item() == pytest.approx(expected.item(), rel=1e-5)
    assert fn((s, "extra"), {"logits": t}).item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_task_distill_loss_gets_the_raw_outputs(tiny: Task) -> None:
    calls: list[tuple[type, type]] = []

    def own(student_out, teacher_out):
        calls.append((type(student_out), type(teacher_out)))
        return F.mse_loss(out_tensor(student_out), out_tensor(teacher_out))

    task = embedding_task(tiny, distill_loss=own)
    student, teacher = Embedder(0, as_dict=True), Embedder(1, as_dict=True)
    mse, _ = _gap(student, teacher, task)
    finetune(student, task, FinetuneConfig(epochs=3, lr=2e-2, alpha=1.0, distill_loss="cosine"),
             teacher=teacher)
    assert calls and set(calls) == {(dict, dict)}
    assert _gap(student, teacher, task)[0] < mse / 5


def test_an_output_without_a_tensor_fails_clearly() -> None:
    with pytest.raises(TypeError, match="give the task a distill_loss"):
        output_tensor({"text": "no tensor here"})
    assert output_tensor([(torch.ones(1),)]).item() == 1.0


# --- inputs of any form -----------------------------------------------------------------------

class TwoInputs(nn.Module):
    """``forward(a, b)``: two halves of the 16 features."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.a(a) + self.b(b)))


class Tokens(nn.Module):
    """``forward(input_ids=..., mask=...)``: the label is the first token mod 4."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.head = nn.Linear(8 * 6, 4)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head((self.embed(input_ids) * mask[..., None]).flatten(1))


def _batches(inputs, y: torch.Tensor, size: int = 64) -> list:
    from autocompress._inputs import map_tensors

    return [(map_tensors(inputs, lambda t, i=i: t[i:i + size]), y[i:i + size])
            for i in range(0, len(y), size)]


def multi_input_task(kind: str) -> Task:
    torch.manual_seed(0)
    if kind == "tuple":
        x, y = synthetic_classification(768, seed=0)
        inputs, model = (x[:, :8], x[:, 8:]), TwoInputs()
    else:
        ids = torch.randint(0, 16, (768, 6), generator=torch.Generator().manual_seed(0))
        mask = (torch.rand(768, 6, generator=torch.Generator().manual_seed(1)) > 0.3).float()
        mask[:, 0] = 1.0
        inputs, y, model = {"input_ids": ids, "mask": mask}, ids[:, 0] % 4, Tokens()
    from autocompress._inputs import map_tensors, take

    train = _batches(map_tensors(inputs, lambda t: t[:512]), y[:512])
    val = _batches(map_tensors(inputs, lambda t: t[512:]), y[512:], size=256)
    return Task(model=model, train_loader=train, val_loader=val,
                example_inputs=take(inputs, 4), name=kind)


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_tuple_and_dict_inputs_finetune_evaluate_and_distil(kind: str) -> None:
    task = multi_input_task(kind)
    before = task.evaluate(task.model)
    history = finetune(task.model, task, FinetuneConfig(epochs=4, lr=5e-2, distill=False))
    assert history[-1] == task.evaluate(task.model) > before + 0.3, (before, history)
    student = type(task.model)()
    distilled = finetune(student, task, FinetuneConfig(epochs=4, lr=5e-2, alpha=1.0),
                         teacher=task.model)
    assert distilled[-1] > before + 0.3, (before, distilled)


def test_top1_accuracy_takes_tuple_and_dict_outputs(tiny: Task) -> None:
    from autocompress.measure import top1_accuracy

    class Wrapped(nn.Module):
        def __init__(self, inner: nn.Module, how: str) -> None:
            super().__init__()
            self.inner, self.how = inner, how

        def forward(self, x):
            out = self.inner(x)
            return {"logits": out, "hidden": x} if self.how == "dict" else (out, x)

    expected = top1_accuracy(tiny.model, tiny.val_loader)
    for how in ("dict", "tuple"):
        assert top1_accuracy(Wrapped(tiny.model, how), tiny.val_loader) == expected
    assert top1_accuracy(nn.Identity(), [(torch.eye(4), torch.arange(4))]) == 1.0  # no params


# --- devices ----------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")


def test_auto_resolves_to_what_this_machine_has() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@no_cuda
def test_cuda_without_cuda_fails_clearly_and_leaves_the_model_alone(tiny: Task) -> None:
    model = copy.deepcopy(tiny.model)
    with pytest.raises(ValueError, match=r"^finetune\.device='cuda': torch sees no CUDA device "
                                         r"here .*; allowed here: \['auto', 'cpu'\]"):
        finetune(model, tiny, FinetuneConfig(epochs=1, device="cuda"), teacher=tiny.model)
    assert_same_weights(model, tiny.model)


def test_amp_is_ignored_on_the_cpu(tiny: Task) -> None:
    task = untrained(tiny)
    a, b = copy.deepcopy(task.model), copy.deepcopy(task.model)
    config = FinetuneConfig(epochs=1, lr=5e-3, device="cpu")
    assert finetune(a, task, config, teacher=tiny.model) == finetune(
        b, task, replace(config, amp=True), teacher=tiny.model)
    assert_same_weights(a, b)


class Moves(nn.Module):
    """Records where ``.to`` sends it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.moves: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)

    def to(self, *args, **kwargs):
        self.moves.append(str(torch.device(args[0])))
        return super().to(*args, **kwargs)


@pytest.mark.parametrize("diverge", [False, True], ids=["finished", "diverged"])
def test_model_and_teacher_end_on_the_cpu(tiny: Task, monkeypatch: pytest.MonkeyPatch,
                                          diverge: bool) -> None:
    """Both go to the training device and back to the CPU, even when training fails."""
    import autocompress.finetune._loop as ft

    monkeypatch.setattr(ft, "resolve_device", lambda device: torch.device("cpu"))
    student, teacher = Moves(copy.deepcopy(tiny.model)), Moves(tiny.model)
    task = tiny
    if diverge:
        task = Task(model=tiny.model, train_loader=tiny.train_loader, val_loader=tiny.val_loader,
                    example_inputs=tiny.example_inputs, loss_fn=lambda out, y: out.sum() * math.inf)
    with pytest.raises(DivergedError) if diverge else contextlib.nullcontext():
        finetune(student, task, FinetuneConfig(epochs=1, device="cuda"), teacher=teacher)
    assert student.moves == ["cpu", "cpu"] and teacher.moves == ["cpu", "cpu"]
    assert not student.training and not teacher.training


# --- the search refuses what it cannot run ------------------------------------------------------

def _experiment(tmp_path: Path, finetune: dict, search: dict | None = None) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny-devices", "task": "tests.models:tiny_task",
        "search_space": str(ROOT / "search_spaces" / "default.yaml"),
        "objectives": [{"metric": "accuracy"}, {"metric": "size_bytes"}],
        "target": {"runtime": "torch", "budget_s": 0.05, "min_runs": 3, "warmup": 1},
        "search": {"trials": 1, **(search or {})}, "finetune": {"epochs": 1, **finetune},
    }))
    return path


@no_cuda
def test_search_with_cuda_finetuning_without_cuda_exits_2_and_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd) -> None:
    from autocompress import cli

    monkeypatch.chdir(tmp_path)
    exp = _experiment(tmp_path, {"device": "cuda"}, {"gpus_per_trial": 1})
    code = cli.main(["search", str(exp), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capfd.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith(f"autocompress: error: {exp}: finetune.device: device='cuda': torch sees no "
                          f"CUDA device"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.yaml"]


def test_cuda_finetuning_needs_a_gpu_per_trial(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from autocompress._errors import ConfigError
    from autocompress.config import load_experiment
    from autocompress.tune._driver import _check_finetune_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    said: list[str] = []
    exp = load_experiment(_experiment(tmp_path, {"device": "cuda"}))
    with pytest.raises(ConfigError, match=r"search\.gpus_per_trial: finetune.device is 'cuda' "
                                          r"but no GPU is reserved"):
        _check_finetune_device(exp, None, said.append)
    _check_finetune_device(load_experiment(_experiment(tmp_path, {"device": "cuda"},
                                                       {"gpus_per_trial": 0.5})), None, said.append)
    _check_finetune_device(load_experiment(_experiment(tmp_path, {})), None, said.append)
    assert said == ["fine-tuning on the CPU: set search.gpus_per_trial (e.g. 1) to train on the GPU"]


@pytest.mark.parametrize(("ray_gpus", "target", "ok"), [
    (0, "cpu", False), (1, "cpu", True), (1, "cuda", False), (2, "cuda", True)])
def test_gpus_per_trial_needs_gpus_in_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          ray_gpus: int, target: str, ok: bool) -> None:
    import ray

    from autocompress._errors import ConfigError
    from autocompress.config import load_experiment
    from autocompress.tune._ray_backend import _check_gpus

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "GPU": float(ray_gpus)})
    exp = load_experiment(_experiment(tmp_path, {}, {"gpus_per_trial": 1}))
    exp = replace(exp, target=replace(exp.target, device=target))
    if ok:
        _check_gpus(exp)
    else:
        with pytest.raises(ConfigError, match=rf"search\.gpus_per_trial: gpus_per_trial=1 needs "
                                              rf"{1 + (target == 'cuda')} GPUs.* Ray sees {ray_gpus}"):
            _check_gpus(exp)
    _check_gpus(replace(exp, search=replace(exp.search, gpus_per_trial=0.0)))  # CPU: no check


@pytest.mark.parametrize("value", [-1, "one", True, math.inf])
def test_gpus_per_trial_is_validated(value: object) -> None:
    from autocompress.config import SearchSettings

    with pytest.raises(ValueError, match=r"^gpus_per_trial=.*; allowed: a number >= 0"):
        SearchSettings(gpus_per_trial=value)  # type: ignore[arg-type]
    assert SearchSettings(gpus_per_trial=0.25).gpus_per_trial == 0.25
    assert SearchSettings().gpus_per_trial == 0.0


def test_the_search_logs_the_distillation_loss(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """It is one of the parent run's facts (tags ``autocompress.<key>``)."""
    import autocompress.tune._resume as resume
    from autocompress.config import load_experiment
    from autocompress.measure import LatencyResult

    facts: dict[str, str] = {}

    def start(*args, **kwargs):
        facts.update(kwargs["facts"])
        raise KeyboardInterrupt  # enough: no store needed

    monkeypatch.setattr(resume.SearchTracker, "start", start)
    class Stub:  # the search's measurer: the baseline is timed by its reference()
        def reference(self, model, inputs, target) -> LatencyResult:
            return LatencyResult(1.0, 1.0, 0.0, 1, "torch", "cpu", 1, 1)

    stub = Stub()
    for given, task, logged in [({"distill_loss": "cosine"}, tiny_task(train=False), "cosine"),
                                ({}, tiny_task(train=False), "kl"),
                                ({}, embedding_task(tiny_task(train=False)), "mse")]:
        exp = load_experiment(_experiment(tmp_path, given))
        with pytest.raises(KeyboardInterrupt):
            resume._start(exp, task, "sqlite:///unused.db", lambda _: None, stub)
        assert facts["finetune.distill_loss"] == logged


# --- on a GPU (bench/gpu_check.py runs the same checks with timings) -----------------------------

def _on_cpu(*models: nn.Module) -> bool:
    return all(t.device.type == "cpu" for m in models for t in [*m.parameters(), *m.buffers()])


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_cuda_finetuning_learns_and_returns_to_the_cpu(tiny: Task, amp: bool) -> None:
    task = untrained(tiny)
    model, teacher = copy.deepcopy(task.model), copy.deepcopy(tiny.model)
    history = finetune(model, task, FinetuneConfig(epochs=3, lr=2e-2, device="cuda", amp=amp),
                       teacher=teacher)
    assert _on_cpu(model, teacher)
    assert history[-1] > task.evaluate(task.model) + 0.3, history
    assert task.evaluate(model) == pytest.approx(history[-1], abs=0.02)  # CPU vs GPU rounding
    assert_same_weights(teacher, tiny.model)


@pytest.mark.gpu
@cuda
def test_cuda_fp16_with_a_compressed_model(tiny: Task, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fp16 + GradScaler path (GPUs without bf16), on masks and fake quantization."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    plan = Plan({"net.0": LayerPlan(sparsity=0.8, act_bits=8), "net.2": LayerPlan(bits=4)})
    model = apply(tiny.model, plan, tiny.example_inputs)
    before = tiny.evaluate(model)
    history = finetune(model, tiny, FinetuneConfig(epochs=3, lr=3e-3, device="cuda", amp=True,
                                                   grad_clip=1.0), teacher=tiny.model)
    assert _on_cpu(model, tiny.model)
    assert history[-1] >= before - 0.02 and all(math.isfinite(m) for m in history)
    assert (model.net[0].weight == 0).sum().item() >= round(0.8 * model.net[0].weight.numel())


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp16"])
def test_cuda_amp_with_activation_fake_quant_inside(tiny: Task, monkeypatch: pytest.MonkeyPatch,
                                                    bf16: bool) -> None:
    """An inner layer's input is bf16/fp16 under autocast; its 8-bit observer must take it."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    model = apply(tiny.model, Plan({"net.2": LayerPlan(act_bits=8), "net.4": LayerPlan(bits=8)}),
                  tiny.example_inputs)
    history = finetune(model, tiny, FinetuneConfig(epochs=1, lr=1e-3, device="cuda", amp=True),
                       teacher=tiny.model)
    assert _on_cpu(model) and history[-1] > 0.8


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_cuda_with_tuple_and_dict_inputs(kind: str) -> None:
    from autocompress.measure import top1_accuracy

    task = multi_input_task(kind)
    before = task.evaluate(task.model)
    history = finetune(task.model, task, FinetuneConfig(epochs=4, lr=5e-2, distill=False,
                                                        device="cuda", amp=True))
    assert _on_cpu(task.model) and history[-1] > before + 0.3
    student = type(task.model)()
    finetune(student, task, FinetuneConfig(epochs=1, lr=5e-2, device="cuda"), teacher=task.model)
    assert _on_cpu(student, task.model)
    assert top1_accuracy(task.model.cuda(), task.val_loader) == pytest.approx(
        top1_accuracy(task.model.cpu(), task.val_loader), abs=0.02)


@pytest.mark.gpu
@cuda
def test_run_trial_on_cuda(tiny: Task) -> None:
    from autocompress.measure import Target
    from autocompress.tune._trial import run_trial

    plan = Plan({"net.0": LayerPlan(sparsity=0.5), "net.2": LayerPlan(bits=8)})
    target = Target(warmup=1, min_runs=3, max_runs=5, budget_s=0.05)
    result = run_trial(tiny, plan, FinetuneConfig(epochs=1, device="cuda", amp=True), target)
    assert _on_cpu(result.model, tiny.model)
    # keep_best (on the GPU) and the trial's own check (on the CPU): the best state is kept.
    assert result.metrics.accuracy == pytest.approx(max(result.post_training, *result.history),
                                                    abs=0.02)
    assert result.metrics.accuracy >= result.post_training
    assert result.metrics.latency_ms > 0


def test_keep_best_never_ends_worse_than_before_training(tiny: Task) -> None:
    import copy

    from autocompress.finetune import FinetuneConfig, finetune

    model = copy.deepcopy(tiny.model)
    before = tiny.evaluate(model)
    # A step size this large wrecks the model; keep_best gives back the weights it started with.
    history = finetune(model, tiny, FinetuneConfig(epochs=2, lr=0.5, optimizer="sgd", distill=False,
                                                   keep_best=True, device="cpu"))
    assert max(history) < before
    assert tiny.evaluate(model) == before
    with pytest.raises(ValueError, match="finetune.keep_best='yes'"):
        FinetuneConfig(keep_best="yes")
