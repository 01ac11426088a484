"""Facts about the machine a measurement ran on (imports nothing heavy at import time: the
device agent uses :func:`cpu_model` without torch)."""

from __future__ import annotations

import functools
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo``, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def machine_facts() -> dict[str, str]:
    """CPU, runtime versions and Python of this machine, logged with every measurement."""
    import onnxruntime as ort
    import torch

    return {"cpu": cpu_model(), "torch": torch.__version__, "onnxruntime": ort.__version__,
            "python": platform.python_version()}


@functools.cache
def library_version(name: str) -> str:
    """The version of the installed package ``name`` as it reports it (``__version__``;
    imported now, once: ``openvino``'s names its build), or "" when it is not installed. For
    runtimes whose library is not in :func:`machine_facts` (which every latency-cache key
    holds, so it does not grow with optional runtimes)."""
    import importlib

    try:
        return str(importlib.import_module(name).__version__)
    except ImportError:
        return ""


def gpu_name() -> str:
    """The name of the current CUDA device."""
    import torch

    return torch.cuda.get_device_name()
