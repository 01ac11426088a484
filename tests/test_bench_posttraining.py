"""Smoke tests of ``bench/posttraining.py`` on tiny models (the benchmark itself runs on
all-MiniLM-L6-v2 and the bench CNNs: ``make bench-posttraining``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from autocompress.compress import Calibration, describe_layers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import posttraining as pt  # noqa: E402

from tests.models import tiny_task  # noqa: E402


def test_cnn_rows_compare_each_quantizer_with_round_to_nearest() -> None:
    rows = pt.cnn_results(tiny_task(), bits_list=(3,), samples=64, draws=2)
    assert [r["quantizer"] for r in rows] == list(pt.QUANTIZERS)
    rtn = rows[0]
    assert rtn["error"] is None and rtn["verdict"] == "—" and len(rtn["accuracies"]) == 1
    assert rtn["loss_pt"] == pytest.approx(100 * (rtn["fp32"] - rtn["accuracy"]))
    for r in rows[1:]:  # a method not available yet is a row with its error, not a failure
        assert r["rtn_loss_pt"] == rtn["loss_pt"]
        if r["error"] is None:
            assert len(r["accuracies"]) == 2
            assert r["verdict"] == ("PASS" if r["loss_pt"] <= max(rtn["loss_pt"], 0) / 2 else "MISS")
        else:
            assert r["verdict"] == "n/a" and r["accuracy"] is None
    table = pt.cnn_table(rows)
    assert "| tiny | 3 |" in table and table.count("\n") == 2


def test_minilm_rows_follow_the_layers_refusals() -> None:
    from tests.real_models import tiny_bert

    model, x = tiny_bert()
    layers = describe_layers(model, x)
    specs = pt.minilm_specs(layers)
    assert [s.name for s in specs[:2]] == [pt.BASELINE, "ORT quantize_dynamic"]
    assert len({s.key for s in specs}) == len(specs) == 13
    linear = {la.name for la in layers if la.type == "Linear" and la.used}
    by_key = {s.key: s for s in specs}
    sparse = by_key["50% unstructured / wanda"].plan
    assert set(sparse.active()) == linear and sparse.layers[min(linear)].pruner == "wanda"
    assert by_key["2:4 (50%) / sparsegpt"].target == 0.98
    # hidden 32: group 128 does not divide any Linear's input width, so only embeddings are left
    gptq = by_key["4-bit weights, group 128 / GPTQ"].plan
    assert {la.type for la in layers if la.name in gptq.active()} == {"Embedding"}
    cut = by_key[f"{pt.STRUCTURED_RATIO:.0%} heads + FFN removed / reconstruction (sparsegpt)"]
    assert cut.timed and cut.target == 0.98
    assert sorted({n.split(".")[-1] for n in cut.plan.active()}) == ["dense", "query"]
    assert all(lp.structure == "channel" and lp.pruner == "sparsegpt" for lp in cut.plan.active().values())


def test_a_minilm_row_is_built_scored_and_tabled(tmp_path: Path) -> None:
    from tests.real_models import task_of, tiny_bert

    task = task_of(*tiny_bert(), n=8)
    by_key = {s.key: s for s in pt.minilm_specs(describe_layers(task.model, task.example_inputs))}
    specs = [by_key[pt.BASELINE], by_key["50% unstructured / magnitude"]]
    calibration = Calibration.from_task(task, 8)
    files: dict[str, Path] = {}
    rows = [pt.build_onnx(task, s, calibration, tmp_path, files) for s in specs]
    assert [r.error for r in rows] == [None, None] and len(files) == 2
    for row, spec in zip(rows, specs, strict=True):
        row.fidelity[12] = pt.fidelity(files[spec.key], task)
    assert rows[0].fidelity[12] == pytest.approx(1.0, abs=1e-5)
    assert rows[1].size_bytes < rows[0].size_bytes and rows[1].verdict == "—"
    rows[1].target = 0.99
    assert rows[1].verdict == ("PASS" if rows[1].fidelity[12] >= 0.99 else "MISS")
    result = {"seqs": [12], "rows": [{**vars(r), "verdict": r.verdict} for r in rows]}
    assert pt.minilm_table(result).count("\n") == 3
