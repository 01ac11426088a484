"""The Python API's surface: lazy top-level names, argument checking, in-memory tasks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autocompress as ac
from autocompress._api import _experiment
from autocompress.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTED = ["Task", "Plan", "LayerPlan", "search", "export", "load_experiment", "load_packed"]


def test_documented_names_import_and_are_listed() -> None:
    from autocompress import LayerPlan, Plan, Task, export, load_experiment, load_packed, search

    assert set(DOCUMENTED) <= set(ac.__all__)
    assert all(callable(obj) for obj in (LayerPlan, Plan, Task, export, load_experiment, load_packed,
                                         search))
    for name in ac.__all__:
        assert getattr(ac, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ac.nope  # noqa: B018


def test_importing_the_package_imports_neither_torch_nor_ray() -> None:
    code = ("import sys, autocompress as ac; ac.__version__; "
            "bad = [m for m in ('torch', 'ray', 'mlflow', 'optuna') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def tiny_task() -> ac.Task:
    x = torch.randn(32, 8)
    data = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    return ac.Task(model=model, train_loader=data, val_loader=data, example_inputs=x[:1], name="tiny")


SPACE = {"layers": [{"knobs": {"bits": [4, 8]}}]}


def test_an_in_memory_task_becomes_an_experiment() -> None:
    task = tiny_task()
    exp = _experiment(task, space=SPACE, objectives=None, name=None, target={"threads": 1},
                      finetune={"epochs": 1}, constraints=None, tracking_uri=None,
                      settings={"trials": 3})
    assert exp.task is task and exp.name == "tiny-search"
    assert exp.metrics == ["accuracy", "latency_ms", "size_bytes"]
    assert exp.search.trials == 3 and exp.finetune.epochs == 1
    assert exp.to_dict()["task"] == "<in-memory:tiny>"


def test_an_experiment_file_takes_keyword_overrides() -> None:
    exp = _experiment(str(ROOT / "experiments" / "digits.yaml"), space=None, objectives=["accuracy"],
                      name="other", target=None, finetune={"epochs": 1}, constraints=None,
                      tracking_uri=None, settings={"trials": 2})
    assert (exp.task, exp.name, exp.metrics, exp.search.trials) == ("digits", "other", ["accuracy"], 2)
    assert exp.finetune.epochs == 1 and exp.finetune.lr == ac.load_experiment(
        ROOT / "experiments" / "digits.yaml").finetune.lr  # the rest of the section is kept


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"trails": 3}, "unknown keyword 'trails' (did you mean 'trials'?)"),
    ({"trials": 0}, "search.trials: trials=0; allowed: an integer >= 1"),
    ({"objectives": ["acc"]}, "objectives[0].metric"),
    ({"target": {"runtime": "tvm"}}, "target.runtime"),
    ({"space": None}, "space: give the search space"),
    ({"space": {"layers": [{"match": "nope", "knobs": {"bits": [8]}}]}}, "matches no layer"),
], ids=["typo", "trials", "metric", "runtime", "no-space", "space-matches-nothing"])
def test_bad_arguments_are_config_errors(kwargs: dict, message: str, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        ac.search(tiny_task(), **{"space": SPACE, **kwargs})
    assert message in str(info.value)
    assert not (tmp_path / "mlflow.db").exists()  # nothing was logged


def test_exporting_an_unknown_in_memory_task_asks_for_it(tmp_path: Path) -> None:
    from autocompress.tracking._writer import SearchTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = SearchTracker.start(uri, "mem", {"task": "<in-memory:tiny>"}, {"accuracy": 1.0},
                                  [("accuracy", "max")], echo=lambda _: None)
    tracker.trial_started("t0", {})
    artifacts = tmp_path / "a"
    artifacts.mkdir()
    (artifacts / "plan.json").write_text('{"version": 1, "layers": {}}')
    tracker.trial_finished("t0", {"accuracy": 1.0}, "", artifacts)
    tracker.finish()
    run_id = tracker.trials["t0"].run_id
    with pytest.raises(ConfigError, match=r"in-memory task .*task=task"):
        ac.export(run_id, format="onnx", out=str(tmp_path / "dist"), tracking_uri=uri)
    assert not (tmp_path / "dist").exists()
