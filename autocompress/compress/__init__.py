"""Compression: the plan, layer discovery and the registered compression methods.

Each method is a pure transform ``apply(model, plan, example_inputs)``;
:func:`apply` runs all of them in a fixed order: low-rank -> prune -> quantize. To add a
method, write one file with a function decorated by ``@register_method(name, order)`` and add
its module name to ``BUILTIN_METHODS`` in ``_registry.py`` (``lowrank.py`` is the one to copy).
Names are imported on first use, so the plan (torch-free) loads without torch.
"""

from autocompress._lazy import lazy_exports

_EXPORTS = {
    "_knobs": ("KNOBS", "KNOB_TABLE", "KnobSpec", "Heat"),
    "_plan": ("Plan", "LayerPlan", "PlanError"),
    "_layers": ("LayerInfo", "find_layers", "count_macs"),
    "_modules": ("ActFakeQuant", "LowRank", "WeightCompression"),
    "_registry": ("METHODS", "apply", "describe_layers", "list_methods", "register_method"),
    "_bake": ("bake", "export_onnx"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
