"""Commands that deploy a search's results: ``export`` (a verified artifact) and ``report``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from autocompress.cli._common import DEFAULT_TRACKING_URI, names, print_table, relative


def _export_format(name: str) -> str:
    """``--format``'s type: a registered export format, read now (did-you-mean otherwise)."""
    from autocompress.deploy import EXPORT_FORMATS

    if name not in EXPORT_FORMATS:
        raise argparse.ArgumentTypeError(EXPORT_FORMATS.unknown(name).message)
    return name


def add_parsers(sub: Any) -> None:
    """Adds ``export`` and ``report`` to the subcommands ``sub``."""
    from autocompress.deploy import DEFAULT_TOLERANCE, EXPORT_FORMATS

    p = sub.add_parser("export", help="export a trial as a deployable, verified model")
    p.add_argument("run_id", help="a trial's MLflow run id (autocompress pareto lists them)")
    p.add_argument("--format", required=True, type=_export_format,
                   metavar="{" + ",".join(EXPORT_FORMATS.names()) + "}",
                   help=f"export format: {names(EXPORT_FORMATS)}")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the artifact")
    p.add_argument("--register", metavar="MODEL_NAME", help="register in the MLflow Model Registry")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"largest allowed |exported - logged| metric (default {DEFAULT_TOLERANCE})")
    p.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("report", help="a one-page HTML report of an experiment's latest search")
    p.add_argument("experiment_name")
    p.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")
    p.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(fn=cmd_report)


def cmd_export(args: argparse.Namespace) -> int:
    from autocompress import export
    from autocompress.deploy import VerificationError

    try:
        result = export(args.run_id, args.format, args.out, tracking_uri=args.tracking_uri,
                        register=args.register, tolerance=args.tolerance)
    except VerificationError as e:
        print(f"autocompress: export failed verification, nothing written: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    r = result
    print(f"exported {r['trial']} (run {r['run_id']}) of {r['experiment']!r} as {r['format']}: "
          f"{relative(r['path'])} ({r['file_bytes']:,} bytes on disk)")
    print(f"verified: its accuracy is within {r['tolerance']} of the logged one; 're-measured' "
          "was measured now (latencies paired with the baseline, on the clock of its logged "
          "latency), 'logged' is what the search recorded\n")
    artifact = f"the {r['format']} file on {r['artifact_runtime']}"
    rows = [("accuracy", f"{r['accuracy']:.4f}", f"{r['logged_accuracy']:.4f}",
             f"{artifact}, {r['validation_samples']} validation samples"),
            ("size_bytes", f"{r['size_bytes']:,}", f"{r['logged_size_bytes']:,.0f}",
             "computed from the stored tensors"),
            ("latency_ms", f"{r['latency_ms']:.4f}", f"{r['logged_latency_ms']:.4f}",
             r["latency_target"]),
            ("p90_ms", f"{r['p90_ms']:.4f}", "", r["latency_target"])]
    if r["artifact_runtime"] != r["latency_runtime"]:
        timed = r["artifact_latency_ms"]
        rows.append(("artifact latency_ms", "n/a" if timed is None else f"{timed:.4f}", "",
                     artifact if timed is not None else f"{artifact}: not runnable on the target"))
    print_table(("metric", "re-measured", "logged", "measured on"), rows)
    if "registered" in r:
        reg = r["registered"]
        print(f"\nregistered {reg['model_uri']} (source run {reg['run_id']})")
    print(f"\nwrote {relative(Path(r['path']).parent / 'export.json')}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from autocompress.deploy import write_report

    path = write_report(args.experiment_name, args.tracking_uri, args.out)
    if args.json:
        print(json.dumps({"path": str(path.resolve())}))
    else:
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, self-contained) and logged it to "
              "the search's parent run as report.html")
    return 0
