"""ONNX graph building: export of a (compressed) model, its weights as their formats store
them, matching layers to graph nodes, and ONNX Runtime's static/dynamic int8 quantization.

Layer: above ``compress`` (it exports compressed models), below ``measure`` (latency is timed
on the exported graph). Names are imported on first use.
"""

from autocompress._lazy import lazy_exports

_EXPORTS = {
    "_causal": ("CausalLM", "causal_lm_feeds", "export_causal_lm", "is_causal_lm"),
    "_export": ("ONNX_OPSET", "export_onnx"),
    "_ort_quant": ("StaticLayer", "WeightMatch", "dynamic_nodes", "match_weight",
                   "quantize_dynamic_layers", "quantize_static_layers"),
    "_weights": ("store_weights",),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
