"""GPTQ (Frantar et al. 2022): integer weights rounded column by column, each rounding error
compensated on the columns not yet rounded with the inverse Hessian of the layer's calibration
inputs. ``quantizer: gptq``."""

from __future__ import annotations

from torch import nn

from autocompress.compress._calibration import Calibration
from autocompress.compress._plan import LayerPlan, PlanError


def gptq_round(model: nn.Module, entries: dict[str, LayerPlan], calibration: Calibration) -> None:
    """Moves the weights of the plan ``entries`` (integer ``bits``, ``quantizer: gptq``) onto
    their quantization grid with GPTQ's error compensation."""
    raise PlanError("quantizer='gptq' is not implemented yet")
