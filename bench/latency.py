"""Side-by-side latency of the baseline and of each compression method, on this CPU.

Usage::

    AUTOCOMPRESS_CACHE=/tmp/accache .venv/bin/python bench/latency.py \
        [--runtime onnxruntime|torch|both] [--repeats N] [--quick] [--out bench/results.json]

Models: the ``digits`` and ``mnist1d`` task baselines (``autocompress.tasks.load_task``) and a
small residual CNN defined here (CIFAR-style ResNet with BatchNorm and residual adds on
3x32x32 inputs, random weights), the latter at batch 1 and batch 8.

Variants: the baseline; channel pruning 25/50/75% of every non-output layer; low-rank 0.5 and
0.25 on every layer; unstructured 50/90%; int8 weights; 4-bit weights; int8 weights +
activations; and channel 50% + int8 weights + activations. No fine-tuning: latency depends on
the shapes and formats of the deployable model, not on the weight values.

Protocol: every variant is built once with ``autocompress.compress.apply``. Then, for each
repeat, every (model, runtime, batch) configuration and every variant is timed once with
``autocompress.measure.measure_latency`` (which exports the deployable model and reports the
median of many single inferences), in a freshly shuffled order. Interleaving spreads the
machine's noise (other processes, frequency changes) over all variants instead of letting it
land on whichever one was timed during a busy moment. Reported per variant: the median over
repeats of the per-repeat median latency, the min-max of the repeat medians (spread), the
speed-up (baseline latency / variant latency, both medians over repeats), the best-case
speed-up (fastest baseline repeat / fastest variant repeat), the size ratio (baseline
size_bytes / variant size_bytes), dense MACs and stored parameters.

With the ``onnxruntime`` runtime a reference row ``ref: ort-static-int8`` is added (not an
autocompress method): ONNX Runtime's own static int8 quantization of the fp32 baseline export,
to show what a fully integer graph costs on this CPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from autocompress._inputs import repeat_to
from autocompress.compress import apply
from autocompress.compress._layers import count_macs, find_layers
from autocompress.compress._plan import LayerPlan, Plan
from autocompress.measure import (
    LatencyResult,
    Target,
    count_params,
    machine_facts,
    measure_latency,
    size_bytes,
)
from autocompress.measure.latency import Prepared
from autocompress.measure.runtimes import get_runtime
from autocompress.onnxgraph import export_onnx
from autocompress.tasks import load_task
from autocompress.tasks.digits_resnet import BasicBlock  # the residual block of the built-in ResNet

RUNTIMES = ("onnxruntime", "torch")
REFERENCE = "ref: ort-static-int8"
QUICK_VARIANTS = ("baseline", "channel-50%", "lowrank-0.5", "unstructured-90%", "int8-w",
                  "int8-w+a")


# --------------------------------------------------------------------------------------------
# The residual model


class ResNetSmall(nn.Module):
    """A CIFAR-style ResNet: 3x3 stem, three stages of ``blocks`` BasicBlocks, pool, Linear."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), blocks: int = 1,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, c_in = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(c_in, width, 2 if i > 0 and j == 0 else 1))
                c_in = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet_model(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The residual model with random weights and realistic BatchNorm statistics."""
    torch.manual_seed(seed)
    model = ResNetSmall()
    model.train()
    with torch.no_grad():  # BN affine parameters and running stats that are not the defaults
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0.0, 0.1)
        for _ in range(4):
            model(torch.randn(16, 3, 32, 32))
    model.eval()
    return model, torch.randn(1, 3, 32, 32)


# --------------------------------------------------------------------------------------------
# Variants


def variant_plans(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, Plan]:
    """The methods x strengths to compare, as plans over every compressible layer."""
    layers = find_layers(model, example_inputs)
    names = [layer.name for layer in layers]
    hidden = [layer.name for layer in layers if not layer.is_output]

    def every(names_: list[str], **knobs) -> Plan:
        return Plan({n: LayerPlan(**knobs) for n in names_})

    def channel_plus(sparsity: float, **knobs) -> Plan:
        return Plan({n: LayerPlan(sparsity=sparsity if n in hidden else 0.0,
                                  structure="channel" if n in hidden else "unstructured", **knobs)
                     for n in names})

    return {
        "baseline": Plan(),
        "channel-25%": every(hidden, sparsity=0.25, structure="channel"),
        "channel-50%": every(hidden, sparsity=0.50, structure="channel"),
        "channel-75%": every(hidden, sparsity=0.75, structure="channel"),
        "lowrank-0.5": every(names, rank=0.5),
        "lowrank-0.25": every(names, rank=0.25),
        "unstructured-50%": every(names, sparsity=0.5),
        "unstructured-90%": every(names, sparsity=0.9),
        "int8-w": every(names, bits=8),
        "int4-w": every(names, bits=4),
        "int8-w+a": every(names, bits=8, act_bits=8),
        "channel-50%+int8-w+a": channel_plus(0.5, bits=8, act_bits=8),
    }


@dataclass
class Variant:
    """A compressed model, or (``onnx_path`` set) a reference ONNX file timed as it is."""

    name: str
    plan: Plan
    model: nn.Module
    size_bytes: int | None
    params: int
    nonzero_params: int
    macs: int
    onnx_path: Path | None = None


@dataclass
class Config:
    """One table: a model, a runtime and a batch size, with its variants and timings."""

    model: str
    runtime: str
    batch_size: int
    example_inputs: torch.Tensor
    variants: list[Variant]
    target: Target
    times: dict[str, list[float]] = field(default_factory=dict)
    runs: dict[str, list[int]] = field(default_factory=dict)


def build_variants(model: nn.Module, example_inputs: torch.Tensor,
                   only: tuple[str, ...] | None) -> list[Variant]:
    out = []
    for name, plan in variant_plans(model, example_inputs).items():
        if only is not None and name not in only:
            continue
        compressed = apply(model, plan, example_inputs).eval()
        params, nonzero = count_params(compressed)
        out.append(Variant(
            name=name, plan=plan, model=compressed, size_bytes=size_bytes(compressed),
            params=params, nonzero_params=nonzero,
            macs=sum(count_macs(compressed, example_inputs[:1]).values()),
        ))
    return out


def ort_static_int8(model: nn.Module, example_inputs: torch.Tensor, workdir: Path,
                    name: str) -> Path:
    """Reference only (not an autocompress method): ONNX Runtime's own static int8.

    The fp32 export of ``model``, pre-processed and quantized by
    ``onnxruntime.quantization.quantize_static`` (QDQ format, per-channel int8 weights, uint8
    activations on the inputs *and* outputs of every supported op, residual adds included),
    calibrated on a few random inputs. It shows what a fully integer graph costs on this CPU.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32, pre, out = (workdir / f"{name}-{k}.onnx" for k in ("fp32", "pre", "int8"))
    export_onnx(model, example_inputs, fp32)
    quant_pre_process(str(fp32), str(pre))
    gen = torch.Generator().manual_seed(0)
    batches = [example_inputs[:1]] + [
        example_inputs[:1] + 0.1 * torch.randn(example_inputs[:1].shape, generator=gen)
        for _ in range(7)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": b.numpy()} for b in batches])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def load_models() -> dict[str, tuple[nn.Module, torch.Tensor, tuple[int, ...]]]:
    """``{name: (model, example_inputs of batch 1, batch sizes to time)}``."""
    models = {}
    for name in ("digits", "mnist1d"):
        task = load_task(name)
        models[name] = (task.model.eval(), task.example_inputs[:1], (1,))
    model, x = resnet_model()
    models["resnet"] = (model, x, (1, 8))
    return models


# --------------------------------------------------------------------------------------------
# Measuring


def _measure(variant: Variant, config: Config) -> LatencyResult:
    if variant.onnx_path is None:
        return measure_latency(variant.model, config.example_inputs, config.target, use_cache=False)
    # A reference ONNX file: the same runtime, session options and timing loop as measure_latency.
    batch = repeat_to(config.example_inputs, config.target.batch_size)
    prepared = Prepared(batch, onnx=Path(variant.onnx_path).read_bytes())
    return get_runtime(config.target).measure(prepared, config.target)


def run_benchmark(configs: list[Config], repeats: int, seed: int = 0) -> None:
    """Times every variant of every config ``repeats`` times, round-robin, shuffled."""
    rng = random.Random(seed)
    jobs = [(c, v) for c in configs for v in c.variants]
    for r in range(repeats):
        order = jobs[:]
        rng.shuffle(order)
        t0 = time.perf_counter()
        for config, variant in order:
            res = _measure(variant, config)
            config.times.setdefault(variant.name, []).append(res.latency_ms)
            config.runs.setdefault(variant.name, []).append(res.runs)
        print(f"bench: repeat {r + 1}/{repeats} done in {time.perf_counter() - t0:.1f} s "
              f"({len(order)} measurements)", file=sys.stderr)


def summarize(config: Config) -> dict:
    base = statistics.median(config.times["baseline"])
    base_variant = next(v for v in config.variants if v.name == "baseline")
    base_times = config.times["baseline"]
    rows = []
    for v in config.variants:
        times = config.times[v.name]
        med = statistics.median(times)
        paired = [b / t for b, t in zip(base_times, times, strict=True)]
        rows.append({
            "variant": v.name,
            "plan": v.plan.summary() if v.name != "baseline" else "(no compression)",
            "latency_ms": med,
            "latency_min_ms": min(times),
            "latency_max_ms": max(times),
            "repeat_medians_ms": times,
            "runs_per_repeat": config.runs[v.name],
            "speedup": base / med,
            "speedup_best": min(base_times) / min(times),
            "paired_speedup_min": min(paired),
            "paired_speedup_max": max(paired),
            "size_bytes": v.size_bytes,
            "size_ratio": base_variant.size_bytes / v.size_bytes if v.size_bytes else None,
            "reference_only": v.onnx_path is not None,
            "params": v.params,
            "nonzero_params": v.nonzero_params,
            "macs": v.macs,
        })
    return {"model": config.model, "runtime": config.runtime, "batch_size": config.batch_size,
            "threads": config.target.threads, "target": config.target.to_dict(), "rows": rows}


def _fmt_ms(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.2f}"


def _fmt_count(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(n)


def markdown_table(summary: dict) -> str:
    lines = [
        f"### {summary['model']} — {summary['runtime']}, batch {summary['batch_size']}, "
        f"{summary['threads']} thread",
        "",
        "| variant | latency ms (median) | spread ms (min–max) | speed-up | speed-up (best) "
        "| size ratio | MACs | params (nonzero) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        size = "—" if r["size_ratio"] is None else f"{r['size_ratio']:.2f}×"
        lines.append(
            f"| {r['variant']} | {_fmt_ms(r['latency_ms'])} "
            f"| {_fmt_ms(r['latency_min_ms'])}–{_fmt_ms(r['latency_max_ms'])} "
            f"| {r['speedup']:.2f}× | {r['speedup_best']:.2f}× | {size} | {_fmt_count(r['macs'])} "
            f"| {_fmt_count(r['params'])} ({_fmt_count(r['nonzero_params'])}) |")
    return "\n".join(lines)


def cpu_flags() -> list[str]:
    """The CPU's SIMD features that matter for int8 kernels."""
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def package_digest() -> str:
    """SHA-256 (first 12 hex digits) of the autocompress sources the run used."""
    import autocompress

    root = Path(autocompress.__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def facts() -> dict:
    out = dict(machine_facts())
    out.update({
        "cpu_flags": " ".join(cpu_flags()),
        "logical_cpus": str(os.cpu_count()),
        "platform": platform.platform(),
    })
    return out


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime", choices=[*RUNTIMES, "both"], default="both",
                   help="runtime(s) to time (default: both)")
    p.add_argument("--repeats", type=int, default=None,
                   help="round-robin repeats (default: 10, or 2 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="smoke check: fewer variants, repeats and timed runs (< 1 minute)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default: 1)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds of timed runs per measurement (default: 0.3, 0.1 with --quick)")
    p.add_argument("--no-reference", action="store_true",
                   help=f"skip the {REFERENCE!r} row (ONNX Runtime's own static int8 of the "
                        "baseline, timed for comparison; never with --quick)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled order")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output path (default: bench/results.json; bench/results-quick.json "
                        "with --quick, so a smoke check never overwrites the full results)")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 10
    if args.out is None:
        here = Path(__file__).resolve().parent
        args.out = here / ("results-quick.json" if args.quick else "results.json")
    if args.budget_s is None:
        args.budget_s = 0.1 if args.quick else 0.3
    if args.repeats < 1 or args.threads < 1 or args.budget_s <= 0:
        p.error("--repeats and --threads must be >= 1 and --budget-s > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    runtimes = RUNTIMES if args.runtime == "both" else (args.runtime,)
    only = QUICK_VARIANTS if args.quick else None
    started = dt.datetime.now(dt.timezone.utc)
    load_start = os.getloadavg()
    digest = package_digest()

    configs = []
    t0 = time.perf_counter()
    workdir = tempfile.TemporaryDirectory(prefix="autocompress-bench-")
    reference = not args.quick and not args.no_reference and "onnxruntime" in runtimes
    for name, (model, x, batches) in load_models().items():
        if args.quick:
            batches = batches[:1]
        variants = build_variants(model, x, only)
        if reference:
            base = variants[0]
            ref = Variant(REFERENCE, Plan(), base.model, None, base.params, base.nonzero_params,
                          base.macs, ort_static_int8(base.model, x, Path(workdir.name), name))
        for runtime in runtimes:
            for batch in batches:
                target = Target(runtime=runtime, threads=args.threads, batch_size=batch,
                                warmup=5 if args.quick else 10,
                                min_runs=10 if args.quick else 20,
                                max_runs=300 if args.quick else 1000,
                                budget_s=args.budget_s)
                extra = [ref] if reference and runtime == "onnxruntime" else []
                configs.append(Config(name, runtime, batch, x, variants + extra, target))
    print(f"bench: built {sum(len(c.variants) for c in configs)} variants for {len(configs)} "
          f"configurations in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    run_benchmark(configs, args.repeats, args.seed)
    workdir.cleanup()
    summaries = [summarize(c) for c in configs]
    result = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date_utc": started.isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - t0, 1),
        "machine": facts(),
        "autocompress_sources_sha256": digest,
        "autocompress_sources_changed_during_run": package_digest() != digest,
        "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()),
        "settings": {"runtimes": list(runtimes), "repeats": args.repeats, "quick": args.quick,
                     "threads": args.threads, "budget_s": args.budget_s, "seed": args.seed,
                     "target": configs[0].target.to_dict() | {"batch_size": None,
                                                               "runtime": None}},
        "tables": summaries,
    }

    m = result["machine"]
    print(f"## Machine\n\n{m['cpu']} ({m['logical_cpus']} logical CPUs; {m['cpu_flags']}), "
          f"torch {m['torch']}, onnxruntime {m['onnxruntime']}, Python {m['python']}; "
          f"load average {load_start[0]:.2f} at start, {result['load_average_end'][0]:.2f} "
          f"at end; autocompress sources sha256 {digest}.\n")
    if result["autocompress_sources_changed_during_run"]:
        print("bench: warning: the autocompress sources changed during the run; the variants "
              "were built with the version present at the start", file=sys.stderr)
    print(f"{args.repeats} repeats, round-robin; each repeat times every variant once "
          f"(median of >= {configs[0].target.min_runs} runs, ~{args.budget_s} s). "
          "Latency = median of the repeat medians; spread = their min–max; speed-up and size "
          "ratio are baseline / variant (speed-up of the medians; speed-up (best) of the "
          "fastest repeats, less sensitive to load from other processes).\n")
    for s in summaries:
        print(markdown_table(s) + "\n")
    if reference:
        print(f"`{REFERENCE}` is not an autocompress method: it is ONNX Runtime's own "
              "quantize_static (QDQ, per-channel) of the fp32 baseline export, timed the same "
              "way for comparison.\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"bench: wrote {args.out} ({result['duration_s']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
