"""all-MiniLM-L6-v2 (the built-in ``minilm`` task): autocompress's compressions against the
one-call anchor a user already has, ONNX Runtime's ``quantize_dynamic``, side by side.

    .venv/bin/python bench/minilm.py [--repeats 7] [--epochs 1] [--quick]

Every variant is an ONNX file timed by the same runtime and protocol as a search
(``autocompress.measure``: onnxruntime, 1 thread, batch 1, seq 32), round-robin over
``--repeats`` rounds in a shuffled order, so the machine's drift hits all alike; the table
gives the median of the per-round medians. Fidelity is the task's metric (mean cosine
similarity to the original embeddings) of the ONNX file itself on the 256 validation
sentences, computed with onnxruntime. Size is the ONNX file on disk.

Variants:
- ``fp32``: the model as exported by autocompress (the reference).
- ``quantize_dynamic``: ``onnxruntime.quantization.quantize_dynamic(fp32, QInt8)``, one call,
  no fine-tuning: what a user would otherwise do.
- ``int8 weights``: autocompress ``bits: 8`` on every linear layer and the embeddings (int8
  storage + DequantizeLinear; ONNX Runtime folds it back to fp32 at load time).
- ``W8A8 dynamic``: ``bits: 8, act_bits: dynamic`` on every linear layer (ONNX Runtime's
  integer MatMul), ``bits: 8`` embeddings; no fine-tuning, then fine-tuned ``--epochs``.
- ``heads 2/12 + FFN 1/8 + W8A8 dynamic``: 2 of 12 heads and 1/8 of the FFN neurons removed
  in every block on top, fine-tuned ``--epochs``.
- ``heads 3/12 + FFN 1/4 + W8A8 dynamic``: 3 heads and a quarter of the FFN, fine-tuned.

Fine-tuning: AdamW, lr 3e-4, 10% warm-up, distilled from the original, ``keep_best`` (the experiment's
settings). ``--quick``: 2 rounds and no fine-tuning (a smoke run).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autocompress import LayerPlan, Plan  # noqa: E402
from autocompress._inputs import (
    repeat_to,
    to_numpy_feed,  # noqa: E402
)
from autocompress.compress import apply  # noqa: E402
from autocompress.finetune import FinetuneConfig, finetune  # noqa: E402
from autocompress.measure import Target  # noqa: E402
from autocompress.measure.latency import Prepared  # noqa: E402
from autocompress.measure.runtimes import get_runtime  # noqa: E402
from autocompress.onnxgraph import export_onnx  # noqa: E402
from autocompress.tasks import load_task  # noqa: E402

BLOCKS = 6


def plan_of(task, heads: float = 0.0, ffn: float = 0.0, dynamic: bool = True,
            pruner: str = "magnitude", layers_info: list | None = None) -> Plan:
    """Every linear layer ``bits: 8`` (``act_bits: dynamic`` if asked), every embedding
    ``bits: 8``; ``heads`` of the heads and ``ffn`` of the FFN neurons removed in every block
    (chosen by ``pruner``)."""
    from autocompress.compress._registry import describe_layers

    layers = {}
    for la in layers_info or describe_layers(task.model, task.example_inputs):
        if la.type == "Block":
            continue
        if not la.used:
            continue
        if la.type == "Embedding":
            layers[la.name] = LayerPlan(bits=8)
            continue
        ratio = heads if la.name.endswith("attention.self.query") else (
            ffn if la.name.endswith("intermediate.dense") else 0.0)
        layers[la.name] = LayerPlan(sparsity=ratio, structure="channel" if ratio else "unstructured",
                                    pruner=pruner if ratio else "magnitude", bits=8,
                                    act_bits="dynamic" if dynamic else None)
    return Plan(layers)


def quantize_dynamic(src: Path, dst: Path) -> Path:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    ort_quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return dst


def fidelity(path: Path, task) -> float:
    """The task metric of the ONNX file, computed with onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    total = count = 0.0
    for x, y in task.val_loader:
        out = session.run(None, to_numpy_feed(x))[0]
        ref = y.numpy()
        cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)
        total += float(cos.sum())
        count += len(ref)
    return total / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs of the pruned model")
    parser.add_argument("--quick", action="store_true", help="2 repeats, no fine-tuning (a smoke run)")
    args = parser.parse_args(argv)
    repeats, epochs = (2, 0) if args.quick else (args.repeats, args.epochs)
    warnings.filterwarnings("ignore")
    task = load_task("minilm")
    target = Target(threads=1, batch_size=1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-minilm-"))
    files: dict[str, Path] = {}
    print("building the variants ...", file=sys.stderr)
    files["fp32"] = export_onnx(task.model, task.example_inputs, tmp / "fp32.onnx")
    files["quantize_dynamic"] = quantize_dynamic(files["fp32"], tmp / "dynamic.onnx")
    files["int8 weights"] = export_onnx(apply(task.model, plan_of(task, dynamic=False),
                                              task.example_inputs), task.example_inputs, tmp / "int8.onnx")
    config = FinetuneConfig(epochs=epochs, lr=3e-4, optimizer="adamw", warmup=0.1, grad_clip=1.0,
                            keep_best=True)
    tuned_s = 0.0
    variants = [("W8A8 dynamic, not fine-tuned", {}, False), ("W8A8 dynamic, fine-tuned", {}, True),
                ("heads 2/12 + FFN 1/8 + W8A8 dynamic", {"heads": 0.125, "ffn": 0.125}, True),
                ("heads 3/12 + FFN 1/4 + W8A8 dynamic", {"heads": 0.25, "ffn": 0.25}, True)]
    for i, (name, ratios, tune) in enumerate(variants):
        if tune and not epochs:
            continue
        model = apply(task.model, plan_of(task, **ratios), task.example_inputs)
        if tune:
            started = time.perf_counter()
            finetune(model, task, config, teacher=task.model)
            tuned_s += time.perf_counter() - started
        files[name] = export_onnx(model, task.example_inputs, tmp / f"ours{i}.onnx")
    batch = repeat_to(task.example_inputs, target.batch_size)
    runtime = get_runtime(target)
    prepared = {name: Prepared(batch, onnx=path.read_bytes()) for name, path in files.items()}
    rounds: dict[str, list[float]] = {name: [] for name in files}
    rng = random.Random(0)
    for r in range(repeats):
        order = list(files)
        rng.shuffle(order)
        for name in order:
            rounds[name].append(runtime.measure(prepared[name], target).latency_ms)
        print(f"round {r + 1}/{repeats} done", file=sys.stderr)
    base = statistics.median(rounds["fp32"])
    base_bytes = files["fp32"].stat().st_size
    print(f"\nall-MiniLM-L6-v2, seq {batch['input_ids'].shape[1]}, batch 1, 1 thread, onnxruntime; "
          f"{repeats} rounds; fine-tuning {epochs} epoch(s) each ({tuned_s:.0f} s in all)\n")
    header = (f"{'variant':<40} {'latency ms':>10} {'speed-up':>9} {'fidelity':>9} {'ONNX MB':>8} "
              f"{'smaller':>8}")
    print(header)
    print("-" * len(header))
    for name, path in files.items():
        ms = statistics.median(rounds[name])
        size = path.stat().st_size
        print(f"{name:<40} {ms:>10.3f} {base / ms:>8.2f}x {fidelity(path, task):>9.4f} "
              f"{size / 1e6:>8.1f} {base_bytes / size:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
