"""Compression: the plan, layer discovery and the registered compression methods.

Each method is a pure transform ``apply(model, plan, example_inputs)``;
:func:`apply` runs all of them in a fixed order: low-rank -> prune -> quantize. To add a
method, write one file with a function decorated by ``@register_method(name, order)`` and add
its module name to ``BUILTIN_METHODS`` in ``_registry.py`` (``lowrank.py`` is the one to copy).
Names are imported on first use, so the plan (torch-free) loads without torch. What a
compressed weight's values are is its format (:mod:`autocompress.compress.formats`); ONNX
export is a package of its own, :mod:`autocompress.onnxgraph`.
"""

from autocompress._lazy import lazy_exports

_EXPORTS = {
    "_knobs": ("KNOBS", "KNOB_TABLE", "KNOB_RULES", "KnobRule", "KnobSpec", "Heat", "reconcile",
               "same", "seed_knob", "why_refused", "needs_masks", "heat_maps"),
    "_plan": ("Plan", "LayerPlan", "PlanError"),
    "_layers": ("LayerInfo", "find_layers", "count_macs", "functional_layers", "output_tensors"),
    "_modules": ("ActFakeQuant", "FunctionalLowRank", "LowRank", "Regrowth", "WeightCompression",
                 "find_weight_compression", "act_quant_pre_hook", "leaves", "weight_compression"),
    "_registry": ("METHODS", "apply", "describe_layers", "list_methods", "register_method"),
    "_bake": ("bake", "dynamic_layers", "float_weights", "quantized_weights", "static_layers",
              "stored_weights"),
    "_fold": ("find_folds", "fold_factors", "fold_into", "folded"),
    "_ties": ("tensor_aliases", "weight_ties"),
    "_blocks": ("block_importance", "drop_blocks", "plan_after_drops"),
    "_knob_values": ("BLOCK",),
    "_calibration": ("DEFAULT_SAMPLES", "Calibration", "InputStats", "calibration_problem", "input_rows",
                     "input_stats", "output_error", "weight_matrix"),
    "_awq": ("InputScale", "input_scale_pre_hook"),
    "formats": ("FORMATS", "StoredWeight", "WeightFormat", "weight_format"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
