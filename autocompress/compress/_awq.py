"""AWQ (Lin et al. 2023) and SmoothQuant (Xiao et al. 2022): per-input-channel scales chosen
on the calibration inputs. ``quantizer: awq``.

A layer ``y = W x`` computes the same ``y = (W diag(s)) (x / s)`` for any positive ``s`` (one
per input channel), but not once quantized: scaling up the columns that meet large inputs
gives them finer levels (relative to their size) at the cost of the others, and dividing the
input by ``s`` flattens its outlier channels before an 8-bit activation quantizer sees them.
The layer then computes ``Q(W diag(s)) (x / s)``: its weight parameter becomes ``W diag(s)``
(what is quantized, stored and fine-tuned), and ``1/s`` is applied to its input by an
:class:`InputScale` child, ``<layer>.input_scale``, whose buffer ``factor`` holds it, called
by a forward pre-hook (:func:`input_scale_pre_hook`) that runs before the activation
quantizer's, so that ``act_bits`` quantizes the scaled input. Exported to ONNX it is a ``Mul``
by a constant before the layer's MatMul/Conv; the packed format stores ``factor`` (fp32, one
per input channel, counted by ``size_bytes`` as any buffer).

``s`` is searched per layer on a grid, as both papers do, for the least layer-local output
error after quantization at the plan's bits (through the plan's weight format,
:func:`~autocompress.compress.formats.weight_format`, so grouped formats plug in),
``||X W^T - Q_a(X / s) Q(W diag(s))^T||^2`` on a sample of :data:`SAMPLE_ROWS` input rows
``X`` (:class:`InputSample`, kept in one pass over the calibration data; a sample, not the
inputs' ``d x d`` Gram matrix: at MiniLM's widths accumulating that over every calibration
token costs more than the whole search):

- AWQ (``llm-awq``'s ``auto_scale``): ``s = mean|x|^a``, ``a`` in ``0, 0.05, .., 0.95``,
  normalized so that ``max(s) * min(s) = 1``; ``Q_a`` is the identity (weight-only);
- with ``act_bits`` (8 or ``"dynamic"``) also SmoothQuant's ``s = max|x|^a / max|w|^(1-a)``
  (``max|w|`` over the column), and ``Q_a`` fake-quantizes the scaled input to uint8 per
  tensor for both families (range: the calibration inputs' min/max divided by ``s``; a
  dynamic quantizer's per-call range is at most that).

``a = 0`` of the AWQ family is ``s = 1``, plain round-to-nearest: the chosen ``s`` is never
worse than it on the sampled rows. A conv is scaled per input channel (``s`` repeats over
the kernel positions); a low-rank layer only in its first factor (whose input is the layer's;
the other factors are quantized as they are). A layer whose weight another module shares
(tied weights) keeps ``s = 1``: the other module would compute with the scaled weight. ``1/s``
is not folded into a preceding LayerNorm or Linear: a Mul per layer, as the graph is not
assumed to be known.

Then AWQ's second step (``auto_clip``): per output channel, the scaled weight is clamped to
the bound of least output error on the sampled rows (:func:`search_clip`; no clamp when that
is best). The clamped weight is the parameter, so its format's scale follows from it (rebuilt
or fine-tuned alike).

Without calibration data (:meth:`Calibration.empty`, rebuilding a logged trial) each layer
gets its :class:`InputScale` with ``factor`` all ones; the logged state fills it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from autocompress.compress._calibration import Calibration, hooked_pass, input_rows, weight_matrix
from autocompress.compress._modules import ActFakeQuant, leaves
from autocompress.compress._plan import LayerPlan
from autocompress.compress.formats import WeightFormat, weight_format

__all__ = ["GRID", "SAMPLE_ROWS", "InputSample", "InputScale", "input_samples",
           "input_scale_pre_hook", "scale_inputs", "scale_shape", "search_clip", "search_scale"]

GRID = 20  # exponents a = 0, 1/GRID, ..., (GRID-1)/GRID (llm-awq's n_grid)
SAMPLE_ROWS = 2048  # input rows per layer the objective is measured on
_MIN_SCALE = 1e-4  # llm-awq clamps mean|x|^a at 1e-4; SmoothQuant its scales at 1e-5


class InputScale(nn.Module):
    """Multiplies a layer's input by a fixed factor per input channel (``1/s`` of AWQ /
    SmoothQuant; the module docstring).

    Args:
        shape: The factor's shape, broadcast over the layer's input: ``(in_features,)`` of a
            Linear, ``(in_channels, 1, ..)`` of a conv (:func:`scale_shape`).
    """

    def __init__(self, shape: tuple[int, ...] | list[int]) -> None:
        super().__init__()
        self.shape = tuple(int(d) for d in shape)
        self.register_buffer("factor", torch.ones(self.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


def input_scale_pre_hook(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: multiplies a layer's input by its ``input_scale`` child."""
    return (module.input_scale(args[0]), *args[1:])


def scale_shape(module: nn.Module) -> tuple[int, ...]:
    """The shape of ``module``'s :class:`InputScale` factor: one per input channel, broadcast
    over its input (a Linear's last dimension, a conv's dimension 1)."""
    if isinstance(module, nn.Linear):
        return (module.in_features,)
    return (module.in_channels, *[1] * len(module.kernel_size))


def _add_input_scale(leaf: nn.Module) -> InputScale:
    """Gives ``leaf`` an :class:`InputScale` (ones) and its pre-hook, first of its pre-hooks."""
    leaf.input_scale = InputScale(scale_shape(leaf)).to(leaf.weight.device)
    leaf.register_forward_pre_hook(input_scale_pre_hook, prepend=True)
    return leaf.input_scale


def _stored_weight(leaf: nn.Module) -> torch.Tensor:
    """The tensor ``leaf`` stores its weight in (the parametrization's original, if any)."""
    if parametrize.is_parametrized(leaf, "weight"):
        return leaf.parametrizations.weight.original
    return leaf.weight


def _shared(model: nn.Module) -> set[int]:
    """``id``s of the modules whose stored weight another module stores too (tied weights)."""
    holders: dict[int, list[nn.Module]] = {}
    for mod in model.modules():
        w = getattr(mod, "weight", None) if not isinstance(mod, parametrize.ParametrizationList) else None
        if isinstance(w, torch.Tensor):
            holders.setdefault(_stored_weight(mod).data_ptr(), []).append(mod)
    return {id(m) for mods in holders.values() if len(mods) > 1 for m in mods}


@torch.no_grad()
def scale_inputs(model: nn.Module, entries: dict[str, LayerPlan], calibration: Calibration) -> None:
    """Scales the input channels of the plan ``entries`` (integer ``bits``, ``quantizer:
    awq``) before their weights are quantized (the module docstring): each layer (a low-rank
    layer's first factor) gets its :class:`InputScale`; with calibration data, its searched
    ``1/s``, and its weight becomes ``W diag(s)``, clamped per output channel
    (:func:`search_clip`)."""
    targets = {name: leaves(model, name)[0] for name in entries}
    for leaf in targets.values():
        _add_input_scale(leaf)
    if calibration.is_empty:
        return  # rebuilding: the logged state holds the scales and the scaled weights
    shared = _shared(model)
    todo = {name: leaf for name, leaf in targets.items() if id(leaf) not in shared}
    samples = input_samples(model, list(todo.values()), calibration)
    for name, leaf in todo.items():
        s = search_scale(leaf, entries[name], samples[leaf])
        clip = search_clip(leaf, entries[name], samples[leaf], s)
        stored = _stored_weight(leaf)
        stored.mul_(s.view(1, -1, *[1] * (stored.dim() - 2)))
        bound = clip.view(-1, *[1] * (stored.dim() - 1))
        stored.copy_(torch.maximum(torch.minimum(stored, bound), -bound))
        leaf.input_scale.factor.copy_((1 / s).view(scale_shape(leaf)))


class InputSample:
    """What a layer's inputs were over the calibration data: per input channel their min,
    max and mean ``|x|`` over all of them, and a sample of its input rows
    (:func:`~autocompress.compress.input_rows`: a seeded random subset, at most
    :data:`SAMPLE_ROWS`)."""

    def __init__(self, quota: int = SAMPLE_ROWS) -> None:
        self.quota = quota  # rows kept per call
        self.rows: list[torch.Tensor] = []
        self.lo = self.hi = self.abssum = torch.zeros(0)
        self.count = 0

    def add(self, module: nn.Module, x: torch.Tensor) -> None:
        """Accumulates one input ``x`` of ``module`` (a Linear or a conv)."""
        x = x.detach().float()
        channels = x.reshape(-1, x.shape[-1]) if isinstance(module, nn.Linear) else \
            x.transpose(0, 1).reshape(x.shape[1], -1).T
        lo, hi = channels.amin(0), channels.amax(0)
        abssum = channels.abs().sum(0, dtype=torch.float64)
        first = not self.count
        self.lo = lo if first else torch.minimum(self.lo, lo)
        self.hi = hi if first else torch.maximum(self.hi, hi)
        self.abssum = abssum if first else self.abssum + abssum
        self.count += len(channels)
        rows = input_rows(module, x)
        # A random (seeded: deterministic) subset: a stride can alias with the spatial grid
        # of a conv's unfolded patches and keep only border positions.
        keep = torch.randperm(len(rows), generator=torch.Generator().manual_seed(len(self.rows)))
        self.rows.append(rows[keep[:self.quota].sort().values].clone())

    @property
    def mean_abs(self) -> torch.Tensor:
        """Mean ``|x|`` per input channel (AWQ's activation scale)."""
        return (self.abssum / max(self.count, 1)).float()

    @property
    def absmax(self) -> torch.Tensor:
        """Largest ``|x|`` per input channel (SmoothQuant's)."""
        return torch.maximum(self.lo.abs(), self.hi.abs())

    def matrix(self) -> torch.Tensor:
        """The sampled input rows, ``(n, d)``, ``n <= SAMPLE_ROWS``."""
        rows = torch.cat(self.rows)
        if len(rows) > SAMPLE_ROWS:
            rows = rows[torch.linspace(0, len(rows) - 1, SAMPLE_ROWS).long()]
        return rows


def input_samples(model: nn.Module, modules: list[nn.Module],
                  calibration: Calibration) -> dict[nn.Module, InputSample]:
    """One pass of ``model`` (eval mode) over ``calibration`` keeping an :class:`InputSample`
    of each of ``modules``' inputs."""
    quota = max(16, math.ceil(SAMPLE_ROWS / max(len(calibration.batches), 1)))
    samples = {m: InputSample(quota) for m in modules}
    hooked_pass(model, modules, calibration, lambda mod, x: samples[mod].add(mod, x))
    return samples


def _per_channel(values: torch.Tensor, channels: int) -> torch.Tensor:
    """Per-column ``values`` (``C * k``: a conv's unfolded patch) reduced to their largest
    per input channel over the kernel positions."""
    return values.float().view(channels, -1).amax(1)


def _normalized(s: torch.Tensor, low: float) -> torch.Tensor:
    s = s.clamp_min(low)
    return s / (s.max() * s.min()).sqrt()


def _candidates(leaf: nn.Module, sample: InputSample, smooth: bool) -> Iterator[torch.Tensor]:
    """The grid of scales ``s`` (one per input channel): AWQ's, then SmoothQuant's if
    ``smooth``. The first is ``s = 1``."""
    for i in range(GRID):
        yield _normalized(sample.mean_abs.pow(i / GRID), _MIN_SCALE)
    if smooth:
        x_max = sample.absmax.clamp_min(1e-5)
        w_max = _per_channel(weight_matrix(leaf).abs().amax(0), len(x_max)).clamp_min(1e-5)
        for i in range(GRID):
            a = i / GRID
            yield _normalized(x_max.pow(a) / w_max.pow(1 - a), 1e-5)


def _act_quantizer(sample: InputSample, s: torch.Tensor) -> ActFakeQuant:
    """A static uint8 quantizer with the range of the calibration inputs divided by ``s``."""
    lo, hi = sample.lo / s, sample.hi / s
    quant = ActFakeQuant(8).eval()
    quant.lo.fill_(float(lo.min()))
    quant.hi.fill_(float(hi.max()))
    quant.initialized.fill_(True)
    return quant


@torch.no_grad()
def search_scale(leaf: nn.Module, lp: LayerPlan, sample: InputSample) -> torch.Tensor:
    """The scale ``s`` (one per input channel of ``leaf``) of least layer-local output error
    ``||X W^T - Q_a(X / s) Q(W diag(s))^T||^2`` on ``sample``'s input rows ``X`` after
    quantization under ``lp`` (``Q_a`` only if ``lp`` quantizes activations; the module
    docstring)."""
    fmt = _format(lp)
    w = leaf.weight.detach().float()  # masked, not yet quantized
    flat = w.flatten(1)
    repeat = flat.shape[1] // len(sample.lo)  # kernel positions per input channel
    x = sample.matrix()
    y = x @ flat.T

    def error(s: torch.Tensor) -> float:
        xs = x * (1 / s).repeat_interleave(repeat)
        if lp.act_bits is not None:
            xs = _act_quantizer(sample, s)(xs)
        return float((xs @ _quantized(fmt, w, s).flatten(1).T - y).pow(2).sum())

    best, best_error = None, math.inf
    for s in _candidates(leaf, sample, smooth=lp.act_bits is not None):
        e = error(s)
        if e < best_error:  # strictly: s = 1 (first) wins ties
            best, best_error = s, e
    assert best is not None
    return best


@torch.no_grad()
def search_clip(leaf: nn.Module, lp: LayerPlan, sample: InputSample,
                s: torch.Tensor) -> torch.Tensor:
    """AWQ's clipping (``auto_clip``): per output channel, the bound ``c`` (of
    ``max|w| * (1 - i / GRID)``, ``i < GRID / 2``) that the scaled weight ``W diag(s)`` is
    clamped to before quantization, of least output error on ``sample``'s scaled rows
    ``X / s`` (per channel: the channels' quantization is independent); ``i = 0`` (no clip)
    wins ties."""
    fmt = _format(lp)
    w = leaf.weight.detach().float()
    w = w * s.view(1, -1, *[1] * (w.dim() - 2))
    flat = w.flatten(1)
    x = sample.matrix() * (1 / s).repeat_interleave(flat.shape[1] // len(s))
    y = x @ flat.T
    amax = flat.abs().amax(1)
    best, best_error = amax, torch.full_like(amax, math.inf)
    for i in range(GRID // 2):
        c = (amax * (1 - i / GRID))[:, None]
        clipped = torch.maximum(torch.minimum(flat, c), -c).view_as(w)
        error = (x @ fmt.fake_quant(clipped).flatten(1).T - y).pow(2).sum(0)
        better = error < best_error
        best, best_error = torch.where(better, c[:, 0], best), torch.where(better, error, best_error)
    return best


def _format(lp: LayerPlan) -> WeightFormat:
    """The format ``lp``'s weight is stored in (per channel or group-wise)."""
    return weight_format(lp.bits, lp.scheme, lp.group_size)


def _quantized(fmt: WeightFormat, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``Q(W diag(s))`` in ``w``'s shape (``s`` per input channel, dimension 1)."""
    return fmt.fake_quant(w * s.view(1, -1, *[1] * (w.dim() - 2)))

