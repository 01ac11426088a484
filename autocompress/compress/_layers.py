"""Finding the compressible layers of a model and counting their parameters and MACs.

A layer is compressible by what it is, not by its exact class: subclasses of ``Conv1d``,
``Conv2d``, ``Linear`` and ``Embedding`` (timm's and EfficientNet's padded convs, quantization
wrappers, ...) count as their base kind, and so does Hugging Face's GPT-2 style ``Conv1D``
(a linear layer with a transposed weight) when transformers is installed. Each layer reports
its *kind* (``LayerInfo.type``: what a search space's ``types:`` selects) and its class.

One forward pass with hooks tells, per layer, its MACs, whether it runs at all (``used``:
layers the forward never calls, e.g. BERT's pooler when only the hidden states are used, are
listed but never compressed or searched) and which layer produces the model output.

``nn.MultiheadAttention`` never calls its ``out_proj`` as a module: it passes the layer's
``weight`` and ``bias`` to a functional call. Such a layer counts as running when its attention
runs (its MACs: the attention's output elements times its input width), and it is compressed
through what the call reads (the parametrized weight; a low-rank factorization as
:class:`~autocompress.compress._modules.FunctionalLowRank`, whose ``weight`` is the factors'
product). What needs the layer's own call (its inputs: activation quantization, the calibrated
methods) or other shapes (channel cuts) it refuses (:func:`functional_refusals`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from autocompress._errors import ConfigError
from autocompress._inputs import batch_size, run
from autocompress.compress._blocks import block_candidates, block_hook, drop_refusal
from autocompress.compress._knob_values import BLOCK, CALIBRATED
from autocompress.compress._ties import weight_ties

COMPRESSIBLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.Embedding)
# Kinds by name, in the order a search space lists them; "Conv1D" is Hugging Face's (a name,
# so that this module does not import transformers).
# Blocks (_blocks.py) last: what a plan may drop.
KINDS = (*(t.__name__ for t in COMPRESSIBLE_TYPES), "Conv1D", BLOCK)


@dataclass(frozen=True)
class Refusal:
    """A knob value a layer cannot take, and why (e.g. ``rank`` on a depthwise conv).

    Attributes:
        knob: The knob (a ``LayerPlan`` field).
        value: The refused value; None refuses every value that changes something.
        reason: Why, in a few words (shown by ``autocompress layers`` and in errors).
    """

    knob: str
    value: Any
    reason: str

    def refuses(self, knob: str, value: Any, default: Any) -> bool:
        """Whether this refusal covers ``knob=value`` (``default`` is the knob's no-op)."""
        return knob == self.knob and (value == self.value if self.value is not None
                                      else value != default)


@dataclass(frozen=True)
class LayerInfo:
    """One compressible layer.

    Attributes:
        name: Module name as in ``model.named_modules()``.
        type: Its kind: ``Conv1d``, ``Conv2d``, ``Linear``, ``Embedding`` or ``Conv1D``.
        shape: Weight shape.
        params: Parameters of the layer (weight and bias).
        macs: Multiply-accumulates for one sample.
        is_output: True if the layer produces the model output; its output channels cannot be
            removed (the classes would change), so ``channel`` pruning is not allowed on it.
        used: False if the model's output does not depend on it (the forward never runs it, or
            drops its result); such a layer is never compressed or searched.
        cls: Its class name, when it is not the kind itself (a subclass).
        refusals: Knob values the layer cannot take (from the compression methods' limits).
        shared_with: The other layers whose weight is this layer's very matrix (tied weights,
            e.g. a decoder's token embedding and output layer): it is stored once and
            compressed once, as the first of them says (:mod:`autocompress.compress._ties`).
    """

    name: str
    type: str
    shape: tuple[int, ...]
    params: int
    macs: int
    is_output: bool = False
    used: bool = True
    cls: str = ""
    refusals: tuple[Refusal, ...] = field(default=(), compare=False)
    shared_with: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """The ``layers --json`` form: ``used``, ``cls``, ``refusals`` and ``shared_with`` only
        when they say something (a layer that does not run, a subclass, refused knob values,
        a tied weight)."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["refusals"] = [asdict(r) for r in self.refusals]
        d["shared_with"] = list(self.shared_with)
        for key, default in (("used", True), ("cls", ""), ("refusals", []), ("shared_with", [])):
            if d[key] == default:
                del d[key]
        return d


def kind(module: nn.Module) -> str | None:
    """The compressible kind of ``module`` (see the module docstring), or None."""
    for t in COMPRESSIBLE_TYPES:
        if isinstance(module, t):
            return t.__name__
    if is_hf_conv1d(module):
        return "Conv1D"
    return None


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is (a subclass of) Hugging Face's ``Conv1D`` (``y = x @ W + b`` with
    ``W`` of shape ``(in, out)``), without importing transformers."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers")
               for c in type(module).__mro__)


def weight_of(module: nn.Module) -> torch.Tensor:
    """The layer's weight with output channels first (Hugging Face ``Conv1D`` transposed)."""
    return module.weight.t() if is_hf_conv1d(module) else module.weight


def count_macs(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """MACs per module name for one sample, counted with forward hooks on compressible layers.

    Conv: output elements x (in_channels / groups) x kernel size. Linear and ``Conv1D``: output
    elements x in_features. Embedding: 0 (a lookup). Sparsity is not discounted: these are
    dense MACs of the stored shapes.
    """
    return _trace(model, example_inputs, reach=False)[0]


def find_layers(model: nn.Module, example_inputs: Any, blocks: bool = False) -> list[LayerInfo]:
    """The compressible layers of ``model`` in definition order (see the module docstring),
    then, with ``blocks``, the blocks a plan can drop (:mod:`~autocompress.compress._blocks`).

    Refusals are not filled in here (but a functionally used layer's, and a block's ``drop``):
    :func:`autocompress.compress.describe_layers` adds the compression methods' limits.
    """
    seen: dict[str, tuple] = {}
    candidates = block_candidates(model, lambda m: kind(m) is not None) if blocks else {}
    macs, calls, matter = _trace(model, example_inputs, candidates=candidates, seen=seen)
    output_layer = next((n for n in reversed(calls) if n in matter), None)
    groups: dict[str, list[str]] = {}  # owner -> every layer holding its weight
    for alias, owner in weight_ties(model).items():
        groups.setdefault(owner, [owner]).append(alias)
    tied = {n: g for g in groups.values() for n in g}
    out = []
    for name, mod in model.named_modules():
        k = kind(mod)
        if k is None or not name:
            continue
        out.append(LayerInfo(
            name=name, type=k, shape=tuple(weight_of(mod).shape),
            params=sum(p.numel() for p in mod.parameters(recurse=False)),
            macs=macs.get(name, 0), is_output=name == output_layer, used=name in matter,
            cls="" if type(mod).__name__ == k else type(mod).__name__,
            shared_with=tuple(n for n in tied.get(name, ()) if n != name),
            refusals=functional_refusals(model, name),
        ))
    return out + _blocks(model, candidates, seen, macs)


def _blocks(model: nn.Module, candidates: dict[str, nn.Module], seen: dict[str, tuple],
            macs: dict[str, int]) -> list[LayerInfo]:
    """The blocks among ``candidates`` that ran with their output shaped as their input."""
    out = []
    for name, mod in candidates.items():
        if name not in seen or seen[name][0] != seen[name][1]:
            continue
        reason = drop_refusal(model, name, single_input=seen[name][2])
        inner = [f"{name}.{n}" if n else name for n, _ in mod.named_modules()]
        out.append(LayerInfo(
            name=name, type=BLOCK, shape=seen[name][1][1:],
            params=sum(p.numel() for p in mod.parameters()),
            macs=sum(macs.get(n, 0) for n in inner), cls=type(mod).__name__,
            refusals=(Refusal("drop", True, reason),) if reason else ()))
    return out


def functional_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{layer name: the module whose forward uses it}`` for the layers that a parent's
    functional call uses instead of calling them (``nn.MultiheadAttention.out_proj``)."""
    return {f"{n}.out_proj" if n else "out_proj": m for n, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention) and kind(m.out_proj) is not None}


def functional_refusals(model: nn.Module, name: str) -> tuple[Refusal, ...]:
    """What a layer that its parent uses through a functional call refuses (none for the
    others): what needs the layer's own call or changes its shape."""
    parent = functional_layers(model).get(name)
    if parent is None:
        return ()
    why = f"{type(parent).__name__} passes its weight to a functional call"
    return (Refusal("structure", "channel", f"{why}, which needs its full output width"),
            Refusal("act_bits", None, f"{why}: its inputs are never seen"),
            *(Refusal(knob, value, f"{why}: its inputs are never seen to calibrate on")
              for knob, values in CALIBRATED.items() for value in values))


def _trace(model: nn.Module, example_inputs: Any, reach: bool = True,
           candidates: dict[str, nn.Module] | None = None,
           seen: dict[str, tuple] | None = None) -> tuple[dict[str, int], list[str], set[str]]:
    """One forward pass: MACs of each compressible layer that runs, every call in order, and
    the layers whose output reaches the model output.

    A layer can run and still not matter: BERT computes its pooler even when the model returns
    pooled hidden states, and the ONNX exporter then drops it. So a backward pass from the
    outputs decides (a layer matters when its parameters get a gradient); the last layer to run
    among those produces the output. A forward that runs under ``no_grad`` gives no gradient
    at all: then every layer that runs counts. ``reach=False`` skips the backward pass (for
    the MACs alone; every layer that runs is returned as reaching the output).
    ``candidates`` (blocks, by name): their input and output shapes go to ``seen``
    (:func:`~autocompress.compress._blocks.block_hook`).
    """
    macs: dict[str, int] = {}
    calls: list[str] = []
    batch = batch_size(example_inputs)

    def hook(name: str):
        def fn(mod: nn.Module, _inp: Any, out: Any) -> None:
            calls.append(name)
            macs[name] = macs.get(name, 0) + _macs(mod, out, batch)

        return fn

    layers = {n: m for n, m in model.named_modules() if n and kind(m) is not None}
    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    handles += [parent.register_forward_hook(_functional_hook(hook(n), layers[n]))
                for n, parent in functional_layers(model).items()]
    handles += [m.register_forward_hook(block_hook(seen if seen is not None else {}, n),
                                        with_kwargs=True)
                for n, m in (candidates or {}).items()]
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad() if reach else torch.no_grad():
            try:
                out = run(model, example_inputs)
            except Exception as e:  # noqa: BLE001  (whatever the user's forward raises)
                raise ConfigError(f"the model's forward fails on the example inputs "
                                  f"({_shapes(example_inputs)}): {type(e).__name__}: {e}",
                                  key="example_inputs") from None
            matter = _reaching_output(out, {n: layers[n] for n in macs}) if reach else set(macs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return macs, calls, matter


def _functional_hook(hook: Any, layer: nn.Module) -> Any:
    """A forward hook on a parent (``nn.MultiheadAttention``) that reports its functionally
    used ``layer`` as called, with the parent's first output as the layer's output."""

    def fn(_mod: nn.Module, inp: Any, out: Any) -> None:
        first = out[0] if isinstance(out, tuple) else out
        hook(layer, inp, first)

    return fn


def _shapes(inputs: Any) -> str:
    if isinstance(inputs, torch.Tensor):
        return f"a tensor of shape {tuple(inputs.shape)}"
    if isinstance(inputs, dict):
        return ", ".join(f"{k}: {tuple(v.shape)}" for k, v in inputs.items())
    return ", ".join(str(tuple(v.shape)) for v in inputs)


def _reaching_output(out: Any, layers: dict[str, nn.Module]) -> set[str]:
    """The names of ``layers`` whose parameters the float outputs ``out`` depend on."""
    tensors = [t for t in output_tensors(out) if t.is_floating_point() and t.requires_grad]
    params = {n: [p for p in m.parameters() if p.requires_grad] for n, m in layers.items()}
    flat = [p for ps in params.values() for p in ps]
    if not tensors or not flat:
        return set(layers)
    total = sum(t.float().sum() for t in tensors)
    grads = torch.autograd.grad(total, flat, allow_unused=True)
    got = {id(p) for p, g in zip(flat, grads, strict=True) if g is not None}
    return {n for n, ps in params.items() if any(id(p) in got for p in ps)} or set(layers)


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, or nested tuples, lists and mappings such
    as Hugging Face's ``ModelOutput``), in order; anything else is skipped."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in output_tensors(v)]
    if isinstance(out, tuple | list):
        return [t for v in out for t in output_tensors(v)]
    return []


def _macs(mod: nn.Module, out: Any, batch: int) -> int:
    if not isinstance(out, torch.Tensor) or isinstance(mod, nn.Embedding):
        return 0
    if isinstance(mod, nn.modules.conv._ConvNd):
        per_out = mod.weight[0].numel()
    elif isinstance(mod, nn.Linear):
        per_out = mod.in_features
    else:  # Hugging Face Conv1D: weight (in, out)
        per_out = mod.weight.shape[0]
    return out.numel() // batch * per_out
