"""Pareto fronts, non-domination ranks and hypervolume for multi-objective search results.

Every function takes an ``(n, k)`` array of objective values (one row per trial, one column
per objective) and a direction per column, ``"min"`` or ``"max"``. Internally the values are
flipped so that lower is better in every column (as in Optuna's
``optuna/study/_multi_objective.py``); row ``a`` then dominates row ``b`` when ``a <= b`` in
every objective and ``a < b`` in at least one. Rows holding NaN in any objective (failed
trials) are never on the front and never dominate anything.

Example:
    >>> values = np.array([[0.75, 10.0], [0.5, 5.0], [0.25, 8.0]])  # accuracy, size
    >>> non_dominated_mask(values, ["max", "min"])
    array([ True,  True, False])
    >>> hypervolume(values, ["max", "min"], reference=[0.0, 20.0])
    10.0
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    import pandas

Direction = Literal["min", "max"]
DIRECTIONS: tuple[Direction, ...] = ("min", "max")

__all__ = [
    "DIRECTIONS",
    "Direction",
    "hypervolume",
    "non_dominated_mask",
    "non_dominated_rank",
    "pareto_front",
    "reference_point",
    "to_minimization",
]


def _check_directions(directions: Sequence[str]) -> np.ndarray:
    """Return a bool array, True for the columns to maximise, after validating ``directions``."""
    if isinstance(directions, str):
        raise ValueError(f"directions must be a sequence like ['min', 'max'], got {directions!r}")
    if len(directions) == 0:
        raise ValueError("at least one objective direction is required")
    for direction in directions:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'min' or 'max', got {direction!r}")
    return np.array([direction == "max" for direction in directions], dtype=bool)


def to_minimization(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Flip objective values so that lower is better in every column.

    Args:
        values: Array-like of shape ``(n, k)``; an empty sequence is read as ``(0, k)``.
        directions: ``k`` directions, each ``"min"`` or ``"max"``.

    Returns:
        A new float array of shape ``(n, k)`` with the ``"max"`` columns negated (NaN stays NaN).

    Raises:
        ValueError: If a direction is not ``"min"``/``"max"``, if ``values`` is not
            two-dimensional, or if its number of columns differs from ``len(directions)``.
    """
    maximize = _check_directions(directions)
    array = np.asarray(values, dtype=float)
    if array.ndim == 1 and array.size == 0:
        array = array.reshape(0, len(maximize))
    if array.ndim != 2:
        raise ValueError(f"values must be a 2-D (n, k) array, got shape {array.shape}")
    if array.shape[1] != len(maximize):
        raise ValueError(
            f"values have {array.shape[1]} objective columns but {len(maximize)} directions "
            f"were given: {list(directions)}"
        )
    return np.where(maximize, -array, array)


def _front_of_unique_lexsorted(loss: np.ndarray) -> np.ndarray:
    """Non-dominated mask of unique, lexicographically sorted rows (lower is better).

    The first remaining row is lexicographically smallest, so nothing still remaining can
    dominate it, and anything that dominated it would have been removed together with a row
    on the front that dominates both. Each step keeps only the rows strictly better than the
    new front member in some objective, i.e. the rows it does not dominate.
    """
    on_front = np.zeros(len(loss), dtype=bool)
    remaining = np.arange(len(loss))
    while remaining.size:
        top = remaining[0]
        on_front[top] = True
        not_dominated = np.any(loss[remaining] < loss[top], axis=1)
        not_dominated[0] = False  # ``top`` itself; guarantees progress whatever the values
        remaining = remaining[not_dominated]
    return on_front


def _valid_unique(loss: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split off NaN rows and deduplicate the rest.

    Returns:
        ``(valid, unique, inverse)``: the bool mask of rows without NaN, the sorted unique
        valid rows, and for each valid row the index of its copy in ``unique``.
    """
    valid = ~np.isnan(loss).any(axis=1)
    unique, inverse = np.unique(loss[valid], axis=0, return_inverse=True)
    return valid, unique, inverse.reshape(-1)


def non_dominated_mask(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Mark the Pareto-optimal rows.

    Duplicated rows do not dominate each other, so all copies of a front point are on the
    front. Rows with NaN in any objective are never on the front and dominate nothing.

    Args:
        values: Array-like of shape ``(n, k)``.
        directions: ``k`` directions, each ``"min"`` or ``"max"``.

    Returns:
        Bool array of shape ``(n,)``, True for the rows that no other row dominates.
    """
    loss = to_minimization(values, directions)
    valid, unique, inverse = _valid_unique(loss)
    mask = np.zeros(len(loss), dtype=bool)
    mask[valid] = _front_of_unique_lexsorted(unique)[inverse]
    return mask


def non_dominated_rank(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Non-domination rank of every row (the fronts of non-dominated sorting).

    Rank 0 is the Pareto front, rank 1 the front of what remains once it is removed, and so
    on. Rows with NaN in any objective all get the rank after the last front of the other rows
    (rank 0 if every row holds NaN, the only case where ``rank == 0`` differs from
    :func:`non_dominated_mask`).

    Args:
        values: Array-like of shape ``(n, k)``.
        directions: ``k`` directions, each ``"min"`` or ``"max"``.

    Returns:
        Int array of shape ``(n,)``.
    """
    loss = to_minimization(values, directions)
    valid, unique, inverse = _valid_unique(loss)
    unique_ranks = np.zeros(len(unique), dtype=int)
    remaining = np.arange(len(unique))
    rank = 0
    while remaining.size:
        # A subset of unique lexsorted rows is still unique and lexsorted.
        on_front = _front_of_unique_lexsorted(unique[remaining])
        unique_ranks[remaining[on_front]] = rank
        remaining = remaining[~on_front]
        rank += 1
    ranks = np.full(len(loss), rank, dtype=int)
    ranks[valid] = unique_ranks[inverse]
    return ranks


def _hypervolume_2d(points: np.ndarray, reference: np.ndarray) -> float:
    """Area dominated by ``points`` (lower is better, all strictly below ``reference``).

    Sweeps the points by the first objective; the running minimum of the second objective
    is the height of the dominated region over each strip, so dominated points are harmless.
    """
    order = np.argsort(points[:, 0], kind="stable")
    x = points[order, 0]
    height = reference[1] - np.minimum.accumulate(points[order, 1])
    widths = np.diff(np.append(x, reference[0]))
    return float(np.sum(widths * height))


def _hypervolume_3d(points: np.ndarray, reference: np.ndarray) -> float:
    """Volume dominated by ``points`` (lower is better, all strictly below ``reference``).

    Slices along the third objective: between consecutive distinct third coordinates, the
    cross-section is the 2-D area dominated by the points seen so far.
    """
    order = np.argsort(points[:, 2], kind="stable")
    points = points[order]
    depths = np.diff(np.append(points[:, 2], reference[2]))
    volume = 0.0
    for i in np.flatnonzero(depths > 0):
        volume += _hypervolume_2d(points[: i + 1, :2], reference[:2]) * depths[i]
    return float(volume)


def hypervolume(
    values: np.ndarray, directions: Sequence[str], reference: Sequence[float] | np.ndarray
) -> float:
    """Hypervolume dominated by the rows of ``values``, bounded by ``reference``.

    This is the Lebesgue measure of the union of the boxes spanned by each point and the
    reference point; only the Pareto front matters, so dominated rows add nothing. Points that
    do not strictly beat the reference in every objective, and rows holding NaN, contribute
    nothing. Exact for 1, 2 (sort sweep) or 3 objectives (slicing into 2-D sweeps,
    ``O(n^2 log n)``).

    Args:
        values: Array-like of shape ``(n, k)`` with ``k`` in ``{1, 2, 3}``.
        directions: ``k`` directions, each ``"min"`` or ``"max"``.
        reference: ``k`` finite reference values, in the original units and directions
            (e.g. from :func:`reference_point`).

    Returns:
        The hypervolume (0.0 if no point beats the reference; ``inf`` if a point is infinitely
        good in some objective).

    Raises:
        ValueError: If ``k`` is not 1, 2 or 3, or ``reference`` is not ``k`` finite numbers.
    """
    loss = to_minimization(values, directions)
    k = loss.shape[1]
    if k not in (1, 2, 3):
        raise ValueError(f"hypervolume supports 1, 2 or 3 objectives, got {k}")
    ref = np.asarray(reference, dtype=float)
    if ref.shape != (k,) or not np.all(np.isfinite(ref)):
        raise ValueError(f"reference must be {k} finite numbers, got {reference!r}")
    ref = to_minimization(ref[None, :], directions)[0]

    points = loss[np.all(loss < ref, axis=1)]  # NaN compares False, so NaN rows drop out.
    if len(points) == 0:
        return 0.0
    if np.isneginf(points).any():
        return float("inf")
    points = points[non_dominated_mask(points, ["min"] * k)]
    if k == 1:
        return float(ref[0] - points.min())
    if k == 2:
        return _hypervolume_2d(points, ref)
    return _hypervolume_3d(points, ref)


def reference_point(
    baseline: Sequence[float], directions: Sequence[str], margin: float = 0.1
) -> np.ndarray:
    """Reference point for :func:`hypervolume`, derived from the uncompressed model's metrics.

    * Objectives to maximise (e.g. accuracy) get reference ``0.0``, the worst possible score.
    * Objectives to minimise (e.g. size, latency) get ``baseline * (1 + margin)`` (computed as
      ``baseline + margin * |baseline|``, which is the same for the usual non-negative
      baselines), so a model slightly worse than the uncompressed baseline contributes nothing.

    Args:
        baseline: The baseline model's value for each objective.
        directions: One direction per objective, each ``"min"`` or ``"max"``.
        margin: Non-negative relative slack added to the minimised objectives.

    Returns:
        Float array of shape ``(k,)``, in the original units and directions.

    Raises:
        ValueError: On a bad direction, a length mismatch, a non-finite baseline or a negative
            margin.
    """
    maximize = _check_directions(directions)
    base = np.asarray(baseline, dtype=float)
    if base.shape != maximize.shape:
        raise ValueError(
            f"baseline has {base.size} values but {len(maximize)} directions were given"
        )
    if not np.all(np.isfinite(base)):
        raise ValueError(f"baseline must be finite, got {list(baseline)}")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin!r}")
    return np.where(maximize, 0.0, base + margin * np.abs(base))


def pareto_front(df: pandas.DataFrame, objectives: Sequence[tuple[str, str]]) -> pandas.DataFrame:
    """Rows of a results table that lie on the Pareto front.

    Args:
        df: One row per trial, with a column per objective metric (e.g. Ray Tune's
            ``ResultGrid.get_dataframe()`` or Optuna's ``study.trials_dataframe()``).
        objectives: ``(metric, mode)`` pairs, ``mode`` being ``"min"`` or ``"max"``.

    Returns:
        The front rows of ``df`` (index and all columns kept), sorted best-first by the first
        objective, ties broken by the following objectives. Rows with NaN metrics are dropped.

    Raises:
        KeyError: If a metric is not a column of ``df``.
        ValueError: On an empty ``objectives`` or a bad mode.
    """
    if len(objectives) == 0:
        raise ValueError("at least one (metric, mode) objective is required")
    metrics = [metric for metric, _ in objectives]
    modes = [mode for _, mode in objectives]
    loss = to_minimization(df[metrics].to_numpy(dtype=float), modes)
    positions = np.flatnonzero(non_dominated_mask(loss, ["min"] * len(metrics)))
    front = loss[positions]
    order = np.lexsort(front.T[::-1])  # np.lexsort's primary key is the last one given.
    return df.iloc[positions[order]]
