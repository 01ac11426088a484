"""Commands on a task's model, without a search: ``layers``, ``sensitivity``, ``trial``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from autocompress._errors import ConfigError
from autocompress.cli._common import add_target_args, add_task_arg, fmt, print_table, progress
from autocompress.cli._common import target as target_of
from autocompress.compress import PlanError

DEFAULT_SPACE = Path(__file__).resolve().parents[2] / "search_spaces" / "default.yaml"


def add_parsers(sub: Any) -> None:
    """Adds ``layers``, ``sensitivity`` and ``trial`` to the subcommands ``sub``."""
    p = sub.add_parser("layers", help="list the compressible layers of a task's model")
    add_task_arg(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(fn=cmd_layers)

    p = sub.add_parser("sensitivity", help="per layer and knob value, the metric lost when that "
                                           "layer alone is compressed (no fine-tuning)")
    add_task_arg(p)
    p.add_argument("--space", default=str(DEFAULT_SPACE),
                   help="search space YAML file (default: search_spaces/default.yaml)")
    p.add_argument("--batches", type=int, default=8, help="validation batches per probe (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", action="store_true", help="print CSV (as logged to a search's parent run)")
    p.add_argument("--no-cache", action="store_true", help="measure again (and do not store)")
    p.set_defaults(fn=cmd_sensitivity)

    p = sub.add_parser("trial", help="one compress / fine-tune / measure cycle with a given plan")
    add_task_arg(p)
    p.add_argument("--plan", required=True, help="plan JSON file")
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs (default 2)")
    p.add_argument("--lr", type=float, default=None,
                   help="fine-tuning learning rate (default: the task's own, else 0.001)")
    p.add_argument("--no-distill", action="store_true", help="fine-tune without distillation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", metavar="DIR", help="write plan.json, model.pt, metrics.json here")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_target_args(p)
    p.set_defaults(fn=cmd_trial)


def cmd_layers(args: argparse.Namespace) -> int:
    from autocompress.compress import describe_layers
    from autocompress.measure import size_and_params
    from autocompress.tasks import load_task

    task = load_task(args.task, seed=args.seed)
    layers = describe_layers(task.model, task.example_inputs, blocks=True)
    if args.json:
        print(json.dumps([layer.to_dict() for layer in layers], indent=2, default=str))
        return 0
    rows = [(la.name, la.type + (f" ({la.cls})" if la.cls else ""), "x".join(map(str, la.shape)),
             f"{la.params:,}", f"{la.macs:,}", _layer_notes(la)) for la in layers]
    print_table(("name", "type", "shape", "params", "macs", ""), rows)
    size, params, _ = size_and_params(task.model)
    tied = sum(1 for la in layers if la.shared_with) // 2
    stored = f"{size / 2**20:,.1f} MiB" if size >= 2**20 else f"{size / 1024:,.1f} KiB"
    print(f"{len(layers)} layers; the model stores {params:,} parameters, {stored}"
          f"{f' (each tied weight once: {tied} shared)' if tied else ''}")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from autocompress.compress import describe_layers
    from autocompress.config import load_search_space
    from autocompress.tasks import load_task
    from autocompress.tune import profile

    task = load_task(args.task, seed=args.seed)
    space = load_search_space(args.space).resolve(describe_layers(task.model, task.example_inputs,
                                                                  blocks=True))
    sens = profile(task, space, batches=args.batches, use_cache=not args.no_cache,
                   echo=lambda m: print(f"autocompress: {m}", file=sys.stderr))
    if args.csv:
        print(sens.to_csv(), end="")
        return 0
    print(f"baseline metric on {args.batches} validation batches: {sens.metric:.4f}"
          f"{' (cached profile)' if sens.cached else ''}; loss when one layer alone is compressed:")
    rows = [(p.layer, p.label(), f"{p.metric:.4f}", f"{sens.metric - p.metric:+.4f}",
             f"{p.distortion:.3g}") for p in sens.probes]
    print_table(("layer", "setting", "metric", "loss", "distortion"), rows)
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
    from autocompress.measure import PairedMeasurer, measure
    from autocompress.tasks import load_task
    from autocompress.tune import run_trial

    target = target_of(args)
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
    log = progress()
    log(f"task {task.name}: measuring the baseline on {target.runtime}/{target.device}")
    measurer = PairedMeasurer(target)  # the compressed model is timed paired with the baseline
    baseline = measure(task.model, task, target, measurer.reference)
    log(f"applying plan: {plan.summary()}")
    result = run_trial(task, plan, ft, target, seed=args.seed, measurer=measurer,
                       on_epoch=lambda e, m: log(f"  epoch {e + 1}/{ft.epochs}: metric {m:.4f}"),
                       on_post_training=lambda m: log(f"  after compression: metric {m:.4f}"))
    if result.restored:
        log(f"  fine-tuning ended below {result.post_training:.4f}: the post-training weights "
            f"were kept")
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
    from autocompress.compress import Plan

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

    from autocompress.compress import bake

    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(result.plan.to_json(indent=2))
    torch.save(bake(result.model).state_dict(), out / "model.pt")
    (out / "metrics.json").write_text(json.dumps({"baseline": baseline, "compressed": compressed},
                                                 indent=2))


def _print_comparison(baseline: dict, compressed: dict) -> None:
    rows = []
    for key, b in baseline.items():
        c = compressed[key]
        ratio = f"{b / c:.2f}x" if isinstance(c, int | float) and c and key != "accuracy" else ""
        rows.append((key, fmt(b), fmt(c), ratio))
    for key in ("compression_ratio", "speedup", "accuracy_drop"):
        rows.append((key, "", fmt(compressed[key]), ""))
    print_table(("metric", "baseline", "compressed", "baseline/compressed"), rows)
