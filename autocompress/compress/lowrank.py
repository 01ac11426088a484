"""Low-rank factorization: truncated SVD of any layer, Tucker-2 or CP of a conv's kernel.

``decomposition: svd`` (the default): a Linear ``W (out x in)`` becomes
``Linear(in, r) -> Linear(r, out)``; a Conv with kernel k becomes a k x k conv with r output
channels followed by a 1x1 conv (Jaderberg et al., 2014, scheme 2 via SVD of the
``out x (in*k)`` unfolded weight); an Embedding ``E (num x dim)`` becomes
``Embedding(num, r) -> Linear(r, dim)`` (ALBERT's factorized embedding, Lan et al., 2020, here
initialized by SVD). The singular values are split evenly (sqrt) between the two factors.

``decomposition: whitened`` (calibrated): svd's two factors at svd's rank, fitted to the
layer's outputs on the calibration inputs instead of its weights (SVD-LLM, Wang et al. 2024:
the truncated SVD of ``W S``, ``S`` the Cholesky factor of the inputs' Gram matrix;
``_decompose.whitened_weights``); a conv's through its unfolded input patches. Refused where
the calibration cannot weigh the inputs (``calibration_problem``: embeddings, grouped convs).
Without calibration data (rebuilding a logged trial) the factors are svd's, and the logged
weights are loaded into them.

``decomposition: tucker`` and ``cp`` (``_decompose.py``), for a Conv1d/Conv2d with a spatial
kernel: Tucker-2 gives three convs (1x1, core, 1x1), CP four (1x1, depthwise per spatial axis,
1x1; three for a Conv1d).

``rank`` is the kept fraction of the decomposition's full rank, the rank that can hold the
layer exactly, at least 1 (``O`` outputs, ``I`` inputs, ``k`` the kernel's size):

- svd and whitened: ``r = rank * min(O, I*k)``; stores ``r * (I*k + O)`` weights;
- tucker: ``r_out = rank * min(O, I*k)`` (svd's r) and ``r_in = rank * min(I, O*k)``, the same
  fraction of each channel mode; stores ``I*r_in + r_in*r_out*k + r_out*O``, so about
  ``rank**2`` of the layer for a large kernel (a square 3x3 conv: rank 0.5 keeps 36%);
- cp: ``R = rank * ceil(O*I*k / (O + I + sum of kernel sides - N + 1))`` (``N`` the weight's
  dimensions), the generic CP rank (``_decompose.cp_rank``); stores
  ``R * (I + O + sum of kernel sides)``, about ``rank`` of the layer, as svd does.

Full rank reproduces the layer for svd and tucker; for cp only when the kernel's CP rank is
no higher (ALS finds the best fit it can). Refused (``limits``): grouped and depthwise convs
(their weight is not one matrix), layers whose parent reads their weight directly
(``nn.TransformerEncoderLayer``'s linears), tucker/cp on anything but a conv with a spatial
kernel and ``groups=1`` (Linear, Embedding, 1x1 convs: svd covers them), and, on a conv
subclass that computes its own forward, each decomposition whose factors do not reproduce
it (:func:`_rebuild_problem`: a weight-standardizing ``StdConv2d`` refuses rank).

Every factorized layer is a :class:`LowRank` (a Sequential: factors ``<name>.0``,
``<name>.1``, ...) of ordinary layers, so pruning and quantization act on each factor. A conv
factor that carries the layer's kernel (svd's first, Tucker's core, CP's depthwise convs) is
of the layer's own class, built without its constructor
(:func:`~autocompress.compress._convs.respecified`): a subclass that pads in its forward
(timm's ``Conv2dSame``: TensorFlow's "same" padding) pads it as it padded the layer, whatever
arguments its constructor takes. The 1x1 factors are plain convs.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from autocompress.compress._calibration import Calibration, InputStats, calibration_problem, input_stats
from autocompress.compress._convs import (
    overrides_forward,
    own_class,
    probe_copy,
    probe_input,
    relative_error,
    respecified,
)
from autocompress.compress._decompose import (
    Conv,
    cp_layers,
    cp_rank,
    cp_tensor,
    cp_weights,
    kept,
    pointwise,
    spatial_problem,
    tucker_layers,
    tucker_ranks,
    tucker_weights,
    whitened_weights,
)
from autocompress.compress._layers import LayerInfo, Refusal, functional_layers
from autocompress.compress._modules import FunctionalLowRank, LowRank
from autocompress.compress._plan import Plan, PlanError
from autocompress.compress._registry import pure, register_method

DECOMPOSITIONS = ("svd", "tucker", "cp", "whitened")
SVD_LIKE = ("svd", "whitened")  # two factors at svd's rank
#: The rank of a probe's kernel and of its factorizations (:func:`_rebuild_problem`): more than
#: one, so that CP's depthwise factors are grouped convs.
PROBE_RANK = 2
#: The largest relative output error of a probe's factorization that counts as exact.
PROBE_TOLERANCE = 1e-3
# _rebuild_problem's answers by (class, kernel layout, decomposition).
_PROBED: dict[tuple, str | None] = {}


def kept_rank(weight_shape: torch.Size | tuple[int, ...], fraction: float) -> int:
    """Number of singular values kept for a weight of this shape."""
    return kept(fraction, min(weight_shape[0], math.prod(weight_shape[1:])))


def factorize(layer: nn.Module, fraction: float, decomposition: str = "svd",
              fit: bool = True, stats: InputStats | None = None) -> LowRank:
    """The low-rank replacement of a Linear, Conv1d/Conv2d or Embedding layer.

    Args:
        layer: The layer (left as it is).
        fraction: The kept fraction of full rank (see the module docstring).
        decomposition: ``svd``, ``tucker``, ``cp`` or ``whitened``.
        fit: False gives the factors' architecture only, with freshly initialized weights
            (e.g. to count MACs without paying for the decomposition).
        stats: The layer's calibration input statistics (``whitened``; None: svd's weights).

    Raises:
        PlanError: The layer cannot take this decomposition.
    """
    if decomposition not in DECOMPOSITIONS:
        raise PlanError(f"unknown decomposition {decomposition!r}; allowed: {', '.join(DECOMPOSITIONS)}")
    problem = _problem(layer, decomposition)
    if problem is not None:
        raise PlanError(f"{decomposition}: {problem}")
    shape = _weight(layer).shape
    if decomposition in SVD_LIKE:
        ranks: tuple[int, ...] = (kept_rank(shape, fraction),)
    elif decomposition == "tucker":
        ranks = tucker_ranks(shape, fraction)
    else:
        ranks = (cp_rank(shape, fraction),)
    return _factorize(layer, decomposition, ranks, fit, stats)


def _problem(layer: nn.Module, decomposition: str) -> str | None:
    """Why ``layer`` cannot take ``decomposition`` (None if it can)."""
    if decomposition == "whitened":
        problem = calibration_problem(layer)
        return None if problem is None else f"it needs calibrated inputs: {problem}"
    return None if decomposition == "svd" else spatial_problem(layer)


def _factorize(layer: nn.Module, decomposition: str, ranks: tuple[int, ...],
               fit: bool, stats: InputStats | None = None) -> LowRank:
    """:func:`factorize` at these ranks: svd's and whitened's ``(r,)``, tucker's
    ``(r_in, r_out)``, cp's ``(R,)``."""
    w = _weight(layer)
    if decomposition in SVD_LIKE:
        (r,) = ranks
        if not fit:
            weights = None
        elif decomposition == "whitened" and stats is not None and stats.rows:
            weights = whitened_weights(w, stats.gram, r)
        else:
            weights = _svd_weights(w, r, isinstance(layer, nn.Embedding))
        return _chain(layer, _svd_layers(layer, r), weights)
    conv = cast(Conv, layer)
    if decomposition == "tucker":
        return _chain(conv, tucker_layers(conv, *ranks), tucker_weights(w, *ranks) if fit else None)
    return _chain(conv, cp_layers(conv, *ranks), cp_weights(w, *ranks) if fit else None)


def _weight(layer: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, layer.weight).detach()


def _chain(layer: nn.Module, factors: Sequence[nn.Module],
           weights: list[torch.Tensor] | None) -> LowRank:
    """``factors`` as a LowRank on ``layer``'s device, dtype and mode, holding ``weights`` and
    ``layer``'s bias on the last factor (None: left as initialized)."""
    w = _weight(layer)
    chain = LowRank(*factors).to(device=w.device, dtype=w.dtype).train(layer.training)
    if weights is not None:
        with torch.no_grad():
            for factor, weight in zip(chain, weights, strict=True):
                target = cast(torch.Tensor, factor.weight)
                target.copy_(weight.reshape(target.shape))
            bias = getattr(layer, "bias", None)
            if bias is not None:
                cast(torch.Tensor, chain[-1].bias).copy_(bias)
    return chain


def _svd_layers(layer: nn.Module, r: int) -> list[nn.Module]:
    """The two factors of rank ``r`` (weights not set): for a conv, its kernel to ``r``
    channels, then a 1x1 conv."""
    if isinstance(layer, nn.Embedding):  # ALBERT's factorized embedding: a table, a projection
        return [nn.Embedding(layer.num_embeddings, r, padding_idx=layer.padding_idx,
                             max_norm=layer.max_norm, norm_type=layer.norm_type,
                             scale_grad_by_freq=layer.scale_grad_by_freq, sparse=layer.sparse),
                nn.Linear(r, layer.embedding_dim, bias=False)]
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        return [nn.Linear(layer.in_features, r, bias=False),
                nn.Linear(r, layer.out_features, bias=has_bias)]
    conv = cast(Conv, layer)
    if conv.groups != 1:
        raise PlanError("low-rank factorization of grouped convolutions is not supported")
    # the first factor carries the kernel: of the layer's own class, to keep a subclass's padding
    return [respecified(conv, conv.in_channels, r, conv.kernel_size, False,
                        stride=conv.stride, padding=conv.padding, dilation=conv.dilation),
            pointwise(conv, r, conv.out_channels, bias=has_bias)]


def _svd_weights(w: torch.Tensor, r: int, embedding: bool) -> list[torch.Tensor]:
    """The factors' weights: ``w ~= outer @ inner`` with ``outer = U_r S_r^1/2`` and
    ``inner = S_r^1/2 V_r^T``; an embedding's table is ``outer``, its projection ``inner^T``."""
    u, s, vh = torch.linalg.svd(w.flatten(1), full_matrices=False)
    root = s[:r].sqrt()
    inner, outer = root[:, None] * vh[:r], u[:, :r] * root
    return [outer, inner.t()] if embedding else [inner, outer]


def _limits(model: nn.Module, example_inputs: Any, layers: list[LayerInfo]) -> dict[str, list[Refusal]]:
    out: dict[str, list[Refusal]] = {}
    functional = functional_layers(model)  # read as weight and bias: a FunctionalLowRank
    for layer in layers:
        mod = model.get_submodule(layer.name)
        refusals = []
        if isinstance(mod, nn.modules.conv._ConvNd) and mod.groups != 1:
            what = "depthwise" if mod.groups == mod.in_channels else "grouped"
            refusals.append(Refusal("rank", None, f"a {what} conv (groups={mod.groups}) has no "
                                                  f"single weight matrix to factorize"))
        elif layer.name not in functional and _parent_reads_weight(model, layer.name):
            parent = type(model.get_submodule(layer.name.rpartition(".")[0])).__name__
            refusals.append(Refusal("rank", None, f"its parent {parent} reads its weight "
                                                  f"directly, so it cannot become two layers"))
        elif overrides_forward(mod):
            refusals.extend(_subclass_refusals(cast(Conv, mod)))
        problem = spatial_problem(mod)
        if problem is not None:
            refusals += [Refusal("decomposition", d, problem) for d in ("tucker", "cp")]
        problem = None if layer.type == "Conv1D" else calibration_problem(mod)  # Conv1D: a Linear
        if problem is not None:
            refusals.append(Refusal("decomposition", "whitened", f"whitened weighs the layer's "
                                                                 f"inputs: {problem}"))
        if refusals:
            out[layer.name] = refusals
    return out


def _subclass_refusals(layer: Conv) -> list[Refusal]:
    """What a conv subclass with its own forward refuses: ``rank`` when an svd factorization
    does not compute what it does, else the decompositions that do not (the reasons name the
    class only, so that the search reports its layers once)."""
    svd = _rebuild_problem(layer, "svd")
    if svd is not None:
        return [Refusal("rank", None, svd)]
    if spatial_problem(layer) is not None:  # tucker and cp are refused anyway
        return []
    problems = {d: _rebuild_problem(layer, d) for d in ("tucker", "cp")}
    return [Refusal("decomposition", d, p) for d, p in problems.items() if p is not None]


def _rebuild_problem(layer: Conv, decomposition: str) -> str | None:
    """Why factorizing ``layer``, a conv whose class has its own forward, by ``decomposition``
    would not compute what the layer does (None: it would).

    Its forward may do anything, so it is checked: a small copy
    (:func:`~autocompress.compress._convs.probe_copy`: its class, kernel, stride, padding and
    dilation) holding a kernel of CP rank :data:`PROBE_RANK`, which svd, tucker and cp at that
    rank all hold exactly, is factorized, and the factors must give the copy's output on an
    input where TensorFlow-style "same" padding is uneven. A forward that pads and convolves
    passes; one that standardizes its weight (timm's ``StdConv2d``), ignores its groups or
    pads by a rule the factors' kernels break does not. Answers are kept per class and kernel
    layout: a subclass's behaviour is taken to depend on those alone.
    """
    key = (own_class(layer), layer.kernel_size, layer.stride, layer.padding, layer.dilation,
           layer.padding_mode, decomposition)
    if key not in _PROBED:
        _PROBED[key] = _probe(layer, decomposition)
    return _PROBED[key]


def _probe(layer: Conv, decomposition: str) -> str | None:
    """:func:`_rebuild_problem`, uncached."""
    probe = cast(Conv, probe_copy(layer))
    gen = torch.Generator().manual_seed(0)
    cp = [torch.randn(n, PROBE_RANK, generator=gen) for n in probe.weight.shape]
    ranks = (PROBE_RANK,) * (2 if decomposition == "tucker" else 1)
    name = type(probe).__name__
    try:
        with torch.no_grad():
            probe.weight.copy_(cp_tensor(cp))
            x = probe_input(probe)
            error = relative_error(_factorize(probe, decomposition, ranks, True)(x), probe(x))
    except Exception as e:  # noqa: BLE001  (whatever the subclass's forward raises)
        return (f"{name} computes its own forward, which fails on {decomposition} factors "
                f"({type(e).__name__})")
    if error > PROBE_TOLERANCE:
        return (f"{name} computes its own forward, which {decomposition} factors of the same "
                f"class do not reproduce")
    return None


def _parent_reads_weight(model: nn.Module, name: str) -> bool:
    """Whether the forward of the module holding layer ``name`` reads the layer's ``weight``
    or ``bias`` itself (``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` do, for
    their fused fast paths), which a factorized replacement does not have."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    try:
        source = inspect.getsource(type(parent).forward)
    except (OSError, TypeError):  # built in, or defined where its source is not kept
        return False
    return f"self.{attr}.weight" in source or f"self.{attr}.bias" in source


@register_method("lowrank", order=10, limits=_limits, calibrated=True)
def _lowrank(model: nn.Module, plan: Plan, example_inputs: Any, calibration: Calibration) -> None:
    todo = {n: lp for n, lp in plan.active().items() if lp.rank is not None}
    # whitened: the inputs of all its layers in one pass, before any layer is factorized
    whitened = [model.get_submodule(n) for n, lp in todo.items() if lp.decomposition == "whitened"
                and calibration_problem(model.get_submodule(n)) is None]
    stats = input_stats(model, whitened, calibration) if whitened and not calibration.is_empty else {}
    functional = functional_layers(model)
    for name, lp in todo.items():
        layer = model.get_submodule(name)
        try:
            new = factorize(layer, lp.rank, lp.decomposition, stats=stats.get(layer))
        except PlanError as e:
            raise PlanError(f"layer {name!r}: {e}") from None
        if name in functional:  # its parent reads its weight: the factors' product
            new = FunctionalLowRank(*new).train(new.training)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)


apply = pure("lowrank")
