"""Weight formats: what a compressed weight's stored values are, one record per format.

``FORMATS`` is the registry (:class:`~autocompress._registry.Registry`) of
:class:`WeightFormat` records: ``fp32``, ``int2`` .. ``int8`` (uniform), ``pow2-3`` ..
``pow2-6`` (power-of-two levels), ``fp16``, ``bf16`` and ``fp8`` (e4m3, per-channel scales).
:func:`weight_format` maps the plan's ``bits``/``scheme`` values to one. Each format is applied
as fake quantization during fine-tuning (:class:`~autocompress.compress.WeightCompression`: the
rounded value forward, the gradient straight through), and says how it is packed, exported to
ONNX, folded and sized.

To add a format: one module registering it (copy ``_pow2.py``) and its name in
``BUILTIN_FORMATS`` (``_base.py``).
"""

from autocompress.compress.formats._base import (
    BUILTIN_FORMATS,
    FORMATS,
    InitializerSlot,
    OnnxNodes,
    StoredWeight,
    WeightFormat,
    compressed_value,
    format_name,
    per_row,
    plan_values,
    quantize_weight,
    weight_format,
)
from autocompress.compress.formats._bitpack import pack_bits, unpack_bits
from autocompress.compress.formats._float16 import (
    FLOAT_DTYPES,
    float_bytes,
    float_from_bytes,
    round_to_float,
)
from autocompress.compress.formats._fp8 import FP8_MAX, fp8_quantize
from autocompress.compress.formats._integer import IntegerFormat
from autocompress.compress.formats._pow2 import POW2_CANDIDATES, pow2_codes, pow2_from_codes

__all__ = ["BUILTIN_FORMATS", "FLOAT_DTYPES", "FORMATS", "FP8_MAX", "POW2_CANDIDATES", "InitializerSlot",
           "IntegerFormat", "OnnxNodes", "StoredWeight", "WeightFormat", "compressed_value",
           "float_bytes", "float_from_bytes", "format_name", "fp8_quantize", "pack_bits", "per_row",
           "plan_values", "pow2_codes", "pow2_from_codes", "quantize_weight", "round_to_float",
           "unpack_bits", "weight_format"]
