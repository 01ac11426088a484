"""The domain of one knob in a search space: a range, a list of choices or a fixed value."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

from autocompress.compress._knobs import same

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution


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
            return any(same(value, c) for c in self.choices)
        if self.kind == "fixed":
            return same(value, self.value)
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
