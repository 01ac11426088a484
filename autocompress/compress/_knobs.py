"""The knob table: every per-layer compression knob, declared once.

A knob is a field of :class:`~autocompress.compress.LayerPlan`. Its :class:`KnobSpec` says what
values it takes, how a search space may give its domain (a range or only choices), which value
is the mildest (the warm-start trial), how a sampled value becomes a plan value, which values a
given layer cannot take, its token in the one-line plan summary, whether rebuilding a trial
must restore masks for it, and its heat map in the report. The plan, the search space, the
report and rebuild all read this table; a new knob is one ``LayerPlan`` field plus one entry
here (``rank`` is the one to copy).

Torch-free: reading a config does not import torch. A search space's domains are read through
the :class:`Knob` protocol, so this module imports no config.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


class Knob(Protocol):
    """What the table reads of a search space's domain (:class:`autocompress.config.Knob`)."""

    @property
    def kind(self) -> str: ...  # "range", "choice" or "fixed"

    @property
    def choices(self) -> tuple[Any, ...]: ...

    @property
    def value(self) -> Any: ...

    def bounds(self) -> tuple[float, float]: ...

    def snap(self, value: Any) -> Any: ...

    def contains(self, value: Any) -> bool: ...

__all__ = ["FLOAT_FORMATS", "KNOBS", "KNOB_TABLE", "POW2_BITS", "POW2_INT8_BITS", "Heat", "KnobSpec",
           "act_bits_fit", "heat_maps", "integer_bits", "needs_masks", "reconcile", "same",
           "summary_tokens", "why_refused"]

FLOAT_FORMATS = ("fp16", "bf16")  # the non-integer weight formats of ``bits`` (compress/_formats.py)
POW2_BITS = range(3, 7)  # ``scheme: pow2`` bit-widths: 2 bits is ternary either way; 7+ would
# reach exponents (2**-62 ...) that no weight needs
POW2_INT8_BITS = 4  # pow2 integers (up to 2**(2**(b-1) - 2)) fit int8 up to 4 bits (64)


def integer_bits(bits: Any) -> bool:
    """Whether a ``bits`` plan value is an integer bit-width (not fp16/bf16, not None)."""
    return type(bits) is int


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _numbers(knob: Knob) -> list[Any]:
    return [c for c in knob.choices if _number(c)]


def _first_of(knob: Knob, preferred: list[Any]) -> Any:
    """The first of ``preferred`` among ``knob``'s choices, else its first choice."""
    return next((p for p in preferred if any(same(p, c) for c in knob.choices)), knob.choices[0])


def same(a: Any, b: Any) -> bool:
    """Equal and of the same kind (0.0 is not False, 8 is not 8.0 for an integer knob)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


@dataclass(frozen=True)
class Heat:
    """A report heat map of one knob over the front's layers.

    Attributes:
        title: Figure title.
        cell: ``cell(knobs) -> (value, text)`` for one layer's plan entry (a dict, possibly
            empty: the layer was not changed).
        colorscale: A plotly colour scale.
        layout: Extra ``go.Heatmap`` arguments (``zmin``, ``zmax``, ``colorbar``).
    """

    title: str
    cell: Callable[[dict[str, Any]], tuple[float, str]]
    colorscale: str
    layout: dict[str, Any]


@dataclass(frozen=True)
class KnobSpec:
    """Everything autocompress knows about one knob.

    Attributes:
        name: The ``LayerPlan`` field.
        default: The value that changes nothing (``LayerPlan``'s default).
        allowed: The allowed plan values in words, used in error messages.
        valid: Whether one plan value is allowed.
        integer: Its numbers are integers: a range over it is an integer range, and a
            non-integer number is refused by type (``bits`` also takes strings).
        rangeable: A search space may give a ``{low, high}`` range (else choices or a value).
        mildest: The mildest value a domain allows (the warm-start trial's).
        to_plan: A sampled value as a plan value (``rank`` 1.0 is no factorization).
        refuses: ``refuses(value, layer) -> reason or None``: why the layer cannot take the
            value, by the knob's own rule (the compression methods add theirs through
            ``LayerInfo.refusals``; :func:`why_refused` asks both). Refused values are dropped
            from the layer's domain (a shared value falls back to ``default``). ``layer`` has
            at least ``name``, ``type`` and ``is_output``.
        token: The knob's part of the one-line plan summary (``LayerPlan`` in), "" when the
            knob changes nothing (a plan entry whose knobs all give "" is the identity).
        masks: Whether a layer with this plan entry keeps a sparsity mask that rebuilding the
            trial must restore from the logged zeros.
        heat: The report's heat map of this knob, or None.
    """

    name: str
    default: Any
    allowed: str
    valid: Callable[[Any], bool]
    integer: bool = False
    rangeable: bool = False
    mildest: Callable[[Knob], Any] = lambda knob: knob.value
    to_plan: Callable[[Any], Any] = lambda value: value
    refuses: Callable[[Any, Any], str | None] = lambda value, layer: None
    token: Callable[[Any], str] = lambda lp: ""
    masks: Callable[[Any], bool] = lambda lp: False
    heat: Heat | None = None

    def mildest_value(self, knob: Knob) -> Any:
        """The mildest value of ``knob``'s domain."""
        if knob.kind == "fixed":
            return knob.value
        return self.mildest(knob)


# --- the knobs -------------------------------------------------------------------------------


def _mildest_sparsity(knob: Knob) -> Any:
    return knob.snap(knob.bounds()[0]) if knob.kind == "range" else _first_of(knob, sorted(_numbers(knob)))


def _mildest_bits(knob: Knob) -> Any:
    if knob.kind == "range":
        low, high = knob.bounds()
        return int(high) if high < 8 else 8 if knob.contains(8) else int(low)
    # 8 first (the warm start stores int8), then fewer bits, then the 16-bit floats, then fp32.
    return _first_of(knob, [8, *sorted(_numbers(knob), reverse=True), *FLOAT_FORMATS, None])


def _mildest_rank(knob: Knob) -> Any:
    if knob.kind == "range":
        return knob.snap(knob.bounds()[1])
    return _first_of(knob, [None, *sorted(_numbers(knob), reverse=True)])


def _act_token(act_bits: Any) -> str:
    """``a8`` (observed range) or ``adyn`` (ONNX Runtime's dynamic quantization)."""
    return "adyn" if act_bits == "dynamic" else f"a{act_bits}"


# Where the non-integer formats sit on the report's bit-width colour scale (after 8).
_HEAT_BITS: dict[Any, int] = {"fp16": 9, "bf16": 10, None: 11}


def _bits_cell(knobs: dict[str, Any]) -> tuple[float, str]:
    """The bit-width heat map's cell: position on the scale, and e.g. ``4 pow2 a8``."""
    bits: Any = knobs.get("bits")
    text = "fp32" if bits is None else str(bits)
    if knobs.get("scheme", "uniform") != "uniform" and integer_bits(bits):
        text += f" {knobs['scheme']}"
    if knobs.get("act_bits"):
        text += f" {_act_token(knobs['act_bits'])}"
    position: float = _HEAT_BITS[bits] if bits in _HEAT_BITS else bits
    return position, text


KNOB_TABLE: dict[str, KnobSpec] = {spec.name: spec for spec in (
    KnobSpec(
        "sparsity", 0.0, "a number in [0, 1)", lambda v: _number(v) and 0.0 <= v < 1.0,
        rangeable=True, mildest=_mildest_sparsity,
        token=lambda lp: f"s{lp.sparsity:.2f}{'ch' if lp.structure == 'channel' else ''}"
        if lp.sparsity else "",
        masks=lambda lp: lp.sparsity > 0 and lp.structure == "unstructured",
        heat=Heat("weight sparsity",
                  lambda k: (k.get("sparsity", 0.0), f"{k['sparsity']:.2f}"
                             f"{'ch' if k.get('structure') == 'channel' else ''}"
                             if k.get("sparsity") else "0"),
                  "Oranges", {"zmin": 0, "zmax": 1})),
    KnobSpec(
        # The output layer keeps its channels: they are the model's outputs (the classes).
        "structure", "unstructured", "one of ['unstructured', 'channel']",
        lambda v: v in ("unstructured", "channel"),
        mildest=lambda knob: _first_of(knob, ["unstructured"]),
        refuses=lambda value, layer: "it produces the model output (its channels are the outputs)"
        if value == "channel" and layer.is_output else None),
    KnobSpec(
        # Integers: per-output-channel integer levels (``scheme``); "fp16"/"bf16": the weight
        # rounded to a 16-bit float (compress/_formats.py). A range is over the integers only.
        "bits", None, "an integer in 2..8, 'fp16', 'bf16' or null",
        lambda v: v is None or v in FLOAT_FORMATS or (integer_bits(v) and 2 <= v <= 8),
        integer=True, rangeable=True, mildest=_mildest_bits,
        token=lambda lp: "" if lp.bits is None else lp.bits if lp.bits in FLOAT_FORMATS
        else f"b{lp.bits}",
        heat=Heat("weight bits", _bits_cell,
                  "Blues_r", {"zmin": 2, "zmax": _HEAT_BITS[None],
                              "colorbar": {"tickvals": [2, 4, 6, 8, *_HEAT_BITS.values()],
                                           "ticktext": ["2", "4", "6", "8", "fp16", "bf16",
                                                        "fp32"]}})),
    KnobSpec(
        # How integer bits are spent: "uniform" levels or "pow2" (0 and signed powers of two
        # times a calibrated per-channel scale; bits 3..6, LayerPlan checks it). No token (and
        # no change) without integer bits.
        "scheme", "uniform", "one of ['uniform', 'pow2']",
        lambda v: isinstance(v, str) and v in ("uniform", "pow2"),
        mildest=lambda knob: _first_of(knob, ["uniform"]),
        token=lambda lp: "pow2" if lp.scheme == "pow2" and integer_bits(lp.bits) else ""),
    KnobSpec(
        # Full rank is no factorization: a full-rank factorization stores more weights than the
        # layer it replaces.
        "rank", None, "a number in (0, 1] or null",
        lambda v: v is None or (_number(v) and 0.0 < v <= 1.0),
        rangeable=True, mildest=_mildest_rank,
        to_plan=lambda v: None if v == 1.0 else v,
        token=lambda lp: "" if lp.rank is None else f"r{lp.rank:.2f}",
        heat=Heat("kept rank",
                  lambda k: (1.0 if k.get("rank") is None else k["rank"],
                             "full" if k.get("rank") is None else f"{k['rank']:.2f}"),
                  "Greens_r", {"zmin": 0, "zmax": 1})),
    KnobSpec(
        # How a layer with a rank is factorized (lowrank.py); no token (and no change) without
        # a rank. Linear, Embedding, 1x1 and grouped convs refuse tucker and cp (lowrank's limits).
        "decomposition", "svd", "one of ['svd', 'tucker', 'cp']",
        lambda v: isinstance(v, str) and v in ("svd", "tucker", "cp"),
        mildest=lambda knob: _first_of(knob, ["svd"]),
        token=lambda lp: "" if lp.rank is None or lp.decomposition == "svd" else lp.decomposition),
    KnobSpec(
        # 8: a fixed range observed during calibration and fine-tuning, deployed on ONNX
        # Runtime's QLinear kernels; needs integer weights (bits). "dynamic": each
        # input's own range at run time, deployed as ONNX Runtime's dynamic quantization
        # (DynamicQuantizeLinear + MatMulInteger); needs bits=8 (LayerPlan checks it) and a
        # Linear (quantize.py refuses the rest). Not ``integer``: a string is a valid value.
        "act_bits", None, "'dynamic', 8 or null",
        lambda v: v is None or v == "dynamic" or (type(v) is int and v == 8),
        mildest=lambda knob: _first_of(knob, [None]),
        token=lambda lp: "" if lp.act_bits is None else _act_token(lp.act_bits)),
)}
KNOBS: tuple[str, ...] = tuple(KNOB_TABLE)


def summary_tokens(lp: Any) -> str:
    """A layer's plan entry in one line, e.g. ``s0.50ch b4 r0.25``."""
    return " ".join(t for spec in KNOB_TABLE.values() if (t := spec.token(lp)))


def needs_masks(lp: Any) -> bool:
    """Whether rebuilding a trial must restore this layer's sparsity masks from the zeros."""
    return any(spec.masks(lp) for spec in KNOB_TABLE.values())


def heat_maps() -> list[Heat]:
    """The report's heat maps, in knob order."""
    return [spec.heat for spec in KNOB_TABLE.values() if spec.heat is not None]


def reconcile(values: dict[str, Any]) -> dict[str, Any]:
    """One layer's sampled plan values made consistent across knobs (the combinations
    :meth:`LayerPlan.check_combination` refuses): ``scheme: pow2`` needs integer ``bits`` in
    3..6, so otherwise it falls back to ``uniform``; ``act_bits: dynamic`` runs the layer on
    ONNX Runtime's integer MatMul, which takes 8-bit weights, so with other ``bits`` it falls
    back to null; ``act_bits: 8`` runs it on QLinearConv/QLinearMatMul, which take int8
    weights, so without integer weights (fp32, fp16, bf16) or with pow2 weights that do not
    fit int8 (over 4 bits) it falls back to null too."""
    bits = values.get("bits")
    if values.get("scheme") == "pow2" and not (integer_bits(bits) and bits in POW2_BITS):
        values = {**values, "scheme": "uniform"}
    if not act_bits_fit(values.get("act_bits"), bits, values.get("scheme", "uniform")):
        values = {**values, "act_bits": None}
    return values


def act_bits_fit(act_bits: Any, bits: Any, scheme: str) -> bool:
    """Whether a layer with weights at ``bits``/``scheme`` can take ``act_bits`` (ONNX
    Runtime's integer kernels take int8 weights; the dynamic MatMul takes 8-bit ones)."""
    if act_bits == "dynamic":
        return bits == 8 and scheme == "uniform"
    if act_bits == 8:
        return integer_bits(bits) and (scheme == "uniform" or bits <= POW2_INT8_BITS)
    return True


def why_refused(spec: KnobSpec, value: Any, layer: Any) -> str | None:
    """Why ``layer`` cannot take ``value`` of knob ``spec``: the knob table's own rule
    (``KnobSpec.refuses``) or a compression method's limits (``LayerInfo.refusals``); None if
    it can. The search space and ``apply`` both ask this one function."""
    reason = spec.refuses(value, layer)
    if reason:
        return reason
    return next((r.reason for r in getattr(layer, "refusals", ())
                 if r.refuses(spec.name, value, spec.default)), None)
