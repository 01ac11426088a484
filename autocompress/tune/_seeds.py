"""The search's first trials: uniform recipes and sensitivity-optimal allocations.

Before the sampler takes over, the search runs (after the warm-start points):

1. **uniform recipes**: the same ``bits`` and the same unstructured ``sparsity`` on every
   layer (what a user would try by hand), chosen from the grid of the space's values as the
   ones the sensitivity profile predicts best for their size, spread across sizes; then,
   where layers can lose channels, uniform channel pruning (75%, then 50%, then 25% of the
   output channels at 4-bit weights), not chosen by the profile, which cannot see how well
   fine-tuning recovers from it;
2. **allocations**: for a ladder of size budgets (each uniform recipe's size, and smaller),
   the per-layer plan of least predicted damage within the budget: a
   multiple-choice knapsack over each layer's options (every combination of the values of
   the knobs the knob table marks ``allocated``: ``sparsity``/``structure``, ``bits`` and
   ``rank``), solved exactly by dynamic
   programming over the budget in 1/2000ths of the baseline's weight bytes (costs rounded up,
   so a plan never exceeds its budget), as HAWQ-V3 does for bits with an integer program.

Predictions are additive: a layer's damage for a combination is the sum of its probes'
output distortions (:mod:`autocompress.tune._sensitivity`; continuous, unlike a metric on a
small subset), a plan's the sum over its layers; a layer's cost is the bytes of its weight as
stored (:func:`autocompress.measure.size.planned_weight_bytes`). Points are Optuna parameter
dicts of the resolved space, enqueued in order; duplicates are dropped. Which knob plays which
part (swept by the uniform recipes, cut by the channel recipes) is its ``seed`` role in the knob
table.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from autocompress.compress import BLOCK, KNOB_TABLE, LayerPlan, reconcile, same, seed_knob
from autocompress.measure import planned_weight_bytes
from autocompress.tune._sensitivity import Sensitivity, _candidates

_UNITS = 2000  # budget resolution of the knapsack
_UNIFORM = ("width", "amount")  # the seed roles the uniform recipes sweep, outer first
CHANNEL_FRACTIONS = (0.75, 0.5, 0.25)  # of the output channels, in the channel recipes' order
CHANNEL_BITS = 4  # their weights' bit-width (the nearest integer value a layer offers)
CALIBRATION_SPARSITIES = (0.5, 0.75, 0.9)  # of the plans ``finetune.lr: auto`` may be chosen on


@dataclass(frozen=True)
class Option:
    """One setting of one layer with its predicted damage (output distortion) and stored
    weight bytes."""

    knobs: dict[str, Any]
    damage: float
    cost: int


def weight_bytes(shape: Sequence[int], lp: LayerPlan) -> int:
    """Bytes of a layer's weight of ``shape`` stored under ``lp``: the size model's
    :func:`~autocompress.measure.size.planned_weight_bytes`."""
    return planned_weight_bytes(shape, lp)


def layer_options(layer: Any, shape: Sequence[int], sens: Sensitivity) -> list[Option]:
    """The Pareto-optimal (damage, bytes) settings of one layer (``layer``: a ``LayerSpace``)."""
    values = {k: _domain_values(k, slot.knob) for k, slot in layer.knobs.items()
              if KNOB_TABLE[k].allocated}
    for spec in KNOB_TABLE.values():  # the knobs probes were repeated over, at their default
        if spec.allocated:
            for k in _looked_up_by(spec):
                values.setdefault(k, [KNOB_TABLE[k].default])
    options = []
    for combo in itertools.product(*values.values()):
        knobs = reconcile(dict(zip(values, combo, strict=True)))
        lp = LayerPlan(**knobs)
        if _idle_modifier(lp):
            continue
        damage = _predicted_damage(sens, layer.name, lp)
        if damage is not None:
            options.append(Option({k: v for k, v in knobs.items() if k in layer.knobs}, damage,
                                  weight_bytes(shape, lp)))
    options.sort(key=lambda o: (o.cost, o.damage))
    front: list[Option] = []
    for o in options:  # cheapest first: keep each that loses less than every cheaper one
        if not front or o.damage < front[-1].damage - 1e-12:
            front.append(o)
    return front


def _idle_modifier(lp: LayerPlan) -> bool:
    """Whether an allocated knob that modifies another (``structure``) is off its default
    while that one is at its default: the same plan as with the modifier at its default."""
    return any(spec.allocated and spec.modifies is not None
               and same(getattr(lp, spec.modifies), KNOB_TABLE[spec.modifies].default)
               and not same(getattr(lp, spec.name), spec.default)
               for spec in KNOB_TABLE.values())


def _looked_up_by(spec: Any) -> list[str]:
    """The knobs a probe of ``spec`` is looked up by: its ``probe_across`` and variants."""
    return ([spec.probe_across] if spec.probe_across else []) + list(spec.probe_variants)


def _predicted_damage(sens: Sensitivity, layer: str, lp: LayerPlan) -> float | None:
    """The sum of the probes' distortions of the allocated knobs ``lp`` sets (each looked up
    with its ``probe_across`` and ``probe_variants`` knobs at ``lp``'s values), or None if
    one was not probed or its probe failed."""
    parts: list[float] = []
    for spec in KNOB_TABLE.values():
        value = getattr(lp, spec.name)
        if not (spec.probed and spec.allocated) or same(value, spec.default):
            continue
        across = {k: getattr(lp, k) for k in _looked_up_by(spec)}
        part = sens.distortion(layer, spec.name, value, **across)
        if part is None:
            return None
        parts.append(part)
    return float(sum(parts))


def allocate(options: Mapping[str, list[Option]], budget: int) -> dict[str, Option] | None:
    """The per-layer options of least total damage whose total bytes are at most ``budget``
    (exact over costs rounded up to 1/``_UNITS`` of the largest total), or None if even the
    cheapest options exceed it."""
    names = list(options)
    top = sum(max(o.cost for o in options[n]) for n in names)
    unit = max(1, math.ceil(top / _UNITS))
    cap = budget // unit
    if cap < 0:
        return None
    best = np.zeros(cap + 1)
    choice: list[np.ndarray] = []
    for name in names:
        new = np.full(cap + 1, np.inf)
        pick = np.full(cap + 1, -1)
        for i, o in enumerate(options[name]):
            c = math.ceil(o.cost / unit)
            if c > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[c:] = best[: cap + 1 - c] + o.damage
            better = cand < new
            new[better], pick[better] = cand[better], i
        best = new
        choice.append(pick)
    if not np.isfinite(best[cap]):
        return None
    out, j = {}, cap
    for name, pick in zip(reversed(names), reversed(choice), strict=True):
        o = options[name][int(pick[j])]
        out[name] = o
        j -= math.ceil(o.cost / unit)
    return dict(reversed(out.items()))


def seed_points(space: Any, sens: Sensitivity, shapes: Mapping[str, Sequence[int]],
                count: int) -> list[dict[str, Any]]:
    """About ``count`` first trials (Optuna parameter dicts): half uniform recipes, half
    allocations at their sizes and below (see the module docstring)."""
    options = {ls.name: layer_options(ls, shapes[ls.name], sens) for ls in space.layers
               if ls.name in shapes and ls.type != BLOCK}
    options = {k: v for k, v in options.items() if v}
    depth = depth_points(space, sens.importance, max(1, count // 4)) if sens.importance else []
    if not options:
        return depth[:count]
    recipes = _uniform_recipes(space, sens, shapes, list(options), max(1, count // 2))
    recipes += _channel_recipes(space, sens, shapes, list(options), max(1, count // 4))
    budgets = [sum(o.cost for o in r.values()) for r in recipes]
    smallest = sum(min(o.cost for o in v) for v in options.values())
    while len(budgets) < count and budgets and min(budgets) // 2 >= smallest:
        budgets.append(min(budgets) // 2)
    plans = [*recipes, *(a for b in budgets if (a := allocate(options, b)) is not None)]
    # Plans that keep more than half the weight bytes teach the search nothing the warm start
    # (8-bit weights) does not (e.g. the uncompressed model, or one free 1% change).
    full = sum(weight_bytes(shapes[name], LayerPlan()) for name in options)
    plans = [p for p in plans if 2 * sum(o.cost for o in p.values()) <= full]
    points: list[dict[str, Any]] = depth
    for plan in plans:
        point = to_params(space, {name: o.knobs for name, o in plan.items()})
        if point not in points:
            points.append(point)
    return points[:count]


def depth_points(space: Any, importance: Mapping[str, float], count: int) -> list[dict[str, Any]]:
    """Up to ``count`` first trials that drop blocks, least important first
    (``importance``: :func:`~autocompress.compress.block_importance`): the one least
    important block, then the two least, ..., never every block of one list (the other knobs
    at their mildest)."""
    blocks = {name: name.rpartition(".")[0] for name in importance}  # block -> its list
    size = {parent: list(blocks.values()).count(parent) for parent in blocks.values()}
    taken = dict.fromkeys(size, 0)
    points: list[dict[str, Any]] = []
    dropped: list[str] = []
    for name in sorted(importance, key=lambda n: importance[n]):
        parent = blocks[name]
        if len(points) >= count:
            break
        if size[parent] > 1 and taken[parent] + 1 >= size[parent]:
            continue  # the last block of a list stays
        taken[parent] += 1
        dropped.append(name)
        points.append(to_params(space, {n: {"drop": True} for n in dropped}))
    return points


def _uniform_recipes(space: Any, sens: Sensitivity, shapes: Mapping[str, Sequence[int]],
                     names: Sequence[str], count: int) -> list[dict[str, Option]]:
    """``count`` uniform recipes (the same bits and the same unstructured sparsity on every
    layer whose domain has them: the knobs of seed roles :data:`_UNIFORM`), the best predicted
    for their size, spread evenly over the sizes they span."""
    swept = [seed_knob(role).name for role in _UNIFORM]
    grid: list[dict[str, Option]] = []
    for combo in itertools.product(*_uniform_values(space)):
        recipe = {}
        for ls in space.layers:
            if ls.name not in names:
                continue
            knobs = {k: v for k, v in zip(swept, combo, strict=True)
                     if k in ls.knobs and any(same(v, w) for w in _domain_values(k, ls.knobs[k].knob))}
            option = best_variant(ls, knobs, sens, shapes[ls.name])
            if option is None:
                break
            recipe[ls.name] = option
        else:
            grid.append(recipe)
    grid.sort(key=lambda r: sum(o.cost for o in r.values()))
    front: list[dict[str, Option]] = []
    for r in grid:
        if not front or sum(o.damage for o in r.values()) < sum(o.damage for o in front[-1].values()) - 1e-12:
            front.append(r)
    if len(front) <= count:
        return front
    idx = np.linspace(0, len(front) - 1, count).round().astype(int)
    return [front[i] for i in dict.fromkeys(idx.tolist())]


def _channel_recipes(space: Any, sens: Sensitivity, shapes: Mapping[str, Sequence[int]],
                     names: Sequence[str], count: int) -> list[dict[str, Option]]:
    """Up to ``count`` uniform channel-pruning recipes, as a user would try them by hand:
    75%, then 50%, then 25% of the output channels removed (the nearest values of each
    layer's domain) with the integer bit-width nearest :data:`CHANNEL_BITS`; a layer that
    cannot lose channels (the output layer, a transformer's residual stream) keeps only the
    bits. Not chosen by predicted damage: the profile measures damage before fine-tuning, and
    fine-tuning recovers from channel pruning far more than that predicts (digits, 2 epochs:
    50% of the channels at 4 bits loses nothing). None when no layer offers channels."""
    amount, how = seed_knob("amount").name, seed_knob("cut")
    recipes: list[dict[str, Option]] = []
    for fraction in CHANNEL_FRACTIONS[:count]:
        recipe, cut = {}, False
        for ls in space.layers:
            if ls.name not in names:
                continue
            knobs = _near_4_bits(ls)
            structures = (_domain_values(how.name, ls.knobs[how.name].knob)
                          if how.name in ls.knobs else [])
            if how.seed_value in structures and amount in ls.knobs:
                level = _nearest(amount, ls.knobs[amount].knob, fraction)
                if level:
                    knobs[amount], knobs[how.name], cut = level, how.seed_value, True
            lp = LayerPlan(**knobs)
            recipe[ls.name] = (best_variant(ls, knobs, sens, shapes[ls.name])
                               or Option(knobs, _predicted_damage(sens, ls.name, lp) or 0.0,
                                         weight_bytes(shapes[ls.name], lp)))
        if cut and recipe not in recipes:
            recipes.append(recipe)
    return recipes


def best_variant(ls: Any, knobs: dict[str, Any], sens: Sensitivity,
                 shape: Sequence[int]) -> Option | None:
    """``knobs`` on layer space ``ls`` with the variants of the knobs they set (the
    ``probe_variants`` its domain offers: ``pruner`` for a sparsity, ``quantizer`` and
    ``group_size`` for bits) chosen for the least predicted damage at no more stored bytes
    than the default variants; on a tie (a model-level probe, measured for the default only)
    a calibrated variant, which is at least as good on the calibration data by
    construction, the last in domain order (``sparsegpt`` refits the next layer after a
    channel cut). A variant no probe of the layer succeeded with is never chosen. None if no
    variant has a prediction."""
    names = [k for name in knobs for k in KNOB_TABLE[name].probe_variants if k in ls.knobs]
    grids = [_domain_values(k, ls.knobs[k].knob) for k in names]
    base = weight_bytes(shape, LayerPlan(**reconcile(dict(knobs))))
    best: tuple[float, bool, int, Option] | None = None
    for i, combo in enumerate(itertools.product(*grids)):
        extra = {k: v for k, v in zip(names, combo, strict=True) if not same(v, KNOB_TABLE[k].default)}
        full = reconcile({**knobs, **extra})
        if any(not same(full.get(k), v) or not sens.works(ls.name, k, v) for k, v in extra.items()):
            continue  # a rule undid the variant (gptq without integer bits), or no probe of it worked
        lp = LayerPlan(**full)
        damage, cost = _predicted_damage(sens, ls.name, lp), weight_bytes(shape, lp)
        if damage is None or cost > base:
            continue
        key = (damage, not extra, -i)
        if best is None or key < best[:3]:
            best = (*key, Option({k: v for k, v in full.items() if k in ls.knobs}, damage, cost))
    return None if best is None else best[3]


def calibration_points(space: Any) -> list[dict[str, Any]]:
    """The Optuna parameters of the plans ``finetune.lr: auto`` may be chosen on, mildest first:
    every layer at the integer bit-width nearest :data:`CHANNEL_BITS` and, in turn, the
    unstructured sparsities nearest :data:`CALIBRATION_SPARSITIES` its domain has (duplicates
    dropped). The search takes the first that loses enough before fine-tuning
    (:func:`autocompress.finetune.choose_lr` needs a plan fine-tuning must work to recover
    from)."""
    amount = seed_knob("amount").name
    points: list[dict[str, Any]] = []
    for target in CALIBRATION_SPARSITIES:
        plan: dict[str, dict[str, Any]] = {}
        for ls in space.layers:
            knobs = _near_4_bits(ls)
            if amount in ls.knobs:
                knobs[amount] = _nearest(amount, ls.knobs[amount].knob, target)
            plan[ls.name] = knobs
        point = to_params(space, plan)
        if point not in points:
            points.append(point)
    return points


def _near_4_bits(ls: Any) -> dict[str, Any]:
    """``{"bits": b}`` (the knob of seed role ``width``), b the integer bit-width of layer
    space ``ls`` nearest :data:`CHANNEL_BITS` (the smaller on ties), or ``{}`` when it offers
    none."""
    width = seed_knob("width").name
    if width not in ls.knobs:
        return {}
    ints = [v for v in _domain_values(width, ls.knobs[width].knob)
            if isinstance(v, int) and not isinstance(v, bool)]
    return {width: min(ints, key=lambda b: (abs(b - CHANNEL_BITS), b))} if ints else {}


def _nearest(name: str, knob: Any, target: float) -> Any:
    """The plan value of ``knob``'s domain nearest ``target`` (the smaller on ties)."""
    spec = KNOB_TABLE[name]
    if knob.kind == "range":
        low, high = knob.bounds()
        return spec.to_plan(knob.snap(min(max(target, low), high)))
    numbers = [v for v in _domain_values(name, knob)
               if isinstance(v, int | float) and not isinstance(v, bool)]
    return min(numbers, key=lambda v: (abs(v - target), v)) if numbers else None


def _domain_values(name: str, knob: Any) -> list[Any]:
    return [KNOB_TABLE[name].default, *_candidates(name, knob)]


def _uniform_values(space: Any) -> list[list[Any]]:
    """Per role of :data:`_UNIFORM` (``bits``, ``sparsity``), the values some layer's domain
    offers for its knob (defaults included)."""
    out = []
    for role in _UNIFORM:
        spec = seed_knob(role)
        target: list[Any] = [spec.default]
        for ls in space.layers:
            if spec.name in ls.knobs:
                target += [v for v in _candidates(spec.name, ls.knobs[spec.name].knob)
                           if not any(same(v, w) for w in target)]
        out.append(target)
    return out


def to_params(space: Any, plan: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The Optuna parameters of ``space`` that give ``plan`` (``{layer: {knob: value}}``):
    each searched knob at the plan's value (its default where the plan does not set it);
    a shared parameter takes its first layer's value."""
    params: dict[str, Any] = {}
    for ls in space.layers:
        for knob, slot in ls.knobs.items():
            if slot.param is None or slot.param in params:
                continue
            value = plan.get(ls.name, {}).get(knob, KNOB_TABLE[knob].default)
            params[slot.param] = _domain_value(knob, slot.knob, value)
    return params


def _domain_value(name: str, knob: Any, value: Any) -> Any:
    """The value of ``knob``'s domain that means plan value ``value`` (``rank`` null is 1.0
    in a range); the mildest value if the domain has none."""
    spec = KNOB_TABLE[name]
    if knob.contains(value):
        return value
    for v in (knob.choices if knob.kind == "choice" else ()):
        if same(spec.to_plan(v), value):
            return v
    if knob.kind == "range" and value is None and knob.contains(1.0):
        return knob.snap(1.0)
    return spec.mildest_value(knob)
