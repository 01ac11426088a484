"""The architecture half of the packed format: the forward as a ``torch.fx`` graph and the
constructor arguments of a whitelist of standard leaf modules, as plain JSON-ready data (no
pickle, no code). Functions in the graph are stored by qualified name and resolved only
under ``torch``, ``operator`` and ``math``."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import _get_qualified_name

from autocompress.compress import ActFakeQuant, InputScale, act_quant_pre_hook, input_scale_pre_hook

_CONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
         "padding_mode", "bias")



_NORM = ("num_features", "eps", "momentum", "affine", "track_running_stats")



_POOL = ("kernel_size", "stride", "padding", "ceil_mode")



#: Leaf module types the packed format can rebuild, with the constructor arguments it stores
#: (read back from the instance's attributes of the same name; ``bias`` means "has a bias").
LEAF_TYPES: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Linear: ("in_features", "out_features", "bias"),
    nn.Conv1d: _CONV, nn.Conv2d: _CONV,
    nn.BatchNorm1d: _NORM, nn.BatchNorm2d: _NORM,
    nn.LayerNorm: ("normalized_shape", "eps", "elementwise_affine", "bias"),
    nn.Embedding: ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                   "scale_grad_by_freq", "sparse"),
    nn.ReLU: ("inplace",), nn.ReLU6: ("inplace",), nn.SiLU: ("inplace",),
    nn.Hardswish: ("inplace",), nn.LeakyReLU: ("negative_slope", "inplace"),
    nn.GELU: ("approximate",), nn.Sigmoid: (), nn.Tanh: (), nn.Identity: (),
    nn.Softmax: ("dim",), nn.LogSoftmax: ("dim",),
    nn.Dropout: ("p", "inplace"), nn.Dropout1d: ("p", "inplace"), nn.Dropout2d: ("p", "inplace"),
    nn.MaxPool1d: (*_POOL, "dilation"), nn.MaxPool2d: (*_POOL, "dilation"),
    nn.AvgPool1d: (*_POOL, "count_include_pad"), nn.AvgPool2d: (*_POOL, "count_include_pad"),
    nn.AdaptiveAvgPool1d: ("output_size",), nn.AdaptiveAvgPool2d: ("output_size",),
    nn.AdaptiveMaxPool1d: ("output_size",), nn.AdaptiveMaxPool2d: ("output_size",),
    nn.Flatten: ("start_dim", "end_dim"),
    ActFakeQuant: ("bits", "momentum", "dynamic"),
    InputScale: ("shape",),
}

#: The forward pre-hooks compression adds to a layer, each calling one child of it on the
#: layer's input (``{hook: (child attribute, child type)}``): stored as explicit calls.
PRE_HOOKS: dict[Any, tuple[str, type[nn.Module]]] = {
    input_scale_pre_hook: ("input_scale", InputScale),  # AWQ / SmoothQuant's 1/s
    act_quant_pre_hook: ("act_quant", ActFakeQuant),
}



_BY_NAME = {cls.__name__: cls for cls in LEAF_TYPES}



_FUNCTION_ROOTS = ("torch", "operator", "_operator", "math")



_BUILTINS = {"getattr": getattr}



class PackedFormatError(ValueError):
    """A model the packed format cannot describe, or a file that is not a valid packed model."""



class Tracer(fx.Tracer):
    """Leaves are exactly the whitelisted types; everything else is traced through."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in LEAF_TYPES

    def call_module(self, m: nn.Module, forward, args: tuple, kwargs: dict) -> Any:
        # fx records a leaf as one call and skips its hooks: make compression's pre-hooks
        # (PRE_HOOKS) explicit calls, and refuse any other hook rather than silently drop it.
        if self.is_leaf_module(m, ""):
            pre = list(m._forward_pre_hooks.values())
            children = [PRE_HOOKS.get(hook) for hook in pre]
            if m._forward_hooks or not all(
                    c is not None and isinstance(getattr(m, c[0], None), c[1]) for c in children):
                raise PackedFormatError(f"module {self.path_of_module(m)!r} has forward hooks, "
                                        "which the packed format cannot store")
            for attr, _ in children:  # type: ignore[misc]
                child = getattr(m, attr)
                args = (super().call_module(child, child.forward, args[:1], {}), *args[1:])
        return super().call_module(m, forward, args, kwargs)



def module_spec(m: nn.Module) -> list:
    """``[type name, constructor kwargs]``, leaving out the arguments at their defaults."""
    defaults = _defaults(type(m))
    kwargs = {}
    for attr in LEAF_TYPES[type(m)]:
        value = (m.bias is not None) if attr == "bias" else getattr(m, attr)
        value = list(value) if isinstance(value, tuple) else value
        if attr in ("kernel_size", "stride", "padding", "dilation") and isinstance(value, list) \
                and len(set(value)) == 1:
            value = value[0]  # (3, 3) -> 3: the constructors expand a single int
        if attr not in defaults or defaults[attr] != value:
            kwargs[attr] = value
    return [type(m).__name__, kwargs] if kwargs else [type(m).__name__]



def _defaults(cls: type[nn.Module]) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}



def build_module(spec: list) -> nn.Module:
    name, kwargs = spec[0], (spec[1] if len(spec) > 1 else {})
    cls = _BY_NAME.get(name)
    if cls is None:
        raise PackedFormatError(f"unknown module type {name!r} in packed file")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})



def _encode_arg(a: Any, index: dict[fx.Node, int]) -> Any:
    if isinstance(a, fx.Node):
        return {"n": index[a]}
    if isinstance(a, tuple):
        return {"t": [_encode_arg(x, index) for x in a]}
    if isinstance(a, list):
        return [_encode_arg(x, index) for x in a]
    if isinstance(a, dict):
        return {"d": [[k, _encode_arg(v, index)] for k, v in a.items()]}
    if isinstance(a, slice):
        return {"s": [_encode_arg(x, index) for x in (a.start, a.stop, a.step)]}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if a is Ellipsis:
        return {"e": 0}
    if a is None or isinstance(a, bool | int | float | str):
        return a
    raise PackedFormatError(f"the packed format cannot store a {type(a).__name__} in the graph")



def _decode_arg(a: Any, nodes: list[fx.Node]) -> Any:
    if isinstance(a, list):
        return [_decode_arg(x, nodes) for x in a]
    if not isinstance(a, dict):
        return a
    (key, value), = a.items()
    if key == "n":
        return nodes[value]
    if key == "t":
        return tuple(_decode_arg(x, nodes) for x in value)
    if key == "d":
        return {k: _decode_arg(v, nodes) for k, v in value}
    if key == "s":
        return slice(*(_decode_arg(x, nodes) for x in value))
    if key == "dtype":
        return getattr(torch, value)
    return Ellipsis



def _function_name(fn: Any) -> str:
    name = _get_qualified_name(fn)
    if _resolve_function(name) is not fn:
        raise PackedFormatError(f"function {name!r} in the forward cannot be stored by name")
    return name



def _resolve_function(name: str) -> Any:
    """The function named ``name``, only from torch, operator, math or ``getattr``."""
    if name in _BUILTINS:
        return _BUILTINS[name]
    parts = name.split(".")
    if parts[0] not in _FUNCTION_ROOTS:
        raise PackedFormatError(f"function {name!r} is not allowed in a packed file "
                                f"(only {', '.join(_FUNCTION_ROOTS)} and getattr)")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj
    raise PackedFormatError(f"function {name!r} not found")



def encode_graph(graph: fx.Graph) -> list:
    index = {node: i for i, node in enumerate(graph.nodes)}
    out = []
    for node in graph.nodes:
        target = _function_name(node.target) if node.op == "call_function" else node.target
        out.append([node.op, target, _encode_arg(node.args, index)["t"],
                    _encode_arg(node.kwargs, index)["d"]])
    return out



def decode_graph(entries: list) -> fx.Graph:
    graph = fx.Graph()
    nodes: list[fx.Node] = []
    for op, target, args, kwargs in entries:
        if op == "call_function":
            target = _resolve_function(target)
        args = tuple(_decode_arg(a, nodes) for a in args)
        kwargs = {k: _decode_arg(v, nodes) for k, v in kwargs}
        if op == "output":
            nodes.append(graph.output(args[0]))
        else:
            nodes.append(graph.create_node(op, target, args, kwargs))
    return graph
