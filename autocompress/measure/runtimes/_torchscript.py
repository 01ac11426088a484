"""TorchScript: the baked module traced (``torch.jit.trace``, as the ``torchscript`` export
format writes it), frozen and optimized for inference, on the CPU or CUDA.

Timed like eager PyTorch (:class:`~autocompress.measure.runtimes._torch.TorchRuntime`: the same
prepared module, threads, ``inference_mode``, CUDA synchronization); only what runs differs.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from autocompress._inputs import run as call
from autocompress._inputs import trace_arguments
from autocompress.measure.runtimes._torch import TorchRuntime

if TYPE_CHECKING:
    import torch
    from torch import nn

# The profiling executor specializes a traced graph on its first runs; they belong to loading
# the model (as building an ONNX Runtime session does), not to the timed warm-up.
JIT_PROFILING_RUNS = 3


def script(module: nn.Module, inputs: Any) -> torch.jit.ScriptModule:
    """``module`` (baked, eval mode) traced on ``inputs`` (a dict: keyword arguments), frozen
    (parameters inlined as constants, BatchNorm folded into convolutions) and optimized for
    inference by ``torch.jit.optimize_for_inference``."""
    import torch

    with warnings.catch_warnings():  # tracer notes on frozen activation ranges, deprecation
        warnings.simplefilter("ignore")
        with torch.no_grad():
            traced = torch.jit.trace(module, **trace_arguments(inputs))
            scripted = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        with torch.inference_mode():
            for _ in range(JIT_PROFILING_RUNS):
                call(scripted, inputs)
    return scripted


class TorchScriptRuntime(TorchRuntime):
    """The baked module as a frozen TorchScript graph (see the module docstring)."""

    name = "torchscript"

    def compile(self, module: nn.Module, inputs: Any) -> nn.Module:
        return script(module, inputs)
