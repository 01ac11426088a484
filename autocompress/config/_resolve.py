"""A search space applied to one model's layers: per-layer domains, sampling plans, and the
inverse (the plan of a finished trial's parameters).

Which values a layer cannot take, how a sampled value becomes a plan value and which value is
the mildest come from the knob table (:mod:`autocompress.compress._knobs`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from autocompress._errors import ConfigError, did_you_mean
from autocompress.compress import (
    KNOB_TABLE,
    KNOBS,
    KnobSpec,
    LayerPlan,
    Plan,
    reconcile,
    why_refused,
)
from autocompress.config._checks import matches
from autocompress.config._domain import Knob, TrialLike

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

    from autocompress.compress import LayerInfo


def resolve(rules: Sequence[Any], layers: Sequence[LayerInfo]) -> ResolvedSpace:
    """Applies ``rules`` (a search space's ``Rule`` objects) to a model's layers (see
    :meth:`SearchSpace.resolve`)."""
    layers = [layer for layer in layers if getattr(layer, "used", True)]  # never-run layers
    chosen: dict[str, dict[str, int]] = {}
    for i, rule in enumerate(rules):
        for layer in _selected(i, rule, layers):
            chosen.setdefault(layer.name, {}).update(dict.fromkeys(rule.knobs, i))
    spaces = tuple(_layer_space(layer, chosen[layer.name], rules)
                   for layer in layers if layer.name in chosen)
    _check_param_names(spaces)
    return ResolvedSpace(spaces)


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
        refusals: The knob values the layer cannot take (``LayerInfo.refusals``).
    """

    name: str
    type: str
    is_output: bool
    knobs: dict[str, Slot]
    refusals: tuple[Any, ...] = field(default=(), compare=False)



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
        return {name: KNOB_TABLE[name.rpartition("/")[2]].mildest_value(knob)
                for name, knob in self.params().items()}

    def warm_start_points(self) -> list[dict[str, Any]]:
        """The search's first trials: :meth:`warm_start_params`, then, where the space offers
        8-bit activations, the same plan with them on every layer that can take them
        (``dynamic`` first: integer kernels without calibration). The second point is where
        int8 pays in speed; it is left out when it would be the first again."""
        first = self.warm_start_params()
        second = {name: _with_int8_activations(name, value, self.params()[name])
                  for name, value in first.items()}
        return [first] if second == first else [first, second]

    def without(self, knob: str) -> ResolvedSpace:
        """This space with ``knob`` left at its default on every layer (not searched, not
        fixed); layers left with no knob are dropped."""
        layers = (replace(layer, knobs={k: s for k, s in layer.knobs.items() if k != knob})
                  for layer in self.layers)
        return ResolvedSpace(tuple(layer for layer in layers if layer.knobs))

    def sets(self, knob: str) -> bool:
        """Whether some layer's ``knob`` may take a value other than its default."""
        default = KNOB_TABLE[knob].default
        return any(not (s.knob.kind == "fixed" and s.knob.value == default)
                   for layer in self.layers for k, s in layer.knobs.items() if k == knob)

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
            knobs = {k: _plan_value(KNOB_TABLE[k], s.knob.value if s.param is None else values[s.param],
                                    s.knob, layer)
                     for k, s in layer.knobs.items()}
            plan[layer.name] = LayerPlan(**reconcile(knobs))
        return Plan(plan)



def _selected(index: int, rule: Any, layers: Sequence[LayerInfo]) -> list[LayerInfo]:
    names = [layer.name for layer in layers]
    for pattern in rule.match:
        if not any(matches(pattern, name) for name in names):
            hint = "" if pattern.startswith("re:") else did_you_mean(pattern, names)
            raise ConfigError(f"pattern {pattern!r} matches no layer{hint}; "
                              f"layers: {_listing(layers)}", key=f"layers[{index}].match")
    selected = [layer for layer in layers if rule.selects(layer)]
    if not selected:
        raise ConfigError(f"{rule.selector()} selects no layer; layers: {_listing(layers)}",
                          key=f"layers[{index}]")
    return selected



def _layer_space(layer: LayerInfo, chosen: Mapping[str, int],
                 rules: Sequence[Any]) -> LayerSpace:
    slots = {}
    for name in KNOBS:
        if name not in chosen:
            continue
        index = chosen[name]
        rule, knob = rules[index], rules[index].knobs[name]
        shared = rule.share and knob.kind != "fixed"
        if not shared:  # a shared value a layer refuses falls back when the plan is built
            knob = _restrict(KNOB_TABLE[name], knob, layer)
        if knob.kind == "fixed":
            slots[name] = Slot(None, knob)
        else:
            slots[name] = Slot(f"{rule.group(index) if shared else layer.name}/{name}", knob)
    return LayerSpace(layer.name, layer.type, bool(layer.is_output), slots,
                      tuple(getattr(layer, "refusals", ())))




def _restrict(spec: KnobSpec, knob: Knob, layer: Any) -> Knob:
    """``knob``'s domain without the values ``layer`` refuses; a domain left empty (or a range
    of which every value is refused) becomes the knob's default."""
    if knob.kind == "range":
        everything = any(r.knob == spec.name and r.value is None for r in getattr(layer, "refusals", ()))
        return Knob("fixed", value=spec.default) if everything else knob
    values = knob.choices if knob.kind == "choice" else (knob.value,)
    kept = tuple(v for v in values if why_refused(spec, v, layer) is None) or (spec.default,)
    if kept == values:
        return knob
    return Knob("fixed", value=kept[0]) if len(kept) == 1 else Knob("choice", choices=kept)


def _plan_value(spec: KnobSpec, value: Any, knob: Knob, layer: LayerSpace) -> Any:
    """A sampled value as a plan value: on the domain's grid, mapped by the knob table, and the
    knob's default where this layer refuses a value shared with other layers."""
    value = spec.to_plan(knob.snap(value))
    return spec.default if why_refused(spec, value, layer) is not None else value


def _with_int8_activations(name: str, value: Any, knob: Knob) -> Any:
    """``value``, or for an ``act_bits`` parameter the first of ``dynamic``, 8 its domain has."""
    if name.rpartition("/")[2] != "act_bits":
        return value
    return next((v for v in ("dynamic", 8) if knob.contains(v)), value)


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





def _listing(layers: Sequence[LayerInfo], limit: int = 30) -> str:
    shown = [f"{layer.name} ({layer.type})" for layer in layers[:limit]]
    if len(layers) > limit:
        shown.append(f"... ({len(layers) - limit} more)")
    return ", ".join(shown) or "(none)"



def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out
