"""Latency measured while trials train: the isolated measurement service vs a shared core.

Usage::

    AUTOCOMPRESS_CACHE=/tmp/accache .venv/bin/python bench/isolation.py \
        [--rounds N] [--load-trials N] [--budget-s S] [--out bench/isolation.json]

Models: the ``digits`` and ``mnist1d`` task baselines and the residual CNN of
``bench/latency.py`` (batch 1, one thread, ONNX Runtime). Each is prepared once
(``autocompress.measure.latency.prepare``) and timed with the latency cache off.

Conditions, all in one Ray instance laid out as a search on this machine lays it out (Ray
CPUs = cores + 1; the service reserves one):

- ``isolated, idle``: the search's measurement service (``autocompress.measure.service``,
  pinned to the reserved core), nothing else running;
- ``isolated, N training``: the same service while N "trials" train, each a Ray actor that
  keeps off the reserved core (as search trials do) and trains the residual CNN on random
  3x32x32 batches of 32 (SGD, one thread) until stopped;
- ``shared, idle``: a plain Ray actor that measures unpinned, as a trial measuring itself did
  before the service existed;
- ``shared, N training``: that actor while N trainers run unpinned.

Every round runs the four conditions in this order and times each model once per condition.
Reported per model and condition: the median over rounds of the per-round median latency and
the min-max of the round medians; the ratio *N training / idle* (1.00 = unaffected by the
training). Trainer throughput (steps/s) is printed too, to show the training really ran.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import ResNetSmall, load_models  # noqa: E402  (bench/latency.py)

from autocompress.measure import Target, machine_facts  # noqa: E402
from autocompress.measure.latency import Prepared, measure_prepared, prepare  # noqa: E402
from autocompress.measure.service import Reservation, keep_off, start_service  # noqa: E402

CONDITIONS = ("isolated, idle", "isolated, training", "shared, idle", "shared, training")


class Trainer:
    """A stand-in for a search trial: trains a residual CNN until stopped (Ray actor)."""

    def __init__(self, reserved: Reservation | None) -> None:
        keep_off(reserved)  # None: runs wherever the OS puts it
        torch.set_num_threads(1)
        self.steps = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self.steps = 0
        self._thread = threading.Thread(target=self._train, daemon=True)
        self._thread.start()

    def _train(self) -> None:
        model = ResNetSmall()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
        while not self._stop.is_set():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            self.steps += 1

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.steps

    def affinity(self) -> list[int]:
        return sorted(os.sched_getaffinity(0))


class SharedMeasurer:
    """Measures in an unpinned worker process, as trials used to (Ray actor)."""

    def __init__(self, target: Target) -> None:
        torch.set_num_threads(target.threads)
        self.target = target

    def measure(self, prepared: Prepared, use_cache: bool = False) -> Any:
        return measure_prepared(prepared, self.target, use_cache)


def run(rounds: int, load_trials: int, target: Target) -> dict[str, Any]:
    import ray

    cores = len(os.sched_getaffinity(0))
    ray.init(num_cpus=cores + 1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})
    try:
        service, reserved = start_service(target)
        keep_off(reserved)  # the driver too, as in a search
        shared = ray.remote(num_cpus=0)(SharedMeasurer).remote(target)
        models = load_models()
        prepared = {name: prepare(model, inputs, target) for name, (model, inputs, _) in models.items()}
        medians: dict[str, dict[str, list[float]]] = {m: {c: [] for c in CONDITIONS} for m in prepared}
        steps: dict[str, list[float]] = {"isolated, training": [], "shared, training": []}
        trainer_cls = ray.remote(num_cpus=0)(Trainer)
        for r in range(rounds):
            for condition in CONDITIONS:
                isolated = condition.startswith("isolated")
                trainers = []
                if condition.endswith("training"):
                    trainers = [trainer_cls.remote(reserved if isolated else None)
                                for _ in range(load_trials)]
                    ray.get([t.start.remote() for t in trainers])
                    time.sleep(1.0)  # let training reach its steady state
                started = time.perf_counter()
                for name, p in prepared.items():
                    measurer = service if isolated else shared
                    result = ray.get(measurer.measure.remote(p, use_cache=False))
                    medians[name][condition].append(result.latency_ms)
                if trainers:
                    seconds = time.perf_counter() - started
                    done = ray.get([t.stop.remote() for t in trainers])
                    steps[condition].append(sum(done) / (seconds + 1.0))
                    for t in trainers:
                        ray.kill(t)
            print(f"round {r + 1}/{rounds}: " + ", ".join(
                f"{name} {statistics.median(v['isolated, idle']):.4f}/"
                f"{statistics.median(v['isolated, training']):.4f} ms" for name, v in medians.items()),
                file=sys.stderr, flush=True)
        service_info = ray.get(service.info.remote())
    finally:
        ray.shutdown()
    return {"medians": medians, "trainer_steps_per_s": steps, "service": service_info,
            "reserved_core": reserved.core, "cores": cores}


def summarize(raw: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, by_condition in raw["medians"].items():
        row: dict[str, Any] = {"model": name}
        for condition, values in by_condition.items():
            row[condition] = {"median_ms": statistics.median(values), "min_ms": min(values),
                              "max_ms": max(values)}
        for kind in ("isolated", "shared"):
            row[f"{kind} ratio"] = (row[f"{kind}, training"]["median_ms"]
                                    / row[f"{kind}, idle"]["median_ms"])
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], load_trials: int) -> str:
    head = ("| model | isolated, idle | isolated, %d training | ratio | shared, idle | "
            "shared, %d training | ratio |" % (load_trials, load_trials))
    lines = [head, "|---|---|---|---|---|---|---|"]

    def cell(c: dict[str, float]) -> str:
        return f"{c['median_ms']:.4f} ms ({c['min_ms']:.4f}–{c['max_ms']:.4f})"

    for row in rows:
        lines.append(f"| {row['model']} | {cell(row['isolated, idle'])} | "
                     f"{cell(row['isolated, training'])} | **{row['isolated ratio']:.3f}** | "
                     f"{cell(row['shared, idle'])} | {cell(row['shared, training'])} | "
                     f"{row['shared ratio']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the four conditions (default 5)")
    ap.add_argument("--load-trials", type=int, default=2, help="training trials under load (default 2)")
    ap.add_argument("--budget-s", type=float, default=1.0, help="timing budget per measurement")
    ap.add_argument("--out", default=str(Path(__file__).parent / "isolation.json"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    target = Target(warmup=20, min_runs=50, max_runs=5000, budget_s=args.budget_s, rel_ci=0.01)
    start = time.time()
    load = os.getloadavg()[0]
    raw = run(args.rounds, args.load_trials, target)
    rows = summarize(raw)
    table = markdown(rows, args.load_trials)
    facts = {**machine_facts(), "cores": raw["cores"], "reserved_core": raw["reserved_core"],
             "date": dt.datetime.now(dt.UTC).isoformat(timespec="minutes"),
             "seconds": round(time.time() - start), "loadavg_start": load,
             "loadavg_end": os.getloadavg()[0]}
    steps = {k: round(statistics.median(v), 1) for k, v in raw["trainer_steps_per_s"].items() if v}
    print(table)
    print(f"\ntrainer steps/s, all {args.load_trials} together (median over rounds): {steps}")
    print(f"machine: {facts}")
    Path(args.out).write_text(json.dumps({"facts": facts, "target": target.to_dict(), "rows": rows,
                                          "raw": raw, "trainer_steps_per_s": steps}, indent=2,
                                         default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
