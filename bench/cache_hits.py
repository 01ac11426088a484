"""How often the latency cache answers during real searches.

Usage::

    AUTOCOMPRESS_CACHE=/tmp/accache .venv/bin/python bench/cache_hits.py \
        [--trials 32] [--epochs 1] [--out bench/cache_hits.json]

Runs real searches (``autocompress.tune.run_search``) of the ``digits`` experiment
(``experiments/digits.yaml``: NSGA-II, 2 trials at a time, ONNX Runtime, batch 1) with
``--trials`` trials and ``--epochs`` fine-tuning epochs, each logged to a temporary MLflow
store, with a latency cache of its own (``AUTOCOMPRESS_LATENCY_CACHE``):

1. ``default`` space, empty cache: every knob per layer (sparsity, structure, bits, rank);
2. ``mixed_precision`` space, empty cache: one bit-width choice per layer;
3. ``default`` space again with another seed, on the cache that search 1 filled: how much a
   second search with the same target reuses.

Reported per search: trials finished, latency measurements taken, cache hits (from each
trial's ``latency_cache_hit`` metric, as logged in MLflow), the hit rate, and the timing
seconds the hits saved (the sum of the wall time the service spent on the measurements it did
take, divided by their number, times the hits; an estimate, labelled as such).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import yaml
from mlflow.tracking import MlflowClient

from autocompress.config import load_experiment
from autocompress.tracking import read_trials
from autocompress.tune._driver import run_search

ROOT = Path(__file__).resolve().parents[1]
SEARCHES = (("default", "default", 0, True), ("mixed_precision", "mixed_precision", 0, True),
            ("default, 2nd search", "default", 1, False))


def one_search(workdir: Path, label: str, space: str, seed: int, trials: int, epochs: int,
               cache: Path) -> dict[str, Any]:
    exp = yaml.safe_load((ROOT / "experiments" / "digits.yaml").read_text())
    exp.update(name=f"cache-bench-{space}-{seed}",
               search_space=str(ROOT / "search_spaces" / f"{space}.yaml"))
    exp["search"].update(trials=trials, seed=seed)
    exp["finetune"].update(epochs=epochs)
    path = workdir / f"{space}-{seed}.yaml"
    path.write_text(yaml.safe_dump(exp))
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ["AUTOCOMPRESS_LATENCY_CACHE"] = str(cache)
    start = time.perf_counter()
    result = run_search(load_experiment(path), tracking_uri=uri,
                        echo=lambda msg: print(f"  [{label}] {msg}", file=sys.stderr, flush=True))
    seconds = time.perf_counter() - start
    runs = [r for r in read_trials(MlflowClient(uri), result.parent_run_id)
            if r.info.status == "FINISHED"]
    hits = sum(int(r.data.metrics["latency_cache_hit"]) for r in runs)
    timed = [float(r.data.tags.get("autocompress.latency.runs", 0)) * r.data.metrics["latency_ms"]
             for r in runs if not r.data.metrics["latency_cache_hit"]]
    per_measurement_s = (sum(timed) / len(timed) / 1000) if timed else 0.0
    return {"search": label, "space": space, "seed": seed, "finished": len(runs),
            "measured": len(runs) - hits, "hits": hits, "hit_rate": hits / max(len(runs), 1),
            "timed_s_per_measurement": per_measurement_s,
            "saved_s_estimate": hits * per_measurement_s, "search_seconds": round(seconds)}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| search | trials | measured | cache hits | hit rate | search time |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['search']} | {r['finished']} | {r['measured']} | {r['hits']} | "
                     f"**{r['hit_rate']:.0%}** | {r['search_seconds']} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "cache_hits.json"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        os.chdir(workdir)  # Ray Tune's and Optuna's files go here too
        for label, space, seed, fresh in SEARCHES:
            cache = workdir / f"latency-{space}.db"
            if fresh and cache.exists():
                cache.unlink()
            print(f"search {label!r}: {args.trials} trials, {args.epochs} epoch(s), "
                  f"{'empty' if fresh else 'warm'} cache", file=sys.stderr, flush=True)
            rows.append(one_search(workdir, label, space, seed, args.trials, args.epochs, cache))
    print(markdown(rows))
    Path(args.out).write_text(json.dumps({
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="minutes"), "trials": args.trials,
        "epochs": args.epochs, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
