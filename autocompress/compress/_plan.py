"""The compression plan: what to do to each layer, as a versioned JSON document.

Example:
    >>> plan = Plan({"fc": LayerPlan(sparsity=0.5, bits=8)})
    >>> Plan.from_json(plan.to_json()) == plan
    True
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from autocompress._errors import did_you_mean
from autocompress.compress._knob_values import CALIBRATED
from autocompress.compress._knobs import KNOB_TABLE, broken_rule, summary_tokens

PLAN_VERSION = 1


class PlanError(ValueError):
    """A plan names an unknown layer or holds a value outside its allowed range."""


@dataclass(frozen=True)
class LayerPlan:
    """What to do to one layer.

    Attributes:
        sparsity: Fraction of weights (``unstructured``) or output channels (``channel``) to
            remove, in [0, 1).
        structure: ``"unstructured"`` (a mask over single weights), ``"channel"`` (output
            channels physically removed, with the matching inputs of every dependent layer) or
            ``"2:4"`` (two of every four consecutive input weights masked, the N:M pattern;
            needs ``sparsity: 0.5``).
        pruner: How the pruned weights are chosen: ``"magnitude"`` (data-free),
            ``"wanda"`` (weight magnitude times input norm on calibration data) or
            ``"sparsegpt"`` (second-order, the kept weights updated to compensate; on
            ``channel``, the next layer refit by least squares).
        bits: Weight bit-width in 2..8 (per-output-channel symmetric integer levels, as
            ``scheme`` says), ``"fp16"`` or ``"bf16"`` (the weight rounded to that 16-bit
            float, no scale), or None to keep fp32.
        scheme: How integer ``bits`` are spent: ``"uniform"`` (evenly spaced levels) or
            ``"pow2"`` (0 and signed powers of two times a calibrated per-channel scale:
            shift quantization; ``bits`` 3..6). ``compress/_formats.py`` has the details.
        quantizer: How integer ``bits`` are rounded: ``"rtn"`` (to nearest), ``"gptq"``
            (error compensation with the calibration inputs' Hessian) or ``"awq"``
            (activation-aware per-input-channel scales, then to nearest).
        group_size: Input columns sharing one scale (32, 64 or 128), or None: one scale per
            output channel.
        rank: Kept fraction of full rank in (0, 1] for a low-rank factorization, or None.
        decomposition: How a layer with a ``rank`` is factorized: ``"svd"`` (truncated SVD,
            two layers; any layer), ``"tucker"`` (Tucker-2, three convs) or ``"cp"`` (CP,
            four convs; three for a Conv1d) or ``"whitened"`` (SVD of the weight whitened by
            its calibration inputs, SVD-LLM); tucker and cp only on a conv with a spatial
            kernel and ``groups=1`` (``lowrank.py`` says what ``rank`` means for each).
        act_bits: 8 to fake-quantize the layer's input activations to 8 bits with a range
            observed during calibration and fine-tuning (deployed on ONNX Runtime's QLinearConv
            / QLinearMatMul integer kernels; needs integer ``bits`` whose values fit int8:
            uniform, or pow2 up to 4 bits),
            ``"dynamic"`` to quantize them with each input's own range at run time as ONNX
            Runtime's dynamic quantization does (integer MatMul kernels; needs ``bits=8`` and
            a Linear layer), or None.
        drop: True to drop the block of this name from the model (only blocks, type
            ``Block`` in ``autocompress layers``: a residual block, a transformer layer;
            ``compress/_blocks.py``). Left out of :meth:`to_dict` while False.
    """

    sparsity: float = 0.0
    structure: str = "unstructured"
    pruner: str = "magnitude"
    bits: int | str | None = None
    scheme: str = "uniform"
    quantizer: str = "rtn"
    group_size: int | None = None
    rank: float | None = None
    decomposition: str = "svd"
    act_bits: int | str | None = None
    drop: bool = False

    def __post_init__(self) -> None:
        for spec in KNOB_TABLE.values():
            value = getattr(self, spec.name)
            _check(spec.valid(value), spec.name, value, spec.allowed,
                   boolean=isinstance(spec.default, bool))

    def check_combination(self) -> None:
        """Refuses knob values that are each valid but not together (the first rule of
        :data:`~autocompress.compress._knobs.KNOB_RULES` they break).

        Not in ``__post_init__``: ``compress.check_plan`` builds entries with one knob reset
        to its default (to see whether that knob changes anything), which may be such a
        combination. :class:`Plan` and :meth:`from_dict` call it.

        Raises:
            PlanError: E.g. ``scheme='pow2'`` without integer ``bits`` in 3..6,
                ``act_bits='dynamic'`` without ``bits=8``, ``act_bits=8`` without integer
                ``bits`` or with pow2 ``bits`` over 4; the message says why.
        """
        values = vars(self)
        rule = broken_rule(values)
        if rule is not None:
            raise PlanError(rule.message(values))

    @property
    def is_identity(self) -> bool:
        """True when this entry changes nothing."""
        return not summary_tokens(self)  # every knob that changes something has a token

    def to_dict(self) -> dict[str, Any]:
        """Every knob; ``drop`` only when set (plans written before it stay as they were)."""
        d = asdict(self)
        if not self.drop:
            del d["drop"]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "layer") -> LayerPlan:
        """Builds a LayerPlan from a mapping, rejecting unknown keys.

        Args:
            data: Mapping with a subset of the LayerPlan fields.
            where: Used in error messages, e.g. the layer name.
        """
        if not isinstance(data, Mapping):
            raise PlanError(f"{where}: expected a mapping of knobs, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(f"{where}: unknown key {unknown[0]!r}{did_you_mean(unknown[0], known)}; "
                            f"allowed: {sorted(known)}")
        try:
            lp = cls(**data)
            lp.check_combination()
            return lp
        except PlanError as e:
            raise PlanError(f"{where}: {e}") from None


@dataclass(frozen=True)
class Plan:
    """A per-layer compression plan. Layers not listed stay as they are.

    Keys are module names as in ``model.named_modules()``.
    """

    layers: dict[str, LayerPlan] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        if self.version != PLAN_VERSION:
            raise PlanError(f"plan version {self.version!r} is not supported; expected {PLAN_VERSION}")
        for name, lp in self.layers.items():
            try:
                lp.check_combination()
            except PlanError as e:
                raise PlanError(f"layer {name!r}: {e}") from None

    def __hash__(self) -> int:
        # Sorted: equal plans (dicts compare without order) must hash alike.
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def active(self) -> dict[str, LayerPlan]:
        """The entries that change something."""
        return {name: lp for name, lp in self.layers.items() if not lp.is_identity}

    @property
    def is_identity(self) -> bool:
        return not self.active()

    @property
    def needs_calibration(self) -> bool:
        """Whether a knob of an entry that changes something is calibrated (``pruner: wanda``,
        ``quantizer: gptq``, ``decomposition: whitened``, ...: :data:`CALIBRATED`)."""
        return any(getattr(lp, knob) in values for lp in self.active().values()
                   for knob, values in CALIBRATED.items())

    def validate(self, layer_names: Iterable[str]) -> None:
        """Raises PlanError if the plan names a layer that is not among ``layer_names``."""
        valid = list(layer_names)
        for name in self.layers:
            if name not in valid:
                raise PlanError(f"plan names unknown layer {name!r}{did_you_mean(name, valid)}; "
                                f"compressible layers: {valid}")

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "layers": {k: v.to_dict() for k, v in self.layers.items()}}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=indent is not None)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        if not isinstance(data, Mapping) or not isinstance(data.get("layers", {}), Mapping):
            raise PlanError('a plan is a mapping {"version": 1, "layers": {name: {knobs}}}')
        unknown = sorted(set(data) - {"version", "layers"})
        if unknown:
            raise PlanError(f"plan: unknown key {unknown[0]!r}"
                            f"{did_you_mean(unknown[0], ['layers', 'version'])}; "
                            "allowed: ['layers', 'version']")
        layers = {str(k): LayerPlan.from_dict(v, where=f"layers.{k}")
                  for k, v in data.get("layers", {}).items()}
        return cls(layers=layers, version=data.get("version", PLAN_VERSION))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def flatten(self) -> dict[str, Any]:
        """Flat ``{"layer/knob": value}`` view, used for MLflow params."""
        return {f"{name}/{k}": v for name, lp in self.layers.items() for k, v in lp.to_dict().items()}

    def summary(self) -> str:
        """A one-line human summary, e.g. ``conv1: s0.50ch b4 | fc: r0.25``; a plan of more
        than :data:`SUMMARY_LAYERS` layers counts the layers sharing a setting instead of
        naming them (``b4 g64 gptq x180 | b8 g128 x30 | lm.model.embed_tokens: b8 g128``)."""
        tokens = {name: summary_tokens(lp) for name, lp in self.active().items()}
        if len(tokens) <= SUMMARY_LAYERS:
            return " | ".join(f"{name}: {t}" for name, t in tokens.items()) or "(no compression)"
        names: dict[str, list[str]] = {}
        for name, t in tokens.items():
            names.setdefault(t, []).append(name)
        return " | ".join(f"{t} x{len(n)}" if len(n) > 1 else f"{n[0]}: {t}" for t, n in names.items())


SUMMARY_LAYERS = 12  # layers a plan summary names one by one


def _check(ok: bool, key: str, value: Any, allowed: str, boolean: bool = False) -> None:
    # Only a boolean knob (drop) takes a boolean, but True == 1 would pass the range checks
    # (JSON ``"rank": true``).
    if not ok or (isinstance(value, bool) and not boolean) or (isinstance(value, float)
                                                               and math.isnan(value)):
        raise PlanError(f"{key}={value!r} is out of range; allowed: {allowed}")

