"""Commands on searches: ``search`` (run one) and ``pareto`` (its front)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

from autocompress.cli._common import DEFAULT_TRACKING_URI, catalog, print_table


def add_parsers(sub: Any) -> None:
    """Adds ``search`` and ``pareto`` to the subcommands ``sub``."""
    p = sub.add_parser("search", help="run a multi-objective compression search", epilog=catalog())
    p.add_argument("experiment", help="experiment YAML file")
    p.add_argument("--trials", type=int, help="override search.trials")
    p.add_argument("--concurrency", type=int, help="override search.concurrency")
    p.add_argument("--name", help="override the experiment name")
    p.add_argument("--resume", action="store_true",
                   help="continue the latest search of this experiment up to --trials finished trials")
    p.add_argument("--address", help="Ray cluster to run the trials on (auto, or HOST:PORT of the head; "
                   "ray://HOST:PORT runs the whole search there through Ray Client)")
    p.add_argument("--tracking-uri", help=f"MLflow tracking URI (default {DEFAULT_TRACKING_URI})")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(fn=cmd_search)

    p = sub.add_parser("pareto", help="the Pareto-optimal trials of an experiment's latest search")
    p.add_argument("experiment_name")
    p.add_argument("--max-accuracy-drop", type=float, help="only trials losing at most this much")
    p.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(fn=cmd_pareto)


def print_front(rows: Sequence[dict]) -> None:
    from autocompress.measure import front_columns

    columns: list[tuple[str, str, Callable[[Any], str]]] = [
        ("trial", "trial", str), ("run_id", "run id", str), *front_columns(), ("summary", "plan", str)]
    print_table([h for _, h, _ in columns],
                 [["" if r.get(k) is None else f(r[k]) for k, _, f in columns] for r in rows])


def cmd_search(args: argparse.Namespace) -> int:
    from autocompress import search
    from autocompress.config import load_experiment

    exp = load_experiment(args.experiment, trials=args.trials, concurrency=args.concurrency,
                          name=args.name)  # the overrides' errors name the option
    uri = args.tracking_uri or exp.tracking_uri or DEFAULT_TRACKING_URI
    result = search(exp, tracking_uri=uri, address=args.address, resume=args.resume)
    front = result.front.drop(columns=["error"]).to_dict("records")
    if args.json:
        print(json.dumps({"parent_run_id": result.parent_run_id, "baseline": result.baseline,
                          "front": front}, indent=2, default=str))
        return 0
    counts = result.trials["status"].value_counts()
    print(f"\nsearch {exp.name!r} finished: {int(counts.get('FINISHED', 0))} trials finished, "
          f"{int(counts.get('FAILED', 0))} failed; parent run {result.parent_run_id}")
    b = result.baseline
    print(f"baseline: accuracy {b['accuracy']:.4f}, size {b['size_bytes'] / 1024:.1f} KiB, "
          f"latency {b['latency_ms']:.4f} ms\n")
    print(f"Pareto front ({len(front)} models):")
    print_front(front)
    print(f"\nsee it in the MLflow UI: autocompress ui --tracking-uri {uri}")
    return 0


def cmd_pareto(args: argparse.Namespace) -> int:
    from autocompress.tracking import read_front

    rows = read_front(args.tracking_uri, args.experiment_name, args.max_accuracy_drop)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_front(rows)
    return 0
