"""Compression methods. Each is a pure transform ``apply(model, plan, example_inputs)``.

``autocompress.compress.apply`` runs all of them in a fixed order: low-rank -> prune ->
quantize. To add a method, write one file with a function decorated by
``@register_method(name, order)`` and import it here.
"""

from autocompress.compress import lowrank, prune, quantize  # noqa: F401  (registration)
from autocompress.compress._modules import ActFakeQuant, LowRank, WeightCompression
from autocompress.compress._registry import apply, list_methods, register_method

__all__ = ["ActFakeQuant", "LowRank", "WeightCompression", "apply", "list_methods", "register_method"]
