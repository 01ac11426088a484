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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autocompress.config import SAMPLERS, SamplerBuilder

if TYPE_CHECKING:
    from autocompress.config._resolve import ResolvedSpace


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


def _searcher_class():
    import optuna
    from ray import cloudpickle
    from ray.tune.search import Searcher as RaySearcher
    from ray.tune.search.optuna import OptunaSearch

    class Searcher(OptunaSearch):
        """OptunaSearch that tells Optuna a failed trial FAILED and a pruned one PRUNED, and
        stops suggesting once ``trials`` trials have finished (pruned ones do not count: the
        search runs new trials in their place).

        Ray's OptunaSearch passes the last (per-epoch) result of an errored multi-objective
        trial as a list of Nones, which Optuna rejects, leaving the trial RUNNING in the study.

        It takes a :class:`SamplerFactory` and a storage URL instead of live objects, and
        pickles as those (plus the Optuna trial ids of the running trials): unpickling reopens
        the study from its storage and builds a fresh sampler.
        """

        def __init__(self, *args: Any, sampler: SamplerFactory, storage: str,
                     trials: int | None = None, **kwargs: Any) -> None:
            self.sampler_factory, self.storage_url = sampler, storage
            super().__init__(*args, sampler=sampler(), storage=optuna.storages.RDBStorage(storage),
                             **kwargs)
            self.wanted, self.ended, self.live = trials, 0, set()

        def __getstate__(self) -> dict[str, Any]:
            state = self.__dict__.copy()
            state.update(_sampler=None, _storage=None, _ot_study=None,
                         _ot_trials={k: t._trial_id for k, t in self._ot_trials.items()})
            return state

        def __setstate__(self, state: dict[str, Any]) -> None:
            trial_ids = state.pop("_ot_trials")
            self.__dict__.update(state)
            self._sampler = self.sampler_factory()
            self._storage = optuna.storages.RDBStorage(self.storage_url)
            self._ot_study = optuna.load_study(study_name=self._study_name, storage=self._storage,
                                               sampler=self._sampler)
            self._ot_trials = {k: optuna.Trial(self._ot_study, tid) for k, tid in trial_ids.items()}

        # Ray's own save/restore pickle ``__dict__`` directly: the live sampler with it.
        def save(self, checkpoint_path: str) -> None:
            Path(checkpoint_path).write_bytes(cloudpickle.dumps(self.__getstate__()))

        def restore(self, checkpoint_path: str) -> None:
            self.__setstate__(cloudpickle.loads(Path(checkpoint_path).read_bytes()))

        def suggest(self, trial_id: str) -> Any:
            if self.wanted is not None and self.ended + len(self.live) >= self.wanted:
                return RaySearcher.FINISHED if not self.live else None  # wait for the running
            config = super().suggest(trial_id)
            if isinstance(config, dict):
                self.live.add(trial_id)
            return config

        def on_trial_complete(self, trial_id: str, result: dict | None = None,
                              error: bool = False) -> None:
            self.live.discard(trial_id)
            if result and result.get("pruned"):
                super().on_trial_complete(trial_id, None, False)  # no values, no error: PRUNED
                return
            self.ended += 1
            metrics = self.metric if isinstance(self.metric, list) else [self.metric]
            if error or not result or any(result.get(m) is None for m in metrics):
                result, error = None, True
            elif trial_id in self._ot_trials:  # for the constraint (AccuracyDropConstraint)
                self._ot_trials[trial_id].set_user_attr(VALUES_ATTR,
                                                        [float(result[m]) for m in metrics])
            super().on_trial_complete(trial_id, result, error)

    return Searcher
