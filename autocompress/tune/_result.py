"""What a search returns, and where its Optuna study is stored."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from autocompress.config import Experiment

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"



@dataclass
class SearchResult:
    """The outcome of a search.

    Attributes:
        experiment: The experiment that ran.
        parent_run_id: The MLflow parent run.
        baseline: The uncompressed model's metrics.
        trials: One row per trial (see :meth:`SearchTracker.table`).
        front: The Pareto-optimal feasible trials.
        study_storage: Optuna storage URL; the study is named ``study_name``.
        study_name: The Optuna study.
    """

    experiment: Experiment
    parent_run_id: str
    baseline: dict[str, float]
    trials: pd.DataFrame
    front: pd.DataFrame
    study_storage: str
    study_name: str



def study_storage_url(tracking_uri: str) -> str:
    """The Optuna storage beside the MLflow store: ``optuna.db`` in the same directory for a
    ``sqlite:///`` store, else ``.autocompress/optuna.db`` in the working directory."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return f"sqlite:///{db.parent / 'optuna.db'}"
    Path(".autocompress").mkdir(exist_ok=True)
    return f"sqlite:///{Path('.autocompress') / 'optuna.db'}"
