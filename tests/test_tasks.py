"""Tasks: user task references, bad references, the baseline cache, the built-in tasks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from autocompress.config import ConfigError
from autocompress.tasks import Task, cache_dir, list_tasks, load_task
from autocompress.tasks._registry import cached_baseline
from tests.models import MLP, tiny_task


def test_user_task_reference() -> None:
    task = load_task("tests.models:tiny_task")
    assert isinstance(task, Task) and task.name == "tiny"
    assert isinstance(task.model, MLP) and not task.model.training
    assert task.example_inputs.shape == (4, 16)
    assert task.evaluate(task.model) > 0.85


@pytest.mark.parametrize(("ref", "pattern"), [
    pytest.param("imagenet", r"unknown task 'imagenet'; allowed: digits, minilm, mnist1d; "
                             r"or give 'package.module:function'",
                 id="unknown-builtin"),
    pytest.param("tests.no_such_module:fn",
                 r"cannot import task module 'tests.no_such_module': ModuleNotFoundError",
                 id="missing-module"),
    pytest.param(":tiny_task", r"cannot import task module ''", id="empty-module"),
    pytest.param("tests.models:no_such_fn", r"module 'tests.models' has no function 'no_such_fn'",
                 id="missing-function"),
    pytest.param("tests.models:CLASSES", r"has no function 'CLASSES'", id="not-callable"),
    pytest.param("tests.models:not_a_task",
                 r"tests.models:not_a_task\(\) returned dict, expected autocompress.Task",
                 id="wrong-return-type"),
])
def test_bad_references_are_config_errors(ref: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as err:
        load_task(ref)
    assert err.value.key == "task"


def test_builtins_are_listed() -> None:
    assert list_tasks() == ["digits", "minilm", "mnist1d"]


def test_task_contract_checks_and_defaults() -> None:
    task = tiny_task(train=False)
    with pytest.raises(TypeError, match="nn.Module"):
        Task(model="model", train_loader=[], val_loader=[], example_inputs=task.example_inputs)
    with pytest.raises(TypeError, match="batch dimension"):
        Task(model=task.model, train_loader=[], val_loader=[], example_inputs=torch.zeros(16))
    x, y = torch.randn(8, 16), torch.arange(8) % 4
    custom = Task(model=task.model, train_loader=[], val_loader=[(x, y)], example_inputs=x,
                  metric=lambda model, loader: 0.5, loss_fn=lambda out, t: out.sum() * 0)
    assert custom.evaluate(task.model) == 0.5
    assert custom.loss(task.model(x), y).item() == 0
    default = Task(model=task.model, train_loader=[], val_loader=[(x, y)], example_inputs=x)
    expected = (task.model(x).argmax(1) == y).float().mean().item()
    assert default.evaluate(task.model) == expected
    assert torch.equal(default.loss(task.model(x), y), F.cross_entropy(task.model(x), y))


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("AUTOCOMPRESS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "autocompress"


def test_baseline_is_trained_once_then_loaded(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path))
    trained: list[int] = []

    def train(model: MLP) -> None:
        trained.append(1)
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(0.25)

    first, cached = cached_baseline("toy", 0, MLP(), train, MLP)
    assert (cached, len(trained)) == (False, 1)
    files = list((tmp_path / "baselines").glob("toy-seed0-*.pt"))
    assert len(files) == 1 and not list(tmp_path.glob("baselines/*.tmp*"))

    second, cached = cached_baseline("toy", 0, MLP(), train, MLP)
    assert (cached, len(trained)) == (True, 1)
    assert not second.training
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    _, cached = cached_baseline("toy", 1, MLP(), train, MLP)  # another seed, another baseline
    assert (cached, len(trained)) == (False, 2)
    _, cached = cached_baseline("toy", 0, MLP(), train, tiny_task)  # other code, retrained
    assert (cached, len(trained)) == (False, 3)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "shape", "accuracy"), [
    pytest.param("digits", (1, 8, 8), 0.95, id="digits"),
    pytest.param("mnist1d", (1, 40), 0.9, id="mnist1d"),
])
def test_builtin_task(name: str, shape: tuple[int, ...], accuracy: float) -> None:
    """Trains the baseline if $AUTOCOMPRESS_CACHE does not hold it yet (about 30 s)."""
    load_task(name)
    task = load_task(name)
    assert task.info["baseline_cached"] is True
    assert task.name == name
    assert task.example_inputs.shape[1:] == shape
    x, y = next(iter(task.val_loader))
    assert x.shape[1:] == shape and x.dtype == torch.float32 and y.dtype == torch.long
    assert task.evaluate(task.model) > accuracy
    if name == "digits":
        assert 0.0 <= x.min() and x.max() <= 1.0  # pixels / 16
        assert task.info["train_samples"] + task.info["val_samples"] == 1797
