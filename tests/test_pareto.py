"""Tests for autocompress.pareto: hand-computed cases, and properties checked by brute force."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from autocompress.tracking._pareto import (
    hypervolume,
    non_dominated_mask,
    non_dominated_rank,
    pareto_front,
    reference_point,
    to_minimization,
)

NAN = math.nan
FAST = settings(max_examples=60, deadline=None)


# --- brute-force references -------------------------------------------------------------------


def _loss(values: np.ndarray, directions: list[str]) -> np.ndarray:
    sign = np.where(np.array(directions) == "max", -1.0, 1.0)
    return np.asarray(values, dtype=float) * sign


def _dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """Definition, on minimised rows: a NaN row dominates nothing; NaN counts as +inf in b."""
    if np.isnan(a).any():
        return False
    b = np.where(np.isnan(b), np.inf, b)
    return bool(np.all(a <= b) and np.any(a < b))


def _grid_hypervolume(loss: np.ndarray, ref: np.ndarray) -> int:
    """Count the unit cells [c, c + 1) below ``ref`` whose lower corner some point dominates."""
    points = loss[~np.isnan(loss).any(axis=1)]
    if len(points) == 0:
        return 0
    low = np.minimum(points.min(axis=0), ref).astype(int)
    axes = [np.arange(lo, hi) for lo, hi in zip(low, ref.astype(int))]
    cells = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(ref))
    covered = (cells[:, None, :] >= points[None, :, :]).all(axis=-1).any(axis=-1)
    return int(covered.sum())


# --- strategies -------------------------------------------------------------------------------


@st.composite
def problems(draw, max_k: int = 4, max_rows: int = 25, nan: bool = True):
    """Small integer-valued objective tables (many ties and duplicates) with directions."""
    k = draw(st.integers(1, max_k))
    n = draw(st.integers(0, max_rows))
    elements = st.integers(-3, 3).map(float)
    if nan:
        elements = st.one_of(elements, st.just(NAN))
    values = draw(hnp.arrays(np.float64, (n, k), elements=elements))
    directions = draw(st.lists(st.sampled_from(["min", "max"]), min_size=k, max_size=k))
    return values, directions


# --- to_minimization --------------------------------------------------------------------------


def test_to_minimization_negates_max_columns():
    values = np.array([[0.9, 10.0, NAN], [0.8, 5.0, 1.0]])
    out = to_minimization(values, ["max", "min", "max"])
    np.testing.assert_array_equal(out, [[-0.9, 10.0, NAN], [-0.8, 5.0, -1.0]])
    assert out.dtype == float
    np.testing.assert_array_equal(values[0, :2], [0.9, 10.0])  # input untouched


def test_to_minimization_empty():
    assert to_minimization([], ["min", "max"]).shape == (0, 2)
    assert to_minimization(np.empty((0, 3)), ["min"] * 3).shape == (0, 3)


@pytest.mark.parametrize(
    ("values", "directions", "match"),
    [
        ([[1.0, 2.0]], ["min", "maximize"], "maximize"),
        ([[1.0, 2.0]], ["min", "MAX"], "MAX"),
        ([[1.0, 2.0]], ["min"], "2 objective columns but 1 directions"),
        ([[1.0, 2.0]], ["min", "min", "max"], "3 directions"),
        ([[1.0, 2.0]], [], "at least one"),
        ([[1.0]], "min", "sequence"),
        ([1.0, 2.0], ["min", "min"], "2-D"),
    ],
)
def test_to_minimization_rejects(values, directions, match):
    with pytest.raises(ValueError, match=match):
        to_minimization(values, directions)


# --- non_dominated_mask / non_dominated_rank: hand-computed -----------------------------------


def test_mask_two_objectives_mixed_directions():
    # accuracy (max), latency (min)
    values = [[0.9, 10.0], [0.95, 20.0], [0.85, 12.0], [0.95, 25.0], [0.9, 10.0]]
    mask = non_dominated_mask(values, ["max", "min"])
    np.testing.assert_array_equal(mask, [True, True, False, False, True])
    assert mask.dtype == bool


def test_mask_three_objectives_with_duplicates_and_nan():
    values = [
        [1, 2, 5],  # front
        [2, 1, 5],  # front
        [1, 2, 4],  # dominated by row 0 (third objective is maximised)
        [3, 3, 9],  # front: best third objective
        [1, 2, 5],  # duplicate of row 0: also on the front
        [NAN, 0, 9],  # NaN: never on the front, and dominates neither row 3 nor row 6
        [0, 0, 3],  # front: best first two objectives
    ]
    mask = non_dominated_mask(values, ["min", "min", "max"])
    np.testing.assert_array_equal(mask, [True, True, False, True, True, False, True])


def test_mask_weak_domination_needs_one_strict_improvement():
    values = [[1.0, 2.0], [1.0, 3.0], [0.0, 3.0]]
    np.testing.assert_array_equal(non_dominated_mask(values, ["min", "min"]), [True, False, True])


def test_mask_single_objective_keeps_all_ties_of_the_best():
    values = [[3.0], [1.0], [2.0], [1.0], [NAN]]
    np.testing.assert_array_equal(
        non_dominated_mask(values, ["min"]), [False, True, False, True, False]
    )
    np.testing.assert_array_equal(
        non_dominated_mask(values, ["max"]), [True, False, False, False, False]
    )


def test_mask_negative_zero_equals_zero():
    values = [[0.0, 1.0], [-0.0, 1.0]]
    np.testing.assert_array_equal(non_dominated_mask(values, ["max", "min"]), [True, True])


def test_mask_and_rank_empty_and_all_nan():
    assert non_dominated_mask(np.empty((0, 2)), ["min", "max"]).shape == (0,)
    assert non_dominated_rank(np.empty((0, 2)), ["min", "max"]).shape == (0,)
    assert non_dominated_mask([], ["min"]).dtype == bool
    np.testing.assert_array_equal(non_dominated_mask([[NAN, 1.0]], ["min", "min"]), [False])
    np.testing.assert_array_equal(non_dominated_rank([[NAN, 1.0]], ["min", "min"]), [0])


def test_rank_hand_computed():
    values = [[1, 1], [2, 2], [3, 3], [1, 1], [NAN, 0], [1, 3]]
    ranks = non_dominated_rank(values, ["min", "min"])
    np.testing.assert_array_equal(ranks, [0, 1, 2, 0, 3, 1])
    assert np.issubdtype(ranks.dtype, np.integer)
    # Same fronts when both objectives are maximised and the values negated.
    flipped = -np.asarray(values, dtype=float)
    np.testing.assert_array_equal(non_dominated_rank(flipped, ["max", "max"]), ranks)


# --- non_dominated_mask / non_dominated_rank: properties --------------------------------------


@FAST
@given(problems())
def test_front_matches_definition(problem):
    values, directions = problem
    loss = _loss(values, directions)
    mask = non_dominated_mask(values, directions)
    valid = ~np.isnan(loss).any(axis=1)
    assert not mask[~valid].any()
    for i in np.flatnonzero(mask):  # no front member is dominated by any row
        assert not any(_dominates(loss[j], loss[i]) for j in range(len(loss)))
    for i in np.flatnonzero(valid & ~mask):  # every other valid row is dominated by the front
        assert any(_dominates(loss[j], loss[i]) for j in np.flatnonzero(mask))


@FAST
@given(problems(), st.randoms(use_true_random=False))
def test_mask_and_rank_invariant_to_row_permutation(problem, rng):
    values, directions = problem
    perm = np.arange(len(values))
    rng.shuffle(perm)
    np.testing.assert_array_equal(
        non_dominated_mask(values[perm], directions), non_dominated_mask(values, directions)[perm]
    )
    np.testing.assert_array_equal(
        non_dominated_rank(values[perm], directions), non_dominated_rank(values, directions)[perm]
    )


@FAST
@given(problems())
def test_rank_zero_is_the_front_and_ranks_are_fronts(problem):
    values, directions = problem
    loss = _loss(values, directions)
    valid = ~np.isnan(loss).any(axis=1)
    mask = non_dominated_mask(values, directions)
    ranks = non_dominated_rank(values, directions)
    if valid.any():
        np.testing.assert_array_equal(ranks == 0, mask)
        assert np.all(ranks[~valid] == ranks[valid].max() + 1)
    for r in range(1, ranks[valid].max() + 1 if valid.any() else 0):
        # Rank r is the front of the rows left once ranks 0..r-1 are removed.
        left = np.flatnonzero(valid & (ranks >= r))
        np.testing.assert_array_equal(
            non_dominated_mask(values[left], directions), ranks[left] == r
        )


@FAST
@given(problems(), st.data())
def test_removing_a_dominated_row_keeps_the_front(problem, data):
    values, directions = problem
    mask = non_dominated_mask(values, directions)
    off_front = np.flatnonzero(~mask)
    if off_front.size == 0:
        return
    drop = data.draw(st.sampled_from(off_front.tolist()))
    keep = np.arange(len(values)) != drop
    np.testing.assert_array_equal(non_dominated_mask(values[keep], directions), mask[keep])


# --- hypervolume ------------------------------------------------------------------------------


def test_hypervolume_2d_hand_computed():
    staircase = [[1, 3], [2, 2], [3, 1]]
    assert hypervolume(staircase, ["min", "min"], [4, 4]) == 6.0
    # A dominated point, a duplicate, a NaN row and points not strictly better than the
    # reference in every objective add nothing.
    extra = staircase + [[3, 3], [2, 2], [NAN, 0], [4, 0], [0, 4], [5, 5]]
    assert hypervolume(extra, ["min", "min"], [4, 4]) == 6.0
    # Mixed directions: accuracy (max) with reference 0, size (min) with reference 20.
    values = [[0.75, 10.0], [0.5, 5.0], [0.25, 8.0]]
    assert hypervolume(values, ["max", "min"], [0.0, 20.0]) == pytest.approx(10.0)


def test_hypervolume_3d_hand_computed():
    directions = ["min", "min", "min"]
    assert hypervolume([[1, 1, 1]], directions, [2, 2, 2]) == 1.0
    # Boxes of volume 4 and 2 overlapping in the unit cube [1, 2]^3.
    assert hypervolume([[0, 0, 1], [1, 1, 0]], directions, [2, 2, 2]) == 5.0
    # Three slabs of volume 4, pairwise overlaps of 2, common overlap 1: 12 - 6 + 1.
    assert hypervolume([[1, 0, 0], [0, 1, 0], [0, 0, 1]], directions, [2, 2, 2]) == 7.0
    # Same in maximisation form.
    maxed = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]
    assert hypervolume(maxed, ["max", "max", "max"], [-2, -2, -2]) == 7.0


def test_hypervolume_1d_and_edge_cases():
    assert hypervolume([[3.0], [1.0], [NAN]], ["min"], [5.0]) == 4.0
    assert hypervolume([[0.5], [0.75]], ["max"], [0.0]) == 0.75
    assert hypervolume(np.empty((0, 2)), ["min", "max"], [1.0, 0.0]) == 0.0
    assert hypervolume([[5.0, 5.0]], ["min", "min"], [4.0, 4.0]) == 0.0
    assert hypervolume([[-np.inf, 1.0]], ["min", "min"], [4.0, 4.0]) == math.inf


@pytest.mark.parametrize(
    ("values", "directions", "reference", "match"),
    [
        ([[1, 1, 1, 1]], ["min"] * 4, [2, 2, 2, 2], "1, 2 or 3 objectives"),
        ([[1, 1]], ["min", "min"], [2], "2 finite numbers"),
        ([[1, 1]], ["min", "min"], [2, np.inf], "finite"),
        ([[1, 1]], ["min", "min"], [2, NAN], "finite"),
        ([[1, 1]], ["min", "up"], [2, 2], "'up'"),
    ],
)
def test_hypervolume_rejects(values, directions, reference, match):
    with pytest.raises(ValueError, match=match):
        hypervolume(values, directions, reference)


@st.composite
def hypervolume_problems(draw):
    values, directions = draw(problems(max_k=3, max_rows=12))
    reference = draw(hnp.arrays(np.float64, len(directions), elements=st.integers(-2, 4)))
    return values, directions, reference


@FAST
@given(hypervolume_problems())
def test_hypervolume_equals_grid_count(problem):
    values, directions, reference = problem
    expected = _grid_hypervolume(_loss(values, directions), _loss(reference, directions))
    assert hypervolume(values, directions, reference) == expected


@FAST
@given(hypervolume_problems(), st.data())
def test_hypervolume_is_monotone(problem, data):
    values, directions, reference = problem
    k = len(directions)
    point = data.draw(hnp.arrays(np.float64, (1, k), elements=st.integers(-3, 3).map(float)))
    before = hypervolume(values, directions, reference)
    after = hypervolume(np.vstack([values, point]), directions, reference)
    assert after >= before


@FAST
@given(hypervolume_problems(), st.randoms(use_true_random=False))
def test_hypervolume_invariant_to_row_permutation_and_dominated_rows(problem, rng):
    values, directions, reference = problem
    perm = np.arange(len(values))
    rng.shuffle(perm)
    expected = hypervolume(values, directions, reference)
    assert hypervolume(values[perm], directions, reference) == expected
    front = values[non_dominated_mask(values, directions)]
    assert hypervolume(front, directions, reference) == expected


def test_hypervolume_3d_large_front_equals_grid_count():
    # All 496 integer points of the plane x + y + z = 30 (every one on the front).
    xy = np.array([(x, y) for x in range(31) for y in range(31 - x)])
    points = np.column_stack([xy, 30 - xy.sum(axis=1)]).astype(float)
    reference = np.full(3, 31.0)
    volume = hypervolume(points, ["min"] * 3, reference)
    assert volume == _grid_hypervolume(points, reference)
    assert hypervolume(-points, ["max"] * 3, -reference) == volume


def test_hypervolume_3d_thousands_of_front_points():
    rng = np.random.default_rng(0)
    xy = rng.integers(0, 1000, size=(4000, 2))
    xy = xy[xy.sum(axis=1) <= 1000]
    points = np.column_stack([xy, 1000 - xy.sum(axis=1)]).astype(float)
    assert non_dominated_mask(points, ["min"] * 3).sum() > 1000
    reference = np.full(3, 1001.0)
    volume = hypervolume(points, ["min"] * 3, reference)
    # Halving every coordinate (exact in binary) divides the volume by 8.
    assert hypervolume(points / 2, ["min"] * 3, reference / 2) == volume / 8
    # At least the largest single box, at most the box spanned by the ideal point.
    assert np.prod(reference - points, axis=1).max() <= volume
    assert volume <= np.prod(reference - points.min(axis=0))


# --- reference_point --------------------------------------------------------------------------


def test_reference_point():
    ref = reference_point([0.95, 20.0, 3.0], ["max", "min", "min"])
    np.testing.assert_allclose(ref, [0.0, 22.0, 3.3])
    np.testing.assert_allclose(reference_point([0.9, 8.0], ["max", "min"], margin=0.0), [0, 8])
    # Negative baselines still move the reference to the worse side.
    np.testing.assert_allclose(reference_point([-10.0], ["min"], margin=0.5), [-5.0])


def test_reference_point_makes_worse_than_baseline_models_count_for_nothing():
    directions = ["max", "min"]  # accuracy, size in MB
    ref = reference_point([0.9, 100.0], directions)  # (0.0, 110.0)
    assert hypervolume([[0.8, 111.0]], directions, ref) == 0.0
    assert hypervolume([[0.5, 10.0]], directions, ref) == pytest.approx(0.5 * 100.0)


@pytest.mark.parametrize(
    ("baseline", "directions", "margin", "match"),
    [
        ([1.0, 2.0], ["min"], 0.1, "2 values but 1 directions"),
        ([1.0], ["least"], 0.1, "'least'"),
        ([NAN], ["min"], 0.1, "finite"),
        ([1.0], ["min"], -0.1, "margin"),
        ([1.0], ["min"], NAN, "margin"),
    ],
)
def test_reference_point_rejects(baseline, directions, margin, match):
    with pytest.raises(ValueError, match=match):
        reference_point(baseline, directions, margin)


# --- pareto_front -----------------------------------------------------------------------------


def test_pareto_front_dataframe():
    df = pd.DataFrame(
        {
            "trial": ["a", "b", "c", "d", "e", "f"],
            "accuracy": [0.90, 0.95, 0.85, 0.95, 0.70, NAN],
            "size_mb": [10.0, 20.0, 12.0, 25.0, 2.0, 1.0],
        },
        index=[10, 11, 12, 13, 14, 15],
    )
    front = pareto_front(df, [("accuracy", "max"), ("size_mb", "min")])
    assert list(front["trial"]) == ["b", "a", "e"]  # best accuracy first
    assert list(front.index) == [11, 10, 14]
    assert list(front.columns) == list(df.columns)
    by_size = pareto_front(df, [("size_mb", "min"), ("accuracy", "max")])
    assert list(by_size["trial"]) == ["e", "a", "b"]


def test_pareto_front_tie_break_and_empty():
    df = pd.DataFrame({"acc": [0.9, 0.9, 0.8], "lat": [5.0, 3.0, 1.0], "size": [1, 2, 1]})
    front = pareto_front(df, [("acc", "max"), ("lat", "min"), ("size", "min")])
    assert list(front.index) == [1, 0, 2]  # the acc tie is broken by the next objective (lat)
    assert pareto_front(df.iloc[:0], [("acc", "max")]).empty
    with pytest.raises(KeyError):
        pareto_front(df, [("missing", "min")])
    with pytest.raises(ValueError, match="at least one"):
        pareto_front(df, [])
    with pytest.raises(ValueError, match="'best'"):
        pareto_front(df, [("acc", "best")])
