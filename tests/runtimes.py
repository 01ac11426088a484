"""The runtimes the runtime suite runs over, read from the registry: a runtime registered in
``autocompress/measure/runtimes/_table.py`` joins every parametrized runtime test with no edit
here. The remote device agent (``device: remote``) needs a server and is tested on its own
(``tests/test_agent.py``)."""

from __future__ import annotations

from typing import Any

from autocompress.measure.runtimes import devices_of, runtime_names

LOCAL_RUNTIMES = [name for name in runtime_names() if "cpu" in devices_of(name)]
CUDA_RUNTIMES = [name for name in runtime_names() if "cuda" in devices_of(name)]


def has_ort_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def cuda_here(runtime: str) -> bool:
    """Whether ``runtime`` can time on CUDA here: ONNX Runtime needs its CUDA provider, the
    torch-based runtimes (and by default any other) a CUDA device torch sees."""
    import torch

    return has_ort_cuda() if runtime == "onnxruntime" else torch.cuda.is_available()


def first_output(out: object) -> Any:
    """The first output of one inference, as an array, whatever a runtime's runner returns (a
    tensor, a list of arrays from ONNX Runtime, a tuple or dict of tensors)."""
    import numpy as np
    import torch

    if isinstance(out, dict):
        out = next(iter(out.values()))
    if isinstance(out, list | tuple):
        out = out[0]
    if isinstance(out, torch.Tensor):
        return out.detach().cpu().numpy()
    return np.asarray(out)
