"""Int8 that pays: accuracy of the deployed integer graph and its speed, against ONNX Runtime's
own static quantization, on the trained built-in tasks.

Usage::

    AUTOCOMPRESS_CACHE=/tmp/accache .venv/bin/python bench/int8.py [--repeats N] [--epochs E]

For the ``digits`` and ``mnist1d`` baselines (trained, real validation data) it builds:

- ``fp32``: the baseline;
- ``int8-w``: 8-bit weights only (stored int8; ONNX Runtime folds them to fp32 constants);
- ``w8a8``: 8-bit weights and activations on every layer (``act_bits: 8``), ranges
  calibrated on the task's 8 calibration batches, no fine-tuning: post-training quantization;
- ``w8a8+ft``: the same, fine-tuned ``--epochs`` epochs (distilled from the baseline): QAT;
- ``ch50%+w8a8+ft``: half the channels of every hidden layer removed, then W8A8, fine-tuned;
- ``ref: ort-static``: not ours: ONNX Runtime's ``quantize_static`` (QDQ, per-channel int8
  weights, uint8 activations, MinMax) of the fp32 export, calibrated on the same batches.

Accuracy is the task metric of the exported ONNX file run by ONNX Runtime (``onnx acc``) and of
the torch model the search would log (``torch acc``); latency is timed by
``autocompress.measure.measure_latency`` (ONNX Runtime, 1 thread, batch 1) over ``--repeats``
interleaved repeats, as in ``bench/latency.py`` (median of repeat medians). ``onnx / size``
is the ONNX file's bytes over the model's ``size_bytes``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from latency import Config, Variant, run_benchmark  # noqa: E402

from autocompress._inputs import to_numpy_feed  # noqa: E402
from autocompress.compress import apply  # noqa: E402
from autocompress.compress._layers import count_macs, find_layers  # noqa: E402
from autocompress.compress._plan import LayerPlan, Plan  # noqa: E402
from autocompress.compress.quantize import calibrate  # noqa: E402
from autocompress.finetune import FinetuneConfig, finetune  # noqa: E402
from autocompress.measure import Target, count_params, size_bytes  # noqa: E402
from autocompress.onnxgraph import export_onnx  # noqa: E402
from autocompress.tasks import load_task  # noqa: E402

REFERENCE = "ref: ort-static"


def plans(task) -> dict[str, tuple[Plan, bool]]:
    """``{variant: (plan, fine-tune?)}``."""
    layers = find_layers(task.model, task.example_inputs)
    every = [la.name for la in layers]

    def w8a8(channel: float = 0.0) -> Plan:
        return Plan({la.name: LayerPlan(
            sparsity=0.0 if la.is_output else channel,
            structure="unstructured" if la.is_output or not channel else "channel",
            bits=8, act_bits=8) for la in layers})

    return {"fp32": (Plan(), False), "int8-w": (Plan({n: LayerPlan(bits=8) for n in every}), False),
            "w8a8": (w8a8(), False), "w8a8+ft": (w8a8(), True),
            "ch50%+w8a8+ft": (w8a8(0.5), True)}


def onnx_accuracy(path: Path, task) -> float:
    """Top-1 accuracy of the ONNX file on the task's validation data, run by ONNX Runtime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    right = total = 0
    for x, y in task.val_loader:
        out = session.run(None, to_numpy_feed(x))[0]
        right += int((out.argmax(1) == y.numpy()).sum())
        total += len(y)
    return right / total


def ort_static(task, workdir: Path) -> Path:
    """ONNX Runtime's own static int8 of the fp32 export (the reference)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32, pre, out = (workdir / f"{task.name}-{k}.onnx" for k in ("fp32", "pre", "int8"))
    export_onnx(task.model, task.example_inputs, fp32)
    quant_pre_process(str(fp32), str(pre))
    feeds = [to_numpy_feed(b) for b in task.calibration_batches()]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def build(task, epochs: int, workdir: Path) -> tuple[list[Variant], dict[str, dict]]:
    variants, facts = [], {}
    x1 = task.example_inputs[:1]
    for name, (plan, tune) in plans(task).items():
        t0 = time.perf_counter()
        model = apply(task.model, plan, task.example_inputs)
        calibrate(model, task.calibration_batches())
        if tune:
            finetune(model, task, FinetuneConfig(epochs=epochs), teacher=task.model)
        model.eval()
        path = export_onnx(model, task.example_inputs, workdir / f"{task.name}-{name}.onnx",
                           calibration=task.calibration_batches())
        params, nonzero = count_params(model)
        variants.append(Variant(name, plan, model, size_bytes(model), params, nonzero,
                                sum(count_macs(model, x1).values())))
        facts[name] = {"onnx_acc": onnx_accuracy(path, task), "torch_acc": task.evaluate(model),
                       "onnx_bytes": path.stat().st_size, "build_s": time.perf_counter() - t0}
    ref = ort_static(task, workdir)
    base = variants[0]
    variants.append(Variant(REFERENCE, Plan(), base.model, None, base.params, base.nonzero_params,
                            base.macs, ref))
    facts[REFERENCE] = {"onnx_acc": onnx_accuracy(ref, task), "torch_acc": None,
                        "onnx_bytes": ref.stat().st_size}
    return variants, facts


def table(config: Config, facts: dict[str, dict]) -> str:
    base = statistics.median(config.times["fp32"])
    acc0 = facts["fp32"]["onnx_acc"]
    lines = [f"### {config.model} — onnxruntime, batch 1, 1 thread", "",
             "| variant | onnx acc | Δ pt | torch acc | latency ms | speed-up | size ratio "
             "| onnx / size | MACs |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base_size = config.variants[0].size_bytes
    for v in config.variants:
        f, med = facts[v.name], statistics.median(config.times[v.name])
        torch_acc = "—" if f["torch_acc"] is None else f"{f['torch_acc']:.4f}"
        size = "—" if v.size_bytes is None else f"{base_size / v.size_bytes:.2f}×"
        ratio = "—" if v.size_bytes is None else f"{f['onnx_bytes'] / v.size_bytes:.2f}"
        lines.append(f"| {v.name} | {f['onnx_acc']:.4f} | {100 * (f['onnx_acc'] - acc0):+.1f} "
                     f"| {torch_acc} | {med:.4f} | {base / med:.2f}× | {size} | {ratio} "
                     f"| {v.macs / 1e6:.2f}M |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7, help="interleaved timing repeats (default 7)")
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs of the +ft rows")
    p.add_argument("--tasks", nargs="+", default=["digits", "mnist1d"])
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    np.random.seed(0)
    work = tempfile.TemporaryDirectory(prefix="autocompress-int8-")
    configs, all_facts = [], {}
    for name in args.tasks:
        task = load_task(name)
        variants, facts = build(task, args.epochs, Path(work.name))
        target = Target(runtime="onnxruntime", threads=1, batch_size=1, warmup=10, min_runs=20,
                        max_runs=2000, budget_s=0.3)
        configs.append(Config(name, "onnxruntime", 1, task.example_inputs[:1], variants, target))
        all_facts[name] = facts
        print(f"int8: built {name} ({len(variants)} variants)", file=sys.stderr)
    run_benchmark(configs, args.repeats)
    for c in configs:
        print(table(c, all_facts[c.model]) + "\n")
    work.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
