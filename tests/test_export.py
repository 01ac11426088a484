"""Rebuild and export: unit tests of the rebuild, then one small real search exported to every
format, each artifact checked in a fresh process with only its runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient

from autocompress import cli
from autocompress.compress import Calibration, apply, bake, float_weights, quantized_weights
from autocompress.compress._modules import ActFakeQuant, WeightCompression, quantize_weight
from autocompress.compress._plan import LayerPlan, Plan
from autocompress.deploy._export import VerificationError, export_run
from autocompress.deploy._rebuild import load_baked_state, rebuild_from_run
from autocompress.measure import size_bytes
from autocompress.onnxgraph import export_onnx
from autocompress.tracking import read_front
from tests.models import MODELS, ModelSpec, tiny_task

ROOT = Path(__file__).resolve().parents[1]


# --- rebuilding a trial's model from its plan and baked weights (fast) ---------------------

@settings(max_examples=80, deadline=None)
@given(bits=st.integers(2, 8), rows=st.integers(1, 6), cols=st.integers(1, 9),
       seed=st.integers(0, 2 ** 16), zero_row=st.booleans())
def test_requantizing_quantized_weights_is_idempotent(bits: int, rows: int, cols: int, seed: int,
                                                      zero_row: bool) -> None:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3
    if zero_row:
        w[0] = 0
    q, scale = quantize_weight(w, bits)
    q2, scale2 = quantize_weight(q * scale, bits)  # what a rebuilt model does with logged weights
    torch.testing.assert_close(q2, q, atol=0, rtol=0)
    torch.testing.assert_close(scale2, scale, atol=0, rtol=1e-6)


def _simulate_finetuning(model: torch.nn.Module) -> None:
    """Moves every weight, statistic and activation range, as fine-tuning would."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.dtype.is_floating_point and not name.endswith("running_var"):
                t.add_(torch.randn(t.shape, generator=gen) * 0.05)
        for mod in model.modules():
            if isinstance(mod, ActFakeQuant):
                mod.lo.fill_(-1.5)
                mod.hi.fill_(2.5)


REBUILD_PLANS = {
    # channel cut with reconstruction and whitened low-rank (tests/test_reconstruct.py)
    "reconstruct-whitened": {"first": {"sparsity": 0.5, "structure": "channel",
                                       "pruner": "sparsegpt", "bits": 4},
                             "second": {"sparsity": 0.6, "bits": 3, "rank": 0.5,
                                        "decomposition": "whitened"},
                             "output": {"sparsity": 0.3, "pruner": "wanda", "bits": 8,
                                        "quantizer": "gptq"}},
    "int": {"first": {"sparsity": 0.5, "structure": "channel", "bits": 4, "act_bits": 8},
            "second": {"sparsity": 0.6, "bits": 3, "rank": 0.5},
            "output": {"sparsity": 0.3}},
    # fp16 / bf16 weights and power-of-two levels (tests/test_formats.py goes through MLflow)
    "fp16-bf16-pow2": {"first": {"sparsity": 0.5, "structure": "channel", "bits": 4,
                                 "scheme": "pow2", "act_bits": 8},
                       "second": {"sparsity": 0.6, "bits": "bf16", "rank": 0.5},
                       "output": {"sparsity": 0.3, "bits": "fp16"}},
    # GPTQ on the example inputs; the rebuild loads its weights (group-wise: tests/test_gptq.py)
    "gptq": {"first": {"bits": 4, "quantizer": "gptq"},
             "second": {"sparsity": 0.6, "bits": 3, "rank": 0.5, "quantizer": "gptq"},
             "output": {"sparsity": 0.3, "bits": 4, "quantizer": "gptq"}},
    # calibrated pruners (tests/test_sparse.py): the rebuild passes no calibration data
    "sparsegpt-wanda-2:4": {"first": {"bits": 4},
                            "second": {"sparsity": 0.5, "pruner": "sparsegpt", "rank": 0.5,
                                       "bits": 3},
                            "output": {"sparsity": 0.5, "structure": "2:4", "pruner": "wanda",
                                       "bits": 8}},
    # AWQ / SmoothQuant input scales (an InputScale buffer per layer; tests/test_awq.py)
    "awq": {"first": {"sparsity": 0.5, "structure": "channel", "bits": 4, "act_bits": 8,
                      "quantizer": "awq"},
            "second": {"sparsity": 0.6, "bits": 3, "rank": 0.5, "quantizer": "awq"},
            "output": {"sparsity": 0.3, "bits": 4, "quantizer": "awq"}},
}


@pytest.mark.parametrize("layers", REBUILD_PLANS.values(), ids=list(REBUILD_PLANS))
@pytest.mark.parametrize("spec", MODELS.values(), ids=list(MODELS))
def test_baked_weights_load_back_into_the_plan_structure(spec: ModelSpec, layers: dict) -> None:
    baseline, x = spec.build(), spec.example_inputs(4)
    roles = {"first": spec.first, "second": spec.second, "output": spec.output}
    plan = Plan({roles[k]: LayerPlan(**v) for k, v in layers.items()})
    trial = apply(baseline, plan, x)
    _simulate_finetuning(trial)
    state = bake(trial).state_dict()

    rebuilt = apply(baseline, plan, x, calibration=Calibration.empty())  # as a rebuild does
    load_baked_state(rebuilt, state, plan)
    torch.testing.assert_close(rebuilt(x), trial(x), atol=1e-6, rtol=0)
    assert size_bytes(rebuilt) == size_bytes(trial)
    for name, (q, scale) in quantized_weights(trial).items():
        q2, scale2 = quantized_weights(rebuilt)[name]
        np.testing.assert_array_equal(q2, q)
        np.testing.assert_allclose(scale2, scale, rtol=1e-6)
    for name, (w, fmt) in float_weights(trial).items():
        w2, fmt2 = float_weights(rebuilt)[name]
        assert fmt2 == fmt
        np.testing.assert_array_equal(w2, w)
    # Masks: "weight != 0" only on layers the plan masked (unstructured); all-ones elsewhere.
    masked = {f"{spec.second}.0", f"{spec.second}.1", spec.output}
    for name, mod in rebuilt.named_modules():
        wc = next((p for p in getattr(getattr(mod, "parametrizations", None), "weight", [])
                   if isinstance(p, WeightCompression)), None)
        if wc is not None:
            expected = (mod.weight != 0) if name in masked else torch.ones_like(wc.mask)
            assert torch.equal(wc.mask, expected), name


def test_onnx_export_is_deterministic(tmp_path: Path) -> None:
    """measure_latency times ``export_onnx(model)``: the same bytes as the exported artifact."""
    spec = MODELS["conv2d"]
    model = apply(spec.build(), Plan({spec.first: LayerPlan(bits=4, rank=0.5)}), spec.example_inputs())
    a = export_onnx(model, spec.example_inputs(), tmp_path / "a.onnx").read_bytes()
    b = export_onnx(model, spec.example_inputs(), tmp_path / "b.onnx").read_bytes()
    assert a == b


# --- one small real search, exported (slow) ------------------------------------------------

@dataclass(frozen=True)
class Searched:
    root: Path
    uri: str
    front: list[dict]
    x: Path
    y: Path

    @property
    def best(self) -> dict:
        return self.front[0]

    @property
    def smallest(self) -> dict:
        """The most compressed front model (the best one is usually the 8-bit warm start)."""
        return min(self.front, key=lambda row: row["size_bytes"])


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> Searched:
    """A 3-trial search on ``tests.models:tiny_task`` (serial backend: what is tested is the
    export of its results; the Ray search is test_search_e2e's), and its validation data."""
    root = tmp_path_factory.mktemp("export-search")
    exp = {
        "name": "export-e2e", "task": "tests.models:tiny_task",
        "search_space": str(ROOT / "search_spaces" / "default.yaml"),
        "objectives": [{"metric": "accuracy", "mode": "max"}, {"metric": "size_bytes", "mode": "min"}],
        "target": {"runtime": "onnxruntime", "threads": 1, "batch_size": 1, "warmup": 2,
                   "min_runs": 5, "max_runs": 20, "budget_s": 0.05},
        "search": {"sampler": "nsga2", "trials": 3, "seed": 0, "backend": "serial"},
        "finetune": {"epochs": 1, "lr": 0.001, "distill": True},
        "constraints": {"max_accuracy_drop": 0.5},
    }
    (root / "exp.yaml").write_text(yaml.safe_dump(exp))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.syspath_prepend(str(ROOT))
        assert cli.main(["search", str(root / "exp.yaml"), "--tracking-uri", uri]) == 0
    x, y = tiny_task(train=False).val_loader.dataset.tensors
    np.save(root / "x.npy", x.numpy())
    np.save(root / "y.npy", y.numpy())
    front = read_front(uri, "export-e2e")
    assert front
    return Searched(root, uri, front, root / "x.npy", root / "y.npy")


# Each script runs in a fresh interpreter in isolated mode (-I: no cwd, no PYTHONPATH) and
# prints the top-1 accuracy of the artifact on the saved validation data.
_LOADERS = {
    "onnx": """
import onnxruntime as ort
session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
out = session.run(None, {session.get_inputs()[0].name: x})[0]
forbidden = ("torch", "autocompress")
""",
    "torchscript": """
import torch
out = torch.jit.load(path)(torch.from_numpy(x)).detach().numpy()
forbidden = ("autocompress",)
""",
    "packed": """
import torch, autocompress
out = autocompress.load_packed(path)(torch.from_numpy(x)).detach().numpy()
forbidden = ()
""",
}
_SCRIPT = """
import sys
import numpy as np
path, x, y = sys.argv[1], np.load(sys.argv[2]), np.load(sys.argv[3])
{load}
loaded = [m for m in forbidden if m in sys.modules]
assert not loaded, f"imported {{loaded}}"
print(float((out.argmax(axis=1) == y).mean()))
"""


def _accuracy_in_fresh_process(fmt: str, artifact: str, s: Searched) -> float:
    script = s.root / f"check_{fmt}.py"
    script.write_text(_SCRIPT.format(load=_LOADERS[fmt]))
    out = subprocess.run([sys.executable, "-I", str(script), artifact, str(s.x), str(s.y)],
                         capture_output=True, text=True, cwd=s.root, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "packed"])
def test_export_reproduces_the_logged_metric_in_a_fresh_process(searched: Searched, fmt: str,
                                                                 tmp_path: Path, capsys) -> None:
    run = searched.smallest
    out = tmp_path / "dist"
    assert cli.main(["export", run["run_id"], "--format", fmt, "--out", str(out),
                     "--tracking-uri", searched.uri, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((out / "export.json").read_text())
    assert printed == written
    artifact = Path(written["path"])
    assert artifact.parent == out.resolve() and artifact.name == {"onnx": "model.onnx",
                                                                  "torchscript": "model.pt",
                                                                  "packed": "model.acpk"}[fmt]
    assert sorted(p.name for p in out.iterdir()) == sorted([artifact.name, "export.json"])
    assert written["format"] == fmt and written["run_id"] == run["run_id"]
    assert written["plan"] == run["plan"]
    assert written["file_bytes"] == artifact.stat().st_size
    assert written["size_bytes"] == written["logged_size_bytes"] == run["size_bytes"]
    assert written["logged_accuracy"] == run["accuracy"]
    assert abs(written["accuracy"] - run["accuracy"]) <= written["tolerance"] == 0.005
    assert written["latency_ms"] > 0 and written["p90_ms"] >= written["latency_ms"]
    assert written["artifact_latency_ms"] > 0

    accuracy = _accuracy_in_fresh_process(fmt, str(artifact), searched)
    assert accuracy == pytest.approx(written["accuracy"], abs=1e-12)
    assert abs(accuracy - run["accuracy"]) <= 0.005
    if fmt == "packed":
        # The payload is size_bytes exactly; the rest is the architecture (the tiny MLP's few KiB
        # make it more than 5% here: test_packed checks the 5% on the digits CNN).
        assert 0 < written["file_bytes"] - written["size_bytes"] < 1024


@pytest.mark.slow
def test_rebuilt_model_is_the_trial_model(searched: Searched) -> None:
    for row in searched.front:
        rebuilt = rebuild_from_run(row["run_id"], searched.uri)
        assert rebuilt.task.evaluate(rebuilt.model) == row["accuracy"]
        assert size_bytes(rebuilt.model) == row["size_bytes"]
        assert rebuilt.plan.to_dict() == row["plan"]
        assert rebuilt.experiment["task"] == "tests.models:tiny_task"


@pytest.mark.slow
def test_register_creates_a_version_of_the_trial_run(searched: Searched, tmp_path: Path,
                                                     capsys) -> None:
    run = searched.best
    assert cli.main(["export", run["run_id"], "--format", "onnx", "--out", str(tmp_path / "onnx"),
                     "--register", "tiny-model", "--tracking-uri", searched.uri]) == 0
    printed = capsys.readouterr().out
    assert "re-measured" in printed and "logged" in printed
    assert "registered models:/tiny-model/1" in printed
    result = export_run(run["run_id"], "packed", tmp_path / "packed", searched.uri,
                        register="tiny-model")
    assert result["registered"]["version"] == 2

    client = MlflowClient(searched.uri)
    parent_id = client.get_run(run["run_id"]).data.tags["mlflow.parentRunId"]
    versions = sorted(client.search_model_versions("name='tiny-model'"), key=lambda v: int(v.version))
    assert [int(v.version) for v in versions] == [1, 2]
    for v, fmt in zip(versions, ("onnx", "packed"), strict=True):
        assert v.run_id == run["run_id"]  # the registry's source run is the trial
        assert v.tags["autocompress.source_run_id"] == run["run_id"]
        assert v.tags["autocompress.search_run_id"] == parent_id
        assert v.tags["autocompress.experiment"] == "export-e2e"
        assert v.tags["autocompress.format"] == fmt
        assert json.loads(v.tags["autocompress.plan"]) == run["plan"]
        assert float(v.tags["autocompress.accuracy"]) == pytest.approx(run["accuracy"], abs=0.005)
        assert run["run_id"] in v.description and "verified" in v.description

    trial = client.get_run(run["run_id"])
    assert result["registered"]["model_id"] in {o.model_id for o in trial.outputs.model_outputs}
    assert trial.info.status == "FINISHED"

    x = np.load(searched.x)

    def download(version: int) -> Path:
        location = client.get_model_version_download_uri("tiny-model", version)
        return Path(mlflow.artifacts.download_artifacts(location, dst_path=str(tmp_path / f"v{version}")))

    local = download(1)
    import onnxruntime as ort

    session = ort.InferenceSession(str(Path(local) / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x})[0]
    local = download(2)
    module = mlflow.pytorch.load_model(local)
    np.testing.assert_allclose(module(torch.from_numpy(x)).numpy(), onnx_out, atol=1e-4)
    assert (Path(local) / "extra_files" / "model.acpk").exists()


@pytest.mark.slow
def test_a_mismatch_is_an_error_and_leaves_nothing(searched: Searched, tmp_path: Path, capsys) -> None:
    out = tmp_path / "dist" / "onnx"
    run_id = searched.best["run_id"]
    assert cli.main(["export", run_id, "--format", "onnx", "--out", str(out), "--tolerance", "-1",
                     "--tracking-uri", searched.uri]) == 1
    assert "failed verification" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # not even the directories it would have made
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("not ours")
    with pytest.raises(VerificationError, match="tolerance"):
        export_run(run_id, "packed", out, searched.uri, tolerance=-1)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_bad_run_ids_are_bad_input(searched: Searched, tmp_path: Path, capsys) -> None:
    args = ["--format", "onnx", "--out", str(tmp_path), "--tracking-uri", searched.uri]
    assert cli.main(["export", "0123456789abcdef0123456789abcdef", *args]) == 2
    assert "0123456789abcdef0123456789abcdef" in capsys.readouterr().err
    assert cli.main(["export", "not-a-run", *args]) == 2
    parent_id = MlflowClient(searched.uri).get_run(searched.best["run_id"]).data.tags[
        "mlflow.parentRunId"]
    assert cli.main(["export", parent_id, *args]) == 2
    assert "parent run of a search" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["export", searched.best["run_id"], "--format", "tflite", "--out", str(tmp_path)])
    assert e.value.code == 2


@pytest.mark.slow
def test_report_of_the_real_search(searched: Searched, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    assert cli.main(["report", "export-e2e", "--out", str(out), "--tracking-uri", searched.uri]) == 0
    page = out.read_text()
    assert page.count("plotly-graph-div") == 4
    assert all(row["run_id"] in page for row in searched.front)


@pytest.mark.parametrize("build", ["two_inputs", "tokens_model", "tiny_gpt2"])
def test_the_verifier_runs_the_onnx_file_as_the_task_calls_its_model(build: str,
                                                                       tmp_path: Path) -> None:
    """Export verification evaluates the ONNX file with the task's own metric, which calls the
    model as ``model(x)``, ``model(*x)`` or ``model(**x)``: models with several inputs (a
    tuple, a dict of token ids and mask) must run too, giving the torch model's outputs, and
    so must the recorded largest output difference."""
    from autocompress._inputs import run
    from autocompress.deploy._artifacts import _OnnxModule
    from tests import real_models

    model, inputs = getattr(real_models, build)()
    path = export_onnx(model, inputs, tmp_path / "m.onnx", dynamic_sequence=isinstance(inputs, dict))
    with torch.no_grad():
        expected = _first_output(run(model, inputs))
    got = run(_OnnxModule(path), inputs)
    assert torch.allclose(got, expected, atol=1e-4)
    if isinstance(run(model, inputs), torch.Tensor):  # the recorded output difference too
        from types import SimpleNamespace

        from autocompress.deploy._export import _max_output_diff

        rebuilt = SimpleNamespace(model=model, task=SimpleNamespace(val_loader=[(inputs, None)]))
        assert _max_output_diff(_OnnxModule(path), rebuilt) < 1e-4


@pytest.mark.parametrize("build", ["two_inputs", "tokens_model", "tiny_gpt2"])
def test_torchscript_export_traces_every_input_form(build: str, tmp_path: Path) -> None:
    """A dict of inputs is traced as keyword arguments (as one positional argument the trace
    fails on a forward that takes them by name), and the loaded module runs as the task calls
    its model."""
    import warnings

    from autocompress._inputs import run, trace_arguments
    from tests import real_models

    model, inputs = getattr(real_models, build)()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, **trace_arguments(inputs))
    torch.jit.save(traced, str(tmp_path / "m.pt"))
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    with torch.no_grad():
        expected, got = run(model, inputs), run(loaded, inputs)
    assert torch.allclose(_first_output(got), _first_output(expected), atol=1e-5)


def _first_output(out: Any) -> torch.Tensor:
    """A model's output tensor, or the first of a tuple or dict of them."""
    return out if isinstance(out, torch.Tensor) else next(iter(
        out.values() if isinstance(out, dict) else out))
