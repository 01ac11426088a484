"""A search on a real multi-node Ray cluster (three Ray nodes on this machine).

The head node has no CPU, so every trial runs on one of the two worker nodes (one CPU each);
two trials at a time must use both. The trials' artifacts reach MLflow through Ray: nothing
is checkpointed to the driver's ``storage_path``, which on a real cluster is a disk the
workers cannot see.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from autocompress.config import load_experiment
from autocompress.tracking import NODE, TRIAL_METRICS, read_trials
from autocompress.tune._driver import run_search
from tests.searches import write_experiment

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
TRIALS = 4


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch):
    """A head node with 0 CPUs and two worker nodes with 1 CPU each."""
    import ray
    import ray._common.utils
    import ray._private.utils
    from ray.cluster_utils import Cluster

    # Cluster() records its address in /tmp/ray/ray_current_cluster, where any ray.init() on
    # this machine would find and join it, and deletes that file on shutdown: keep out of it.
    monkeypatch.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
    monkeypatch.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_search_on_a_multi_node_cluster(cluster, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    ray_cluster, workers = cluster
    monkeypatch.chdir(tmp_path)
    path = write_experiment(tmp_path, "on-a-cluster", trials=TRIALS)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    result = run_search(load_experiment(path), tracking_uri=uri, address=ray_cluster.address)

    client = MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    trials = read_trials(client, result.parent_run_id)
    assert len(trials) == TRIALS
    nodes = set()
    for run in trials:
        assert run.info.status == "FINISHED", run.data.tags.get("autocompress.error")
        assert set(TRIAL_METRICS) <= set(run.data.metrics)
        nodes.add(run.data.tags[NODE].rpartition("/")[2])
        files = {f.path for f in client.list_artifacts(run.info.run_id)}
        assert {"plan.json", "model.pt", "metrics.json"} <= files
        local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / run.info.run_id)))
        plan = json.loads((local / "plan.json").read_text())
        assert plan["version"] == 1 and set(plan["layers"]) <= {"net.0", "net.2", "net.4", "net.6"}
        metrics = json.loads((local / "metrics.json").read_text())
        assert metrics["size_bytes"] == pytest.approx(run.data.metrics["size_bytes"])
        state = torch.load(io.BytesIO((local / "model.pt").read_bytes()), weights_only=True)
        assert any(k.startswith("net.") for k in state)

    assert nodes == {w.node_id for w in workers}, "trials ran on both worker nodes, not the head"
    checkpoints = list(Path(".autocompress/ray").rglob("checkpoint_*"))
    assert checkpoints == [], "artifacts must come back through Ray, not a shared disk"
