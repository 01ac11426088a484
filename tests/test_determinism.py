"""With a fixed seed and one trial at a time, a search is reproducible: the same plans, in the
same order. NSGA-II breeds its second generation from the first one's results, so this also
needs the trials' objective values (accuracy and size) to repeat exactly. (On the serial
backend: the driver, sampler and trial are the same as on Ray, and one trial at a time is
what the serial backend does.)"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from autocompress.config import load_experiment
from autocompress.tracking import read_trials
from autocompress.tune._driver import run_search
from tests.searches import write_experiment

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
TRIALS = 6  # a population of 4, then NSGA-II offspring


def _search(path: Path, uri: str) -> tuple[list[dict], list[dict], list[tuple]]:
    """One search; its child runs' params and metrics and its Optuna trials, in start order."""
    exp = load_experiment(path)
    result = run_search(replace(exp, search=replace(exp.search, backend="serial")), tracking_uri=uri)
    runs = read_trials(MlflowClient(uri), result.parent_run_id)
    assert [r.info.status for r in runs] == ["FINISHED"] * TRIALS
    params = [r.data.params for r in runs]
    metrics = [{k: r.data.metrics[k] for k in ("accuracy", "size_bytes")} for r in runs]
    study = optuna.load_study(study_name=result.study_name, storage=result.study_storage)
    asked = [(t.number, t.params, t.values) for t in study.trials]
    return params, metrics, asked


def test_same_seed_same_plans_in_the_same_order(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_experiment(tmp_path, "deterministic", sampler="mutation", trials=TRIALS,
                            concurrency=1, seed=7)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    first = _search(path, uri)
    second = _search(path, uri)

    params, metrics, asked = first
    assert len({tuple(sorted(p.items())) for p in params}) > 1, "plans should differ"
    assert second[0] == params, "the same plans in the same order"
    assert second[1] == metrics, "the same results (the sampler selects parents by them)"
    assert second[2] == asked
