"""The runtime contract, for every local runtime in the registry (``tests/runtimes.py``): it runs
what the eager model computes, describes itself, refuses what it cannot serve, and times the
trials of a real search. A newly registered runtime joins every test here with no edit.

The timing itself (positive latencies, the run-count protocol, threads, the cache key, pairing)
is checked per runtime in ``test_latency.py``, ``test_latency_cache.py`` and ``test_paired.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from autocompress._inputs import run
from autocompress.compress import LayerPlan, Plan, apply, bake
from autocompress.measure import Target
from autocompress.measure.latency import prepare
from autocompress.measure.runtimes import RUNTIMES, devices_of, get_runtime, runtime_names
from tests import real_models
from tests.models import MODELS
from tests.runtimes import LOCAL_RUNTIMES, first_output

ROOT = Path(__file__).resolve().parents[1]
QUICK = {"warmup": 1, "min_runs": 3, "max_runs": 8, "budget_s": 0.05}


def _models() -> dict:
    """``{id: (model, example_inputs)}``: one tensor, BatchNorm, int8 weights, several inputs."""
    conv = MODELS["conv2d"]
    x = conv.example_inputs()
    return {
        "conv2d": (conv.build(), x),
        "residual": (MODELS["residual"].build(), MODELS["residual"].example_inputs()),
        "conv2d-int8-weights": (apply(conv.build(), Plan({"conv2": LayerPlan(bits=8),
                                                          "head": LayerPlan(bits=8)}), x), x),
        "two-inputs": real_models.two_inputs(),
        "dict-inputs": real_models.tokens_model(),
    }


MODEL_IDS = list(_models())


@pytest.mark.parametrize("model_id", MODEL_IDS)
@pytest.mark.parametrize("runtime", LOCAL_RUNTIMES)
def test_the_runtime_computes_what_the_eager_model_computes(runtime: str, model_id: str) -> None:
    model, x = _models()[model_id]
    target = Target(runtime=runtime, batch_size=3, **QUICK)
    prepared = prepare(model, x, target)
    got = first_output(get_runtime(target).runner(prepared, target)())
    with torch.inference_mode():
        expected = first_output(run(bake(model), prepared.batch))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("runtime", LOCAL_RUNTIMES)
def test_the_runtime_describes_itself(runtime: str) -> None:
    target = Target(runtime=runtime)
    rt = get_runtime(target)
    assert rt.name == runtime and rt.artifact in ("onnx", "module")
    facts = rt.facts(target)
    assert facts["cpu"] and facts["runtime_version"]
    assert rt.cache_facts(target) and all(isinstance(v, str) for v in rt.cache_facts(target).values())
    why = rt.integer_kernels(target)
    assert why is None or (isinstance(why, str) and why)
    rt.check(target)  # every local runtime runs on this machine's CPU


@pytest.mark.parametrize("runtime", LOCAL_RUNTIMES)
def test_a_device_the_runtime_does_not_serve_is_refused(runtime: str) -> None:
    if "remote" not in devices_of(runtime):
        allowed = [name for name in runtime_names() if "remote" in devices_of(name)]
        with pytest.raises(ValueError) as err:
            Target(device="remote", runtime=runtime, url="http://h:1", token_env="T")
        assert str(err.value) == f"target.runtime={runtime!r}; allowed: {allowed} with device: remote"
    served = RUNTIMES.get(runtime).devices
    assert "cpu" in served and set(served) <= {"cpu", "cuda", "remote"}


def test_torchscript_times_a_frozen_graph() -> None:
    """What the ``torchscript`` runtime times: the traced module, frozen (no parameters left:
    weights are constants, BatchNorm folded into the convolutions)."""
    from autocompress.measure.runtimes._torchscript import script

    spec = MODELS["residual"]
    x = spec.example_inputs()
    scripted = script(bake(spec.build()), x)
    assert isinstance(scripted, torch.jit.ScriptModule)
    assert not list(scripted.parameters())
    assert "batch_norm" not in str(scripted.graph)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", [r for r in LOCAL_RUNTIMES if r != Target().runtime])
def test_a_search_measures_on_the_runtime(runtime: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A tiny real search with ``target: {runtime: ...}`` and a latency objective, on the serial
    backend (the default runtime's search on Ray is test_search_e2e's)."""
    from autocompress import cli
    from tests.searches import FAST_TARGET, logged_search, write_experiment

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("AUTOCOMPRESS_LATENCY_CACHE", str(tmp_path / "latency_cache.db"))
    name = f"runtime-{runtime}"
    path = write_experiment(tmp_path, name, trials=2, concurrency=1, backend="serial",
                            objectives=[{"metric": "accuracy"}, {"metric": "latency_ms"}],
                            target={**FAST_TARGET, "runtime": runtime})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cli.main(["search", str(path), "--tracking-uri", uri, "--json"]) == 0
    json.loads(capsys.readouterr().out)
    _, parent, trials = logged_search(uri, name)
    assert parent.data.metrics["baseline_latency_ms"] > 0
    assert len(trials) == 2
    for trial in trials:
        assert trial.info.status == "FINISHED" and trial.data.metrics["latency_ms"] > 0
        assert trial.data.tags["autocompress.latency.runtime"] == runtime
