"""ONNX graph building: export of a (compressed) model, its weights as their formats store
them (block-wise ones on ONNX Runtime's weight-only kernels), matching layers to graph nodes,
ONNX Runtime's static/dynamic int8 quantization and its transformer fusions (``target.graph``).

Layer: above ``compress`` (it exports compressed models), below ``measure`` (latency is timed
on the exported graph). Names are imported on first use.
"""

from autocompress._lazy import lazy_exports

_EXPORTS = {
    "_causal": ("CausalLM", "causal_lm_feeds", "export_causal_lm", "is_causal_lm", "position_limit",
                "prefill_feed"),
    "_export": ("ONNX_OPSET", "export_onnx"),
    "_nbits": ("ACCURACY_LEVEL", "KERNELS", "BlockKernel", "pack_codes", "unpack_codes"),
    "_fusion": ("FUSED_OPS", "FUSION_RTOL", "Fused", "fuse", "fused_op_counts", "model_type",
                "verify_fused"),
    "_ort_quant": ("StaticLayer", "WeightMatch", "dynamic_nodes", "match_weight",
                   "quantize_dynamic_layers", "quantize_static_layers"),
    "_weights": ("store_weights",),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
