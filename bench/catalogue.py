"""The method catalogue's weight formats side by side: fp16 / bf16 weights and power-of-two
(shift) levels against uniform ones.

Usage::

    AUTOCOMPRESS_CACHE=/tmp/accache .venv/bin/python bench/catalogue.py \\
        [--epochs 2] [--repeats 5] [--seed 0]

(a) ``bits: fp16`` and ``bits: bf16`` on every compressible layer of the trained ``digits``
    and ``mnist1d`` models: ``size_bytes`` ratio against fp32, validation accuracy of the torch
    model and of its ONNX export run by ONNX Runtime (all optimizations), and the ONNX file
    ratio; int8 weights (``bits: 8``, the search's warm start) for reference. Then ONNX
    Runtime latency of ``ResNetSmall`` (``bench/latency.py``: random weights,
    3x32x32, batch 1, 1 thread) with every layer in fp32, fp16 and bf16: ``measure_latency``
    without the cache, every repeat times every variant once in a shuffled order; the median
    over ``--repeats`` repeats of each repeat's median, and the min-max of those. "after ORT
    folding" counts, in the graph ONNX Runtime optimizes at load time (basic level: constant
    folding), the Casts left and the initializers that are not float32.
(b) ``scheme: pow2`` against ``scheme: uniform`` on every layer of the same two models at 4
    bits (and at 3, where pow2's levels fit bell-shaped weights better): the relative L2 error
    of the weights, validation accuracy right after compression and after ``--epochs`` epochs
    of fine-tuning (``autocompress.finetune``, distilling from the baseline, the search's
    defaults), as ``bench/decompose.py`` does.

Prints markdown tables.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8 import onnx_accuracy  # noqa: E402  (bench/int8.py)
from latency import resnet_model  # noqa: E402  (bench/latency.py)

from autocompress.compress import (  # noqa: E402
    apply,
    bake,  # noqa: E402
    find_layers,
)
from autocompress.compress._plan import LayerPlan, Plan  # noqa: E402
from autocompress.compress.formats import float_format_names  # noqa: E402
from autocompress.finetune import FinetuneConfig, finetune  # noqa: E402
from autocompress.measure import Target, measure_latency, size_bytes  # noqa: E402
from autocompress.onnxgraph import export_onnx  # noqa: E402
from autocompress.tasks import load_task  # noqa: E402

TASKS = ("digits", "mnist1d")
FLOAT_FORMATS = float_format_names()  # every built-in format `bits` names by a string
SCHEMES = (("uniform", 4), ("pow2", 4), ("uniform", 3), ("pow2", 3))


def every_layer(model: nn.Module, x: torch.Tensor, **knobs) -> Plan:
    """``knobs`` on every compressible layer of ``model``."""
    return Plan({la.name: LayerPlan(**knobs) for la in find_layers(model, x)})


def weight_error(baseline: nn.Module, model: nn.Module) -> float:
    """``||W_compressed - W|| / ||W||`` over every weight the plan compressed."""
    base = dict(baseline.named_parameters())
    diff = total = 0.0
    for name, w in bake(model).named_parameters():
        if name.endswith("weight") and name in base and base[name].shape == w.shape:
            diff += float((w - base[name]).pow(2).sum())
            total += float(base[name].pow(2).sum())
    return math.sqrt(diff / total)


def float_table(tasks: dict, workdir: Path) -> str:
    rows = ["| task | weights | size_bytes | size ratio | torch acc | Δ pt | onnx acc | Δ pt "
            "| ONNX file ratio |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, task in tasks.items():
        base_model, x = task.model, task.example_inputs
        base_path = export_onnx(base_model, x, workdir / f"{name}-fp32.onnx")
        base_torch, base_onnx = task.evaluate(base_model), onnx_accuracy(base_path, task)
        base_size, base_file = size_bytes(base_model), base_path.stat().st_size
        rows.append(f"| {name} | fp32 | {base_size:,} | 1.00x | {base_torch:.4f} | | "
                    f"{base_onnx:.4f} | | 1.00x |")
        for fmt in (*FLOAT_FORMATS, 8):  # 8: the reference, int8 weights (the warm start)
            model = apply(base_model, every_layer(base_model, x, bits=fmt), x).eval()
            path = export_onnx(model, x, workdir / f"{name}-{fmt}.onnx")
            acc, onnx_acc, size = task.evaluate(model), onnx_accuracy(path, task), size_bytes(model)
            label = "ref: int8" if fmt == 8 else fmt
            rows.append(f"| {name} | {label} | {size:,} | {base_size / size:.2f}x | {acc:.4f} "
                        f"| {100 * (acc - base_torch):+.2f} | {onnx_acc:.4f} "
                        f"| {100 * (onnx_acc - base_onnx):+.2f} "
                        f"| {base_file / path.stat().st_size:.2f}x |")
    return "\n".join(rows)


def latency_table(repeats: int, seed: int, workdir: Path) -> str:
    model, x = resnet_model(seed)
    variants = {"fp32": model, **{fmt: apply(model, every_layer(model, x, bits=fmt), x).eval()
                                  for fmt in FLOAT_FORMATS}}
    target = Target(threads=1, batch_size=1)
    times: dict[str, list[float]] = {k: [] for k in variants}
    rng = random.Random(seed)
    for _ in range(repeats):
        order = list(variants)
        rng.shuffle(order)
        for k in order:
            times[k].append(measure_latency(variants[k], x, target, use_cache=False).latency_ms)
    inputs = torch.randn(64, *x.shape[1:], generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        ref = model(inputs)
    base_ms, base_size = statistics.median(times["fp32"]), size_bytes(model)
    rows = ["| weights | latency ms (min-max) | speed-up | size ratio | ONNX MB | logit error "
            "| after ORT folding |", "|---|---:|---:|---:|---:|---:|---|"]
    for k, m in variants.items():
        ms = statistics.median(times[k])
        path = export_onnx(m, x, workdir / f"resnet-{k}.onnx")
        with torch.no_grad():
            error = float((m(inputs) - ref).norm() / ref.norm())
        casts, others = folded(path)
        rows.append(f"| {k} | {ms:.4f} ({min(times[k]):.4f}-{max(times[k]):.4f}) "
                    f"| {base_ms / ms:.2f}x | {base_size / size_bytes(m):.2f}x "
                    f"| {path.stat().st_size / 2**20:.2f} | {error:.1e} "
                    f"| {casts} Cast, {others} non-fp32 initializers |")
    return "\n".join(rows)


def folded(path: Path) -> tuple[int, int]:
    """``(Cast nodes, initializers that are not float32)`` of the graph ONNX Runtime runs,
    after its load-time constant folding."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(path.with_suffix(".folded.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    return (sum(n.op_type == "Cast" for n in graph.node),
            sum(i.data_type != onnx.TensorProto.FLOAT for i in graph.initializer))


def scheme_table(tasks: dict, epochs: int, seed: int) -> str:
    config = FinetuneConfig(epochs=epochs, device="cpu")
    rows = [f"| task | weights | size ratio | weight error | accuracy | after {epochs} epochs |",
            "|---|---|---:|---:|---:|---:|"]
    for name, task in tasks.items():
        base_model, x = task.model, task.example_inputs
        rows.append(f"| {name} | fp32 | 1.00x | 0 | {task.evaluate(base_model):.4f} | |")
        for scheme, bits in SCHEMES:
            model = apply(base_model, every_layer(base_model, x, bits=bits, scheme=scheme), x)
            acc, error = task.evaluate(model.eval()), weight_error(base_model, model)
            tuned = finetune(model, task, config, teacher=base_model, seed=seed)[-1]
            rows.append(f"| {name} | {bits}-bit {scheme} "
                        f"| {size_bytes(base_model) / size_bytes(model):.2f}x | {error:.4f} "
                        f"| {acc:.4f} | {tuned:.4f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs of (b)")
    parser.add_argument("--repeats", type=int, default=5, help="latency repeats (interleaved)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    tasks = {name: load_task(name, seed=args.seed) for name in TASKS}
    with tempfile.TemporaryDirectory(prefix="autocompress-catalogue-") as tmp:
        work = Path(tmp)
        print("## (a) fp16 / bf16 weights on every layer (trained models, validation data)\n")
        print(float_table(tasks, work))
        print(f"\n## (a) ResNetSmall (bench/latency.py), random weights, 3x32x32, batch 1, "
              f"onnxruntime 1 thread, {args.repeats} repeats\n")
        print(latency_table(args.repeats, args.seed, work))
    print(f"\n## (b) power-of-two vs uniform levels on every layer, {args.epochs} epochs of "
          f"fine-tuning with distillation\n")
    print(scheme_table(tasks, args.epochs, args.seed))
    print(f"\n(took {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
