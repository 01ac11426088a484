"""autocompress: search per-layer compression plans for a trained PyTorch model."""

from typing import Any

from autocompress.plan import LayerPlan, Plan, PlanError

__version__ = "0.1.0"

__all__ = ["LayerPlan", "Plan", "PlanError", "__version__", "load_packed"]


def __getattr__(name: str) -> Any:
    # Lazy, so that ``import autocompress`` does not import torch.
    if name == "load_packed":
        from autocompress.packed import load_packed

        return load_packed
    raise AttributeError(f"module 'autocompress' has no attribute {name!r}")
