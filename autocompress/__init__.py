"""autocompress: search per-layer compression plans for a trained PyTorch model."""

from autocompress.plan import LayerPlan, Plan, PlanError

__version__ = "0.1.0"

__all__ = ["LayerPlan", "Plan", "PlanError", "__version__"]
