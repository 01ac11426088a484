"""Optuna glue: the define-by-run space, the sampler registry and the accuracy constraint.

A new sampler is one ``@register_sampler`` function (``_tpe`` is the one to copy); the
experiment's ``search.sampler`` accepts every registered name. The registry itself is
:data:`autocompress.config.SAMPLERS` (torch- and Optuna-free, so that validating a config
imports no search); a built-in here is one more name in its ``builtins``. Optuna is imported
on first use.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autocompress.config import SAMPLERS, SamplerBuilder

if TYPE_CHECKING:
    from autocompress.config import ResolvedSpace


class _DefineByRun:
    """Optuna define-by-run space for ``OptunaSearch``: samples every knob of the plan."""

    def __init__(self, space: ResolvedSpace) -> None:
        self.space = space

    def __call__(self, trial: Any) -> None:
        self.space.suggest(trial)



VALUES_ATTR = "autocompress:values"  # the objective values, as a user attribute (see below)


class AccuracyDropConstraint:
    """Optuna ``constraints_func``: feasible iff ``baseline - accuracy <= max_drop``.

    Optuna calls a sampler's ``after_trial`` (where NSGA-II, TPE and the mutation sampler
    evaluate the constraint) *before* it stores the trial's values, so ``trial.values`` is
    still empty there; the search's :class:`Searcher` therefore sets the values as the user
    attribute :data:`VALUES_ATTR` before telling Optuna, and this reads them from there.
    (Reading ``trial.values`` alone made every trial infeasible: the samplers then ranked
    all trials alike, by an equal constraint violation.)
    """

    def __init__(self, index: int, baseline: float, max_drop: float) -> None:
        self.index, self.baseline, self.max_drop = index, baseline, max_drop

    def __call__(self, trial: Any) -> list[float]:
        values = trial.values or trial.user_attrs.get(VALUES_ATTR)
        if not values or values[self.index] is None:
            return [1.0]
        return [self.baseline - values[self.index] - self.max_drop]



def register_sampler(name: str) -> Callable[[SamplerBuilder], SamplerBuilder]:
    """Registers ``fn(settings: SearchSettings, constraint) -> optuna sampler`` as ``name``
    (``constraint``: an Optuna ``constraints_func``, or None, that the sampler should honour).

    Raises:
        ValueError: ``name`` is already registered.
    """
    return SAMPLERS.register(name)


def sampler_names() -> tuple[str, ...]:
    """The registered samplers (``search.sampler`` values), read now."""
    return SAMPLERS.names()


@register_sampler("nsga2")
def _nsga2(s: Any, constraint: Any) -> Any:
    import optuna

    # The default population (50) would make a typical 16-64 trial search purely random.
    population = max(4, min(50, s.trials // 3))
    return optuna.samplers.NSGAIISampler(population_size=population, seed=s.seed,
                                         constraints_func=constraint)


@register_sampler("tpe")
def _tpe(s: Any, constraint: Any) -> Any:
    import optuna

    return optuna.samplers.TPESampler(seed=s.seed, multivariate=True,
                                      n_startup_trials=max(4, min(10, s.trials // 3)),
                                      constraints_func=constraint)


@register_sampler("mutation")
def _mutation(s: Any, constraint: Any) -> Any:
    from autocompress.tune._mutation import FrontMutationSampler

    caps = {constraint.index: constraint.baseline} if isinstance(constraint, AccuracyDropConstraint) else {}
    return FrontMutationSampler(seed=s.seed, constraints_func=constraint, caps=caps)


@register_sampler("random")
def _random(s: Any, constraint: Any) -> Any:
    import optuna

    return optuna.samplers.RandomSampler(seed=s.seed)  # samples blindly: nothing to constrain


def make_sampler(settings: Any, metrics: list[str], max_accuracy_drop: float | None,
                 baseline_accuracy: float, space: Any = None) -> Any:
    """The Optuna sampler named in ``settings.sampler``, seeded, with the accuracy constraint.

    Args:
        settings: The experiment's ``search`` settings (``SearchSettings``).
        metrics: The objective metrics, in order.
        max_accuracy_drop: The ``constraints.max_accuracy_drop``, or None.
        baseline_accuracy: The baseline's accuracy, which the drop is measured from.
        space: The resolved search space: a sampler with a ``plan_key`` attribute gets
            :func:`plan_key` over it (parameters -> the plan they give, to tell plans apart).

    Raises:
        UnknownNameError: An unregistered sampler name (a KeyError; the experiment's
            validation refuses it first).
    """
    # Optuna 5 deprecates constraints_func for trial.set_constraint, which needs the objective
    # function that Ray's OptunaSearch owns; it still works until Optuna 7.
    warnings.filterwarnings("ignore", message=".*constraints_func.*", category=FutureWarning)
    constraint = None
    if max_accuracy_drop is not None and "accuracy" in metrics:
        constraint = AccuracyDropConstraint(metrics.index("accuracy"), baseline_accuracy,
                                             max_accuracy_drop)
    sampler = SAMPLERS.get(settings.sampler, key="search.sampler")(settings, constraint)
    if space is not None and hasattr(sampler, "plan_key"):
        sampler.plan_key = functools.partial(plan_key, space)
    return sampler


def plan_key(space: Any, params: dict[str, Any]) -> str:
    """The plan that ``params`` give in ``space``, in the knob table's words
    (:meth:`~autocompress.compress.Plan.summary`: a setting the plan ignores, such as
    ``structure`` at sparsity 0, is not in it, so equal plans have equal keys)."""
    return space.plan_from_params(params).summary()


@dataclass(frozen=True)
class SamplerFactory:
    """What builds the search's sampler: plain settings, picklable (no lock, no thread).

    Ray Tune cloudpickles the searcher (the Tuner's state file, searcher checkpoints); a live
    Optuna sampler may hold a lock (optuna 5.1's ``NSGAIISampler`` does), so the searcher
    carries this and rebuilds its sampler from it when unpickled.
    """

    settings: Any
    metrics: tuple[str, ...]
    max_accuracy_drop: float | None
    baseline_accuracy: float
    space: Any = None

    def __call__(self) -> Any:
        return make_sampler(self.settings, list(self.metrics), self.max_accuracy_drop,
                            self.baseline_accuracy, self.space)
