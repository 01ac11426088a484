"""Search spaces: which compression knobs to search, over which values, for which layers.

A search space file is a list of rules under ``layers:``. Each rule selects layers and gives
each selected layer a domain per knob (a :class:`~autocompress.plan.LayerPlan` field)::

    version: 1                        # optional
    layers:
      - name: convs                   # optional; names the shared group, default "rule<i>"
        match: 're:features\\..*'     # exact module name or "re:" regex (fullmatch); or a list
        types: [Conv1d, Conv2d]       # optional: module type names
        exclude: ["features.0"]       # optional: names / "re:" patterns left out
        share: false                  # true: one sampled value for all layers of the rule
        knobs:
          sparsity: {low: 0.0, high: 0.9, step: 0.05}   # range: low, high, step?, log?
          structure: [unstructured, channel]           # choices
          bits: [2, 3, 4, 6, 8, null]                  # choices; null = keep fp32
          rank: {low: 0.1, high: 1.0, step: 0.05}      # 1.0 (full rank) = no factorization
          act_bits: null                               # a fixed value

Rules apply in order; a later rule overrides an earlier one per layer and per knob. Knobs a
layer does not get stay at their ``LayerPlan`` defaults; layers that no rule selects are left
out of the plan.

Two rules turn a sampled value into a plan value:

* ``rank`` 1.0 means full rank, i.e. no factorization, and becomes ``rank: null`` in the plan:
  a full-rank factorization stores more weights than the layer it replaces. So
  ``rank: {low: 0.1, high: 1.0, step: 0.05}`` searches "off, or a rank in [0.1, 0.95]". Without
  a ``step`` the value 1.0 is (almost) never drawn, so every selected layer is factorized.
* The output layer (``LayerInfo.is_output``) cannot lose output channels, since they are the
  classes. ``channel`` is dropped from its ``structure`` choices; if ``channel`` was its only
  choice it gets ``unstructured``. In a ``share: true`` rule the shared value may still be
  ``channel``; the output layer then uses ``unstructured``.

Optuna parameters are named ``"<layer>/<knob>"``, or ``"<group>/<knob>"`` for shared rules.

Example:
    >>> space = load_search_space({"layers": [{"types": ["Linear"], "knobs": {"bits": [4, 8]}}]})
    >>> [r.types for r in space.rules]
    [('Linear',)]
"""

from __future__ import annotations

import functools
import numbers
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

from autocompress.errors import ConfigError, did_you_mean, read_yaml
from autocompress.plan import LayerPlan, Plan, PlanError

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

    from autocompress.layers import LayerInfo

__all__ = [
    "KNOBS",
    "LAYER_TYPES",
    "Knob",
    "LayerSpace",
    "ResolvedSpace",
    "Rule",
    "SearchSpace",
    "Slot",
    "load_search_space",
]

SPACE_VERSION = 1
KNOBS: tuple[str, ...] = tuple(f.name for f in fields(LayerPlan))
# The names of autocompress.layers.COMPRESSIBLE_TYPES, repeated so that reading a config does
# not import torch (a test checks that the two agree).
LAYER_TYPES = ("Conv1d", "Conv2d", "Linear")

_INT_KNOBS = ("bits", "act_bits")
_RANGE_KNOBS = ("sparsity", "bits", "rank")
_RULE_KEYS = ("name", "match", "types", "exclude", "share", "knobs")
_RANGE_KEYS = ("low", "high", "step", "log")
_TOP_KEYS = ("version", "layers")
_MAX_STEPS = 1_000_000
_NAME_RE = re.compile(r"[A-Za-z_][\w.-]*")
_RESERVED_NAME_RE = re.compile(r"rule\d+")


class TrialLike(Protocol):
    """The part of ``optuna.trial.Trial`` that :meth:`ResolvedSpace.suggest` uses."""

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float: ...

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1,
                    log: bool = False) -> int: ...

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


@dataclass(frozen=True)
class Knob:
    """The domain of one knob: a range, a list of choices or a fixed value.

    Attributes:
        kind: ``"range"``, ``"choice"`` or ``"fixed"``.
        low: Lower bound of a range.
        high: Upper bound of a range (inclusive).
        step: Grid step of a range, or None for a continuous range.
        log: Sample a range on a log scale.
        integer: The range is over integers (``bits``).
        choices: The values of a ``choice`` knob (None allowed).
        value: The value of a ``fixed`` knob.
    """

    kind: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] = ()
    value: Any = None

    def suggest(self, trial: TrialLike, name: str) -> Any:
        """Samples a value with an Optuna-like ``trial`` under parameter ``name``."""
        if self.kind == "range":
            low, high = self.bounds()
            if self.integer:
                return trial.suggest_int(name, int(low), int(high), step=int(self.step or 1),
                                         log=self.log)
            return trial.suggest_float(name, low, high, step=self.step, log=self.log)
        if self.kind == "choice":
            return trial.suggest_categorical(name, list(self.choices))
        return self.value

    def distribution(self) -> BaseDistribution | None:
        """The Optuna distribution of this knob, or None for a fixed value."""
        from optuna import distributions

        if self.kind == "range":
            low, high = self.bounds()
            if self.integer:
                return distributions.IntDistribution(int(low), int(high), log=self.log,
                                                     step=int(self.step or 1))
            return distributions.FloatDistribution(low, high, log=self.log, step=self.step)
        if self.kind == "choice":
            return distributions.CategoricalDistribution(self.choices)
        return None

    def contains(self, value: Any) -> bool:
        """True if ``value`` could have been sampled from this knob."""
        if self.kind == "choice":
            return any(_same(value, c) for c in self.choices)
        if self.kind == "fixed":
            return _same(value, self.value)
        kind = numbers.Integral if self.integer else numbers.Real
        if not isinstance(value, kind) or isinstance(value, bool):
            return False
        low, high = self.bounds()
        try:
            number = float(value)
        except (OverflowError, ValueError):
            return False
        tol = 1e-9 * max(1.0, abs(high))
        if not low - tol <= number <= high + tol:
            return False
        if self.step is None:
            return True
        steps = (number - low) / self.step
        return abs(steps - round(steps)) < 1e-6

    def snap(self, value: Any) -> Any:
        """``value`` put exactly on the range's grid (0.15, not 0.15000000000000002)."""
        if self.kind != "range" or self.integer or self.step is None:
            return value
        low, high = self.bounds()
        n = max(0, min(round((value - low) / self.step), round((high - low) / self.step)))
        return float(Decimal(repr(low)) + n * Decimal(repr(self.step)))

    def bounds(self) -> tuple[float, float]:
        """``(low, high)`` of a range."""
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.kind} knob has no bounds")
        return self.low, self.high

    def to_spec(self) -> Any:
        """The YAML form: a range mapping, a list of choices or the fixed value."""
        if self.kind == "range":
            spec: dict[str, Any] = {"low": self.low, "high": self.high}
            if self.step is not None:
                spec["step"] = self.step
            if self.log:
                spec["log"] = True
            return spec
        if self.kind == "choice":
            return list(self.choices)
        return self.value

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description, e.g. ``{"kind": "choice", "choices": [4, 8]}``."""
        if self.kind == "range":
            return {"kind": "range", "low": self.low, "high": self.high, "step": self.step,
                    "log": self.log}
        if self.kind == "choice":
            return {"kind": "choice", "choices": list(self.choices)}
        return {"kind": "fixed", "value": self.value}


@dataclass(frozen=True)
class Rule:
    """One rule of a search space: which layers, and the knob domains they get.

    Attributes:
        knobs: Knob name to domain.
        match: Module names or ``re:`` patterns (``re.fullmatch``); empty selects every layer.
        types: Module type names; empty allows every type.
        exclude: Names or ``re:`` patterns of layers left out.
        share: One sampled value per knob for all layers of the rule.
        name: Optional name, used for the parameters of a shared rule.
    """

    knobs: dict[str, Knob]
    match: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    share: bool = False
    name: str | None = None

    def selects(self, layer: LayerInfo) -> bool:
        """True if the rule applies to ``layer``."""
        return ((not self.match or any(_matches(p, layer.name) for p in self.match))
                and (not self.types or layer.type in self.types)
                and not any(_matches(p, layer.name) for p in self.exclude))

    def group(self, index: int) -> str:
        """Parameter prefix of a shared rule: its name, or ``rule<index>``."""
        return self.name or f"rule{index}"

    def to_dict(self) -> dict[str, Any]:
        """The YAML form, leaving out keys at their defaults."""
        out: dict[str, Any] = {}
        if self.name is not None:
            out["name"] = self.name
        for key in ("match", "types", "exclude"):
            if getattr(self, key):
                out[key] = list(getattr(self, key))
        if self.share:
            out["share"] = True
        out["knobs"] = {k: v.to_spec() for k, v in self.knobs.items()}
        return out

    def selector(self) -> str:
        """A short human description of what the rule selects."""
        parts = [f"{key} {list(getattr(self, key))}" for key in ("match", "types", "exclude")
                 if getattr(self, key)]
        text = ", ".join(parts) or "every layer"
        return f"rule {self.name!r} ({text})" if self.name else text


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space: rules, applied in order.

    Attributes:
        rules: The rules.
        source: Where the rules came from (a file name), used in error messages.
        key_prefix: Key path of the rules inside ``source`` (``search_space`` when inline in an
            experiment file), used in error messages.
    """

    rules: tuple[Rule, ...]
    source: str | None = field(default=None, compare=False)
    key_prefix: str = field(default="", compare=False, repr=False)

    def resolve(self, layers: Sequence[LayerInfo]) -> ResolvedSpace:
        """Applies the rules to a model's layers.

        The output layer (``is_output``) never gets ``channel`` pruning: ``channel`` is dropped
        from its ``structure`` choices, and if ``channel`` was all it was given it gets
        ``unstructured`` (in a ``share: true`` rule, a shared ``channel`` value becomes
        ``unstructured`` for it when the plan is built).

        Args:
            layers: The model's compressible layers (``find_layers``); only ``name``, ``type``
                and ``is_output`` are used.

        Returns:
            The per-layer domains, in the order of ``layers``.

        Raises:
            ConfigError: A ``match`` pattern or a whole rule selects no layer (the message
                lists the layers), or two parameters would share a name.
        """
        layers = list(layers)
        try:
            chosen: dict[str, dict[str, int]] = {}
            for i, rule in enumerate(self.rules):
                for layer in _selected(i, rule, layers):
                    chosen.setdefault(layer.name, {}).update(dict.fromkeys(rule.knobs, i))
            spaces = tuple(_layer_space(layer, chosen[layer.name], self.rules)
                           for layer in layers if layer.name in chosen)
            _check_param_names(spaces)
        except ConfigError as e:
            raise e.located(self.source, self.key_prefix) from None
        return ResolvedSpace(spaces)

    def to_dict(self) -> dict[str, Any]:
        """The YAML form; ``load_search_space(space.to_dict()) == space``."""
        return {"version": SPACE_VERSION, "layers": [r.to_dict() for r in self.rules]}


@dataclass(frozen=True)
class Slot:
    """One knob of one layer after resolving.

    Attributes:
        param: The Optuna parameter name, or None for a fixed value.
        knob: The domain.
    """

    param: str | None
    knob: Knob


@dataclass(frozen=True)
class LayerSpace:
    """The searched knobs of one layer.

    Attributes:
        name: Module name.
        type: Module type name.
        is_output: The layer produces the model output.
        knobs: Knob name to slot, in ``LayerPlan`` field order.
    """

    name: str
    type: str
    is_output: bool
    knobs: dict[str, Slot]


@dataclass(frozen=True)
class ResolvedSpace:
    """A search space applied to one model's layers: samples and rebuilds plans.

    Attributes:
        layers: The layers that get at least one knob, in model order.
    """

    layers: tuple[LayerSpace, ...]

    def params(self) -> dict[str, Knob]:
        """Optuna parameter name to domain, in sampling order (shared parameters once)."""
        out: dict[str, Knob] = {}
        for layer in self.layers:
            for slot in layer.knobs.values():
                if slot.param is not None:
                    out.setdefault(slot.param, slot.knob)
        return out

    def suggest(self, trial: TrialLike) -> Plan:
        """Samples a plan, define-by-run, with an ``optuna.trial.Trial``-like object.

        Example:
            >>> import optuna
            >>> plan = space.suggest(optuna.create_study().ask())  # doctest: +SKIP
        """
        return self._plan({name: knob.suggest(trial, name) for name, knob in self.params().items()})

    def plan_from_params(self, params: Mapping[str, Any]) -> Plan:
        """The plan a finished trial sampled: the inverse of :meth:`suggest`.

        Args:
            params: ``{"<layer>/<knob>": value}`` as in ``optuna.trial.FrozenTrial.params``, or
                the nested ``{"<layer>": {"<knob>": value}}`` form Ray Tune hands to trainables.
                Keys that are not parameters of this space are ignored.

        Raises:
            ConfigError: A parameter is missing or holds a value outside its domain (the trial
                was sampled from another search space).
        """
        flat = _flatten(params)
        values = {}
        for name, knob in self.params().items():
            if name not in flat:
                raise ConfigError(f"no value for parameter {name!r}; the trial was not sampled "
                                  f"from this search space", key="params")
            if not knob.contains(flat[name]):
                raise ConfigError(f"{name}={flat[name]!r} is outside its domain "
                                  f"{knob.to_spec()!r}", key="params")
            values[name] = int(flat[name]) if knob.kind == "range" and knob.integer else flat[name]
        return self._plan(values)

    def warm_start_params(self) -> dict[str, Any]:
        """Parameters of the mildest plan with 8-bit weights, for a first, known-safe trial.

        Per knob: the lowest sparsity, ``unstructured``, 8 bits (else the highest allowed
        bit-width, else fp32), no factorization (else the highest rank) and fp32
        activations, each as close as the knob's domain allows.
        """
        return {name: _mildest(name.rpartition("/")[2], knob) for name, knob in self.params().items()}

    def distributions(self) -> dict[str, BaseDistribution]:
        """Optuna parameter name to distribution (fixed knobs are not parameters)."""
        return {name: dist for name, knob in self.params().items()
                if (dist := knob.distribution()) is not None}

    def describe(self) -> list[dict[str, Any]]:
        """Per layer, which knob is searched over what (JSON-ready)."""
        return [{"layer": layer.name, "type": layer.type, "is_output": layer.is_output,
                 "knobs": {k: {"param": s.param, **s.knob.describe()}
                           for k, s in layer.knobs.items()}}
                for layer in self.layers]

    def _plan(self, values: Mapping[str, Any]) -> Plan:
        plan = {}
        for layer in self.layers:
            knobs = {k: _plan_value(k, s.knob.value if s.param is None else values[s.param],
                                    s.knob, layer.is_output)
                     for k, s in layer.knobs.items()}
            plan[layer.name] = LayerPlan(**knobs)
        return Plan(plan)


def load_search_space(path_or_mapping: str | os.PathLike | Mapping[str, Any], *,
                      source: str | None = None, key_prefix: str = "") -> SearchSpace:
    """Reads and validates a search space.

    Args:
        path_or_mapping: A YAML file, or the already-parsed mapping (e.g. inline in an
            experiment file).
        source: Name used for the origin in error messages; default: the path.
        key_prefix: Key path of the mapping inside ``source``, e.g. ``search_space``.

    Returns:
        The validated search space (not yet applied to a model: see
        :meth:`SearchSpace.resolve`).

    Raises:
        ConfigError: The file is missing, empty or not valid YAML, or a rule has an unknown
            key or knob, a bad range, choice, type name or regex.
    """
    if isinstance(path_or_mapping, Mapping):
        data: Any = path_or_mapping
    else:
        source = source if source is not None else str(path_or_mapping)
        data = read_yaml(path_or_mapping)
    try:
        rules = _parse_space(data)
    except ConfigError as e:
        raise e.located(source, key_prefix) from None
    return SearchSpace(rules, source=source, key_prefix=key_prefix)


# --- parsing -------------------------------------------------------------------------------


def _parse_space(data: Any) -> tuple[Rule, ...]:
    if data is None:
        raise ConfigError("empty search space; expected a mapping with a 'layers' list of rules")
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping with a 'layers' list of rules, "
                          f"got {_type_name(data)}")
    _check_keys(data, _TOP_KEYS, "")
    version = data.get("version", SPACE_VERSION)
    if version != SPACE_VERSION or isinstance(version, bool):
        raise ConfigError(f"version {version!r} is not supported; allowed: {SPACE_VERSION}",
                          key="version")
    raw_rules = data.get("layers")
    if not isinstance(raw_rules, list | tuple) or not raw_rules:
        raise ConfigError(f"expected a non-empty list of rules, got {_type_name(raw_rules)}",
                          key="layers")
    rules = tuple(_parse_rule(raw, f"layers[{i}]") for i, raw in enumerate(raw_rules))
    _check_rule_names(rules)
    return rules


def _parse_rule(raw: Any, where: str) -> Rule:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"expected a rule mapping with 'knobs', got {_type_name(raw)}",
                          key=where)
    _check_keys(raw, _RULE_KEYS, where)
    share = raw.get("share", False)
    if not isinstance(share, bool):
        raise ConfigError(f"expected true or false, got {_type_name(share)}", key=f"{where}.share")
    return Rule(
        knobs=_parse_knobs(raw.get("knobs"), f"{where}.knobs"),
        match=_parse_patterns(raw.get("match"), f"{where}.match", allow_empty=False),
        types=_parse_types(raw.get("types"), f"{where}.types"),
        exclude=_parse_patterns(raw.get("exclude"), f"{where}.exclude", allow_empty=True),
        share=share,
        name=_parse_name(raw.get("name"), f"{where}.name"),
    )


def _parse_name(raw: Any, where: str) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not _NAME_RE.fullmatch(raw):
        raise ConfigError(f"{raw!r} is not a valid rule name; allowed: letters, digits, '_', "
                          f"'.', '-', starting with a letter or '_'", key=where)
    if _RESERVED_NAME_RE.fullmatch(raw):
        raise ConfigError(f"{raw!r} is reserved for unnamed rules; pick another name", key=where)
    return raw


def _parse_patterns(raw: Any, where: str, *, allow_empty: bool) -> tuple[str, ...]:
    if raw is None:
        return ()
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple):
        raise ConfigError(f"expected a module name, a 're:' pattern or a list of them, "
                          f"got {_type_name(raw)}", key=where)
    if not items and not allow_empty:
        raise ConfigError("empty list; give at least one pattern or leave the key out", key=where)
    for j, item in enumerate(items):
        key = where if isinstance(raw, str) else f"{where}[{j}]"
        if not isinstance(item, str) or item in ("", "re:"):
            raise ConfigError(f"expected a module name or a 're:' pattern, got {item!r}", key=key)
        if item.startswith("re:"):
            try:
                _compile(item[3:])
            except (re.error, OverflowError, RecursionError) as e:
                raise ConfigError(f"bad regular expression {item!r}: {e}", key=key) from None
    return tuple(items)


def _parse_types(raw: Any, where: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple) or not items:
        raise ConfigError(f"expected a non-empty list of type names from {list(LAYER_TYPES)}, "
                          f"got {raw!r}", key=where)
    for item in items:
        if item not in LAYER_TYPES:
            hint = did_you_mean(item, LAYER_TYPES) if isinstance(item, str) else ""
            raise ConfigError(f"unknown layer type {item!r}{hint}; allowed: {list(LAYER_TYPES)}",
                              key=where)
    return tuple(items)


def _parse_knobs(raw: Any, where: str) -> dict[str, Knob]:
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"expected a mapping of knobs from {list(KNOBS)}, "
                          f"got {_type_name(raw)}", key=where)
    _check_keys(raw, KNOBS, where, what="knob")
    return {name: _parse_knob(name, value, f"{where}.{name}") for name, value in raw.items()}


def _parse_knob(name: str, raw: Any, where: str) -> Knob:
    if isinstance(raw, Mapping):
        return _parse_range(name, raw, where)
    if isinstance(raw, list | tuple):
        return _parse_choices(name, raw, where)
    _check_value(name, raw, where)
    return Knob("fixed", value=raw)


def _parse_choices(name: str, raw: Sequence[Any], where: str) -> Knob:
    if not raw:
        raise ConfigError("empty list of choices; give at least one value", key=where)
    for j, value in enumerate(raw):
        _check_value(name, value, f"{where}[{j}]")
        if any(_same(value, earlier) for earlier in raw[:j]):
            raise ConfigError(f"{value!r} is listed twice", key=f"{where}[{j}]")
    return Knob("choice", choices=tuple(raw))


def _parse_range(name: str, raw: Mapping[str, Any], where: str) -> Knob:
    if name not in _RANGE_KNOBS:
        raise ConfigError(f"a range is not allowed for {name}; give a list of choices or one "
                          f"value", key=where)
    _check_keys(raw, _RANGE_KEYS, where)
    if "low" not in raw or "high" not in raw:
        raise ConfigError("a range needs both 'low' and 'high'", key=where)
    integer = name in _INT_KNOBS
    low, high = (_range_bound(name, raw[k], k, integer, where) for k in ("low", "high"))
    if low > high:
        raise ConfigError(f"low={low!r} > high={high!r}", key=where)
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"log={log!r}; expected true or false", key=where)
    step = _range_step(raw.get("step"), integer, where)
    if log and step not in (None, 1 if integer else None):
        raise ConfigError("a range cannot have both a step and log=true", key=where)
    if log and low <= 0:
        raise ConfigError(f"log=true needs low > 0, got low={low!r}", key=where)
    knob = Knob("range", low=low, high=high, step=step, log=log, integer=integer)
    if step is not None:
        _check_grid(knob, where)
    return knob


def _range_bound(name: str, value: Any, label: str, integer: bool, where: str) -> float:
    kind = int if integer else int | float
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = "an integer" if integer else "a number"
        raise ConfigError(f"{label}={value!r}; expected {expected}", key=where)
    _check_value(name, value, where, label=label)
    return value if integer else float(value)


def _range_step(step: Any, integer: bool, where: str) -> float | None:
    if step is None:
        return None
    if integer:
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise ConfigError(f"step={step!r}; allowed: an integer >= 1", key=where)
        return step
    if not isinstance(step, int | float) or isinstance(step, bool) or not 0 < step < float("inf"):
        raise ConfigError(f"step={step!r}; allowed: a number > 0", key=where)
    return float(step)


def _check_grid(knob: Knob, where: str) -> None:
    """``high - low`` must be a whole number of steps (Optuna would move ``high`` otherwise)."""
    low, high = knob.bounds()
    step = knob.step or 1
    if (high - low) / step > _MAX_STEPS:
        raise ConfigError(f"step={knob.step!r} gives more than {_MAX_STEPS} values", key=where)
    span = Decimal(repr(high)) - Decimal(repr(low))
    if span % Decimal(repr(step)) != 0:
        raise ConfigError(f"high - low = {float(span)!r} is not a multiple of "
                          f"step={knob.step!r}", key=where)


def _check_value(name: str, value: Any, where: str, label: str | None = None) -> None:
    """Checks one knob value with ``LayerPlan``'s own validation."""
    shown = f"{label}={value!r}" if label else repr(value)
    wrong_type = isinstance(value, bool) or (
        name in _INT_KNOBS and value is not None and not isinstance(value, int))
    if wrong_type:
        raise ConfigError(f"{shown} is not allowed; allowed: {_allowed(name)}", key=where)
    try:
        LayerPlan(**{name: value})
    except PlanError:
        raise ConfigError(f"{shown} is out of range; allowed: {_allowed(name)}",
                          key=where) from None


@functools.cache
def _allowed(name: str) -> str:
    """The allowed values of a knob, in ``LayerPlan``'s words."""
    invalid: Any = object()
    try:
        LayerPlan(**{name: invalid})
    except PlanError as e:
        return str(e).partition("; allowed: ")[2] or str(e)
    return "see LayerPlan"  # pragma: no cover - every knob rejects object()


def _check_keys(data: Mapping[Any, Any], allowed: Iterable[str], where: str,
                what: str = "key") -> None:
    allowed = list(allowed)
    for key in data:
        if key not in allowed:
            path = f"{where}.{key}" if where else str(key)
            raise ConfigError(f"unknown {what} {key!r}{did_you_mean(key, allowed)}; "
                              f"allowed: {allowed}", key=path)


def _check_rule_names(rules: Sequence[Rule]) -> None:
    seen: set[str] = set()
    for i, rule in enumerate(rules):
        if rule.name in seen:
            raise ConfigError(f"rule name {rule.name!r} is used twice", key=f"layers[{i}].name")
        if rule.name is not None:
            seen.add(rule.name)


# --- resolving -----------------------------------------------------------------------------


def _selected(index: int, rule: Rule, layers: Sequence[LayerInfo]) -> list[LayerInfo]:
    names = [layer.name for layer in layers]
    for pattern in rule.match:
        if not any(_matches(pattern, name) for name in names):
            hint = "" if pattern.startswith("re:") else did_you_mean(pattern, names)
            raise ConfigError(f"pattern {pattern!r} matches no layer{hint}; "
                              f"layers: {_listing(layers)}", key=f"layers[{index}].match")
    selected = [layer for layer in layers if rule.selects(layer)]
    if not selected:
        raise ConfigError(f"{rule.selector()} selects no layer; layers: {_listing(layers)}",
                          key=f"layers[{index}]")
    return selected


def _layer_space(layer: LayerInfo, chosen: Mapping[str, int],
                 rules: Sequence[Rule]) -> LayerSpace:
    slots = {}
    for name in KNOBS:
        if name not in chosen:
            continue
        index = chosen[name]
        rule, knob = rules[index], rules[index].knobs[name]
        shared = rule.share and knob.kind != "fixed"
        if layer.is_output and name == "structure" and not shared:
            knob = _without_channel(knob)
        if knob.kind == "fixed":
            slots[name] = Slot(None, knob)
        else:
            slots[name] = Slot(f"{rule.group(index) if shared else layer.name}/{name}", knob)
    return LayerSpace(layer.name, layer.type, bool(layer.is_output), slots)


def _without_channel(knob: Knob) -> Knob:
    """The structure domain of an output layer: ``channel`` dropped (see the module doc)."""
    values = knob.choices if knob.kind == "choice" else (knob.value,)
    kept = tuple(v for v in values if v != "channel") or ("unstructured",)
    if knob.kind == "choice" and kept == knob.choices:
        return knob
    return Knob("fixed", value=kept[0]) if len(kept) == 1 else Knob("choice", choices=kept)


def _check_param_names(spaces: Sequence[LayerSpace]) -> None:
    """A shared rule's group name must not be a layer name with its own parameters."""
    owners: dict[str, Knob] = {}
    for layer in spaces:
        for slot in layer.knobs.values():
            if slot.param is None:
                continue
            if owners.setdefault(slot.param, slot.knob) != slot.knob:
                raise ConfigError(f"parameter name {slot.param!r} is used for two different "
                                  f"domains; rename the rule", key="layers")


def _plan_value(name: str, value: Any, knob: Knob, is_output: bool) -> Any:
    value = knob.snap(value)
    if name == "rank" and value == 1.0:
        return None  # full rank: no factorization (see the module doc)
    if name == "structure" and is_output and value == "channel":
        return "unstructured"  # a shared value; the output layer keeps its channels
    return value


# --- helpers -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _mildest(knob_name: str, knob: Knob) -> Any:
    if knob.kind == "fixed":
        return knob.value
    if knob.kind == "range":
        low, high = knob.bounds()
        if knob_name == "bits":
            return int(high) if high < 8 else 8 if knob.contains(8) else int(low)
        return knob.snap(high) if knob_name == "rank" else knob.snap(low)
    choices = list(knob.choices)
    numbers_ = [c for c in choices if isinstance(c, int | float) and not isinstance(c, bool)]
    preferred = {"structure": ["unstructured"], "bits": [8, *sorted(numbers_, reverse=True), None],
                 "rank": [None, *sorted(numbers_, reverse=True)], "act_bits": [None],
                 "sparsity": sorted(numbers_)}.get(knob_name, [])
    return next((p for p in preferred if any(_same(p, c) for c in choices)), choices[0])


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return _compile(pattern[3:]).fullmatch(name) is not None
    return pattern == name


def _listing(layers: Sequence[LayerInfo], limit: int = 30) -> str:
    shown = [f"{layer.name} ({layer.type})" for layer in layers[:limit]]
    if len(layers) > limit:
        shown.append(f"... ({len(layers) - limit} more)")
    return ", ".join(shown) or "(none)"


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same kind (0.0 is not False, 8 is not 8.0 for an integer knob)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def _type_name(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__
