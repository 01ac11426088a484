"""The domain of one knob in a search space: a range, a list of choices or a fixed value, and
how a rule's ``knobs:`` mapping is read into domains (checked against the knob table)."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

from autocompress._errors import ConfigError
from autocompress.compress import KNOB_TABLE, KNOBS, same
from autocompress.config._checks import check_keys, type_name

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


# --- reading domains ---------------------------------------------------------------------------

_RANGE_KEYS = ("low", "high", "step", "log")
_MAX_STEPS = 1_000_000


def parse_knobs(raw: Any, where: str) -> dict[str, Knob]:
    """A rule's ``knobs:`` mapping (at key ``where``) as knob name to domain.

    Raises:
        ConfigError: An unknown knob, a bad range, choice or value (naming the key).
    """
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"expected a mapping of knobs from {list(KNOBS)}, "
                          f"got {type_name(raw)}", key=where)
    check_keys(raw, KNOBS, where, what="knob")
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
        if any(same(value, earlier) for earlier in raw[:j]):
            raise ConfigError(f"{value!r} is listed twice", key=f"{where}[{j}]")
    return Knob("choice", choices=tuple(raw))


def _parse_range(name: str, raw: Mapping[str, Any], where: str) -> Knob:
    if not KNOB_TABLE[name].rangeable:
        raise ConfigError(f"a range is not allowed for {name}; give a list of choices or one "
                          f"value", key=where)
    check_keys(raw, _RANGE_KEYS, where)
    if "low" not in raw or "high" not in raw:
        raise ConfigError("a range needs both 'low' and 'high'", key=where)
    integer = KNOB_TABLE[name].integer
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
    """Checks one knob value against the knob table."""
    spec = KNOB_TABLE[name]
    shown = f"{label}={value!r}" if label else repr(value)
    # A number of an integer knob must be an int (8.0 == 8); its strings (bits' fp16/bf16)
    # are checked by the table.
    wrong_type = (isinstance(value, bool) != isinstance(spec.default, bool)) or (
        spec.integer and value is not None and not isinstance(value, int | str))
    if wrong_type:
        raise ConfigError(f"{shown} is not allowed; allowed: {spec.allowed}", key=where)
    if (isinstance(value, float) and value != value) or not spec.valid(value):  # NaN too
        raise ConfigError(f"{shown} is out of range; allowed: {spec.allowed}", key=where)
