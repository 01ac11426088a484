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


def gpu_name() -> str:
    """The name of the current CUDA device."""
    import torch

    return torch.cuda.get_device_name()
