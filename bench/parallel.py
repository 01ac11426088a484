"""Does running trials in parallel pay? Search throughput at 1 and K trials at a time, and
the per-trial overhead of Ray + MLflow against a bare loop of the same plans.

Usage::

    AUTOCOMPRESS_CACHE=/tmp/accache .venv/bin/python bench/parallel.py \
        [--task digits] [--trials 12] [--epochs 2] [--concurrency K] [--rounds 2] \
        [--out bench/parallel.json]

Per round, three runs of the same ``--trials`` plans, one after the other:

1. ``search, 1 at a time``: a real search (``run_search``; random sampler, seed 0, warm start
   off, no accuracy constraint, so nothing is pruned and the plans depend on the seed alone),
   ``concurrency: 1``;
2. ``search, K at a time``: the same search with ``concurrency: K`` (default: the cores this
   process may use); the plans are the same (checked);
3. ``bare loop``: the plans of run 1, read back from MLflow, run one after another in this
   process by :func:`autocompress.tune._trial.run_trial` (compress, calibrate, fine-tune,
   measure with the same target), without Ray, MLflow or the measurement service.

Throughput is trials per minute over the *trial phase* of a search: from the first trial's
MLflow run start to the last one's end (Ray start-up, the baseline measurement and the final
report are the same for any concurrency and are left out; they are reported as ``search s``).
The latency cache is off (``AUTOCOMPRESS_LATENCY_CACHE=off``): every trial is timed. Reported:
medians over rounds, the K-at-a-time / 1-at-a-time throughput ratio (the issue's target is
>= 0.85 K) and the overhead per trial of the search over the bare loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
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


def experiment_file(workdir: Path, task: str, trials: int, epochs: int, concurrency: int) -> Path:
    exp = yaml.safe_load((ROOT / "experiments" / f"{task}.yaml").read_text())
    exp.update(name=f"parallel-{concurrency}", search_space=str(ROOT / "search_spaces" / "default.yaml"))
    exp["search"] = {"sampler": "random", "trials": trials, "concurrency": concurrency, "seed": 0,
                     "warm_start": False}
    exp["finetune"].update(epochs=epochs)
    exp.pop("constraints", None)
    path = workdir / f"parallel-{concurrency}.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def one_search(workdir: Path, task: str, trials: int, epochs: int, concurrency: int) -> dict[str, Any]:
    from autocompress.config import load_experiment
    from autocompress.tracking import read_trials
    from autocompress.tune._driver import run_search

    uri = f"sqlite:///{workdir / f'mlflow-{concurrency}.db'}"
    start = time.perf_counter()
    result = run_search(load_experiment(experiment_file(workdir, task, trials, epochs, concurrency)),
                        tracking_uri=uri, echo=lambda msg: None)
    seconds = time.perf_counter() - start
    client = MlflowClient(uri)
    runs = [r for r in read_trials(client, result.parent_run_id) if r.info.status == "FINISHED"]
    span_s = (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000
    plans = {r.info.run_name: Path(client.download_artifacts(r.info.run_id, "plan.json",
                                                             str(workdir))).read_text()
             for r in runs}
    return {"trials": len(runs), "span_s": span_s, "search_s": seconds, "plans": plans,
            "trial_s": statistics.median(r.data.metrics["trial_seconds"] for r in runs)}


def bare_loop(task_name: str, plans: list[str], epochs: int) -> dict[str, Any]:
    """The plans run one after another here, as a search's trials run them, minus Ray,
    MLflow and the measurement service."""
    import torch

    from autocompress.compress._plan import Plan
    from autocompress.config import load_experiment
    from autocompress.tasks import load_task
    from autocompress.tune._trial import run_trial

    exp = load_experiment(ROOT / "experiments" / f"{task_name}.yaml")
    task = load_task(task_name)
    torch.set_num_threads(1)
    config = dataclasses.replace(exp.finetune, epochs=epochs, device="cpu")
    start = time.perf_counter()
    for text in plans:
        run_trial(task, Plan.from_json(text), config, exp.target, seed=0)
    return {"span_s": time.perf_counter() - start}


def markdown(rows: list[dict[str, Any]], k: int, trials: int) -> str:
    def med(key: str, label: str) -> float:
        return statistics.median(r[label][key] for r in rows)

    one, many, bare = (med("span_s", "1"), med("span_s", "k"), med("span_s", "bare"))
    per = {label: trials / span * 60 for label, span in (("1", one), ("k", many), ("bare", bare))}
    lines = ["| run | trial phase s | trials/min | trial s (median) | search s |",
             "|---|---|---|---|---|",
             f"| bare loop (no Ray, no MLflow) | {bare:.1f} | {per['bare']:.1f} | | |",
             f"| search, 1 at a time | {one:.1f} | {per['1']:.1f} | {med('trial_s', '1'):.2f} | "
             f"{med('search_s', '1'):.0f} |",
             f"| search, {k} at a time | {many:.1f} | {per['k']:.1f} | {med('trial_s', 'k'):.2f} | "
             f"{med('search_s', 'k'):.0f} |",
             "",
             f"throughput {k} at a time / 1 at a time: **{per['k'] / per['1']:.2f}x** "
             f"(target >= {0.85 * k:.2f}x); search overhead over the bare loop: "
             f"**{(one - bare) / trials:.2f} s per trial** ({(one / bare - 1):.0%})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="digits", choices=["digits", "mnist1d"])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--concurrency", type=int,
                    default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                    else os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "parallel.json"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ["AUTOCOMPRESS_LATENCY_CACHE"] = "off"
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # Ray Tune's and Optuna's files go here too
        for rnd in range(args.rounds):
            workdir = Path(tmp) / f"round-{rnd}"
            workdir.mkdir()
            row: dict[str, Any] = {}
            for label, k in (("1", 1), ("k", args.concurrency)):
                print(f"round {rnd + 1}: search, {k} at a time", file=sys.stderr, flush=True)
                (workdir / label).mkdir()
                row[label] = one_search(workdir / label, args.task, args.trials, args.epochs, k)
            if sorted(row["1"]["plans"].values()) != sorted(row["k"]["plans"].values()):
                print("warning: the two searches ran different plans", file=sys.stderr)
            print(f"round {rnd + 1}: bare loop", file=sys.stderr, flush=True)
            row["bare"] = bare_loop(args.task, list(row["1"]["plans"].values()), args.epochs)
            for label in ("1", "k"):
                row[label].pop("plans")
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(markdown(rows, args.concurrency, args.trials))
    Path(args.out).write_text(json.dumps({
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="minutes"), "task": args.task,
        "trials": args.trials, "epochs": args.epochs, "concurrency": args.concurrency,
        "load_average": os.getloadavg()[0], "rounds": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
