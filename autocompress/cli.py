"""The ``autocompress`` command line.

Exit codes: 0 success, 2 bad input (message on stderr naming what is wrong), 1 other failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from autocompress._catalog import BUILTIN_TASKS, EXPORT_FILES
from autocompress._errors import ConfigError
from autocompress.compress._plan import PlanError

EXIT_BAD_INPUT = 2
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def _add_target_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target (where latency is measured)")
    g.add_argument("--runtime", default="onnxruntime", help="onnxruntime | torch")
    g.add_argument("--device", default="cpu", help="cpu | cuda")
    g.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    g.add_argument("--batch-size", type=int, default=1, help="timed batch size (default 1)")


def _target(args: argparse.Namespace):
    from autocompress.measure import Target
    from autocompress.measure.latency import check_target

    try:
        target = Target(device=args.device, runtime=args.runtime, threads=args.threads,
                        batch_size=args.batch_size)
        check_target(target)  # e.g. --device cuda on a machine without CUDA
        return target
    except ValueError as e:
        raise ConfigError(str(e).replace("target.", "--"), key=None) from None


def cmd_layers(args: argparse.Namespace) -> int:
    from autocompress.compress._registry import describe_layers
    from autocompress.measure.size import size_and_params
    from autocompress.tasks import load_task

    task = load_task(args.task, seed=args.seed)
    layers = describe_layers(task.model, task.example_inputs)
    if args.json:
        print(json.dumps([layer.to_dict() for layer in layers], indent=2, default=str))
        return 0
    rows = [(la.name, la.type + (f" ({la.cls})" if la.cls else ""), "x".join(map(str, la.shape)),
             f"{la.params:,}", f"{la.macs:,}", _layer_notes(la)) for la in layers]
    _print_table(("name", "type", "shape", "params", "macs", ""), rows)
    size, params, _ = size_and_params(task.model)
    tied = sum(1 for la in layers if la.shared_with) // 2
    stored = f"{size / 2**20:,.1f} MiB" if size >= 2**20 else f"{size / 1024:,.1f} KiB"
    print(f"{len(layers)} layers; the model stores {params:,} parameters, {stored}"
          f"{f' (each tied weight once: {tied} shared)' if tied else ''}")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from autocompress.compress._registry import describe_layers
    from autocompress.config._space import load_search_space
    from autocompress.tasks import load_task
    from autocompress.tune._sensitivity import profile

    task = load_task(args.task, seed=args.seed)
    space = load_search_space(args.space).resolve(describe_layers(task.model, task.example_inputs))
    sens = profile(task, space, batches=args.batches, use_cache=not args.no_cache,
                   echo=lambda m: print(f"autocompress: {m}", file=sys.stderr))
    if args.csv:
        print(sens.to_csv(), end="")
        return 0
    print(f"baseline metric on {args.batches} validation batches: {sens.metric:.4f}"
          f"{' (cached profile)' if sens.cached else ''}; loss when one layer alone is compressed:")
    rows = [(p.layer, p.label(), f"{p.metric:.4f}", f"{sens.metric - p.metric:+.4f}",
             f"{p.distortion:.3g}") for p in sens.probes]
    _print_table(("layer", "setting", "metric", "loss", "distortion"), rows)
    return 0


def _layer_notes(layer) -> str:
    """What ``autocompress layers`` says about a layer: output, never run, refused knobs."""
    notes = ["output"] if layer.is_output else []
    if not layer.used:
        notes.append("never runs in the forward: not searched")
    knobs_by_reason: dict[str, list[str]] = {}  # one reason, said once
    for r in layer.refusals:
        if not (layer.is_output and (r.knob, r.value) == ("structure", "channel")):  # said
            knobs_by_reason.setdefault(r.reason, []).append(
                f"{r.knob}{'=' + str(r.value) if r.value is not None else ''}")
    notes += [f"no {', '.join(knobs)} ({reason})" for reason, knobs in knobs_by_reason.items()]
    return "; ".join(notes)


def cmd_trial(args: argparse.Namespace) -> int:
    from autocompress.compress import apply
    from autocompress.finetune import FinetuneConfig
    from autocompress.measure import measure
    from autocompress.measure.latency import PairedMeasurer
    from autocompress.tasks import load_task
    from autocompress.tune._trial import run_trial

    target = _target(args)
    plan = _read_plan(args.plan)
    try:
        ft = FinetuneConfig(epochs=args.epochs, lr=args.lr, distill=not args.no_distill)
    except ValueError as e:
        raise ConfigError(str(e).replace("finetune.", "--")) from None
    task = load_task(args.task, seed=args.seed)
    try:
        apply(task.model, plan, task.example_inputs)  # dry run: refuse a bad plan up front
    except PlanError as e:
        raise ConfigError(str(e), file=args.plan) from None
    log = _progress()
    log(f"task {task.name}: measuring the baseline on {target.runtime}/{target.device}")
    measurer = PairedMeasurer(target)  # the compressed model is timed paired with the baseline
    baseline = measure(task.model, task, target, measurer.reference)
    log(f"applying plan: {plan.summary()}")
    result = run_trial(task, plan, ft, target, seed=args.seed, measurer=measurer,
                       on_epoch=lambda e, m: log(f"  epoch {e + 1}/{ft.epochs}: metric {m:.4f}"))
    compressed = {**result.metrics.to_dict(), **result.metrics.relative_to(baseline)}
    if args.json:
        print(json.dumps({"baseline": baseline.to_dict(), "compressed": compressed,
                          "plan": plan.to_dict()}, indent=2))
    else:
        _print_comparison(baseline.to_dict(), compressed)
    if args.save:
        _save_trial(Path(args.save), result, baseline.to_dict(), compressed)
        log(f"saved plan.json, model.pt and metrics.json to {args.save}")
    return 0


def _read_plan(path: str):
    """The plan in the JSON file ``path``.

    Raises:
        ConfigError: The file cannot be read, is not UTF-8 text, or holds no valid plan.
    """
    from autocompress.compress._plan import Plan

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read plan: {e.strerror}", file=path) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"not a UTF-8 text file (byte {e.object[e.start]:#04x} at offset "
                          f"{e.start}); a plan is a JSON file", file=path) from None
    try:
        return Plan.from_json(text)
    except PlanError as e:
        raise ConfigError(str(e), file=path) from None


def _save_trial(out: Path, result, baseline: dict, compressed: dict) -> None:
    import torch

    from autocompress.compress._bake import bake

    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(result.plan.to_json(indent=2))
    torch.save(bake(result.model).state_dict(), out / "model.pt")
    (out / "metrics.json").write_text(json.dumps({"baseline": baseline, "compressed": compressed},
                                                 indent=2))


def _progress() -> Callable[[str], None]:
    """Progress lines go to stderr, so ``--json`` output on stdout stays parseable."""
    return lambda msg: print(f"autocompress: {msg}", file=sys.stderr, flush=True)


def _print_comparison(baseline: dict, compressed: dict) -> None:
    rows = []
    for key, b in baseline.items():
        c = compressed[key]
        ratio = f"{b / c:.2f}x" if isinstance(c, int | float) and c and key != "accuracy" else ""
        rows.append((key, _fmt(b), _fmt(c), ratio))
    for key in ("compression_ratio", "speedup", "accuracy_drop"):
        rows.append((key, "", _fmt(compressed[key]), ""))
    _print_table(("metric", "baseline", "compressed", "baseline/compressed"), rows)


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=False)).rstrip())


def _print_front(rows: Sequence[dict]) -> None:
    from autocompress.measure._registry import front_columns

    columns: list[tuple[str, str, Callable[[Any], str]]] = [
        ("trial", "trial", str), ("run_id", "run id", str), *front_columns(), ("summary", "plan", str)]
    _print_table([h for _, h, _ in columns],
                 [["" if r.get(k) is None else f(r[k]) for k, _, f in columns] for r in rows])


def cmd_search(args: argparse.Namespace) -> int:
    from autocompress._api import search
    from autocompress.config._experiment import load_experiment

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
    _print_front(front)
    print(f"\nsee it in the MLflow UI: autocompress ui --tracking-uri {uri}")
    return 0


def cmd_pareto(args: argparse.Namespace) -> int:
    from autocompress.tracking import read_front

    rows = read_front(args.tracking_uri, args.experiment_name, args.max_accuracy_drop)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_front(rows)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from autocompress._api import export
    from autocompress.deploy._export import VerificationError

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
          f"{_relative(r['path'])} ({r['file_bytes']:,} bytes on disk)")
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
    _print_table(("metric", "re-measured", "logged", "measured on"), rows)
    if "registered" in r:
        reg = r["registered"]
        print(f"\nregistered {reg['model_uri']} (source run {reg['run_id']})")
    print(f"\nwrote {_relative(Path(r['path']).parent / 'export.json')}")
    return 0


def _relative(path: str | Path) -> str:
    """``path`` relative to the working directory when it is below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def cmd_report(args: argparse.Namespace) -> int:
    from autocompress.deploy._report import write_report

    path = write_report(args.experiment_name, args.tracking_uri, args.out)
    if args.json:
        print(json.dumps({"path": str(path.resolve())}))
    else:
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, self-contained) and logged it to "
              "the search's parent run as report.html")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from autocompress.tracking._ui import serve_ui

    return serve_ui(args.tracking_uri, args.host, args.port)


def cmd_agent(args: argparse.Namespace) -> int:
    from autocompress.agent import run

    return run(args)


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line, like every other bad input (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"autocompress: error: {message} (see '{self.prog} --help')\n")


def _add_task_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True,
                   help=f"built-in task ({', '.join(BUILTIN_TASKS)}) or pkg.module:fn")


def _catalog() -> str:
    """What the tables hold today: the built-in tasks, samplers and export formats."""
    from autocompress.tune._samplers import sampler_names

    return (f"built-in tasks: {', '.join(BUILTIN_TASKS)}; samplers (search.sampler): "
            f"{', '.join(sampler_names())}; export formats: {', '.join(EXPORT_FILES)}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="autocompress",
        description="Find the best way to compress a trained PyTorch model for a target device.",
        epilog=_catalog(),
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("layers", help="list the compressible layers of a task's model")
    _add_task_arg(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(fn=cmd_layers)

    p = sub.add_parser("sensitivity", help="per layer and knob value, the metric lost when that "
                                           "layer alone is compressed (no fine-tuning)")
    _add_task_arg(p)
    p.add_argument("--space", default=str(Path(__file__).resolve().parents[1] / "search_spaces"
                                          / "default.yaml"),
                   help="search space YAML file (default: search_spaces/default.yaml)")
    p.add_argument("--batches", type=int, default=8, help="validation batches per probe (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", action="store_true", help="print CSV (as logged to a search's parent run)")
    p.add_argument("--no-cache", action="store_true", help="measure again (and do not store)")
    p.set_defaults(fn=cmd_sensitivity)

    p = sub.add_parser("trial", help="one compress / fine-tune / measure cycle with a given plan")
    _add_task_arg(p)
    p.add_argument("--plan", required=True, help="plan JSON file")
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs (default 2)")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate")
    p.add_argument("--no-distill", action="store_true", help="fine-tune without distillation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", metavar="DIR", help="write plan.json, model.pt, metrics.json here")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_target_args(p)
    p.set_defaults(fn=cmd_trial)

    p = sub.add_parser("search", help="run a multi-objective compression search", epilog=_catalog())
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

    p = sub.add_parser("export", help="export a trial as a deployable, verified model")
    p.add_argument("run_id", help="a trial's MLflow run id (autocompress pareto lists them)")
    p.add_argument("--format", required=True, choices=list(EXPORT_FILES))
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the artifact")
    p.add_argument("--register", metavar="MODEL_NAME", help="register in the MLflow Model Registry")
    p.add_argument("--tolerance", type=float, default=0.005,
                   help="largest allowed |exported - logged| metric (default 0.005)")
    p.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("report", help="a one-page HTML report of an experiment's latest search")
    p.add_argument("experiment_name")
    p.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")
    p.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("ui", help="the MLflow UI on the same store")
    p.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(fn=cmd_ui)

    from autocompress.agent import add_arguments as add_agent_arguments

    p = sub.add_parser("agent", help="serve latency measurements of ONNX models on this device")
    add_agent_arguments(p)
    p.set_defaults(fn=cmd_agent)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``autocompress`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, PlanError) as e:
        print(f"autocompress: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("autocompress: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
