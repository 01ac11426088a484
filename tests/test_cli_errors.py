"""Bad input at the command line: exit code 2, one line on stderr naming what is wrong, and
nothing written (no MLflow store or run, no Optuna study).

Every case runs ``autocompress.cli.main`` in-process on a fresh directory. Cases marked
``store`` start with an MLflow store that holds one empty experiment, to check that the error
adds neither experiments nor runs to it; the others start with no store, which must still
not exist afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnxruntime
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from autocompress import cli

ROOT = Path(__file__).resolve().parents[1]

GOOD = {
    "name": "tiny-bad-input",
    "task": "tests.models:tiny_task",
    "search_space": str(ROOT / "search_spaces" / "default.yaml"),
    "objectives": [{"metric": "accuracy"}, {"metric": "size_bytes"}],
    "search": {"trials": 2},
    "finetune": {"epochs": 1},
}


def _with(**changes) -> dict:
    exp = {**GOOD, **changes}
    return {k: v for k, v in exp.items() if v is not None}


@dataclass
class Case:
    """One bad input.

    Attributes:
        id: Test id.
        argv: Arguments after ``autocompress``; ``{exp}`` is the experiment file written from
            ``experiment`` (or ``text``), ``{uri}`` the tracking URI.
        expect: Fragments the error line must contain (file, key, value, what is allowed).
        experiment: The experiment as data, or None.
        text: The experiment file's raw text (for syntax errors), or None.
        store: Start with an MLflow store holding an empty experiment.
    """

    id: str
    argv: list[str]
    expect: list[str]
    experiment: dict | None = None
    text: str | None = None
    store: bool = False


SEARCH = ["search", "{exp}", "--tracking-uri", "{uri}"]
CASES = [
    Case("missing-experiment-file", ["search", "{dir}/nope.yaml", "--tracking-uri", "{uri}"],
         ["nope.yaml", "file not found"]),
    Case("yaml-syntax-error", SEARCH, ["exp.yaml", "invalid YAML at line 5, column 7"],
         text="name: x\ntask: digits\nsearch_space: s.yaml\nobjectives: [{metric: accuracy\n"
              "search: {trials: 2}\n"),
    Case("unknown-key", SEARCH, ["exp.yaml", "finetunee", "did you mean 'finetune'"],
         experiment=_with(finetune=None, finetunee={"epochs": 1})),
    Case("unknown-nested-key", SEARCH, ["exp.yaml", "search.trails", "did you mean 'trials'"],
         experiment=_with(search={"trails": 2})),
    Case("wrong-type", SEARCH, ["exp.yaml", "search.trials", "'two'", "an integer"],
         experiment=_with(search={"trials": "two"})),
    Case("knob-out-of-range", SEARCH, ["exp.yaml", "search_space.layers[0].knobs.sparsity", "1.5"],
         experiment=_with(search_space={"layers": [{"knobs": {"sparsity": {"low": 0.0,
                                                                           "high": 1.5}}}]})),
    Case("setting-out-of-range", SEARCH, ["exp.yaml", "finetune.lr", "-1"],
         experiment=_with(finetune={"epochs": 1, "lr": -1})),
    Case("unknown-metric", SEARCH, ["exp.yaml", "objectives[1].metric", "'latency'",
                                    "did you mean 'latency_ms'"],
         experiment=_with(objectives=[{"metric": "accuracy"}, {"metric": "latency"}])),
    Case("missing-search-space-file", SEARCH, ["exp.yaml", "search_space", "nope.yaml"],
         experiment=_with(search_space="nope.yaml")),
    Case("layer-pattern-matches-nothing", SEARCH,
         ["exp.yaml", "search_space.layers[0].match", "features", "net.0"],
         experiment=_with(search_space={"layers": [{"match": "re:^features\\.",
                                                    "knobs": {"bits": [4, 8]}}]})),
    Case("task-import-failure", SEARCH, ["exp.yaml", "task", "'nosuch.module'"],
         experiment=_with(task="nosuch.module:fn")),
    Case("task-function-missing", SEARCH, ["exp.yaml", "task", "'nosuch_fn'"],
         experiment=_with(task="tests.models:nosuch_fn")),
    Case("task-returns-wrong-type", SEARCH, ["exp.yaml", "task", "not_a_task", "dict",
                                             "autocompress.Task"],
         experiment=_with(task="tests.models:not_a_task")),
    Case("unknown-builtin-task", SEARCH, ["exp.yaml", "task", "'digitz'", "digits"],
         experiment=_with(task="digitz")),
    Case("trials-zero", [*SEARCH, "--trials", "0"], ["--trials", "0", ">= 1"], experiment=GOOD),
    Case("concurrency-not-a-number", [*SEARCH, "--concurrency", "x"], ["--concurrency", "'x'"],
         experiment=GOOD),
    Case("pareto-no-store", ["pareto", "nosuch", "--tracking-uri", "{uri}"],
         ["--tracking-uri", "mlflow.db"]),
    Case("pareto-unknown-experiment", ["pareto", "nosuch", "--tracking-uri", "{uri}"],
         ["'nosuch'", "other"], store=True),
    Case("resume-no-store", [*SEARCH, "--resume"], ["--resume", "'tiny-bad-input'"],
         experiment=GOOD),
    Case("resume-no-earlier-search", [*SEARCH, "--resume"], ["--resume", "'tiny-bad-input'"],
         experiment=GOOD, store=True),
    # Through Ray Client (ray://) the search runs on the cluster, which needs a tracking server.
    Case("ray-client-with-a-local-store", [*SEARCH, "--address", "ray://head:10001"],
         ["--tracking-uri", "sqlite:///", "runs on the cluster", "--tracking-uri http://"],
         experiment=GOOD),
    Case("ray-client-malformed-address", [*SEARCH, "--address", "ray://head",
                                          "--tracking-uri", "http://127.0.0.1:1"],
         ["--address", "'ray://head'", "ray://HOST:PORT"], experiment=GOOD),
    Case("ray-client-unreachable-address", [*SEARCH, "--address", "ray://127.0.0.1:1",
                                            "--tracking-uri", "http://127.0.0.1:1"],
         ["--address", "ray://127.0.0.1:1", "--ray-client-server-port"], experiment=GOOD),
    Case("malformed-address", [*SEARCH, "--address", "nonsense:::"],
         ["--address", "'nonsense:::'", "HOST:PORT"], experiment=GOOD),
    Case("unreachable-address", [*SEARCH, "--address", "127.0.0.1:1"],
         ["--address", "127.0.0.1:1", "ray start --head"], experiment=GOOD),
]
if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
    CASES.append(Case("cuda-target-without-cuda", SEARCH,
                      ["exp.yaml", "target.device", "'cuda'", "onnxruntime-gpu", "allowed here"],
                      experiment=_with(target={"device": "cuda"})))
if not torch.cuda.is_available():
    CASES.append(Case("trial-on-cuda-without-cuda",
                      ["trial", "--task", "tests.models:tiny_task", "--plan",
                       str(ROOT / "examples" / "digits_plan.json"), "--device", "cuda",
                       "--runtime", "torch"],
                      ["--device='cuda'", "no CUDA device", "allowed here"]))


def _run(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        return int(e.code or 0)


def _store_state(uri: str) -> tuple[set[str], int]:
    client = MlflowClient(uri)
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments]) if experiments else []
    return {e.name for e in experiments}, len(runs)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
        case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd) -> None:
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    exp = tmp_path / "exp.yaml"
    if case.text is not None:
        exp.write_text(case.text)
    elif case.experiment is not None:
        exp.write_text(yaml.safe_dump(case.experiment))
    before = None
    if case.store:
        MlflowClient(uri).create_experiment("other")
        before = _store_state(uri)
    capfd.readouterr()

    argv = [a.format(exp=exp, uri=uri, dir=tmp_path) for a in case.argv]
    code = _run(argv)
    out, err = capfd.readouterr()

    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("autocompress: error: ")
    for fragment in case.expect:
        assert fragment in lines[0]
    assert out == ""
    if case.store:
        assert _store_state(uri) == before, "the error wrote to MLflow"
    else:
        assert not db.exists(), "the error created an MLflow store"
    assert not (tmp_path / "optuna.db").exists()
    assert not (tmp_path / ".autocompress").exists()


def test_root_cause_is_the_innermost_exception_on_one_line() -> None:
    from autocompress._errors import root_cause, root_cause_of_text

    try:
        try:
            raise KeyError("bits")
        except KeyError as e:
            raise RuntimeError("trial failed\nsee above") from e
    except RuntimeError as e:
        assert root_cause(e) == "KeyError: 'bits'"
    try:
        try:
            raise KeyError("bits")
        except KeyError:
            raise ValueError("plan refused\nat layer conv") from None
    except ValueError as e:
        assert root_cause(e) == "ValueError: plan refused at layer conv"  # context suppressed
    ray_text = ("Failure # 1 (occurred at 2026-12-06_02-28-20)\n"
                "\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=1, ip=1.2.3.4, repr=f)\n"
                "  File \"x.py\", line 3, in f\n"
                "torch.OutOfMemoryError: out of memory\n\n"
                "The above exception was the direct cause of the following exception:\n\n"
                "ray.exceptions.RayTaskError(RuntimeError): ray::ImplicitFunc.train()\n"
                "RuntimeError: wrapped\n")
    assert root_cause_of_text(ray_text) == "torch.OutOfMemoryError: out of memory"
    assert root_cause_of_text("Failure # 1 (occurred at x)\nThe actor died unexpectedly\n") == \
        "The actor died unexpectedly"
