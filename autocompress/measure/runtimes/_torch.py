"""Eager PyTorch: the baked module under ``inference_mode``, on the CPU or CUDA."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from autocompress._inputs import run as call
from autocompress._inputs import to_device
from autocompress.measure.runtimes._base import LocalRuntime

if TYPE_CHECKING:
    from torch import nn

    from autocompress.measure._results import Prepared
    from autocompress.measure.target import Target


class TorchRuntime(LocalRuntime):
    """The baked eager module, run with ``target.threads`` intra-op threads (synchronized after
    every run on CUDA, so the time covers the kernels).

    Subclasses that run another form of the same baked module (``_torchscript.py``) override
    :meth:`compile` only.
    """

    name = "torch"
    artifact = "module"
    library = "torch"

    def check(self, target: Target) -> None:
        import torch

        if target.device == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"target.device='cuda' with runtime {self.name}: torch sees no CUDA "
                             f"device here (torch {torch.__version__}); allowed here: ['cpu', 'remote']")

    def integer_kernels(self, target: Target) -> str | None:
        return (f"the {self.name} runtime runs the baked fp32 module (fake quantization folded "
                "into fp32 weights and float Q/DQ ops), no integer kernels")

    def compile(self, module: nn.Module, inputs: Any) -> nn.Module:
        """What is timed: ``module`` (baked, eval mode, on the target's device) made ready to
        run ``inputs`` (already on that device). Here: the eager module itself."""
        return module

    def runner(self, prepared: Prepared, target: Target) -> Callable[[], object]:
        import torch

        assert prepared.module is not None
        device = torch.device(target.device)
        x = to_device(prepared.batch, device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        threads = target.threads
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)  # compiling may already choose kernels by thread count
        try:
            deployable = self.compile(prepared.module.to(device).eval(), x)
        finally:
            torch.set_num_threads(previous)

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
