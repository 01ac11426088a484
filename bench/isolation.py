"""Latency measured while trials train: the isolated measurement service vs a shared core.

Usage::

    AUTOCOMPRESS_CACHE=/tmp/accache .venv/bin/python bench/isolation.py \
        [--rounds N] [--load-trials N] [--budget-s S] [--out bench/isolation.json]

Models: the ``digits`` and ``mnist1d`` task baselines and the residual CNN of
``bench/latency.py`` (batch 1, one thread, ONNX Runtime). Each is prepared once
(``autocompress.measure.latency.prepare``) and timed with the latency cache off.

Conditions, all in one Ray instance laid out as a search on this machine lays it out (Ray
CPUs = cores + 1; the service reserves one). A "trainer" stands in for a search trial: a Ray
actor training the residual CNN on random 3x32x32 batches of 32 (SGD, one thread) until
stopped.

- ``service``: the search's measurement service as a search runs it (``autocompress.tune.
  _service``: pinned to the reserved core, ``pause_training`` on), idle and while N trainers
  run that keep off the reserved core and step through the service's training gate, as
  search trials do;
- ``core only``: a service pinned to the reserved core with ``pause_training: false``, idle
  and while N trainers run that keep off its core (but never pause);
- ``shared cores``: the service as a search runs it when no core is spare (``isolation=
  "pause"``: unpinned, a counting training gate with one slot per core, of which a
  measurement takes one), idle and while N trainers run unpinned through its gate;
- ``shared``: a plain Ray actor that measures unpinned, as a trial measuring itself did before
  the service existed, idle and while N trainers run unpinned.

Every round runs the eight cases in this order and times each model once per case. Reported
per model and case: the median over rounds of the per-round median latency and the min-max of
the round medians; the ratio *N training / idle* per condition (1.00 = unaffected by the
training). Trainer throughput (steps/s over the timed window, all trainers together) is
printed too: it shows the training really ran, and what pausing costs it.
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
from autocompress.tune._service import (  # noqa: E402
    Reservation,
    keep_off,
    start_service,
    training_gate,
)

KINDS = ("service", "core only", "shared cores", "shared")
CASES = tuple(f"{kind}, {load}" for kind in KINDS for load in ("idle", "training"))


class Trainer:
    """A stand-in for a search trial: trains a residual CNN until stopped (Ray actor)."""

    def __init__(self, reserved: Reservation | None) -> None:
        keep_off(reserved)  # None: runs wherever the OS puts it
        self.gate = training_gate(reserved)  # a no-op without the service's pause_training
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
            with self.gate():
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            self.steps += 1

    def count(self) -> int:
        return self.steps

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
    import dataclasses

    import ray

    cores = len(os.sched_getaffinity(0))
    ray.init(num_cpus=cores + 2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})
    try:
        service, reserved = start_service(target)
        core_only, core_reserved = start_service(dataclasses.replace(target, pause_training=False))
        sharing, sharing_reserved = start_service(target, "pause")
        keep_off(reserved)  # the driver too, as in a search
        shared = ray.remote(num_cpus=0)(SharedMeasurer).remote(target)
        measurers = {"service": (service, reserved), "core only": (core_only, core_reserved),
                     "shared cores": (sharing, sharing_reserved), "shared": (shared, None)}
        models = load_models()
        prepared = {name: prepare(model, inputs, target) for name, (model, inputs, _) in models.items()}
        medians: dict[str, dict[str, list[float]]] = {m: {c: [] for c in CASES} for m in prepared}
        steps: dict[str, list[float]] = {c: [] for c in CASES if c.endswith("training")}
        trainer_cls = ray.remote(num_cpus=0)(Trainer)
        for r in range(rounds):
            for case in CASES:
                measurer, where = measurers[case.split(",")[0]]
                trainers = []
                if case.endswith("training"):
                    trainers = [trainer_cls.remote(where) for _ in range(load_trials)]
                    ray.get([t.start.remote() for t in trainers])
                    time.sleep(2.0)  # let training reach its steady state
                before = sum(ray.get([t.count.remote() for t in trainers]))
                started = time.perf_counter()
                for name, p in prepared.items():
                    result = ray.get(measurer.measure.remote(p, use_cache=False))
                    medians[name][case].append(result.latency_ms)
                if trainers:
                    seconds = time.perf_counter() - started
                    done = sum(ray.get([t.stop.remote() for t in trainers]))
                    steps[case].append((done - before) / seconds)
                    for t in trainers:
                        ray.kill(t)
            print(f"round {r + 1}/{rounds}: " + ", ".join(
                f"{name} " + "/".join(f"{v[c][-1]:.4f}" for c in CASES) + " ms"
                for name, v in medians.items()), file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    return {"medians": medians, "trainer_steps_per_s": steps, "reserved_core": reserved.core,
            "cores": cores}


def summarize(raw: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, by_condition in raw["medians"].items():
        row: dict[str, Any] = {"model": name}
        for condition, values in by_condition.items():
            row[condition] = {"median_ms": statistics.median(values), "min_ms": min(values),
                              "max_ms": max(values)}
        for kind in KINDS:
            row[f"{kind} ratio"] = (row[f"{kind}, training"]["median_ms"]
                                    / row[f"{kind}, idle"]["median_ms"])
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], load_trials: int) -> str:
    lines = [f"| model | {' | '.join(f'{k}: idle | {k}: {load_trials} training | ratio' for k in KINDS)} |",
             "|---|" + "---|" * (3 * len(KINDS))]

    def cell(c: dict[str, float]) -> str:
        return f"{c['median_ms']:.4f} ({c['min_ms']:.4f}–{c['max_ms']:.4f})"

    for row in rows:
        cells = [f"{cell(row[f'{k}, idle'])} | {cell(row[f'{k}, training'])} | **{row[f'{k} ratio']:.3f}**"
                 for k in KINDS]
        lines.append(f"| {row['model']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9, help="rounds of the eight cases (default 9)")
    ap.add_argument("--load-trials", type=int, default=2, help="training trials under load (default 2)")
    ap.add_argument("--budget-s", type=float, default=1.0, help="timing budget per measurement")
    ap.add_argument("--rel-ci", type=float, default=0.01,
                    help="stop timing once the median's 95%% CI is this tight (0: time the whole budget)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "isolation.json"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    target = Target(warmup=20, min_runs=50, max_runs=100_000, budget_s=args.budget_s, rel_ci=args.rel_ci)
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
