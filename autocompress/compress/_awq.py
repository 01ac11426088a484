"""AWQ (Lin et al. 2023) and SmoothQuant (Xiao et al. 2022): per-input-channel scales chosen
on the calibration inputs. ``quantizer: awq``."""

from __future__ import annotations

from torch import nn

from autocompress.compress._calibration import Calibration
from autocompress.compress._plan import LayerPlan, PlanError


def scale_inputs(model: nn.Module, entries: dict[str, LayerPlan], calibration: Calibration) -> None:
    """Scales the input channels of the plan ``entries`` (``quantizer: awq``) before their
    weights are quantized."""
    raise PlanError("quantizer='awq' is not implemented yet")
