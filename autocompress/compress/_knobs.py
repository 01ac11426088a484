"""The knob table: every per-layer compression knob, declared once.

A knob is a field of :class:`~autocompress.compress.LayerPlan`. Its :class:`KnobSpec` says what
values it takes, how a search space may give its domain (a range or only choices), which value
is the mildest (the warm-start trial), how a sampled value becomes a plan value, which values a
given layer cannot take, its token in the one-line plan summary, whether rebuilding a trial
must restore masks for it, and its heat map in the report. The plan, the search space, the
report and rebuild all read this table. Its policy fields say what the search does with the
knob: whether the sensitivity profile probes it (and with what), whether the first trials'
size allocation spends it, whether it buys speed only (left out when no objective measures
speed), and its role in the first trials' recipes. Combinations of values that are each valid
but not together are :data:`KNOB_RULES`, one :class:`KnobRule` each, read both by
:meth:`LayerPlan.check_combination` (refuse) and :func:`reconcile` (repair). A new knob is one
``LayerPlan`` field plus one entry here (``rank`` is the one to copy), and a rule if it clashes
with another knob.

Torch-free: reading a config does not import torch. A search space's domains are read through
the :class:`Knob` protocol, so this module imports no config.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from autocompress.compress._knob_rules import KNOB_RULES, KnobRule
from autocompress.compress._knob_values import (
    BLOCK,
    DECOMPOSITIONS,
    FLOAT_FORMATS,
    GROUP_SIZES,
    HEAT_BITS,
    POW2_BITS,
    POW2_INT8_BITS,
    PRUNERS,
    QUANTIZERS,
    STRUCTURE_TOKENS,
    STRUCTURES,
    Knob,
    act_token,
    bits_cell,
    first_of,
    integer_bits,
    is_number,
    mildest_bits,
    mildest_rank,
    mildest_sparsity,
    same,
)

__all__ = ["FLOAT_FORMATS", "KNOBS", "KNOB_RULES", "KNOB_TABLE", "POW2_BITS", "POW2_INT8_BITS", "Heat",
           "Knob", "KnobRule", "KnobSpec", "broken_rule", "heat_maps", "integer_bits", "needs_masks",
           "reconcile", "same", "seed_knob", "summary_tokens", "why_refused"]


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
        modifies: The knob whose effect this one qualifies (``structure`` says how
            ``sparsity`` is spent), or None. While that knob is at its default, this one
            changes nothing: the first trials do not spend it there.
        probed: The sensitivity profile (``tune/_sensitivity.py``) compresses each layer by
            each of this knob's values alone.
        probe_with: Other knobs' values every probe of this knob sets too (``act_bits``
            runs with 8-bit weights), as ``(knob, value)`` pairs.
        probe_across: A knob whose values (its default included) each probe is repeated over
            (``sparsity`` over ``structure``); predictions look the probe up by it.
        probe_variants: Knobs that choose how this one is done (the calibrated variants:
            ``pruner`` for ``sparsity``, ``quantizer`` and ``group_size`` for ``bits``); each
            probe is repeated over every combination of the values the layer's domain offers
            of them (and of ``probe_across``); predictions look the probe up by them too.
        local: Whether a probe with this value (the knob's own, or set with a probed one)
            can be measured layer-locally, as the layer's output error on its calibration
            inputs: False where it changes shapes other layers see (``structure: channel``)
            or acts on the activations (``act_bits``); the profile then runs the model.
        allocated: The first trials' size allocation (``tune/_seeds.py``) spends it: it
            changes the stored weight bytes, or (a ``probe_variants`` knob) chooses among
            variants of one that does, at the same bytes, by their predicted damage.
        speed_only: It buys speed only (the same weights, some accuracy): the search leaves
            it out when no objective measures latency.
        integer_kernels: It only pays on a runtime with integer kernels: the search leaves
            it out where the target's runtime has none.
        about: The knob in words, for messages (``quantized activations``).
        seed: Its role in the first trials' recipes (``tune/_seeds.py``): ``"width"`` (the
            bits each weight takes: swept by the uniform recipes, near 4 in the channel
            recipes), ``"amount"`` (the fraction removed: swept by the uniform recipes, set
            per recipe in the channel and calibration recipes) or ``"cut"`` (how it is
            removed: ``seed_value`` in the channel recipes); None: left at its mildest.
        seed_value: The value of a ``"cut"`` knob that the channel recipes set.
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
    modifies: str | None = None
    probed: bool = False
    probe_with: tuple[tuple[str, Any], ...] = ()
    probe_across: str | None = None
    probe_variants: tuple[str, ...] = ()
    local: Callable[[Any], bool] = lambda value: True
    allocated: bool = False
    speed_only: bool = False
    integer_kernels: bool = False
    about: str = ""
    seed: str | None = None
    seed_value: Any = None

    def mildest_value(self, knob: Knob) -> Any:
        """The mildest value of ``knob``'s domain."""
        if knob.kind == "fixed":
            return knob.value
        return self.mildest(knob)


# --- the knobs -------------------------------------------------------------------------------


_SPECS: dict[str, KnobSpec] = {spec.name: spec for spec in (
    KnobSpec(
        "sparsity", 0.0, "a number in [0, 1)", lambda v: is_number(v) and 0.0 <= v < 1.0,
        rangeable=True, mildest=mildest_sparsity,
        token=lambda lp: f"s{lp.sparsity:.2f}{STRUCTURE_TOKENS[lp.structure]}"
        if lp.sparsity else "",
        masks=lambda lp: lp.sparsity > 0 and lp.structure != "channel",
        heat=Heat("weight sparsity",
                  lambda k: (k.get("sparsity", 0.0), f"{k['sparsity']:.2f}"
                             f"{STRUCTURE_TOKENS[k.get('structure', 'unstructured')]}"
                             if k.get("sparsity") else "0"),
                  "Oranges", {"zmin": 0, "zmax": 1}),
        probed=True, probe_across="structure", probe_variants=("pruner",), allocated=True,
        seed="amount"),
    KnobSpec(
        # The output layer keeps its channels: they are the model's outputs (the classes).
        "structure", "unstructured", f"one of {list(STRUCTURES)}",
        lambda v: isinstance(v, str) and v in STRUCTURES,
        mildest=lambda knob: first_of(knob, ["unstructured"]),
        refuses=lambda value, layer: "it produces the model output (its channels are the outputs)"
        if value == "channel" and layer.is_output else None,
        modifies="sparsity", local=lambda v: v != "channel", allocated=True, seed="cut",
        seed_value="channel"),
    KnobSpec(
        # Integers: per-output-channel integer levels (``scheme``); "fp16"/"bf16": the weight
        # rounded to a 16-bit float; "fp8": to e4m3 with per-channel scales (compress/formats/).
        # A range is over the integers only.
        "bits", None, f"an integer in 2..8, {', '.join(map(repr, FLOAT_FORMATS))} or null",
        lambda v: v is None or v in FLOAT_FORMATS or (integer_bits(v) and 2 <= v <= 8),
        integer=True, rangeable=True, mildest=mildest_bits,
        token=lambda lp: "" if lp.bits is None else lp.bits if lp.bits in FLOAT_FORMATS
        else f"b{lp.bits}",
        heat=Heat("weight bits", bits_cell,
                  "Blues_r", {"zmin": 2, "zmax": HEAT_BITS[None],
                              "colorbar": {"tickvals": [2, 4, 6, 8, *HEAT_BITS.values()],
                                           "ticktext": ["2", "4", "6", "8",
                                                        *(f or "fp32" for f in HEAT_BITS)]}}),
        probed=True, probe_variants=("quantizer", "group_size"), allocated=True, seed="width"),
    KnobSpec(
        # How integer bits are spent: "uniform" levels or "pow2" (0 and signed powers of two
        # times a calibrated per-channel scale; bits 3..6, KNOB_RULES). No token (and no
        # change) without integer bits.
        "scheme", "uniform", "one of ['uniform', 'pow2']",
        lambda v: isinstance(v, str) and v in ("uniform", "pow2"),
        mildest=lambda knob: first_of(knob, ["uniform"]),
        token=lambda lp: "pow2" if lp.scheme == "pow2" and integer_bits(lp.bits) else "",
        modifies="bits"),
    KnobSpec(
        # Full rank is no factorization: a full-rank factorization stores more weights than the
        # layer it replaces.
        "rank", None, "a number in (0, 1] or null",
        lambda v: v is None or (is_number(v) and 0.0 < v <= 1.0),
        rangeable=True, mildest=mildest_rank,
        to_plan=lambda v: None if v == 1.0 else v,
        token=lambda lp: "" if lp.rank is None else f"r{lp.rank:.2f}",
        heat=Heat("kept rank",
                  lambda k: (1.0 if k.get("rank") is None else k["rank"],
                             "full" if k.get("rank") is None else f"{k['rank']:.2f}"),
                  "Greens_r", {"zmin": 0, "zmax": 1}),
        probed=True, probe_variants=("decomposition",), allocated=True),
    KnobSpec(
        # How a layer with a rank is factorized (lowrank.py); no token (and no change) without
        # a rank. Linear, Embedding, 1x1 and grouped convs refuse tucker and cp (lowrank's limits).
        "decomposition", "svd", f"one of {list(DECOMPOSITIONS)}",
        lambda v: isinstance(v, str) and v in DECOMPOSITIONS,
        mildest=lambda knob: first_of(knob, ["svd"]),
        token=lambda lp: "" if lp.rank is None or lp.decomposition == "svd" else lp.decomposition,
        modifies="rank", local=lambda v: v in ("svd", "whitened"), allocated=True),
    KnobSpec(
        # 8: a fixed range observed during calibration and fine-tuning, deployed on ONNX
        # Runtime's QLinear kernels; needs integer weights (bits). "dynamic": each
        # input's own range at run time, deployed as ONNX Runtime's dynamic quantization
        # (DynamicQuantizeLinear + MatMulInteger); needs bits=8 (KNOB_RULES) and a
        # Linear (quantize.py refuses the rest). Not ``integer``: a string is a valid value.
        # Probed with 8-bit weights (what both take); not allocated: it buys speed, not size.
        "act_bits", None, "'dynamic', 8 or null",
        lambda v: v is None or v == "dynamic" or (type(v) is int and v == 8),
        mildest=lambda knob: first_of(knob, [None]),
        token=lambda lp: "" if lp.act_bits is None else act_token(lp.act_bits),
        probed=True, probe_with=(("bits", 8),), local=lambda v: v is None, speed_only=True,
        integer_kernels=True,
        about="quantized activations"),
    KnobSpec(
        # How the weights of a sparsity are chosen (and the rest updated): "magnitude" (the
        # smallest |w|, data-free), "wanda" (|w| x the input's L2 norm over the calibration
        # set, Sun et al. 2023) or "sparsegpt" (second-order: the kept weights are updated to
        # compensate, Frantar & Alistarh 2023; on ``structure: channel`` the next layer is
        # refit by least squares on the calibration inputs). No token (and no change)
        # without a sparsity. Calibrated pruners need a layer with inputs (prune.py's limits).
        "pruner", "magnitude", f"one of {list(PRUNERS)}",
        lambda v: isinstance(v, str) and v in PRUNERS,
        mildest=lambda knob: first_of(knob, ["magnitude"]),
        token=lambda lp: lp.pruner if lp.sparsity and lp.pruner != "magnitude" else "",
        modifies="sparsity", allocated=True),
    KnobSpec(
        # How integer weights are rounded: "rtn" (round to nearest), "gptq" (column by column,
        # the rounding error compensated on the columns not yet rounded with the inverse
        # Hessian of the layer's calibration inputs, Frantar et al. 2022) or "awq" (per input
        # channel scales chosen on the calibration inputs so that salient channels lose
        # least, then round to nearest; with ``act_bits`` the scales also smooth the
        # activations as SmoothQuant does, Lin et al. 2023, Xiao et al. 2022). Integer uniform
        # bits only (KNOB_RULES); calibrated, so a layer with inputs (quantize.py's limits).
        "quantizer", "rtn", f"one of {list(QUANTIZERS)}",
        lambda v: isinstance(v, str) and v in QUANTIZERS,
        mildest=lambda knob: first_of(knob, ["rtn"]),
        token=lambda lp: lp.quantizer if lp.quantizer != "rtn" and integer_bits(lp.bits) else "",
        modifies="bits", allocated=True),
    KnobSpec(
        # Input columns that share one scale per output channel (32, 64 or 128), or null: one
        # scale per output channel (the whole row). Integer uniform bits only (KNOB_RULES);
        # the layer's input width must be a multiple of it (quantize.py's limits).
        "group_size", None, f"one of {list(GROUP_SIZES)} or null",
        lambda v: v is None or (type(v) is int and v in GROUP_SIZES),
        integer=True, mildest=lambda knob: first_of(knob, [None]),
        token=lambda lp: f"g{lp.group_size}" if lp.group_size and integer_bits(lp.bits) else "",
        modifies="bits", allocated=True),
    KnobSpec(
        # Depth: a whole block (a residual block, a transformer layer; type "Block" in
        # ``autocompress layers``) dropped from the model (compress/_blocks.py says how and
        # which blocks refuse). Only blocks take it; blocks take no other knob (why_refused).
        "drop", False, "true or false", lambda v: isinstance(v, bool),
        mildest=lambda knob: first_of(knob, [False]),
        refuses=lambda value, layer: None if not value or layer.type == BLOCK
        else "only a block (type Block in `autocompress layers`) can be dropped",
        token=lambda lp: "drop" if lp.drop else "", about="dropped blocks"),
)}
# Table order is the order of the one-line summary, the search space's parameters and the
# report: each knob after the one it modifies.
KNOB_TABLE: dict[str, KnobSpec] = {name: _SPECS[name] for name in (
    "sparsity", "structure", "pruner", "bits", "scheme", "quantizer", "group_size", "rank",
    "decomposition", "act_bits", "drop")}
KNOBS: tuple[str, ...] = tuple(KNOB_TABLE)


def seed_knob(role: str) -> KnobSpec:
    """The knob of a role in the first trials' recipes (:attr:`KnobSpec.seed`)."""
    return next(spec for spec in KNOB_TABLE.values() if spec.seed == role)


# --- the rules across knobs (_knob_rules.py) ----------------------------------------------


def _filled(values: Mapping[str, Any]) -> dict[str, Any]:
    return {name: values.get(name, spec.default) for name, spec in KNOB_TABLE.items()}


def broken_rule(values: Mapping[str, Any]) -> KnobRule | None:
    """The first rule of :data:`KNOB_RULES` that ``values`` (knobs not given are at their
    defaults) break, or None."""
    filled = _filled(values)
    return next((rule for rule in KNOB_RULES if rule.broken(filled)), None)


def reconcile(values: dict[str, Any]) -> dict[str, Any]:
    """One layer's sampled plan values made consistent across knobs: each rule of
    :data:`KNOB_RULES` that they break (in order, on the values the earlier rules repaired)
    sets its knob back to its default (``scheme: pow2`` without bits in 3..6 becomes
    ``uniform``; ``act_bits`` the weights cannot run with becomes null)."""
    for rule in KNOB_RULES:
        if rule.broken(_filled(values)):
            values = {**values, rule.knob: KNOB_TABLE[rule.knob].default}
    return values


def summary_tokens(lp: Any) -> str:
    """A layer's plan entry in one line, e.g. ``s0.50ch b4 r0.25``."""
    return " ".join(t for spec in KNOB_TABLE.values() if (t := spec.token(lp)))


def needs_masks(lp: Any) -> bool:
    """Whether rebuilding a trial must restore this layer's sparsity masks from the zeros."""
    return any(spec.masks(lp) for spec in KNOB_TABLE.values())


def heat_maps() -> list[Heat]:
    """The report's heat maps, in knob order."""
    return [spec.heat for spec in KNOB_TABLE.values() if spec.heat is not None]


def why_refused(spec: KnobSpec, value: Any, layer: Any) -> str | None:
    """Why ``layer`` cannot take ``value`` of knob ``spec``: the knob table's own rule
    (``KnobSpec.refuses``) or a compression method's limits (``LayerInfo.refusals``); None if
    it can. The search space and ``apply`` both ask this one function."""
    reason = spec.refuses(value, layer)
    if reason:
        return reason
    if getattr(layer, "type", None) == BLOCK and spec.name != "drop" and not same(value, spec.default):
        return "a block is kept or dropped (drop); its layers take the other knobs"
    return next((r.reason for r in getattr(layer, "refusals", ())
                 if r.refuses(spec.name, value, spec.default)), None)
