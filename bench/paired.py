"""Do the speed-ups a search logs hold up? Each front model's logged speed-up against an
independent side-by-side timing of the exported models, with and without another process
loading the machine during the search.

Usage::

    AUTOCOMPRESS_CACHE=/tmp/accache .venv/bin/python bench/paired.py \
        [--tasks digits minilm] [--trials 6] [--rounds 9] [--out bench/paired.json]

Per task (the digits CNN, all-MiniLM-L6-v2 at seq 32) and per condition (``quiet``: nothing
else runs; ``loaded``: a second process busy-loops on one core for 10 s of every 20 s while
the search runs), one search (``latency_ms`` and ``accuracy`` objectives, 1 trial at a time,
the latency cache off so every trial is timed), then, with the load stopped:

- every front model is exported (``autocompress export --format onnx``) and the baseline by
  the project's own ONNX export;
- the independent timing: plain ONNX Runtime sessions (the target's threads and session
  settings), round robin, ``--rounds`` rounds of 0.5 s per model, the order rotating; a model's
  speed-up is the median over rounds of baseline median / its median;
- the disagreement: logged / independent - 1, and the same for the speed-up the search would
  have logged before pairing (the baseline timed once at the start over the trial's own median,
  timed later: the tag ``autocompress.latency.measured_ms``);
- plans on both the quiet and the loaded search's front: their two logged speed-ups (two
  searches of one experiment under different machine states);
- the cost: wall time of a paired measurement of a front model against an unpaired one.

The issue's target: every front model within 5%. Printed as a table, written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import yaml
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
SEARCH = {"digits": {"trials": 6, "epochs": 1}, "minilm": {"trials": 4, "epochs": 0}}


def busy(period_s: float = 20.0, on_s: float = 10.0) -> None:
    """Loads one core for ``on_s`` of every ``period_s`` seconds, until killed."""
    start = time.monotonic()
    while True:
        if (time.monotonic() - start) % period_s < on_s:
            x = 0
            for i in range(100_000):
                x += i * i
        else:
            time.sleep(0.05)


def experiment(workdir: Path, task: str, trials: int, epochs: int, name: str) -> Path:
    exp = yaml.safe_load((ROOT / "experiments" / f"{task}.yaml").read_text())
    exp["search_space"] = str((ROOT / "experiments" / exp["search_space"]).resolve())
    exp.update(name=name, objectives=[{"metric": "accuracy", "mode": "max"},
                                      {"metric": "latency_ms", "mode": "min"}])
    exp["search"] = {"sampler": "mutation", "trials": trials, "concurrency": 1, "seed": 0}
    exp["finetune"]["epochs"] = epochs
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def side_by_side(models: dict[str, bytes], feed: dict[str, Any], threads: int, rounds: int,
                 seconds: float = 0.5) -> dict[str, list[float]]:
    """Per model, its median latency (ms) in each round; models timed one after the other
    within a round, the order rotating from round to round."""
    import onnxruntime as ort

    from autocompress.measure.runtimes._ort import has_activation_quant, session_options

    sessions = {n: ort.InferenceSession(m, session_options(threads, not has_activation_quant(m)),
                                        providers=["CPUExecutionProvider"])
                for n, m in models.items()}
    for s in sessions.values():
        for _ in range(10):
            s.run(None, feed)
    names = list(sessions)
    medians: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            times, end = [], time.perf_counter() + seconds
            while time.perf_counter() < end or len(times) < 3:
                t0 = time.perf_counter()
                sessions[n].run(None, feed)
                times.append((time.perf_counter() - t0) * 1e3)
            medians[n].append(statistics.median(times))
    return medians


def run(task: str, condition: str, trials: int, epochs: int, rounds: int,
        workdir: Path) -> list[dict[str, Any]]:
    from autocompress._inputs import to_numpy_feed
    from autocompress.config import load_experiment
    from autocompress.deploy import export_run
    from autocompress.onnxgraph import export_onnx
    from autocompress.tasks import load_task
    from autocompress.tune import run_search

    name = f"paired-{task}-{condition}"
    exp = load_experiment(experiment(workdir, task, trials, epochs, name))
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    load = mp.Process(target=busy, daemon=True) if condition == "loaded" else None
    if load:
        load.start()
    try:
        result = run_search(exp, tracking_uri=uri, echo=lambda m: print(f"  {m}", file=sys.stderr))
    finally:
        if load:
            load.kill()
    task_obj = load_task(task)
    models = {"baseline": export_onnx(task_obj.model, task_obj.example_inputs,
                                      workdir / f"{name}-baseline.onnx").read_bytes()}
    logged = {}
    for row in result.front.to_dict("records"):
        out = export_run(row["run_id"], "onnx", workdir / row["run_id"], uri)
        models[row["run_id"]] = Path(out["path"]).read_bytes()
        logged[row["run_id"]] = row
    medians = side_by_side(models, to_numpy_feed(task_obj.example_inputs), exp.target.threads,
                           rounds)
    cost = pairing_cost(task_obj, next(iter(logged)), uri, exp.target) if logged else None
    rows = []
    client = MlflowClient(uri)
    for run_id, row in logged.items():
        ratios = [b / c for b, c in zip(medians["baseline"], medians[run_id], strict=True)]
        independent = statistics.median(ratios)
        # What the search logged before pairing: the baseline timed once at the start over
        # the trial's own median timed later (the tag of the raw median in its window).
        measured = float(client.get_run(run_id).data.tags["autocompress.latency.measured_ms"])
        unpaired = result.baseline["latency_ms"] / measured
        rows.append({"task": task, "condition": condition, "run_id": run_id,
                     "summary": row.get("summary", ""), "logged_speedup": row["speedup"],
                     "independent_speedup": independent,
                     "disagreement": row["speedup"] / independent - 1,
                     "unpaired_speedup": unpaired,
                     "unpaired_disagreement": unpaired / independent - 1,
                     "baseline_ms_logged": result.baseline["latency_ms"],
                     "baseline_ms_now": statistics.median(medians["baseline"]),
                     "pairing_cost": cost})
    return rows


def pairing_cost(task: Any, run_id: str, uri: str, target: Any, repeats: int = 5) -> float:
    """Wall time of a paired measurement of front model ``run_id`` over an unpaired one (the
    protocol before pairing), minus 1: medians of ``repeats`` each, session set-up included,
    the baseline's session already loaded (as in the measurement service)."""
    from autocompress.deploy._rebuild import rebuild_from_run
    from autocompress.measure.latency import PairedMeasurer, measure_prepared, prepare

    model = rebuild_from_run(run_id, uri, task).model
    paired = PairedMeasurer(target)
    paired.set_reference(prepare(task.model, task.example_inputs, target), latency_ms=1.0)
    candidate = prepare(model, task.example_inputs, target)
    paired.measure(candidate, use_cache=False)  # the service's baseline has run before
    seconds: dict[str, list[float]] = {"paired": [], "unpaired": []}
    for _ in range(repeats):
        for kind in seconds:
            t0 = time.perf_counter()
            if kind == "paired":
                paired.measure(candidate, use_cache=False)
            else:
                measure_prepared(candidate, target, use_cache=False)
            seconds[kind].append(time.perf_counter() - t0)
    return statistics.median(seconds["paired"]) / statistics.median(seconds["unpaired"]) - 1


def agreement(rows: list[dict[str, Any]]) -> list[str]:
    """Per task, the plans on the front of both a quiet and a loaded search: how far apart
    their two logged speed-ups are (two searches of one experiment at different times)."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        by = {c: {r["summary"]: r["logged_speedup"] for r in rows
                  if r["task"] == task and r["condition"] == c} for c in ("quiet", "loaded")}
        common = sorted(set(by["quiet"]) & set(by["loaded"]))
        if common:
            gaps = [by["loaded"][p] / by["quiet"][p] - 1 for p in common]
            lines.append(f"{task}: {len(common)} plan(s) on both fronts; loaded / quiet logged "
                         f"speed-up {', '.join(f'{100 * g:+.1f}%' for g in gaps)}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(SEARCH))
    parser.add_argument("--conditions", nargs="+", default=["quiet", "loaded"])
    parser.add_argument("--trials", type=int, help="trials per search (default: per task)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", default=str(ROOT / "bench" / "paired.json"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ["AUTOCOMPRESS_LATENCY_CACHE"] = "off"  # every trial timed
    rows: list[dict[str, Any]] = []
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        for task in args.tasks:
            for condition in args.conditions:
                print(f"{task}, {condition}: searching", file=sys.stderr)
                rows += run(task, condition, args.trials or SEARCH[task]["trials"],
                            SEARCH[task]["epochs"], args.rounds, Path(tmp))
    print(f"\n{'task':8} {'condition':9} {'logged':>8} {'side by side':>13} {'disagree':>9} "
          f"{'unpaired':>9} {'disagree':>9}  plan")
    for r in rows:
        print(f"{r['task']:8} {r['condition']:9} {r['logged_speedup']:7.3f}x "
              f"{r['independent_speedup']:12.3f}x {100 * r['disagreement']:+8.1f}% "
              f"{r['unpaired_speedup']:8.3f}x {100 * r['unpaired_disagreement']:+8.1f}%  "
              f"{r['summary'][:50]}")
    worst = max((abs(r["disagreement"]) for r in rows), default=float("nan"))
    within = sum(abs(r["disagreement"]) <= 0.05 for r in rows)
    unpaired = max((abs(r["unpaired_disagreement"]) for r in rows), default=float("nan"))
    print(f"\nworst disagreement {100 * worst:.1f}% over {len(rows)} front models ({within} within "
          f"5%); unpaired, as before: {100 * unpaired:.1f}% ({(time.time() - start) / 60:.1f} min)")
    for line in agreement(rows):
        print(line)
    for task in args.tasks:
        costs = {r["pairing_cost"] for r in rows if r["task"] == task and r["pairing_cost"] is not None}
        if costs:
            shown = ", ".join(f"{100 * c:+.0f}%" for c in sorted(costs))
            print(f"{task}: time of a paired measurement against an unpaired one: {shown}")
    Path(args.out).write_text(json.dumps({"rows": rows, "worst": worst,
                                          "minutes": (time.time() - start) / 60}, indent=2))


if __name__ == "__main__":
    main()
