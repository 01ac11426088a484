"""Weight formats: what a compressed weight's stored values are, one record per format.

``FORMATS`` is the registry (:class:`~autocompress._registry.Registry`) of
:class:`WeightFormat` records: ``fp32``, ``int2`` .. ``int8`` (uniform), ``int2-g32`` ..
``int8-g128`` (uniform, one scale per group of 32/64/128 input columns), ``pow2-3`` ..
``pow2-6`` (power-of-two levels), ``fp16``, ``bf16`` and ``fp8`` (e4m3, per-channel scales).
:func:`weight_format` maps the plan's ``bits``/``scheme``/``group_size`` values to one. Each format is applied
as fake quantization during fine-tuning (:class:`~autocompress.compress.WeightCompression`: the
rounded value forward, the gradient straight through), and says how it is packed, exported to
ONNX (``to_onnx``; a block-wise format also ``blocks``: its codes as ONNX Runtime's weight-only
kernels take them), folded and sized.

To add a format: one module registering it (copy ``_pow2.py``) and its name in
``BUILTIN_FORMATS`` (``_names.py``).
"""

from autocompress._lazy import lazy_exports

# Imported on first use: the names (``_names``) load without torch.
_EXPORTS = {
    "_names": ("BUILTIN_FORMATS", "FORMATS", "GROUP_SIZES", "float_format_names", "format_name",
               "plan_values"),
    "_base": ("BlockCodes", "InitializerSlot", "OnnxNodes", "StoredWeight", "WeightFormat",
              "compressed_value", "per_row", "quantize_weight", "weight_format"),
    "_bitpack": ("pack_bits", "unpack_bits"),
    "_float16": ("FLOAT_DTYPES", "float_bytes", "float_from_bytes", "round_to_float"),
    "_fp8": ("FP8_MAX", "fp8_quantize"),
    "_grouped": ("GroupedFormat", "expand_scales", "group_quantize"),
    "_integer": ("IntegerFormat",),
    "_pow2": ("POW2_CANDIDATES", "pow2_codes", "pow2_from_codes"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
