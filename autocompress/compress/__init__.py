"""Compression: the plan, layer discovery and the registered compression methods.

Each method is a pure transform ``apply(model, plan, example_inputs)``;
:func:`apply` runs all of them in a fixed order: low-rank -> prune -> quantize. To add a
method, write one file with a function decorated by ``@register_method(name, order)`` and add
its module name to ``BUILTIN_METHODS`` in ``_registry.py`` (``lowrank.py`` is the one to copy).
Names are imported on first use, so the plan (torch-free) loads without torch.
"""

from autocompress._lazy import lazy_exports

_WHERE = {
    "Plan": "autocompress.compress._plan",
    "LayerPlan": "autocompress.compress._plan",
    "PlanError": "autocompress.compress._plan",
    "LayerInfo": "autocompress.compress._layers",
    "find_layers": "autocompress.compress._layers",
    "count_macs": "autocompress.compress._layers",
    "ActFakeQuant": "autocompress.compress._modules",
    "LowRank": "autocompress.compress._modules",
    "WeightCompression": "autocompress.compress._modules",
    "apply": "autocompress.compress._registry",
    "list_methods": "autocompress.compress._registry",
    "register_method": "autocompress.compress._registry",
    "bake": "autocompress.compress._bake",
    "export_onnx": "autocompress.compress._bake",
}
__all__ = list(_WHERE)

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
