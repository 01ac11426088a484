"""Search quality: search strategies compared at equal trial budgets.

Usage::

    export AUTOCOMPRESS_CACHE=/tmp/accache      # trained digits / mnist1d baselines, cached
    .venv/bin/python bench/search_quality.py            # digits + mnist1d, seeds 0 1 2, 32 trials
    .venv/bin/python bench/search_quality.py --quick    # smoke run: digits, seed 0, 8 trials, 1 epoch
    # options: --tasks digits mnist1d [minilm]  --trials N  --epochs E  --seeds 0 1 2
    #          --strategies uniform grid "random N" "random 2N" default  --concurrency C
    #          --max-drop D  --objectives accuracy size_bytes [latency_ms]  --random-constraint
    #          --skip-enumerable  --verbose  --out PATH
    # JSON goes to bench/search_quality.json (bench/search_quality-quick.json with --quick).

Strategies, each asked for ``--trials`` N compress -> fine-tune (``--epochs`` E) -> measure
trials, per task and per seed (the seed selects the task's trained baseline, the fine-tuning
seed and the sampler seed). A search with an accuracy constraint stops hopeless trials after
an epoch (PRUNED) and runs new ones in their place (up to 4N + 8 in all), so it may spend more
than N x E fine-tuning epochs: the tables give the epochs each run spent and its HV within the
first N x E of them.

- ``uniform``: the same recipe on every layer, each evaluated exactly like a search trial
  (:func:`autocompress.tune._trial.run_trial`, in a plain loop, no Ray). The recipe pool is
  the grid bits {8, 6, 4, 3, 2} x unstructured sparsity {0, 0.5, 0.75, 0.9} (20 recipes) plus
  12 more: channel pruning {25, 50, 75%} with 8-bit and with 4-bit weights (6), low-rank
  {0.5, 0.25} with 8-bit weights (2), and 8-bit weights with 8-bit activations (W8A8) at
  channel pruning {0, 25, 50, 75%} (4): 32 recipes. With N = 32 all of them run; with N < 32,
  N of them spread evenly over the pool sorted by compression ratio; with N > 32 the pool
  grows by the finer sparsities {0.25, 0.6, 0.8, 0.95} x the five bit-widths (52 recipes) and
  N are picked from it the same way (at most 52). A knob a layer refuses is left off on that
  layer (no channel pruning of the output layer, no 8-bit activations where a layer has no
  integer kernel), exactly as a search space leaves it out.
- ``grid``: the uniform recipes as the issue defines them, bits {8, 6, 4, 3, 2} x
  unstructured sparsity {0, 0.5, 0.75, 0.9} (20 recipes; with N > 20 also sparsities
  {0.25, 0.6, 0.8, 0.95}, 40, N of them picked as above), run as ``uniform`` is. A weaker
  baseline than ``uniform``: no channel pruning, no low rank.
- ``random N`` and ``random 2N``: ``ac.search(..., sampler="random", warm_start=False,
  constraints=None)`` on ``search_spaces/default.yaml`` with N and 2N trials: plain random
  sampling, no warm start, no constraint, hence no pruning and exactly N x E (2N x E) epochs.
  ``--random-constraint`` gives them the constraint (and the library's pruning) too. With the
  same seed the 2N search samples the N search's trials first (paired comparisons).
- ``default``: ``ac.search(...)`` with whatever sampler, first trials (warm start, seeding)
  and trial handling (pruning) the library defaults to at run time; nothing but the budget,
  seed and the settings below is given.

Every search: objectives ``--objectives`` (default accuracy and size_bytes),
``finetune={"epochs": E}`` (digits and mnist1d: ``lr`` 6e-3 with a 20% warm-up, see
``CNN_FINETUNE``; minilm: as ``experiments/minilm.yaml``),
``constraints={"max_accuracy_drop": D}`` (``--max-drop``, default
0.05; not for random, above), ``concurrency`` (default 1), a fresh temporary MLflow store
(SQLite) and a fresh latency cache per run, fast latency settings (1 thread, warm-up 2,
5..50 runs, 0.05 s budget).

Definitions (per task, strategy and seed; ``acc0`` = the baseline's accuracy as that run
measured it, a trial's drop = ``acc0 - accuracy``, ratio = baseline size / size):

- **hypervolume (HV)**: the area dominated by the finished trials in the plane
  (``min(accuracy, acc0)``, ``log2(compression ratio)``), both maximised, with reference point
  (``acc0 - D``, 0), divided by D. Equivalently: the mean, over accuracy-drop budgets d in
  (0, D], of the best log2 compression ratio among trials that lose at most d. In doublings:
  HV 3 means "8x smaller on average over the budgets up to D". Only trials losing less than
  D and smaller than the baseline count; accuracy above the baseline counts as no drop.
- **HV within N x E epochs**: the HV of the run's first trials (in the order they ran) whose
  fine-tuning epochs add up to at most N x E (a pruned trial costs the epochs it ran): the
  run at the compute of ``uniform`` and ``random N``.
- **HV ratio vs uniform / vs grid / vs random 2N**: this strategy's HV / theirs (all
  trials), per seed, then median.
- **trials (+pruned)**: finished trials (+ trials stopped early); **epochs**: fine-tuning
  epochs spent in all.
- **best compression <= 0.5 pt**: the largest compression ratio among trials that lose at most
  0.005 accuracy; **best speed-up <= 1 pt**: the largest baseline latency / latency among trials
  that lose at most 0.01 (latencies timed briefly on a shared CPU: treat +-20% as noise). The
  baseline itself counts (1.0x), so a run that finds nothing reports 1.0.
- **infeasible fine-tuned**: finished trials that lost more than D after fine-tuning for all E
  epochs (the compute a search spent on results it cannot report); trials the library stopped
  early are not among them (``pruned`` in the JSON).
- **wall s**: wall-clock seconds of the run: for a search all of ``ac.search`` (Ray start-up,
  baseline measurement, MLflow logging included), for ``uniform`` the baseline measurement and
  the loop. Trained baselines come from the cache (loaded before timing starts).
- Tables give the **median over seeds** of each quantity.

Enumerable-space check (digits, ``--skip-enumerable`` to skip): bits {2, 3, 4, 8} per layer on
the digits CNN's 5 layers, no fine-tuning. All 4^5 = 1024 plans are evaluated directly
(``apply`` + ``task.evaluate`` + ``measure.size_bytes``) to get the exhaustive front, then per
seed one ``ac.search`` with that space, ``finetune={"epochs": 0}``, objectives accuracy and
size_bytes and N trials, on the same (seed 0) baseline. Reported: the search's HV as a
fraction of the exhaustive front's, with the HV above and with a wide reference (accuracy 0,
i.e. the whole accuracy range); the issue's target is >= 97% within 32 trials.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("uniform", "grid", "random N", "random 2N", "default")
QUICK_DROP, SPEED_DROP = 0.005, 0.01  # "best compression <= 0.5 pt", "best speed-up <= 1 pt"
FAST_TARGET = {"threads": 1, "warmup": 2, "min_runs": 5, "max_runs": 50, "budget_s": 0.05}
ENUM_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class TaskSetup:
    """How one task is searched: its search space and its fine-tuning settings."""

    name: str
    space: Path
    finetune: dict[str, Any] = field(default_factory=dict)


# Fine-tuning of the two CNNs: the library default (lr 1e-3) under-trains them in 2 epochs.
# Uniform grid, seed 0, HV digits / mnist1d: lr 5e-4 4.44 / 2.91, 1e-3 4.61 / 3.13, 3e-3
# 5.74 / 3.10, 6e-3 5.75 / 3.33, 1e-2 5.66 / 3.21 (their baselines trained at 2e-3, 5e-3);
# 6e-3 costs mild plans 1-2 pt on digits, which a warm-up over the first 20% of the steps
# gives back (6e-3 + warm-up: 5.98 / 3.14, mnist1d within its noise).
CNN_FINETUNE = {"lr": 6e-3, "warmup": 0.2}

TASKS = {
    "digits": TaskSetup("digits", ROOT / "search_spaces" / "default.yaml", CNN_FINETUNE),
    "mnist1d": TaskSetup("mnist1d", ROOT / "search_spaces" / "default.yaml", CNN_FINETUNE),
    # As experiments/minilm.yaml: AdamW with warm-up, never end worse than compression alone.
    "minilm": TaskSetup("minilm", ROOT / "search_spaces" / "transformer.yaml",
                        {"lr": 3e-4, "optimizer": "adamw", "warmup": 0.1, "grad_clip": 1.0,
                         "keep_best": True}),
}


@dataclass(frozen=True)
class Settings:
    """What every run shares."""

    trials: int
    epochs: int
    seeds: tuple[int, ...]
    concurrency: int
    max_drop: float
    objectives: tuple[str, ...]
    verbose: bool
    workdir: Path
    random_constraint: bool = False


@dataclass
class Run:
    """One (task, strategy, seed): its trials as rows, its baseline and its wall time."""

    task: str
    strategy: str
    seed: int
    baseline: dict[str, float]
    rows: list[dict[str, Any]]
    wall_s: float
    quality: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "strategy": self.strategy, "seed": self.seed,
                "baseline": self.baseline, "wall_s": round(self.wall_s, 1),
                "quality": self.quality, "trials": self.rows}


def log(msg: str) -> None:
    """Progress, on stderr."""
    print(f"search_quality: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Quality of a set of trials


def hypervolume(rows: Iterable[dict[str, Any]], base_accuracy: float, max_drop: float,
                accuracy_ref: float | None = None) -> float:
    """Normalised HV of ``rows`` in (accuracy clipped at the baseline, log2 compression ratio).

    The reference point is (``base_accuracy - max_drop``, 0), or (``accuracy_ref``, 0) when
    given; the area is divided by the reference's distance to the baseline accuracy, so the
    result is the mean over accuracy-drop budgets of the best log2 ratio (module docstring).
    """
    from autocompress.tracking import hypervolume as hv

    ref = base_accuracy - max_drop if accuracy_ref is None else accuracy_ref
    points = [[min(r["accuracy"], base_accuracy), math.log2(r["compression_ratio"])]
              for r in rows if _finished(r)]
    if not points or base_accuracy <= ref:
        return 0.0
    return hv(points, ["max", "max"], reference=[ref, 0.0]) / (base_accuracy - ref)


def best_within(rows: Iterable[dict[str, Any]], key: str, drop: float) -> float:
    """The largest ``key`` among finished rows that lose at most ``drop``; 1.0 (the baseline)
    if none does."""
    values = [r[key] for r in rows if _finished(r) and r["accuracy_drop"] <= drop + 1e-12
              and r.get(key) is not None and math.isfinite(r[key])]
    return max([1.0, *values])


def quality(rows: list[dict[str, Any]], base_accuracy: float, max_drop: float, epochs: int,
            budget_trials: int) -> dict[str, Any]:
    """The per-run quantities of the module docstring (``budget_trials``: N)."""
    finished = [r for r in rows if _finished(r)]
    infeasible = [r for r in finished if r["accuracy_drop"] > max_drop + 1e-12]
    return {
        "hypervolume": hypervolume(rows, base_accuracy, max_drop),
        "hypervolume_equal_epochs": hypervolume(within_epochs(rows, budget_trials * epochs),
                                                base_accuracy, max_drop),
        "best_compression_0.5pt": best_within(rows, "compression_ratio", QUICK_DROP),
        "best_speedup_1pt": best_within(rows, "speedup", SPEED_DROP),
        "infeasible_finetuned": sum(r["epochs_done"] >= epochs for r in infeasible),
        "pruned": sum(r["status"] not in ("FINISHED", "FAILED") for r in rows),
        "finished_short": sum(r["epochs_done"] < epochs for r in finished),
        "finished": len(finished),
        "failed": sum(r["status"] == "FAILED" for r in rows),
        "epochs_spent": sum(r["epochs_done"] for r in rows),
        "trial_seconds": round(sum(r.get("trial_seconds") or 0.0 for r in rows), 1),
    }


def within_epochs(rows: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """The first trials (in the order they ran) whose fine-tuning epochs add up to at most
    ``budget``: the run as if stopped there. With no fine-tuning (budget 0) every trial."""
    if budget <= 0:
        return rows
    kept, spent = [], 0
    for r in rows:
        spent += r["epochs_done"]
        if spent > budget:
            break
        kept.append(r)
    return kept


def _finished(row: dict[str, Any]) -> bool:
    return row["status"] == "FINISHED" and row.get("accuracy") is not None \
        and not math.isnan(row["accuracy"])


def relative(metrics: dict[str, Any], baseline: dict[str, float]) -> dict[str, float]:
    """Drop, compression ratio and speed-up of ``metrics`` against ``baseline``."""
    return {"accuracy_drop": baseline["accuracy"] - metrics["accuracy"],
            "compression_ratio": baseline["size_bytes"] / metrics["size_bytes"],
            "speedup": baseline["latency_ms"] / metrics["latency_ms"]}


# --------------------------------------------------------------------------------------------
# Uniform recipes


def recipe_pool(n: int, grid_only: bool = False) -> list[dict[str, Any]]:
    """The uniform recipes (``LayerPlan`` keyword arguments) a budget of ``n`` picks from
    (``grid_only``: bits x unstructured sparsity alone, the ``grid`` strategy's)."""
    bits = (8, 6, 4, 3, 2)
    pool: list[dict[str, Any]] = [{"bits": b, "sparsity": s}
                                  for b in bits for s in (0.0, 0.5, 0.75, 0.9)]
    if grid_only:
        finer = [{"bits": b, "sparsity": s} for b in bits for s in (0.25, 0.6, 0.8, 0.95)]
        return pool + finer if n > len(pool) else pool
    pool += [{"bits": b, "sparsity": s, "structure": "channel"}
             for b in (8, 4) for s in (0.25, 0.5, 0.75)]
    pool += [{"bits": 8, "rank": r} for r in (0.5, 0.25)]
    pool += [{"bits": 8, "act_bits": 8, "sparsity": s, "structure": "channel"}
             for s in (0.0, 0.25, 0.5, 0.75)]
    if n > len(pool):
        pool += [{"bits": b, "sparsity": s} for b in bits for s in (0.25, 0.6, 0.8, 0.95)]
    return pool


def recipe_plan(recipe: dict[str, Any], layers: Sequence[Any]) -> Any:
    """The plan applying ``recipe`` to every used layer, minus the knobs a layer refuses."""
    from autocompress.compress._knobs import KNOB_TABLE, reconcile, why_refused
    from autocompress.compress._plan import LayerPlan, Plan

    plan = {}
    for layer in layers:
        if not getattr(layer, "used", True):
            continue
        knobs = {k: v for k, v in recipe.items() if why_refused(KNOB_TABLE[k], v, layer) is None}
        if knobs.get("structure", "unstructured") != recipe.get("structure", "unstructured"):
            knobs.pop("sparsity", None)  # no channel pruning here: no pruning, not another kind
        plan[layer.name] = LayerPlan(**reconcile(knobs))
    return Plan(plan)


def pick_recipes(task: Any, n: int, grid_only: bool = False) -> list[Any]:
    """``n`` uniform plans for ``task``: the whole pool, or ``n`` spread evenly over it sorted
    by compression ratio (sizes computed without fine-tuning)."""
    from autocompress.compress import apply
    from autocompress.compress._registry import describe_layers
    from autocompress.measure import size_bytes

    layers = describe_layers(task.model, task.example_inputs)
    plans = [recipe_plan(r, layers) for r in recipe_pool(n, grid_only)]
    if n >= len(plans):
        return plans
    sizes = [size_bytes(apply(task.model, p, task.example_inputs)) for p in plans]
    order = sorted(range(len(plans)), key=lambda i: -sizes[i])
    picks = sorted({round(i * (len(plans) - 1) / max(n - 1, 1)) for i in range(n)})
    return [plans[order[i]] for i in picks]


def run_uniform(setup: TaskSetup, seed: int, s: Settings, strategy: str = "uniform") -> Run:
    """Evaluates ``s.trials`` uniform recipes (of ``grid``'s pool for ``strategy`` "grid")
    like search trials, one after another."""
    import torch

    from autocompress.finetune import FinetuneConfig
    from autocompress.measure import Target, measure
    from autocompress.tasks import load_task
    from autocompress.tune._trial import run_trial

    torch.set_num_threads(1)  # as a search trial (cpus_per_trial 1)
    task = load_task(setup.name, seed=seed)
    plans = pick_recipes(task, s.trials, grid_only=strategy == "grid")
    config = FinetuneConfig(**{"epochs": s.epochs, **setup.finetune, "device": "cpu"})
    target = Target(**FAST_TARGET)
    fresh_latency_cache(s.workdir / f"{setup.name}-{strategy}-{seed}")
    start = time.perf_counter()
    base = measure(task.model, task, target)
    baseline = {"accuracy": base.accuracy, "size_bytes": base.size_bytes,
                "latency_ms": base.latency_ms}
    rows = []
    for i, plan in enumerate(plans):
        result = run_trial(task, plan, config, target, seed=seed)
        m = result.metrics.to_dict()
        rows.append({"trial": f"{strategy}-{i:03d}", "status": "FINISHED", **_kept(m),
                     **relative(m, baseline), "epochs_done": len(result.history),
                     "trial_seconds": result.seconds, "summary": plan.summary()})
        log(f"  {strategy} {i + 1}/{len(plans)}: {_row_line(rows[-1])}")
    return Run(setup.name, strategy, seed, baseline, rows, time.perf_counter() - start)


def _kept(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in ("accuracy", "size_bytes", "latency_ms") if k in metrics}


def _row_line(r: dict[str, Any]) -> str:
    return (f"accuracy {r['accuracy']:.4f} ({r['compression_ratio']:.1f}x smaller, "
            f"{r['speedup']:.2f}x faster) {r['summary']}")


# --------------------------------------------------------------------------------------------
# Searches through the public API


def fresh_latency_cache(directory: Path) -> None:
    """A new, empty latency cache in ``directory`` for the next run (no run reuses another's
    measurements, so wall times compare)."""
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["AUTOCOMPRESS_LATENCY_CACHE"] = str(directory / "latency.db")


_CONSTRAINED = object()


def run_search(task: Any, label: str, seed: int, s: Settings, *, space: Any, trials: int,
               epochs: int, objectives: Sequence[str], finetune: dict[str, Any] | None = None,
               constraints: Any = _CONSTRAINED, **settings: Any) -> tuple[Any, float, str]:
    """One ``ac.search`` in a directory of its own; returns (result, wall s, tracking URI).
    ``constraints`` default: ``max_accuracy_drop`` = ``s.max_drop``; None: no constraint."""
    import autocompress as ac

    name = getattr(task, "name", task)
    directory = s.workdir / f"{name}-{label.replace(' ', '')}-{seed}"
    fresh_latency_cache(directory)
    uri = f"sqlite:///{directory / 'mlflow.db'}"
    echo = (lambda msg: log(f"  [{label}] {msg}")) if s.verbose else (lambda msg: None)
    start = time.perf_counter()
    result = ac.search(task, space=space, objectives=list(objectives),
                       name=f"{name}-{label.replace(' ', '')}-s{seed}",
                       finetune={"epochs": epochs, **(finetune or {})}, target=FAST_TARGET,
                       constraints=({"max_accuracy_drop": s.max_drop}
                                    if constraints is _CONSTRAINED else constraints),
                       tracking_uri=uri,
                       echo=echo, trials=trials, seed=seed, concurrency=s.concurrency, **settings)
    return result, time.perf_counter() - start, uri


def search_rows(result: Any, uri: str) -> list[dict[str, Any]]:
    """The trials of a search as rows, with the fine-tuning epochs each one ran."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    rows = []
    for rec in result.trials.to_dict("records"):
        row = {k: _plain(v) for k, v in rec.items() if k not in ("run_id", "error")}
        # The metric after each fine-tuning epoch (step k: after epoch k).
        history = dict(sorted((m.step, m.value)
                              for m in client.get_metric_history(rec["run_id"], "accuracy")))
        row["history"] = [history[step] for step in sorted(history) if step > 0]
        if "epochs" in rec and rec["epochs"] == rec["epochs"]:
            row["epochs_done"] = int(rec["epochs"])
        else:
            row["epochs_done"] = max(history, default=0)
        rows.append(row)
    return rows


def _plain(value: Any) -> Any:
    """A pandas/numpy cell as a JSON-ready Python value (NaN as None)."""
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


def run_strategy(setup: TaskSetup, strategy: str, seed: int, s: Settings) -> Run:
    """One search strategy (not ``uniform``) on one task and seed."""
    settings: dict[str, Any] = {}
    trials = s.trials
    if strategy.startswith("random"):
        settings = {"sampler": "random", "warm_start": False}
        if not s.random_constraint:  # no constraint: nothing to prune, exactly N trials
            settings["constraints"] = None
        trials = 2 * s.trials if strategy == "random 2N" else s.trials
    result, wall, uri = run_search(setup.name, strategy, seed, s, space=str(setup.space),
                                   trials=trials, epochs=s.epochs, objectives=s.objectives,
                                   finetune=setup.finetune, **settings)
    rows = search_rows(result, uri)
    for r in rows:  # drop, ratio and speed-up against this run's baseline, as for uniform
        if _finished(r):
            r.update(relative(r, result.baseline))
    baseline = {k: float(result.baseline[k]) for k in ("accuracy", "size_bytes", "latency_ms")}
    return Run(setup.name, strategy, seed, baseline, rows, wall)


def run_one(setup: TaskSetup, strategy: str, seed: int, s: Settings) -> Run:
    """Runs one (task, strategy, seed) and computes its quality."""
    budget = 2 * s.trials if strategy == "random 2N" else s.trials
    log(f"{setup.name} / {strategy} / seed {seed}: {budget} trials, {s.epochs} epoch(s)")
    run = (run_uniform(setup, seed, s, strategy) if strategy in ("uniform", "grid")
           else run_strategy(setup, strategy, seed, s))
    run.quality = quality(run.rows, run.baseline["accuracy"], s.max_drop, s.epochs, s.trials)
    q = run.quality
    log(f"{setup.name} / {strategy} / seed {seed}: HV {q['hypervolume']:.3f} "
        f"({q['hypervolume_equal_epochs']:.3f} within {s.trials * s.epochs} epochs), "
        f"best {q['best_compression_0.5pt']:.1f}x at <=0.5pt, {q['best_speedup_1pt']:.2f}x "
        f"faster at <=1pt, {q['finished']} finished, {q['pruned']} pruned, "
        f"{q['infeasible_finetuned']} infeasible, {q['epochs_spent']} epochs, {run.wall_s:.0f} s")
    return run


# --------------------------------------------------------------------------------------------
# Summaries and tables


def summarize(runs: list[Run], task: str) -> list[dict[str, Any]]:
    """Per strategy of ``task``: medians over seeds (ratios per seed first, then median)."""
    by = {(r.strategy, r.seed): r for r in runs if r.task == task}
    seeds = sorted({seed for _, seed in by})
    out = []
    for strategy in STRATEGIES:
        mine = [by[(strategy, sd)] for sd in seeds if (strategy, sd) in by]
        if not mine:
            continue
        row: dict[str, Any] = {"strategy": strategy, "seeds": [r.seed for r in mine]}
        for key in ("finished", "pruned", "failed", "epochs_spent", "hypervolume",
                    "hypervolume_equal_epochs", "best_compression_0.5pt", "best_speedup_1pt",
                    "infeasible_finetuned"):
            row[key] = statistics.median(r.quality[key] for r in mine)
        row["wall_s"] = statistics.median(r.wall_s for r in mine)
        for other, key in (("uniform", "hv_ratio_vs_uniform"), ("grid", "hv_ratio_vs_grid"),
                           ("random 2N", "hv_ratio_vs_random_2N")):
            row[key] = _median_ratio(mine, [by.get((other, r.seed)) for r in mine])
        out.append(row)
    return out


def _median_ratio(mine: list[Run], others: list[Run | None]) -> float | None:
    ratios = [a.quality["hypervolume"] / b.quality["hypervolume"]
              for a, b in zip(mine, others, strict=True)
              if b is not None and b.quality["hypervolume"] > 0]
    return statistics.median(ratios) if ratios else None


def _ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def markdown_table(task: str, rows: list[dict[str, Any]], s: Settings) -> str:
    """The per-task table of the module docstring."""
    seeds = " ".join(str(x) for x in s.seeds)
    lines = [f"### {task} — N = {s.trials} trials (random 2N: {2 * s.trials}), {s.epochs} "
             f"fine-tuning epoch(s), max drop {s.max_drop:g}, objectives "
             f"{', '.join(s.objectives)}; medians over seeds {seeds}", "",
             "| strategy | trials (+pruned) | epochs | hypervolume (median) "
             f"| HV within {s.trials * s.epochs} epochs | HV ratio vs uniform "
             "| HV ratio vs grid | HV ratio vs random 2N | best compression ≤0.5pt "
             "| best speed-up ≤1pt | infeasible fine-tuned | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        pruned = f" (+{r['pruned']:g})" if r["pruned"] else ""
        lines.append(
            f"| {r['strategy']} | {r['finished']:g}{pruned} | {r['epochs_spent']:g} "
            f"| {r['hypervolume']:.3f} | {r['hypervolume_equal_epochs']:.3f} "
            f"| {_ratio(r['hv_ratio_vs_uniform'])} | {_ratio(r['hv_ratio_vs_grid'])} "
            f"| {_ratio(r['hv_ratio_vs_random_2N'])} "
            f"| {r['best_compression_0.5pt']:.1f}× | {r['best_speedup_1pt']:.2f}× "
            f"| {r['infeasible_finetuned']:g} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The enumerable space: bits {2, 3, 4, 8} per layer, no fine-tuning


def enumerate_bits(task: Any) -> tuple[list[dict[str, Any]], float]:
    """Every plan of ``ENUM_BITS`` per used layer, evaluated without fine-tuning; and the
    seconds it took."""
    import torch

    from autocompress.compress import apply
    from autocompress.compress._plan import LayerPlan, Plan
    from autocompress.compress._registry import describe_layers
    from autocompress.compress.quantize import calibrate
    from autocompress.measure import size_bytes

    torch.set_num_threads(1)
    names = [la.name for la in describe_layers(task.model, task.example_inputs)
             if getattr(la, "used", True)]
    start = time.perf_counter()
    rows = []
    for combo in itertools.product(ENUM_BITS, repeat=len(names)):
        plan = Plan({n: LayerPlan(bits=b) for n, b in zip(names, combo, strict=True)})
        model = apply(task.model, plan, task.example_inputs)
        calibrate(model, task.calibration_batches())  # as run_trial does
        rows.append({"summary": plan.summary(), "accuracy": task.evaluate(model),
                     "size_bytes": size_bytes(model), "status": "FINISHED"})
        if len(rows) % 256 == 0:
            log(f"  enumerated {len(rows)}/{len(ENUM_BITS) ** len(names)} plans")
    return rows, time.perf_counter() - start


def enumerable_check(s: Settings) -> dict[str, Any]:
    """Exhaustive front of the bits-only digits space against an N-trial search per seed."""
    from autocompress.measure import size_bytes
    from autocompress.tasks import load_task

    task = load_task("digits", seed=0)
    base = {"accuracy": task.evaluate(task.model), "size_bytes": size_bytes(task.model)}
    log(f"enumerable check: digits, bits {list(ENUM_BITS)} per layer, no fine-tuning")
    rows, enum_s = enumerate_bits(task)
    _with_ratio(rows, base)
    by_summary = {r["summary"]: r for r in rows}
    space = {"version": 1, "layers": [{"knobs": {"bits": list(ENUM_BITS)}}]}
    full, wide = _both_hv(rows, base["accuracy"], s.max_drop)
    out: dict[str, Any] = {"plans": len(rows), "enumerate_s": round(enum_s, 1),
                           "baseline": base, "hv_exhaustive": full, "hv_exhaustive_wide": wide,
                           "front": _front(rows, base["accuracy"]), "seeds": []}
    for seed in s.seeds:
        result, wall, _ = run_search(task, "enumerable", seed, s, space=space, trials=s.trials,
                                     epochs=0, objectives=("accuracy", "size_bytes"))
        found = [_plain_row(rec) for rec in result.trials.to_dict("records")]
        _with_ratio(found, base)
        hv, hv_wide = _both_hv(found, base["accuracy"], s.max_drop)
        mismatch = sum(abs(r["accuracy"] - by_summary[r["summary"]]["accuracy"]) > 1e-9
                       for r in found if _finished(r) and r["summary"] in by_summary)
        distinct = len({r["summary"] for r in found if _finished(r)})
        out["seeds"].append({"seed": seed, "trials": len(found), "distinct_plans": distinct,
                             "hv": hv, "hv_wide": hv_wide, "hv_fraction": hv / full if full else None,
                             "hv_fraction_wide": hv_wide / wide if wide else None,
                             "accuracy_mismatches": mismatch, "wall_s": round(wall, 1)})
        log(f"  enumerable search seed {seed}: {hv / full if full else 0:.1%} of the exhaustive "
            f"HV ({hv_wide / wide if wide else 0:.1%} wide), {distinct} distinct plans, {wall:.0f} s")
    return out


def _plain_row(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: _plain(rec.get(k)) for k in ("trial", "status", "accuracy", "size_bytes", "summary")}


def _with_ratio(rows: list[dict[str, Any]], base: dict[str, float]) -> None:
    for r in rows:
        if _finished(r):
            r["compression_ratio"] = base["size_bytes"] / r["size_bytes"]
            r["accuracy_drop"] = base["accuracy"] - r["accuracy"]


def _both_hv(rows: list[dict[str, Any]], base_accuracy: float,
             max_drop: float) -> tuple[float, float]:
    return (hypervolume(rows, base_accuracy, max_drop),
            hypervolume(rows, base_accuracy, max_drop, accuracy_ref=0.0))


def _front(rows: list[dict[str, Any]], base_accuracy: float) -> list[dict[str, Any]]:
    """The exhaustive (accuracy clipped at the baseline, size) front, best accuracy first."""
    from autocompress.tracking import non_dominated_mask

    values = [[min(r["accuracy"], base_accuracy), r["size_bytes"]] for r in rows]
    mask = non_dominated_mask(values, ["max", "min"])
    front = [r for r, on in zip(rows, mask, strict=True) if on]
    return sorted(front, key=lambda r: (-r["accuracy"], r["size_bytes"]))


def enumerable_table(check: dict[str, Any], s: Settings) -> str:
    """The enumerable check as markdown."""
    lines = [f"### Enumerable space — digits, bits {{2,3,4,8}} on each of its layers "
             f"({check['plans']} plans), no fine-tuning, {s.trials}-trial searches", "",
             f"Exhaustive front: HV {check['hv_exhaustive']:.3f} (wide: "
             f"{check['hv_exhaustive_wide']:.3f}), {len(check['front'])} plans, enumerated in "
             f"{check['enumerate_s']:.0f} s.", "",
             "| seed | trials | distinct plans | HV | fraction of exhaustive HV "
             "| fraction (wide reference) | wall s |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in check["seeds"]:
        lines.append(f"| {r['seed']} | {r['trials']} | {r['distinct_plans']} | {r['hv']:.3f} "
                     f"| {_pct(r['hv_fraction'])} | {_pct(r['hv_fraction_wide'])} "
                     f"| {r['wall_s']:.0f} |")
    fractions = [r["hv_fraction"] for r in check["seeds"] if r["hv_fraction"] is not None]
    if fractions:
        lines += ["", f"Median fraction: **{_pct(statistics.median(fractions))}** "
                      "(issue target: ≥ 97% within 32 trials)."]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1%}"


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: digits, seed 0, 8 trials, 1 epoch (flags given win)")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=None,
                   help="tasks (default: digits mnist1d; minilm on request)")
    p.add_argument("--trials", type=int, default=None, help="trial budget N (default 32)")
    p.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default 2)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2)")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES),
                   help="strategies to run (default: all)")
    p.add_argument("--concurrency", type=int, default=1, help="trials at a time (default 1)")
    p.add_argument("--max-drop", type=float, default=0.05,
                   help="constraints.max_accuracy_drop and the HV window (default 0.05)")
    p.add_argument("--objectives", nargs="+", default=["accuracy", "size_bytes"],
                   help="search objectives (default: accuracy size_bytes)")
    p.add_argument("--random-constraint", action="store_true",
                   help="give the random searches the accuracy constraint too (the library "
                        "then prunes and replaces their hopeless trials)")
    p.add_argument("--skip-enumerable", action="store_true", help="skip the enumerable check")
    p.add_argument("--verbose", action="store_true", help="the searches' own progress lines too")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default bench/search_quality.json; "
                        "bench/search_quality-quick.json with --quick)")
    args = p.parse_args(argv)
    quick = {"tasks": ["digits"], "trials": 8, "epochs": 1, "seeds": [0]}
    full = {"tasks": ["digits", "mnist1d"], "trials": 32, "epochs": 2, "seeds": [0, 1, 2]}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = ROOT / "bench" / ("search_quality-quick.json" if args.quick
                                     else "search_quality.json")
    if args.trials < 1 or args.epochs < 0 or args.concurrency < 1 or not 0 < args.max_drop < 1:
        p.error("--trials and --concurrency must be >= 1, --epochs >= 0, 0 < --max-drop < 1")
    return args


def run_all(args: argparse.Namespace, s: Settings) -> tuple[list[Run], list[dict[str, Any]]]:
    """Every (task, seed, strategy), baselines trained (or loaded) before any timing; and the
    runs that raised twice (a minute apart), which are reported and left out of the tables."""
    from autocompress.tasks import load_task

    runs, errors = [], []
    for name in args.tasks:
        for seed in s.seeds:
            load_task(name, seed=seed)  # trains and caches the baseline outside every timing
            for strategy in args.strategies:
                for attempt in (1, 2):
                    try:
                        runs.append(run_one(TASKS[name], strategy, seed, s))
                        break
                    except Exception as e:  # noqa: BLE001  (one broken run must not end the rest)
                        log(f"{name} / {strategy} / seed {seed} raised {type(e).__name__}: {e}")
                        if attempt == 2:
                            errors.append({"task": name, "strategy": strategy, "seed": seed,
                                           "error": f"{type(e).__name__}: {e}"})
                        else:
                            time.sleep(60)
    return runs, errors


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("AUTOCOMPRESS_CACHE", str(ROOT / ".autocompress" / "cache"))
    from autocompress.measure import machine_facts

    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    here = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="autocompress-search-quality-") as tmp:
        os.chdir(tmp)  # Ray Tune's files go here too
        s = Settings(args.trials, args.epochs, tuple(args.seeds), args.concurrency,
                     args.max_drop, tuple(args.objectives), args.verbose, Path(tmp),
                     args.random_constraint)
        try:
            runs, errors = run_all(args, s)
            check = None if args.skip_enumerable else enumerable_check(s)
        finally:
            os.chdir(here)
    summaries = {task: summarize(runs, task) for task in args.tasks}
    duration = time.perf_counter() - t0
    print(f"## Search quality at equal trial budgets\n\nmachine: {machine_facts()}, "
          f"{os.cpu_count()} logical CPUs; load average {os.getloadavg()[0]:.2f} at the end; "
          f"{duration / 60:.1f} min in all.\n")
    for task, rows in summaries.items():
        print(markdown_table(task, rows, s) + "\n")
    if check is not None:
        print(enumerable_table(check, s) + "\n")
    for e in errors:
        print(f"**{e['task']} / {e['strategy']} / seed {e['seed']} failed**: {e['error']}\n")
    write_json(args, s, started, duration, runs, summaries, check, errors)
    return 1 if errors else 0


def write_json(args: argparse.Namespace, s: Settings, started: dt.datetime, duration: float,
               runs: list[Run], summaries: dict[str, Any], check: dict[str, Any] | None,
               errors: list[dict[str, Any]]) -> None:
    """Everything, every trial included, to ``args.out``."""
    from autocompress.measure import machine_facts

    result = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date_utc": started.isoformat(timespec="seconds"),
        "duration_s": round(duration, 1),
        "machine": {**machine_facts(), "logical_cpus": os.cpu_count()},
        "load_average_end": list(os.getloadavg()),
        "settings": {"tasks": args.tasks, "strategies": args.strategies, "trials": s.trials,
                     "epochs": s.epochs, "seeds": list(s.seeds), "concurrency": s.concurrency,
                     "max_drop": s.max_drop, "objectives": list(s.objectives),
                     "random_constraint": s.random_constraint,
                     "target": FAST_TARGET, "quick": args.quick},
        "uniform_recipes": recipe_pool(s.trials),
        "summary": summaries,
        "enumerable": check,
        "errors": errors,
        "runs": [r.to_dict() for r in runs],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    log(f"wrote {args.out} ({duration:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
