"""Eager PyTorch: the baked module under ``inference_mode``, on the CPU or CUDA."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from autocompress._inputs import run as call
from autocompress._inputs import to_device
from autocompress.measure.runtimes._base import LocalRuntime

if TYPE_CHECKING:
    from autocompress.measure._results import Prepared
    from autocompress.measure.target import Target


class TorchRuntime(LocalRuntime):
    """The baked eager module, run with ``target.threads`` intra-op threads (synchronized after
    every run on CUDA, so the time covers the kernels)."""

    name = "torch"
    artifact = "module"

    def check(self, target: Target) -> None:
        import torch

        if target.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("target.device='cuda' with runtime torch: torch sees no CUDA device here "
                             f"(torch {torch.__version__}); allowed here: ['cpu', 'remote']")

    def integer_kernels(self, target: Target) -> str | None:
        return ("the torch runtime runs the baked fp32 module (fake quantization folded into "
                "fp32 weights and float Q/DQ ops), no integer kernels")

    def runner(self, prepared: Prepared, target: Target) -> Callable[[], object]:
        import torch

        assert prepared.module is not None
        device = torch.device(target.device)
        deployable = prepared.module.to(device).eval()
        x = to_device(prepared.batch, device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        threads = target.threads

        def run() -> object:
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                with torch.inference_mode():
                    out = call(deployable, x)
                sync()
                return out
            finally:
                torch.set_num_threads(previous)

        return run
