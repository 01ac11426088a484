"""SVD vs Tucker-2 vs CP on convolutions, at about 4x fewer MACs of the decomposed convs.

Usage::

    AUTOCOMPRESS_CACHE=/tmp/accache .venv/bin/python bench/decompose.py \
        [--repeats 5] [--share 0.25] [--epochs 2] [--seed 0]

Decomposed: every conv with a spatial kernel and ``groups=1`` except the first (it reads the
image, 1 or 3 channels), each with ``decomposition: svd | tucker | cp`` at one shared
``rank``: per method, the rank on a grid of 0.005 whose decomposed convs have the MACs
closest to ``--share`` of theirs (``count_macs`` on the factors' architecture,
``factorize(..., fit=False)``: ALS runs only at the chosen rank). The rest of the model is
left as it is.

Two models:

- ``ResNetSmall`` of ``bench/latency.py`` (random weights, 3x32x32, batch 1): MACs, params,
  ONNX Runtime latency (``measure_latency``, ``Target(threads=1, batch_size=1)``, no latency
  cache; every repeat times every variant once in a shuffled order; the median over repeats of
  each repeat's median, and the min-max of those) and the relative L2 error of the logits
  against the baseline on 64 random inputs.
- The ``digits`` task's trained CNN: MACs, params, logit error on the validation data, and
  validation accuracy right after decomposition and after ``--epochs`` epochs of fine-tuning
  (``autocompress.finetune``, distilling from the baseline, the search's defaults).

Prints two markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import resnet_model  # noqa: E402  (bench/latency.py)

from autocompress.compress import apply, count_macs  # noqa: E402
from autocompress.compress._decompose import spatial_problem  # noqa: E402
from autocompress.compress._plan import LayerPlan, Plan  # noqa: E402
from autocompress.compress.lowrank import factorize  # noqa: E402
from autocompress.finetune import FinetuneConfig, finetune  # noqa: E402
from autocompress.measure import Target, count_params, measure_latency  # noqa: E402
from autocompress.tasks import load_task  # noqa: E402

METHODS = ("svd", "tucker", "cp")
GRID = [i / 200 for i in range(1, 201)]


@dataclass
class Variant:
    """One decomposition of one model."""

    method: str
    rank: float
    model: nn.Module
    conv_macs: int
    macs: int
    params: int
    build_s: float


def decomposable(model: nn.Module) -> list[str]:
    """The convs to decompose: spatial kernel, ``groups=1``, all but the first."""
    return [name for name, mod in model.named_modules()
            if isinstance(mod, nn.Conv2d | nn.Conv1d) and spatial_problem(mod) is None][1:]


def macs_of(model: nn.Module, x: torch.Tensor, names: list[str]) -> tuple[int, int]:
    """``(MACs of the layers named, or of their factors; MACs of the whole model)``."""
    macs = count_macs(model, x)
    part = sum(v for k, v in macs.items() if any(k == n or k.startswith(n + ".") for n in names))
    return part, sum(macs.values())


def architecture(model: nn.Module, names: list[str], method: str, rank: float) -> nn.Module:
    """``model`` with the layers ``names`` replaced by their (unfitted) factors."""
    new = copy.deepcopy(model)
    for name in names:
        parent, _, attr = name.rpartition(".")
        setattr(new.get_submodule(parent), attr,
                factorize(new.get_submodule(name), rank, method, fit=False))
    return new


def rank_for(model: nn.Module, x: torch.Tensor, names: list[str], method: str, share: float) -> float:
    """The grid rank whose decomposed layers have the MACs closest to ``share`` of theirs
    (MACs grow with the rank: bisection for the first grid rank at or above ``share``)."""
    base = macs_of(model, x, names)[0]

    def ratio(i: int) -> float:
        return macs_of(architecture(model, names, method, GRID[i]), x, names)[0] / base

    low, high = 0, len(GRID) - 1
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if ratio(mid) < share else (low, mid)
    best = min((i for i in (low - 1, low) if i >= 0), key=lambda i: abs(ratio(i) - share))
    return GRID[best]


def variants(model: nn.Module, x: torch.Tensor, share: float) -> list[Variant]:
    """The baseline and each method at its rank for ``share`` of the MACs."""
    names = decomposable(model)
    out = [Variant("baseline", 1.0, model, *macs_of(model, x, names), count_params(model)[0], 0.0)]
    for method in METHODS:
        rank = rank_for(model, x, names, method, share)
        start = time.perf_counter()
        new = apply(model, Plan({n: LayerPlan(rank=rank, decomposition=method) for n in names}), x)
        seconds = time.perf_counter() - start
        out.append(Variant(method, rank, new.eval(), *macs_of(new, x, names),
                           count_params(new)[0], seconds))
    return out


def logit_error(baseline: nn.Module, model: nn.Module, inputs: torch.Tensor) -> float:
    """``||model(x) - baseline(x)|| / ||baseline(x)||`` over all of ``inputs``."""
    with torch.no_grad():
        ref = baseline(inputs)
        return float((model(inputs) - ref).norm() / ref.norm())


def time_variants(found: list[Variant], x: torch.Tensor, repeats: int, seed: int) -> dict[str, list[float]]:
    """Per variant, one ONNX Runtime median latency (ms) per repeat, variants interleaved."""
    target = Target(threads=1, batch_size=1)
    times: dict[str, list[float]] = {v.method: [] for v in found}
    rng = random.Random(seed)
    for _ in range(repeats):
        order = list(found)
        rng.shuffle(order)
        for v in order:
            times[v.method].append(measure_latency(v.model, x, target, use_cache=False).latency_ms)
    return times


def _ratio(part: int, base: int) -> str:
    return f"{part:,} ({part / base:.2f}x)"


def resnet_table(repeats: int, share: float, seed: int) -> str:
    model, x = resnet_model(seed)
    found = variants(model, x, share)
    inputs = torch.randn(64, *x.shape[1:], generator=torch.Generator().manual_seed(seed + 1))
    times = time_variants(found, x, repeats, seed)
    base, base_ms = found[0], statistics.median(times["baseline"])
    rows = ["| method | rank | decomposed-conv MACs | total MACs | params | latency ms (min-max) "
            "| speed-up | logit error | build s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in found:
        ms = statistics.median(times[v.method])
        rows.append(f"| {v.method} | {v.rank:.3f} | {_ratio(v.conv_macs, base.conv_macs)} "
                    f"| {_ratio(v.macs, base.macs)} | {_ratio(v.params, base.params)} "
                    f"| {ms:.4f} ({min(times[v.method]):.4f}-{max(times[v.method]):.4f}) "
                    f"| {base_ms / ms:.2f}x | {logit_error(model, v.model, inputs):.4f} "
                    f"| {v.build_s:.1f} |")
    return "\n".join(rows)


def digits_table(share: float, epochs: int, seed: int) -> str:
    task = load_task("digits", seed=seed)
    model, x = task.model.eval(), task.example_inputs
    found = variants(model, x, share)
    val = torch.cat([inputs for inputs, _ in task.val_loader])
    config = FinetuneConfig(epochs=epochs, device="cpu")
    rows = [f"## digits CNN (trained), {len(val)} validation images\n",
            "| method | rank | decomposed-conv MACs | total MACs | params | logit error "
            f"| accuracy | accuracy after {epochs} epochs |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = found[0]
    for v in found:
        accuracy, error = task.evaluate(v.model), logit_error(model, v.model, val)
        tuned = "" if v is base else f"{finetune(v.model, task, config, teacher=model, seed=seed)[-1]:.4f}"
        rows.append(f"| {v.method} | {v.rank:.3f} | {_ratio(v.conv_macs, base.conv_macs)} "
                    f"| {_ratio(v.macs, base.macs)} | {_ratio(v.params, base.params)} "
                    f"| {error:.4f} | {accuracy:.4f} | {tuned} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="latency repeats (interleaved)")
    parser.add_argument("--share", type=float, default=0.25,
                        help="target MACs of the decomposed convs, as a share of theirs")
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs (digits)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    print(f"## ResNetSmall (bench/latency.py), random weights, 3x32x32, batch 1, onnxruntime "
          f"1 thread, {args.repeats} repeats\n")
    print(resnet_table(args.repeats, args.share, args.seed))
    print()
    print(digits_table(args.share, args.epochs, args.seed))
    print(f"\n(took {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
