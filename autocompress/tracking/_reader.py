"""Reading searches back from MLflow: the store, the latest search, its trials and front."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from autocompress.measure import logged_metrics
from autocompress.tracking._names import PARETO, ROLE, SUMMARY


def open_store(tracking_uri: str, *, must_exist: bool = False) -> MlflowClient:
    """An MLflow client of ``tracking_uri``.

    Args:
        tracking_uri: Any MLflow tracking URI.
        must_exist: For commands that only read: refuse a ``sqlite:///`` store whose file does
            not exist, instead of creating an empty one.

    Raises:
        ConfigError: ``must_exist`` and the SQLite file is missing.
    """
    from autocompress._errors import ConfigError

    if must_exist and tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///"):])
        if not path.is_file():
            raise ConfigError(f"no MLflow store at {path} (nothing was logged there yet); give the "
                              f"tracking URI a search logged to", key="--tracking-uri")
    return client_for(tracking_uri)


# Python driver module of a database store -> the pip package that provides it.
_DRIVER_PACKAGES = {"MySQLdb": "mysqlclient", "pymysql": "PyMySQL", "psycopg2": "psycopg2-binary",
                    "psycopg": "psycopg[binary]", "pymssql": "pymssql"}


def client_for(tracking_uri: str) -> MlflowClient:
    """An MLflow client of ``tracking_uri`` whose store is already created.

    Creating the store imports the database driver of a ``mysql://``, ``postgresql://`` or
    ``mssql://`` URI; a missing driver is bad input (a package to install), not a crash.

    Args:
        tracking_uri: Any MLflow tracking URI.

    Raises:
        ConfigError: The store needs a Python package that is not installed (key
            ``--tracking-uri``).
    """

    try:
        client = MlflowClient(tracking_uri)
        tracking = getattr(client, "_tracking_client", None)
        if tracking is not None:
            _ = tracking.store  # the MLflow version in use may create the store lazily
    except ImportError as e:
        raise _missing_driver(e, tracking_uri) from None
    return client


def check_store_driver(tracking_uri: str) -> None:
    """Refuses a database store whose Python driver is missing, without creating anything (a
    search checks this before it loads its task or starts Ray).

    Raises:
        ConfigError: As :func:`client_for`.
    """
    if tracking_uri.partition("://")[0].split("+")[0] not in ("mysql", "postgresql", "postgres", "mssql"):
        return
    from sqlalchemy.engine import make_url

    try:
        make_url(tracking_uri).get_dialect().import_dbapi()
    except ImportError as e:
        raise _missing_driver(e, tracking_uri) from None


def _missing_driver(e: ImportError, tracking_uri: str) -> Exception:
    from autocompress._errors import ConfigError

    module = (e.name or "").split(".")[0]
    if not module:
        return ConfigError(f"{_redacted(tracking_uri)}: cannot load the store's driver: {e}",
                           key="--tracking-uri")
    return ConfigError(f"{_redacted(tracking_uri)} needs the Python module {module!r}, which is "
                       f"not installed; pip install {_DRIVER_PACKAGES.get(module, module)}",
                       key="--tracking-uri")


def _redacted(uri: str) -> str:
    """``uri`` with the password of its user info (``user:password@``) replaced by ``***``."""
    scheme, sep, rest = uri.partition("://")
    netloc, slash, path = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if not (sep and at and ":" in userinfo):
        return uri
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***{at}{host}{slash}{path}"



def latest_search(client: MlflowClient, experiment_name: str):
    """The most recent parent run of a search in ``experiment_name``.

    Raises:
        ConfigError: No such experiment, or it holds no search.
    """
    from autocompress._errors import ConfigError

    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ConfigError(f"no MLflow experiment named {experiment_name!r}; experiments: {names}")
    runs = client.search_runs([exp.experiment_id], f"tags.`{ROLE}` = 'search'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ConfigError(f"experiment {experiment_name!r} holds no autocompress search")
    return runs[0]



def read_trials(client: MlflowClient, parent_run_id: str) -> list:
    """The child (trial) runs of a search, oldest first."""
    parent = client.get_run(parent_run_id)
    return client.search_runs(
        [parent.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{ROLE}` = 'trial'",
        order_by=["attributes.start_time ASC"], max_results=50000,
    )



def read_front(tracking_uri: str, experiment_name: str,
               max_accuracy_drop: float | None = None) -> list[dict[str, Any]]:
    """The Pareto-optimal trials of the latest search, as logged in MLflow.

    Returns:
        One dict per front trial: ``run_id``, ``trial``, the metrics, ``summary`` and ``plan``,
        best accuracy first.
    """
    client = open_store(tracking_uri, must_exist=True)
    parent = latest_search(client, experiment_name)
    rows = []
    for run in read_trials(client, parent.info.run_id):
        if run.data.tags.get(PARETO) != "true" or run.info.status != "FINISHED":
            continue
        m = run.data.metrics
        if max_accuracy_drop is not None and m.get("accuracy_drop", 0.0) > max_accuracy_drop:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            plan = json.loads(Path(client.download_artifacts(run.info.run_id, "plan.json", tmp))
                              .read_text())
        rows.append({"run_id": run.info.run_id, "trial": run.info.run_name,
                     **{k: m[k] for k in logged_metrics(m)},  # with latency_<workload>_ms
                     "summary": run.data.tags.get(SUMMARY, ""), "plan": plan})
    return sorted(rows, key=lambda r: -r.get("accuracy", 0.0))
