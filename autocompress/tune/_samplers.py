"""Optuna glue: the define-by-run space, the samplers and the accuracy constraint."""

from __future__ import annotations

import warnings
from typing import Any

from autocompress.config._experiment import Experiment
from autocompress.config._resolve import ResolvedSpace


class _DefineByRun:
    """Optuna define-by-run space for ``OptunaSearch``: samples every knob of the plan."""

    def __init__(self, space: ResolvedSpace) -> None:
        self.space = space

    def __call__(self, trial: Any) -> None:
        self.space.suggest(trial)



class _AccuracyDropConstraint:
    """Optuna ``constraints_func``: feasible iff ``baseline - accuracy <= max_drop``."""

    def __init__(self, index: int, baseline: float, max_drop: float) -> None:
        self.index, self.baseline, self.max_drop = index, baseline, max_drop

    def __call__(self, trial: Any) -> list[float]:
        if not trial.values:
            return [1.0]
        return [self.baseline - trial.values[self.index] - self.max_drop]



def make_sampler(exp: Experiment, baseline_accuracy: float):
    """The Optuna sampler named in ``search.sampler``, seeded, with the accuracy constraint."""
    import optuna

    s = exp.search
    # Optuna 5 deprecates constraints_func for trial.set_constraint, which needs the objective
    # function that Ray's OptunaSearch owns; it still works until Optuna 7.
    warnings.filterwarnings("ignore", message=".*constraints_func.*", category=FutureWarning)
    constraint = None
    if exp.constraints.max_accuracy_drop is not None and "accuracy" in exp.metrics:
        constraint = _AccuracyDropConstraint(exp.metrics.index("accuracy"), baseline_accuracy,
                                             exp.constraints.max_accuracy_drop)
    if s.sampler == "nsga2":
        # The default population (50) would make a typical 16-64 trial search purely random.
        population = max(4, min(50, s.trials // 3))
        return optuna.samplers.NSGAIISampler(population_size=population, seed=s.seed,
                                             constraints_func=constraint)
    if s.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=s.seed, multivariate=True,
                                          n_startup_trials=max(4, min(10, s.trials // 3)),
                                          constraints_func=constraint)
    return optuna.samplers.RandomSampler(seed=s.seed)



def _searcher_class():
    from ray.tune.search.optuna import OptunaSearch

    class Searcher(OptunaSearch):
        """OptunaSearch that tells Optuna a failed trial FAILED.

        Ray's OptunaSearch passes the last (per-epoch) result of an errored multi-objective
        trial as a list of Nones, which Optuna rejects, leaving the trial RUNNING in the study.
        """

        def on_trial_complete(self, trial_id: str, result: dict | None = None,
                              error: bool = False) -> None:
            metrics = self.metric if isinstance(self.metric, list) else [self.metric]
            if error or not result or any(result.get(m) is None for m in metrics):
                result, error = None, True
            super().on_trial_complete(trial_id, result, error)

    return Searcher
