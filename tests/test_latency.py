"""Latency measurement: sane numbers on every local runtime (``tests/runtimes.py``: read from the
registry), the run-count protocol, Target checks.

Speed-ups are not asserted here (timings on a shared machine are noisy); that is what
``bench/latency.py`` is for.
"""

from __future__ import annotations

import math

import pytest
import torch

from autocompress.compress import apply
from autocompress.compress._plan import LayerPlan, Plan
from autocompress.measure import Target, machine_facts, measure_latency
from autocompress.measure._machine import library_version
from autocompress.measure.runtimes import get_runtime, runtime_names
from tests.models import MODELS
from tests.runtimes import CUDA_RUNTIMES, LOCAL_RUNTIMES, cuda_here

PLANS = {
    "fp32": {},
    "int8-weights": {"conv2": LayerPlan(bits=8), "head": LayerPlan(bits=8)},
    "int8-weights-and-acts": {"conv2": LayerPlan(bits=8, act_bits=8)},
    "pruned": {"conv1": LayerPlan(sparsity=0.5, structure="channel")},
}


def quick(**kw: object) -> Target:
    """A target that times only a few runs."""
    return Target(**{"warmup": 1, "min_runs": 3, "max_runs": 8, "budget_s": 0.05, **kw})


@pytest.mark.parametrize("runtime", LOCAL_RUNTIMES)
@pytest.mark.parametrize("plan", list(PLANS))
def test_latency_is_sane(runtime: str, plan: str) -> None:
    spec = MODELS["conv2d"]
    x = spec.example_inputs()
    model = apply(spec.build(), Plan(PLANS[plan]), x)
    target = quick(runtime=runtime)
    result = measure_latency(model, x, target)
    assert 0 < result.latency_ms <= result.p90_ms < 10_000
    assert result.iqr_ms >= 0 and math.isfinite(result.iqr_ms)
    assert target.min_runs <= result.runs <= target.max_runs
    assert (result.runtime, result.device, result.threads, result.batch_size) == (
        runtime, "cpu", 1, 1)
    assert set(result.to_dict()) == {"latency_ms", "p90_ms", "iqr_ms", "runs", "runtime",
                                     "device", "threads", "batch_size", "ci_low_ms", "ci_high_ms",
                                     "stopped", "runtime_version", "cpu", "cached", "gpu",
                                     "speedup", "reference_ms", "measured_ms", "drift", "slowdown",
                                     "retries", "measured_at", "graph", "fused_ops", "graph_note"}
    assert not result.paired and result.measured_at > 0  # timed alone, now
    assert result.cpu == machine_facts()["cpu"]
    facts = get_runtime(target).facts(target)
    library = get_runtime(target).library or runtime  # openvino's is not in machine_facts
    assert result.runtime_version == facts["runtime_version"] == library_version(library)


@pytest.mark.parametrize("runtime", LOCAL_RUNTIMES)
@pytest.mark.parametrize(("budget_s", "runs"), [
    pytest.param(1e-9, 3, id="budget-spent-stops-at-min-runs"),
    pytest.param(600.0, 8, id="budget-left-stops-at-max-runs"),
])
def test_run_count_follows_the_protocol(runtime: str, budget_s: float, runs: int) -> None:
    spec = MODELS["mlp"]
    result = measure_latency(spec.build(), spec.example_inputs(), quick(runtime=runtime,
                                                                        budget_s=budget_s, rel_ci=0))
    assert result.runs == runs


@pytest.mark.parametrize("runtime", LOCAL_RUNTIMES)
def test_batch_larger_than_the_example(runtime: str) -> None:
    spec = MODELS["mlp"]
    result = measure_latency(spec.build(), spec.example_inputs(batch=2),
                             quick(runtime=runtime, batch_size=5, threads=2))
    assert result.batch_size == 5 and result.threads == 2
    assert result.latency_ms > 0


@pytest.mark.parametrize("runtime", LOCAL_RUNTIMES)
def test_torch_threads_are_restored(runtime: str) -> None:
    spec = MODELS["mlp"]
    before = torch.get_num_threads()
    measure_latency(spec.build(), spec.example_inputs(), quick(runtime=runtime, threads=2))
    assert torch.get_num_threads() == before


# Why a runtime refuses CUDA here, where known; any runtime's message names the key and itself.
NO_CUDA_BECAUSE = {"onnxruntime": "no CUDAExecutionProvider", "torch": "torch sees no CUDA device"}


@pytest.mark.parametrize("runtime", CUDA_RUNTIMES)
def test_cuda_without_a_gpu_is_an_error(runtime: str) -> None:
    if cuda_here(runtime):
        pytest.skip("checks the no-GPU error")
    why = NO_CUDA_BECAUSE.get(runtime, "")
    spec = MODELS["mlp"]
    with pytest.raises(ValueError, match=f"target.device='cuda' with runtime {runtime}: .*{why}"):
        measure_latency(spec.build(), spec.example_inputs(), quick(device="cuda", runtime=runtime))


@pytest.mark.parametrize("runtime", CUDA_RUNTIMES)
def test_cuda_latency(runtime: str) -> None:
    """Runs only where a CUDA device (and, for onnxruntime, onnxruntime-gpu) exists."""
    if not cuda_here(runtime):
        pytest.skip(f"no CUDA for {runtime} on this machine")
    spec = MODELS["residual"]
    model = spec.build()
    result = measure_latency(model, spec.example_inputs(), quick(device="cuda", runtime=runtime),
                             use_cache=False)
    assert result.device == "cuda" and result.gpu == torch.cuda.get_device_name()
    assert 0 < result.latency_ms <= result.p90_ms < 1000
    assert result.runs >= quick().min_runs


@pytest.mark.parametrize(("field", "value", "allowed"), [
    ("device", "tpu", "['cpu', 'cuda', 'remote']"),
    ("runtime", "tflite", str(runtime_names())),
    ("threads", 0, "an integer >= 1"),
    ("threads", 1.5, "an integer >= 1"),
    ("threads", True, "an integer >= 1"),
    ("batch_size", -1, "an integer >= 1"),
    ("min_runs", 0, "an integer >= 1"),
    ("max_runs", "10", "an integer >= 1"),
    ("warmup", -1, "an integer >= 0"),
    ("warmup", True, "an integer >= 0"),
    ("budget_s", 0, "a number > 0"),
    ("budget_s", math.nan, "a number > 0"),
    ("budget_s", "1s", "a number > 0"),
    ("rel_ci", -0.1, "a number >= 0 and < 1"),
    ("rel_ci", 1, "a number >= 0 and < 1"),
    ("url", "http://h:1", "only with device: remote"),
    ("token_env", "TOKEN", "only with device: remote"),
])
def test_target_validation_names_the_field(field: str, value: object, allowed: str) -> None:
    with pytest.raises(ValueError) as err:
        Target(**{field: value})
    assert str(err.value) == f"target.{field}={value!r}; allowed: {allowed}"


def test_max_runs_below_min_runs() -> None:
    with pytest.raises(ValueError, match=r"target\.max_runs=5 < min_runs=30"):
        Target(max_runs=5)


def test_machine_facts() -> None:
    facts = machine_facts()
    assert set(facts) == {"cpu", "torch", "onnxruntime", "python"}
    assert facts["torch"] == torch.__version__ and all(facts.values())


@pytest.mark.parametrize(("kw", "message"), [
    ({}, "target.url=None; allowed: the agent's http://host:port (required with device: remote)"),
    ({"url": "ftp://h:1", "token_env": "T"}, "target.url='ftp://h:1'; allowed: the agent's "
     "http://host:port (required with device: remote)"),
    ({"url": "http://h:1"}, "target.token_env=None; allowed: the name of an environment variable "
     "holding the agent's token (required with device: remote)"),
    ({"url": "http://h:1", "token_env": "T", "runtime": "torch"},
     "target.runtime='torch'; allowed: ['onnxruntime'] with device: remote"),
])
def test_remote_target_validation(kw: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        Target(device="remote", **kw)
    assert str(err.value) == message


def test_remote_target_in_an_experiment_names_the_key(tmp_path) -> None:
    import yaml

    from autocompress.config import ConfigError, load_experiment

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    exp = {"name": "x", "task": "digits", "search_space": str(root / "search_spaces" / "default.yaml"),
           "objectives": ["accuracy"], "target": {"device": "remote", "token_env": "T"}}
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(exp))
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    assert err.value.key == "target.url"
    exp["target"]["url"] = "http://127.0.0.1:9"
    path.write_text(yaml.safe_dump(exp))
    target = load_experiment(path).target
    assert (target.device, target.url, target.token_env) == ("remote", "http://127.0.0.1:9", "T")
    assert {"url", "token_env"} <= set(target.to_dict())
    assert "url" not in Target().to_dict()  # local targets keep their logged form
