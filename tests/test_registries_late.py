"""Every registry is read at call time: an entry registered AFTER everything was imported is seen
by validation, the command line's choices and its help; a name is registered once (ValueError);
an unknown name gets the closest one ("did you mean") and the allowed ones."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

import autocompress
from autocompress import cli
from autocompress._registry import UnknownNameError
from autocompress.compress import METHODS, LayerPlan, Plan, PlanError, apply, list_methods, register_method
from autocompress.config import METRICS as OBJECTIVE_METRICS
from autocompress.config import SAMPLERS, ConfigError, Objective, SearchSettings
from autocompress.deploy import EXPORT_FORMATS, ExportFormat
from autocompress.measure import METRICS, MetricSpec, Target, get_metric, register_metric
from autocompress.measure.runtimes import RUNTIMES, get_runtime, register_runtime
from autocompress.tasks import TASKS, list_tasks, load_task, register_task
from autocompress.tracking import TRIAL_METRICS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _everything_imported() -> None:
    """Every module of the package (every built-in registered), before any late registration:
    nothing may have taken a snapshot of a registry's names."""
    for module in pkgutil.walk_packages(autocompress.__path__, "autocompress."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit):
        cli.main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.fixture
def late(request: pytest.FixtureRequest) -> Iterator[SimpleNamespace]:
    """Registers nothing itself; unregisters ``(registry, name)`` pairs added to ``.added``."""
    ns = SimpleNamespace(added=[])
    yield ns
    for registry, name in ns.added:
        registry.unregister(name)


# --- metrics -----------------------------------------------------------------------------------


def test_a_late_metric_is_an_objective_a_logged_metric_and_in_the_help(late, capsys) -> None:
    spec = MetricSpec("energy_mj", "min", "mJ", "trial", "Energy of one inference.", objective=True)
    register_metric(spec)
    late.added.append((METRICS, "energy_mj"))
    assert Objective("energy_mj").mode == "min"
    assert OBJECTIVE_METRICS["energy_mj"] == "min" and "energy_mj" in OBJECTIVE_METRICS
    assert "energy_mj" in TRIAL_METRICS and list(TRIAL_METRICS)[-1] == "energy_mj"
    assert "objectives: accuracy, size_bytes, latency_ms, params, macs, energy_mj" in _help(capsys)
    with pytest.raises(ValueError, match="metric 'energy_mj' is already registered"):
        register_metric(spec)


def test_a_late_plotted_metric_gets_its_plot(late, tmp_path: Path) -> None:
    import pandas as pd

    from autocompress.tracking import write_plots

    register_metric(MetricSpec("energy_mj", "min", "mJ", "trial", "Energy.", label="energy (mJ)",
                               objective=True, plotted=True))
    late.added.append((METRICS, "energy_mj"))
    trials = pd.DataFrame({"accuracy": [0.9, 0.8], "size_bytes": [10, 5], "latency_ms": [1.0, 0.5],
                           "energy_mj": [2.0, 1.0], "pareto": [True, True], "trial": ["a", "b"],
                           "summary": ["x", "y"]})
    paths = write_plots(trials, {"accuracy": 1.0, "energy_mj": 3.0}, tmp_path)
    assert tmp_path / "pareto_energy_mj.png" in paths
    assert "energy (mJ)" in (tmp_path / "pareto.html").read_text()


def test_an_unknown_metric_says_the_closest() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown metric 'acuracy' \(did you mean 'accuracy'\?\)"):
        get_metric("acuracy")
    with pytest.raises(ValueError, match=r"metric='acuracy' \(did you mean 'accuracy'\?\)"):
        Objective("acuracy")


# --- samplers ----------------------------------------------------------------------------------


def test_a_late_sampler_is_valid_listed_and_built(late, capsys) -> None:
    from autocompress.tune import make_sampler

    @SAMPLERS.register("grid_late")
    def _grid(settings, constraint):
        return ("grid", settings.seed)

    late.added.append((SAMPLERS, "grid_late"))
    settings = SearchSettings(sampler="grid_late", seed=3)
    assert make_sampler(settings, ["accuracy"], None, 1.0) == ("grid", 3)
    assert "grid_late" in _help(capsys) and "grid_late" in _help(capsys, "search")
    with pytest.raises(ValueError, match="sampler 'grid_late' is already registered"):
        SAMPLERS.register("grid_late", _grid)


def test_an_unknown_sampler_says_the_closest(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"sampler='nsga' \(did you mean 'nsga2'\?\)"):
        SearchSettings(sampler="nsga")
    with pytest.raises(UnknownNameError, match=r"search.sampler: unknown sampler 'tpee' "
                                                r"\(did you mean 'tpe'\?\)"):
        SAMPLERS.get("tpee", key="search.sampler")


# --- tasks -------------------------------------------------------------------------------------


def test_a_late_task_is_loaded_listed_and_in_the_help(late, capsys) -> None:
    @register_task("late_task")
    def _task(seed: int = 0):
        return ("late", seed)

    late.added.append((TASKS, "late_task"))
    assert "late_task" in list_tasks() and load_task("late_task", seed=2) == ("late", 2)
    for command in ("layers", "sensitivity", "trial"):
        assert "late_task" in _help(capsys, command), command
    assert "late_task" in _help(capsys)
    with pytest.raises(ValueError, match="task 'late_task' is already registered"):
        register_task("late_task")(_task)


def test_an_unknown_task_says_the_closest() -> None:
    with pytest.raises(ConfigError, match=r"task: unknown task 'digts' \(did you mean 'digits'\?\)"):
        load_task("digts")


# --- compression methods -----------------------------------------------------------------------


def test_a_late_method_runs_in_its_order(late) -> None:
    from tests.models import MODELS

    calls = []

    @register_method("late_method", order=25)
    def _late(model, plan, example_inputs) -> None:
        calls.append(type(model).__name__)

    late.added.append((METHODS, "late_method"))
    assert list_methods() == ["lowrank", "prune", "late_method", "quantize"]
    spec = MODELS["mlp"]
    apply(spec.build(), Plan({spec.first: LayerPlan(bits=8)}), spec.example_inputs(),
          methods=["late_method"])
    assert calls == ["MLP"]
    with pytest.raises(ValueError, match="compression method 'late_method' is already registered"):
        register_method("late_method", order=26)(_late)


def test_an_unknown_method_says_the_closest() -> None:
    from tests.models import MODELS

    spec = MODELS["mlp"]
    with pytest.raises(PlanError, match=r"unknown compression method 'prnue' \(did you mean 'prune'\?\)"):
        apply(spec.build(), Plan(), spec.example_inputs(), methods=["prnue"])


# --- runtimes ----------------------------------------------------------------------------------


class FakeRuntime:
    """A runtime registered late (only loaded, never run)."""


def test_a_late_runtime_is_a_valid_target_and_in_the_help(late, capsys) -> None:
    from autocompress.measure.runtimes import _table

    register_runtime("late_rt", ("cpu",), f"{__name__}:FakeRuntime")
    late.added.append((RUNTIMES, "late_rt"))
    target = Target(runtime="late_rt")
    try:
        assert isinstance(get_runtime(target), FakeRuntime)
    finally:
        _table._LOADED.pop(("late_rt", "cpu"), None)
    assert "late_rt" in _help(capsys, "trial") and "late_rt" in _help(capsys)
    with pytest.raises(ValueError, match=r"target.runtime='late_rt' with device: cuda"):
        get_runtime(Target(runtime="late_rt", device="cuda"))
    with pytest.raises(ValueError, match="runtime 'late_rt' is already registered"):
        register_runtime("late_rt", ("cuda",), f"{__name__}:FakeRuntime")


def test_an_unknown_runtime_says_the_closest(capsys) -> None:
    with pytest.raises(ValueError, match=r"target.runtime='onnxruntme' \(did you mean 'onnxruntime'\?\)"):
        Target(runtime="onnxruntme")
    assert cli.main(["trial", "--task", "digits", "--plan", "p.json", "--runtime", "troch"]) == 2
    assert "(did you mean 'torch'?)" in capsys.readouterr().err


# --- export formats ----------------------------------------------------------------------------


def test_a_late_export_format_is_a_choice_and_in_the_help(late, capsys) -> None:
    fmt = ExportFormat("late_fmt", "model.late", "torch", write=lambda r, p: None,
                       load=lambda p: None, save_mlflow=lambda *a: None)
    EXPORT_FORMATS.register("late_fmt", fmt)
    late.added.append((EXPORT_FORMATS, "late_fmt"))
    args = cli.build_parser().parse_args(["export", "RUN", "--format", "late_fmt", "--out", "d"])
    assert args.format == "late_fmt" and EXPORT_FORMATS.get("late_fmt") is fmt
    assert "late_fmt" in _help(capsys, "export") and "late_fmt" in _help(capsys)
    with pytest.raises(ValueError, match="export format 'late_fmt' is already registered"):
        EXPORT_FORMATS.register("late_fmt", fmt)


def test_an_unknown_export_format_says_the_closest_and_exits_2(capsys) -> None:
    with pytest.raises(SystemExit) as err:
        cli.main(["export", "RUN", "--format", "onx", "--out", "d"])
    assert err.value.code == 2
    assert ("unknown export format 'onx' (did you mean 'onnx'?); allowed: onnx, torchscript, packed"
            in capsys.readouterr().err)


# --- the command line stays light --------------------------------------------------------------


def test_help_lists_a_late_registration_without_importing_torch() -> None:
    code = ("import sys\n"
            "from autocompress.config import SAMPLERS\n"
            "SAMPLERS.register('late_sampler', lambda s, c: None)\n"
            "from autocompress import cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "for argv in (['export', '--help'], ['trial', '--help']):\n"
            "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "late_sampler" in " ".join(out.stdout.split())
