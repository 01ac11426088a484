"""Fine-tuning on a CUDA GPU: one prepared check for a machine that has one.

Usage::

    python bench/gpu_check.py              # about a minute on a GPU
    python bench/gpu_check.py --no-pytest  # without the ``gpu`` tests of tests/test_finetune.py

Prints torch's CUDA facts; trains a small CNN teacher on synthetic 3x32x32 images (on the
GPU), compresses a copy (pruning, 4-bit weights, 8-bit activations) and fine-tunes it with
distillation for one epoch with ``device: cpu``, ``device: cuda``, ``cuda`` + ``amp`` (bf16
where the GPU has it) and ``amp`` on the fp16 + GradScaler path, printing wall times and
accuracies; checks that student and teacher come back to the CPU, that the teacher's weights
are untouched and that the accuracies agree; runs one ``autocompress.tune.run_trial`` with
``FinetuneConfig(device="cuda")``; then the ``gpu``-marked tests. Exits 1 on any failure;
exits 0 with a ``no CUDA device: skipped`` line where torch sees no GPU.
"""

from __future__ import annotations

import argparse
import copy
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

CLASSES = 10


class SmallCNN(nn.Module):
    """Three conv blocks (the last two stride 2) and a Linear head on 3x32x32 inputs."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.BatchNorm2d(4 * width),
            nn.ReLU(),
        )
        self.head = nn.Linear(4 * width * 8 * 8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def make_task(train: int = 2048, val: int = 1024, seed: int = 0, signal: float = 0.1) -> Any:
    """Noise images, each with a faint copy of its class's fixed random pattern added."""
    from autocompress.tasks import Task

    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn(CLASSES, 3, 32, 32, generator=gen)
    y = torch.randint(0, CLASSES, (train + val,), generator=gen)
    x = torch.randn(train + val, 3, 32, 32, generator=gen) + signal * patterns[y]
    loader = DataLoader(TensorDataset(x[:train], y[:train]), batch_size=128, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    val_loader = DataLoader(TensorDataset(x[train:], y[train:]), batch_size=512)
    torch.manual_seed(seed)
    return Task(model=SmallCNN(), train_loader=loader, val_loader=val_loader,
                example_inputs=x[train:train + 1], name="gpu-check-cnn")


class Checks:
    """Runs steps and records what failed."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, ok: bool, what: str) -> None:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}", flush=True)
        if not ok:
            self.failed.append(what)

    def step(self, name: str, fn: Callable[[], None]) -> None:
        print(f"\n== {name}", flush=True)
        try:
            fn()
        except Exception:  # a failing step is reported and the others still run
            traceback.print_exc()
            self.failed.append(f"{name}: raised")


def on_cpu(*models: nn.Module) -> bool:
    return all(t.device.type == "cpu" for m in models for t in [*m.parameters(), *m.buffers()])


def same_state(a: dict[str, torch.Tensor], model: nn.Module) -> bool:
    return all(torch.equal(v, model.state_dict()[k]) for k, v in a.items())


def facts() -> None:
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"CUDA build {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    print(f"cuda available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"  cuda:{i} {p.name}, capability {p.major}.{p.minor}, "
              f"{p.total_memory / 2**30:.1f} GiB, bf16: {torch.cuda.is_bf16_supported()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-pytest", action="store_true", help="skip the gpu-marked tests")
    args = parser.parse_args(argv)
    facts()
    if not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0

    from autocompress.compress import apply
    from autocompress.compress._plan import LayerPlan, Plan
    from autocompress.finetune import FinetuneConfig, finetune
    from autocompress.measure import Target, top1_accuracy
    from autocompress.tune._trial import run_trial

    start = time.perf_counter()
    checks = Checks()
    task = make_task()
    state: dict[str, Any] = {}

    def teacher() -> None:
        t0 = time.perf_counter()
        history = finetune(task.model, task, FinetuneConfig(epochs=5, lr=3e-3, distill=False,
                                                            device="cuda"))
        print(f"  teacher: 5 epochs on cuda in {time.perf_counter() - t0:.1f} s, "
              f"accuracy {[round(a, 3) for a in history]}")
        checks.check(on_cpu(task.model), "teacher back on the CPU")
        checks.check(history[-1] > 0.5, f"teacher learns (accuracy {history[-1]:.3f} > 0.5)")
        state["teacher"] = {k: v.clone() for k, v in task.model.state_dict().items()}

    def students() -> None:
        plan = Plan({"features.3": LayerPlan(sparsity=0.5), "features.6": LayerPlan(bits=4),
                     "head": LayerPlan(bits=8, act_bits=8)})
        compressed = apply(task.model, plan, task.example_inputs)
        before = task.evaluate(compressed)
        print(f"  compressed, before fine-tuning: accuracy {before:.3f}")
        runs = [("cpu", FinetuneConfig(epochs=1, device="cpu"), False),
                ("cuda", FinetuneConfig(epochs=1, device="cuda"), False),
                ("cuda + amp", FinetuneConfig(epochs=1, device="cuda", amp=True), False),
                ("cuda + amp fp16", FinetuneConfig(epochs=1, device="cuda", amp=True,
                                                   grad_clip=1.0), True)]
        accuracy = {}
        bf16 = torch.cuda.is_bf16_supported
        for label, config, fp16 in runs:
            student = copy.deepcopy(compressed)
            if fp16:  # the path of GPUs without bf16: fp16 autocast and a GradScaler
                torch.cuda.is_bf16_supported = lambda *a, **k: False  # type: ignore[assignment]
            try:
                t0 = time.perf_counter()
                history = finetune(student, task, config, teacher=task.model)
                seconds = time.perf_counter() - t0
            finally:
                torch.cuda.is_bf16_supported = bf16  # type: ignore[assignment]
            accuracy[label] = history[-1]
            on_cpu_acc = task.evaluate(student)
            print(f"  {label:16s} 1 epoch in {seconds:6.2f} s: accuracy {history[-1]:.3f} "
                  f"(on the CPU afterwards: {on_cpu_acc:.3f})")
            checks.check(on_cpu(student, task.model), f"{label}: student and teacher on the CPU")
            checks.check(same_state(state["teacher"], task.model), f"{label}: teacher unchanged")
            checks.check(abs(on_cpu_acc - history[-1]) < 0.02,
                         f"{label}: same accuracy on the CPU as on the training device")
            checks.check(history[-1] >= before - 0.05, f"{label}: no worse than before")
        for label in ("cuda", "cuda + amp", "cuda + amp fp16"):
            checks.check(abs(accuracy[label] - accuracy["cpu"]) < 0.1,
                         f"{label} and cpu agree ({accuracy[label]:.3f} vs {accuracy['cpu']:.3f})")

    def evaluation() -> None:
        model = copy.deepcopy(task.model)
        cpu = top1_accuracy(model, task.val_loader)
        gpu = top1_accuracy(model.cuda(), task.val_loader)
        checks.check(abs(cpu - gpu) < 0.01, f"top1_accuracy on cuda {gpu:.3f} = on cpu {cpu:.3f}")

    def trial() -> None:
        plan = Plan({"features.0": LayerPlan(sparsity=0.3), "head": LayerPlan(bits=8)})
        target = Target(device="cpu", runtime="onnxruntime", warmup=2, min_runs=5, max_runs=20,
                        budget_s=0.2)
        t0 = time.perf_counter()
        result = run_trial(task, plan, FinetuneConfig(epochs=1, device="cuda", amp=True), target)
        print(f"  run_trial in {time.perf_counter() - t0:.1f} s "
              f"(fine-tuning {result.finetune_seconds:.1f} s): {result.metrics.to_dict()}")
        checks.check(on_cpu(result.model, task.model), "trial model and task model on the CPU")
        checks.check(same_state(state["teacher"], task.model), "task model unchanged")
        checks.check(result.metrics.latency_ms > 0 and result.metrics.accuracy > 0.3,
                     "trial measured")

    checks.step("teacher (5 epochs on cuda)", teacher)
    if "teacher" in state:
        checks.step("fine-tune a compressed student: cpu vs cuda vs amp", students)
        checks.step("top1_accuracy on cuda", evaluation)
        checks.step("run_trial with FinetuneConfig(device='cuda')", trial)
    if not args.no_pytest:
        print("\n== pytest -m gpu tests/test_finetune.py", flush=True)
        code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p",
                                "no:cacheprovider", "tests/test_finetune.py"], cwd=ROOT)
        checks.check(code == 0, f"gpu tests (exit {code})")
    print(f"\n{len(checks.failed)} failures in {time.perf_counter() - start:.0f} s"
          + "".join(f"\n  {f}" for f in checks.failed))
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
