"""Tasks: user task references, bad references, the baseline cache, the built-in tasks."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from autocompress.config import ConfigError
from autocompress.tasks import TASKS, Task, cache_dir, list_tasks, load_task
from autocompress.tasks._registry import cached_baseline
from tests.models import MLP, tiny_task


def test_user_task_reference() -> None:
    task = load_task("tests.models:tiny_task")
    assert isinstance(task, Task) and task.name == "tiny"
    assert isinstance(task.model, MLP) and not task.model.training
    assert task.example_inputs.shape == (4, 16)
    assert task.evaluate(task.model) > 0.85


@pytest.mark.parametrize(("ref", "pattern"), [
    pytest.param("imagenet", rf"unknown task 'imagenet'; allowed: "
                             rf"{re.escape(', '.join(TASKS.names()))}; "
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
    assert list_tasks() == sorted(TASKS.names())
    assert {"digits", "digits_resnet", "minilm", "mnist1d", "smollm2"} <= set(list_tasks())


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


# The generic contract of every built-in task, run over TASKS' names: a new built-in task joins
# with no edit here. Each is loaded once per session from a session-wide cache directory
# ($AUTOCOMPRESS_CACHE when set, as `make test` does, so baselines persist across runs; else a
# temporary one, so a bare pytest run never writes to ~/.cache); a task whose extra is not
# installed (an ImportError or the ConfigError naming the extra) is skipped.
BUILTINS = TASKS.names()


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(os.environ.get("AUTOCOMPRESS_CACHE") or tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def builtin(builtin_cache: Path) -> Callable[[str], tuple[Task, Task]]:
    """``builtin(name)``: the task loaded twice (the second time from the cache), once per
    session."""
    loaded: dict[str, tuple[Task, Task]] = {}

    def load(name: str) -> tuple[Task, Task]:
        if name not in loaded:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("AUTOCOMPRESS_CACHE", str(builtin_cache))
                try:
                    loaded[name] = (load_task(name), load_task(name))
                except (ImportError, ConfigError) as e:
                    pytest.skip(f"task {name!r} cannot load here: {e}")
        return loaded[name]

    return load


def _samples(inputs: Any) -> list[bytes]:
    """One key per sample of a batch's inputs (a tensor, a tuple or a dict of tensors)."""
    if isinstance(inputs, dict):
        parts = [inputs[k] for k in sorted(inputs)]
    else:
        parts = list(inputs) if isinstance(inputs, tuple | list) else [inputs]
    return [b"|".join(p[i].numpy().tobytes() for p in parts) for i in range(len(parts[0]))]


def _batch_size(inputs: Any) -> int:
    first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs
    return len(first[0] if isinstance(first, tuple | list) else first)


def _call(model: torch.nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, tuple | list) else model(inputs)


BASELINE_AT_LEAST = {"smollm2": 0.35}


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_task_contract(name: str, builtin) -> None:
    """Loads, runs its example inputs, scores a trained baseline in [0, 1] on a split disjoint
    from the training data, and loads again to the same task (from the baseline cache)."""
    task, again = builtin(name)
    assert isinstance(task, Task) and task.name == name and not task.model.training
    with torch.no_grad():
        out = _call(task.model, task.example_inputs)
    out = out if isinstance(out, torch.Tensor) else out[0]
    assert out.shape[0] == _batch_size(task.example_inputs)  # batch dimension first
    score = task.evaluate(task.model)
    # a trained baseline, the metric a fraction (a decoder LM's next-token accuracy: SmolLM2
    # predicts 42% of the next tokens of Python's help text)
    assert BASELINE_AT_LEAST.get(name, 0.9) < score <= 1.0 + 1e-6

    train = {k for x, _ in task.train_loader for k in _samples(x)}
    val = [k for x, _ in task.val_loader for k in _samples(x)]
    # Disjoint samples, though equal inputs may occur in both: 9 of minilm's 256 validation
    # sentences have the same 32 tokens as a training one (Python's help topics repeat text).
    assert sum(k in train for k in val) <= 0.05 * len(val)

    assert _samples(again.example_inputs) == _samples(task.example_inputs)
    assert [k for x, _ in again.val_loader for k in _samples(x)] == val
    for a, b in zip(task.model.state_dict().values(), again.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    assert again.evaluate(again.model) == score
    assert again.info.get("baseline_cached", True) is True


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in BUILTINS if n.startswith("digits")])
def test_digits_tasks_share_the_data(name: str, builtin) -> None:
    """The digits tasks: scikit-learn's 1,797 images, pixels / 16, the same split as digits."""
    task, _ = builtin(name)
    x, y = next(iter(task.val_loader))
    assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert task.info["train_samples"] + task.info["val_samples"] == 1797
    reference, _ = builtin("digits")
    assert torch.equal(task.example_inputs, reference.example_inputs)
    assert torch.equal(x, next(iter(reference.val_loader))[0])
