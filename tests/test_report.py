"""The HTML report, on a search logged by SearchTracker (no Ray, no training)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from autocompress import cli
from autocompress.deploy._report import write_report
from autocompress.tracking import SearchTracker

BASELINE = {"accuracy": 0.95, "size_bytes": 4000.0, "latency_ms": 1.0, "params": 1000,
            "macs": 5000}
PLANS = [  # (accuracy, size, latency, plan layers)
    (0.95, 2000.0, 1.0, {"fc1": {"bits": 8}, "fc2": {"bits": 8}}),
    (0.93, 800.0, 0.6, {"fc1": {"sparsity": 0.5, "structure": "channel", "bits": 4},
                        "fc2": {"rank": 0.25, "bits": None}}),
    (0.90, 1500.0, 0.9, {"fc1": {"sparsity": 0.2}}),  # dominated by the second
]


@pytest.fixture
def search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    monkeypatch.chdir(tmp_path)  # a SQLite store keeps its artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = {"task": "tests.models:tiny_task", "objectives": [{"metric": "accuracy", "mode": "max"},
                                                                {"metric": "size_bytes", "mode": "min"}],
              "target": {"runtime": "onnxruntime", "device": "cpu", "threads": 1, "batch_size": 1},
              "search": {"sampler": "nsga2", "trials": 3, "seed": 0}}
    tracker = SearchTracker.start(uri, "report-test", config, BASELINE,
                                  [("accuracy", "max"), ("size_bytes", "min")],
                                  facts={"cpu": "Test CPU", "torch": "2.x"}, echo=lambda _: None)
    for i, (acc, size, latency, layers) in enumerate(PLANS):
        out = tmp_path / f"t{i}"
        out.mkdir()
        (out / "plan.json").write_text(json.dumps({"version": 1, "layers": layers}))
        tracker.trial_started(f"t{i}", {})
        tracker.trial_finished(f"t{i}", {"accuracy": acc, "size_bytes": size, "latency_ms": latency,
                                         "compression_ratio": 4000 / size, "speedup": 1 / latency,
                                         "accuracy_drop": 0.95 - acc}, f"plan {i}", out)
    tracker.finish()
    return uri, tracker.parent_run_id


def test_report_has_plots_table_heatmaps_and_is_logged(search: tuple[str, str], tmp_path: Path) -> None:
    uri, parent_id = search
    path = write_report("report-test", uri, tmp_path / "out" / "r.html")
    page = path.read_text()
    assert page.count("plotly-graph-div") == 4  # the front, then 3 heat maps
    assert len(re.findall(r"plotly\.js v\d", page)) == 1  # plotly.js inlined, once
    assert "<script src=" not in page  # self-contained: nothing fetched to view it
    table = page[page.index("<table id=front-table>"):page.index("</table>")]
    assert table.count("<tr>") == 3  # header + the two front models
    assert "plan 1" in table and "plan 0" in table and "plan 2" not in table
    for title in ("weight sparsity", "weight bits", "kept rank"):
        assert f'"text":"{title}"' in page
    assert '"type":"heatmap"' in page and "0.50ch" in page and "fp32" in page and "full" in page
    assert "Test CPU" in page and "tests.models:tiny_task" in page
    client = MlflowClient(uri)
    assert "report.html" in {f.path for f in client.list_artifacts(parent_id)}


def test_report_command(search: tuple[str, str], tmp_path: Path, capsys) -> None:
    uri, _ = search
    out = tmp_path / "report.html"
    assert cli.main(["report", "report-test", "--out", str(out), "--tracking-uri", uri, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(out.resolve())
    assert cli.main(["report", "no-such-experiment", "--tracking-uri", uri]) == 2


def test_heat_map_columns_follow_model_order() -> None:
    from autocompress.deploy._report import _layer_order

    layers = {name: {} for name in ("classifier.1", "classifier.3", "features.0", "features.3")}
    warm_start = {"summary": "features.0: b8 | features.3: b8 | classifier.1: b8 | classifier.3: b8"}
    front = [{"summary": "features.3: s0.50 | classifier.1: b4", "plan": {"layers": layers}}]
    assert _layer_order(front, [warm_start]) == ["features.0", "features.3", "classifier.1",
                                                 "classifier.3"]
    # Without a summary that names every layer: what the summaries tell, then the rest by name.
    assert _layer_order(front, []) == ["features.3", "classifier.1", "classifier.3", "features.0"]
