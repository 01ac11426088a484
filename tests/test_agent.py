"""The remote device agent, run as a real subprocess on 127.0.0.1, and a search against it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token-for-tests"


def onnx_model(n_in: int = 8, n_out: int = 4, dims: tuple = ("N", 8)) -> bytes:
    """``relu(x @ W)`` with a dynamic batch dimension (``dims`` is the input's shape)."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((n_in, n_out))
                                .astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


class Agent:
    def __init__(self, tmp: Path, *extra: str) -> None:
        token_file = tmp / "token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "autocompress", "agent", "--host", "127.0.0.1", "--port", "0",
             "--token-file", str(token_file), "--quiet", *extra],
            stderr=subprocess.PIPE, text=True, cwd=ROOT)
        line = self.proc.stderr.readline()  # "autocompress agent listening on http://127.0.0.1:PORT ..."
        assert "listening on http://" in line, line
        self.url = line.split("listening on ", 1)[1].split()[0]
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep the pipe drained

    def call(self, path: str, body: bytes | None = None, token: str | None = TOKEN,
             scheme: str = "Bearer") -> tuple[int, dict]:
        headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
        req = urllib.request.Request(self.url + path, data=body, headers=headers,
                                     method="POST" if body is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    a = Agent(tmp_path_factory.mktemp("agent"))
    yield a
    a.stop()


@pytest.fixture(scope="module")
def tight_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """Small upload cap (2 KiB), short time-out, no queue."""
    a = Agent(tmp_path_factory.mktemp("tight"), "--max-upload-mb", str(2 / 1024), "--timeout-s", "0.5",
              "--queue", "0")
    yield a
    a.stop()


QUICK = "warmup=1&min_runs=5&max_runs=50&budget_s=0.05"


def test_agent_module_imports_without_torch() -> None:
    # (``autocompress.plan`` is imported by the package's ``__init__``; it is plain Python.)
    code = ("import sys, autocompress.agent as a\n"
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'mlflow', 'ray'))"
            " or (m.startswith('autocompress.') and m != 'autocompress._lazy'"
            " and m.partition('.')[2].partition('.')[0] != 'agent')]\n"
            "assert not bad, bad\n"
            f"r = a.measure({onnx_model()!r}, a.parse_settings({QUICK!r}), 30)\n"
            "assert r['latency_ms'] > 0\n"
            "assert 'torch' not in sys.modules and 'autocompress.measure.latency' not in sys.modules\n")
    subprocess.run([sys.executable, "-I", "-c", code], check=True, cwd=ROOT, timeout=120)


def test_info(agent: Agent) -> None:
    status, facts = agent.call("/info")
    assert status == 200
    assert {"cpu", "cores", "onnxruntime", "numpy", "python", "platform"} <= set(facts)
    assert facts["cores"] >= 1 and facts["cpu"]


def test_good_measurement(agent: Agent) -> None:
    status, r = agent.call(f"/measure?threads=2&batch_size=3&{QUICK}", onnx_model())
    assert status == 200, r
    assert 0 < r["latency_ms"] <= r["p90_ms"] and r["iqr_ms"] >= 0
    assert 5 <= r["runs"] <= 50 and (r["threads"], r["batch_size"]) == (2, 3)
    assert r["stopped"] in ("ci", "budget", "max_runs")


@pytest.mark.parametrize(("token", "scheme"), [(None, "Bearer"), ("wrong", "Bearer"), ("", "Bearer"),
                                               (TOKEN, "Basic"), (TOKEN + "x", "Bearer")])
def test_bad_token_is_401(agent: Agent, token: str | None, scheme: str) -> None:
    assert agent.call("/info", token=token, scheme=scheme)[0] == 401
    status, r = agent.call(f"/measure?{QUICK}", onnx_model(), token=token, scheme=scheme)
    assert status == 401 and "token" in r["error"]


@pytest.mark.parametrize("body", [b"\x00garbage" * 10, b"not an onnx model",
                                  b"\x80\x04\x95pickle-ish\x94."])
def test_garbage_bytes_are_400(agent: Agent, body: bytes) -> None:
    status, r = agent.call(f"/measure?{QUICK}", body)
    assert status == 400 and "ONNX" in r["error"]


@pytest.mark.parametrize(("query", "word"), [
    ("threads=0", "threads"), ("threads=abc", "threads"), ("threads=1.5", "threads"),
    ("batch_size=-1", "batch_size"), ("budget_s=1000", "budget_s"), ("budget_s=nan", "budget_s"),
    ("min_runs=10&max_runs=5", "max_runs"), ("colour=blue", "colour"), ("threads=1&threads=2", "twice"),
])
def test_bad_settings_are_400(agent: Agent, query: str, word: str) -> None:
    status, r = agent.call(f"/measure?{query}", onnx_model())
    assert status == 400 and word in r["error"]


def test_dynamic_non_batch_dim_is_400(agent: Agent) -> None:
    status, r = agent.call(f"/measure?{QUICK}", onnx_model(dims=("N", "M")))
    assert status == 400 and "fixed shape" in r["error"]


def test_unknown_path_is_404(agent: Agent) -> None:
    assert agent.call("/nope")[0] == 404


def test_queue_full_is_503(agent: Agent) -> None:
    """One measuring + 2 waiting are admitted; the rest of 6 simultaneous requests get 503."""
    statuses: list[int] = []
    slow = "warmup=0&min_runs=1&max_runs=100000&budget_s=0.4&rel_ci=0"
    body = onnx_model(256, 256, ("N", 256))
    barrier = threading.Barrier(6)

    def fire() -> None:
        barrier.wait()
        statuses.append(agent.call(f"/measure?batch_size=8&{slow}", body)[0])

    threads = [threading.Thread(target=fire) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(statuses) == [200, 200, 200, 503, 503, 503]


def test_oversize_upload_is_413(tight_agent: Agent) -> None:
    status, r = tight_agent.call(f"/measure?{QUICK}", b"\x00" * 5000)
    assert status == 413 and "limit" in r["error"]
    assert tight_agent.call(f"/measure?{QUICK}", onnx_model())[0] == 200  # small enough


def test_long_measurement_times_out_504(tight_agent: Agent) -> None:
    # A batch of 65536 rows, so that the 100000 runs asked for take far longer than the 0.5 s
    # time-out (100000 runs of one row could finish inside it: the test then raced the timer).
    status, r = tight_agent.call("/measure?batch_size=65536&warmup=0&min_runs=1&max_runs=100000"
                                 "&budget_s=5&rel_ci=0",
                                 onnx_model())
    assert status == 504 and "longer than" in r["error"]
    assert tight_agent.call(f"/measure?{QUICK}", onnx_model())[0] == 200


def test_agent_still_serves_after_bad_requests(agent: Agent, tight_agent: Agent) -> None:
    for a in (agent, tight_agent):
        assert a.proc.poll() is None
        assert a.call("/info")[0] == 200
        assert a.call(f"/measure?{QUICK}", onnx_model())[0] == 200


def test_bad_token_file_is_exit_2(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for path in (empty, tmp_path / "missing"):
        r = subprocess.run([sys.executable, "-m", "autocompress", "agent", "--token-file", str(path)],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert r.returncode == 2 and "--token-file" in r.stderr


@pytest.mark.slow
def test_search_against_the_agent(agent: Agent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    from autocompress import cli
    from autocompress.tracking import ROLE, read_trials

    exp = {
        "name": "agent-e2e",
        "task": "tests.models:tiny_task",
        "search_space": str(ROOT / "search_spaces" / "default.yaml"),
        "objectives": [{"metric": "accuracy", "mode": "max"}, {"metric": "latency_ms", "mode": "min"}],
        "target": {"device": "remote", "url": agent.url, "token_env": "AC_TEST_AGENT_TOKEN",
                   "runtime": "onnxruntime", "threads": 1, "batch_size": 1, "warmup": 2,
                   "min_runs": 5, "max_runs": 20, "budget_s": 0.05},
        "search": {"sampler": "nsga2", "trials": 2, "concurrency": 2, "seed": 0},
        "finetune": {"epochs": 1, "lr": 0.001, "distill": True},
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(exp))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("AC_TEST_AGENT_TOKEN", TOKEN)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cli.main(["search", str(path), "--tracking-uri", uri, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("agent-e2e")
    (parent,) = client.search_runs([experiment.experiment_id], f"tags.`{ROLE}` = 'search'")
    assert parent.info.run_id == out["parent_run_id"] and parent.info.status == "FINISHED"
    facts = agent.call("/info")[1]
    tags = parent.data.tags
    for key in ("cpu", "cores", "onnxruntime", "platform"):
        assert tags[f"autocompress.agent.{key}"] == str(facts[key])
    assert parent.data.metrics["baseline_latency_ms"] > 0
    trials = read_trials(client, parent.info.run_id)
    assert len(trials) == 2
    assert all(r.info.status == "FINISHED" and r.data.metrics["latency_ms"] > 0 for r in trials)


def test_remote_without_the_token_variable_is_a_clear_error(agent: Agent,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from autocompress.measure import Target, measure_latency
    from tests.models import MODELS

    monkeypatch.delenv("AC_TEST_MISSING_TOKEN", raising=False)
    spec = MODELS["mlp"]
    target = Target(device="remote", url=agent.url, token_env="AC_TEST_MISSING_TOKEN")
    with pytest.raises(RuntimeError, match="AC_TEST_MISSING_TOKEN"):
        measure_latency(spec.build(), spec.example_inputs(), target)


def test_remote_measure_latency(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    from autocompress.measure import Target, measure_latency
    from autocompress.measure.runtimes._remote import target_facts
    from tests.models import MODELS

    monkeypatch.setenv("AC_TEST_AGENT_TOKEN", TOKEN)
    spec = MODELS["mlp"]
    target = Target(device="remote", url=agent.url, token_env="AC_TEST_AGENT_TOKEN", warmup=1,
                    min_runs=3, max_runs=10, budget_s=0.05, batch_size=2)
    r = measure_latency(spec.build(), spec.example_inputs(), target)
    assert r.latency_ms > 0 and 3 <= r.runs <= 10 and r.device == "remote" and r.batch_size == 2
    facts = target_facts(target)
    assert r.cpu == facts["agent.cpu"] and r.runtime_version == facts["agent.onnxruntime"]
