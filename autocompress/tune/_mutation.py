"""A sampler that mutates the Pareto front: the next plan is a feasible front member with one
to three of its parameters moved to a neighbouring value.

Why: a compression plan has a few knobs per layer (25 parameters for a 5-layer CNN), and a
good plan's neighbours are mostly good too, while a random plan is mostly bad. NSGA-II breeds
from its whole population with uniform crossover (half of each parent's knobs) and, with a
handful of generations in a 32-trial search, stays close to random sampling; a local search
around the front spends the trials where the front can move. The first trials (warm start,
uniform recipes, sensitivity-optimal allocations: :mod:`autocompress.tune._seeds`) give it
its first front.

Each trial:

- with probability ``explore`` (and while fewer than two trials have finished) it is sampled at
  random (Optuna's ``RandomSampler``);
- otherwise the parent is a member of the non-dominated set of the finished trials that meet
  the constraint (all finished trials when none does), drawn with probability proportional
  to its crowding distance (:func:`crowding`: the ends of the front and the members beside
  its widest gaps most often), and ``k`` of its
  parameters (1, 2 or 3 with probabilities 0.5, 0.3, 0.2) move: a stepped range by one or two
  steps up or down, a list of choices to the next or previous value in the order the search
  space lists them (``bits: [3, 4, 5, 6, 8, null]``, ``rank: [null, 0.5, 0.25]``) or, with
  probability 0.3, to any other value. With probability 0.4 the move is a **shift** instead:
  one knob moves the same way on every layer (all ``bits`` one value down, all
  ``sparsity`` two steps up, ...). A front member's single-layer neighbours differ from it
  by a few percent of its size, while the front's gaps (between a 50% and a 75%
  channel-pruned model, between 4 and 3 bits) are changes to every layer at once; a shift
  crosses them in one trial. A plan a finished or running trial already has is
  mutated further (up to 20 tries), so trials are not spent twice on one plan. Plans are
  compared as the search applies them (``plan_key``): parameters that differ only where the
  plan ignores them (``structure`` at sparsity 0, a knob the layer's other values override)
  are the same plan.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.samplers._base import _CONSTRAINTS_KEY, _process_constraints_after_trial
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from autocompress.tracking import non_dominated_mask

_MUTATIONS = (1, 2, 3)
_MUTATION_P = (0.5, 0.3, 0.2)
_JUMP_P = 0.3  # a choice moves to any other value (else to a neighbour in the listed order)
_TRIES = 20
_SHIFT_P = 0.4  # a move shifts one knob on every layer together (see FrontMutationSampler._shift)


class FrontMutationSampler(BaseSampler):
    """See the module docstring.

    Args:
        seed: Random seed.
        explore: Probability that a trial is sampled at random instead.
        constraints_func: Optuna ``constraints_func`` (feasible iff every value is <= 0), or None.
        caps: ``{objective index: value}``: values better than this count as this when the
            parents are chosen (the search caps accuracy at the baseline's: a compressed
            model one validation sample above the baseline is not a better model, and
            without the cap the parents pile up at that end of the front).
        plan_key: Parameters -> a value equal for parameters that give the same plan (the
            search sets it; default: the parameters themselves).
    """

    def __init__(self, seed: int | None = None, explore: float = 0.05,
                 constraints_func: Callable[[FrozenTrial], Sequence[float]] | None = None,
                 caps: dict[int, float] | None = None,
                 plan_key: Callable[[dict[str, Any]], Hashable] | None = None) -> None:
        self.plan_key = plan_key
        self._rng = np.random.default_rng(seed)
        self._random = RandomSampler(seed=seed)
        self._explore = explore
        self._constraints_func = constraints_func
        self._caps = dict(caps or {})

    def reseed_rng(self) -> None:
        self._rng = np.random.default_rng()
        self._random.reseed_rng()

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return optuna.search_space.intersection_search_space(
            study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.values is not None]
        if not search_space or len(done) < 2 or self._rng.random() < self._explore:
            return {}
        parent = self._parent(study, done)
        seen = {self._plan(t.params) for t in study.get_trials(deepcopy=False)
                if t.number != trial.number and t.params}
        params = {k: v for k, v in parent.params.items() if k in search_space}
        names = sorted(params)
        groups = knob_groups(names)
        for _ in range(_TRIES):
            if groups and self._rng.random() < _SHIFT_P:
                self._shift(params, search_space, groups[int(self._rng.integers(len(groups)))])
            else:
                k = min(len(names), int(self._rng.choice(_MUTATIONS, p=_MUTATION_P)))
                for name in self._rng.choice(names, size=k, replace=False):
                    params[name] = self._neighbour(search_space[name], params[name])
            if self._plan(params) not in seen:
                break
        return params

    def _shift(self, params: dict[str, Any], space: dict[str, BaseDistribution],
               group: list[str]) -> None:
        """Moves every parameter of ``group`` (one knob on every layer) the same way: one
        step of its listed order (a range by one or two steps) up or down, clipped at the
        ends."""
        direction = int(self._rng.choice([-1, 1]))
        steps = int(self._rng.choice([1, 2]))
        for name in group:
            params[name] = _step(space[name], params[name], direction, steps)

    def _plan(self, params: dict[str, Any]) -> Hashable:
        if self.plan_key is not None:
            try:
                return self.plan_key(params)
            except Exception:  # noqa: BLE001  (a trial's params may be partial: compare them as is)
                pass
        return _key(params)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        if self._constraints_func is not None:  # stored as Optuna's own samplers store them
            _process_constraints_after_trial(self._constraints_func, study, trial, state)

    def _parent(self, study: Study, done: list[FrozenTrial]) -> FrozenTrial:
        feasible = [t for t in done if all(c <= 0 for c in t.system_attrs.get(_CONSTRAINTS_KEY) or ())]
        pool = feasible or done
        directions = ["max" if d == StudyDirection.MAXIMIZE else "min" for d in study.directions]
        values = np.array([[v if v is not None else math.nan for v in t.values] for t in pool],
                          dtype=float)
        for i, cap in self._caps.items():
            values[:, i] = (np.minimum if directions[i] == "max" else np.maximum)(values[:, i], cap)
        mask = non_dominated_mask(values, directions)
        if not mask.any():  # no comparable values (NaN): any finished trial
            return pool[int(self._rng.integers(len(pool)))]
        front = [t for t, on in zip(pool, mask, strict=True) if on]
        weights = crowding(values[mask])
        return front[int(self._rng.choice(len(front), p=weights / weights.sum()))]

    def _neighbour(self, dist: BaseDistribution, value: Any) -> Any:
        if isinstance(dist, CategoricalDistribution):
            choices = list(dist.choices)
            if len(choices) < 2:
                return value
            i = choices.index(value)
            if self._rng.random() < _JUMP_P:
                return choices[int(self._rng.choice([j for j in range(len(choices)) if j != i]))]
            moves = [j for j in (i - 1, i + 1) if 0 <= j < len(choices)]
            return choices[int(self._rng.choice(moves))]
        if isinstance(dist, FloatDistribution | IntDistribution):
            step = dist.step or (dist.high - dist.low) / 10
            for _ in range(_TRIES):
                moved = value + int(self._rng.choice([-2, -1, 1, 2])) * step
                if dist.low <= moved <= dist.high:
                    return _snap(dist, value, moved, step)
            return value
        return value


def knob_groups(names: Sequence[str]) -> list[list[str]]:
    """The parameters ``"<layer>/<knob>"`` grouped by knob, groups of two or more only, in
    the order of their first parameter."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.rsplit("/", 1)[-1], []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _step(dist: BaseDistribution, value: Any, direction: int, steps: int) -> Any:
    """``value`` moved ``direction`` (+1 or -1) along ``dist``: to the next listed choice
    (whatever ``steps``), or by ``steps`` steps of a range, clipped at its ends."""
    if isinstance(dist, CategoricalDistribution):
        choices = list(dist.choices)
        i = min(max(choices.index(value) + direction, 0), len(choices) - 1)
        return choices[i]
    if isinstance(dist, FloatDistribution | IntDistribution):
        step = dist.step or (dist.high - dist.low) / 10
        return _snap(dist, value, min(max(value + direction * steps * step, dist.low), dist.high), step)
    return value


def _snap(dist: FloatDistribution | IntDistribution, value: Any, moved: float, step: float) -> Any:
    """``moved`` on the grid of ``step`` from ``dist.low``, within the range, as ``value``'s type."""
    moved = round(round((moved - dist.low) / step) * step + dist.low, 12)
    return type(value)(min(dist.high, max(dist.low, moved)))


def crowding(values: np.ndarray) -> np.ndarray:
    """NSGA-II's crowding distance of each point of a front (rows of ``values``): the sum over
    objectives of the gap between its two neighbours, normalised by the objective's span; the
    two ends of each objective get twice the largest finite distance (1 where none is finite),
    so that the front is pushed outwards and its gaps filled."""
    n, k = values.shape
    if n <= 2:
        return np.ones(n)
    dist = np.zeros(n)
    ends = np.zeros(n, dtype=bool)
    for j in range(k):
        order = np.argsort(values[:, j], kind="stable")
        col = values[order, j]
        span = col[-1] - col[0]
        ends[order[[0, -1]]] = True
        if span > 0:
            dist[order[1:-1]] += (col[2:] - col[:-2]) / span
    finite = dist[~ends]
    dist[ends] = 2 * finite.max() if finite.size and finite.max() > 0 else 1.0
    return np.maximum(dist, 1e-3)


def _key(params: dict[str, Any]) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in params.items()))
