"""What the commands share: exit codes, the default store, the options every command group
adds (task, target) with help read from the registries, and plain-text tables."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from autocompress._errors import ConfigError

EXIT_BAD_INPUT = 2
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def names(registry: Any) -> str:
    """The names ``registry`` holds now, for help texts (a late registration is listed too)."""
    return ", ".join(registry.names())


def add_task_arg(p: argparse.ArgumentParser) -> None:
    from autocompress.tasks import TASKS

    p.add_argument("--task", required=True,
                   help=f"built-in task ({names(TASKS)}) or pkg.module:fn")


def add_target_args(p: argparse.ArgumentParser) -> None:
    from autocompress.measure import DEVICES
    from autocompress.measure.runtimes import RUNTIMES

    g = p.add_argument_group("target (where latency is measured)")
    g.add_argument("--runtime", default="onnxruntime", help=" | ".join(RUNTIMES.names()))
    g.add_argument("--device", default="cpu",
                   help=" | ".join(d for d in DEVICES if d != "remote"))
    g.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    g.add_argument("--batch-size", type=int, default=1, help="timed batch size (default 1)")
    g.add_argument("--seq-len", type=int, nargs="+", default=None, metavar="N",
                   help="sequence lengths to time at (default: the example's); latency_ms is "
                        "their --aggregate, each reported as latency_seq<N>_ms")
    g.add_argument("--aggregate", default="mean", help="mean | max over --seq-len (default mean)")


def target(args: argparse.Namespace) -> Any:
    """The :class:`~autocompress.measure.Target` of the target options, checked on this machine.

    Raises:
        ConfigError: A bad or unavailable option, named as the option.
    """
    from autocompress.measure import Target, check_target

    try:
        t = Target(device=args.device, runtime=args.runtime, threads=args.threads,
                   batch_size=args.batch_size, seq_len=args.seq_len, aggregate=args.aggregate)
        check_target(t)  # e.g. --device cuda on a machine without CUDA
        return t
    except ValueError as e:
        raise ConfigError(str(e).replace("target.", "--"), key=None) from None


def catalog() -> str:
    """What the registries hold now: tasks, samplers, export formats, objectives, runtimes."""
    from autocompress.config import SAMPLERS
    from autocompress.deploy import EXPORT_FORMATS
    from autocompress.measure import OBJECTIVES, objective_patterns
    from autocompress.measure.runtimes import RUNTIMES
    from autocompress.tasks import TASKS

    objectives = ", ".join([*OBJECTIVES, *objective_patterns()])
    return (f"built-in tasks: {names(TASKS)}; samplers (search.sampler): {names(SAMPLERS)}; "
            f"export formats: {names(EXPORT_FORMATS)}; objectives: {objectives}; "
            f"runtimes (target.runtime): {names(RUNTIMES)}")


def progress() -> Callable[[str], None]:
    """Progress lines go to stderr, so ``--json`` output on stdout stays parseable."""
    return lambda msg: print(f"autocompress: {msg}", file=sys.stderr, flush=True)


def fmt(v: float) -> str:
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=False)).rstrip())


def relative(path: str | Path) -> str:
    """``path`` relative to the working directory when it is below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
