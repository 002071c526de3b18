"""The learned combination (recsys/combination.py): it uses both of its signals, keeps its monotonicity,
falls back to the first column when the outcomes are few, is reproducible, and refuses a tampered stored
model."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.calibration import fit_isotonic
from recsys.combination import MAX_MODEL_CHARS, MIN_OUTCOMES, Combination, fit_combination
from recsys.evaluation.campaigns import auc

FEATURES = ("raw", "frequency", "noise")
INCREASING = (True, True, False)


def _examples(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two kinds of shoppers: buyers of the products, whose outcome follows their frequency, and the new
    to them (frequency 0), whose outcome follows the raw score; the noise column carries nothing."""
    rng = np.random.default_rng(seed)
    raw = rng.gamma(2.0, 0.2, n)
    buyer = rng.random(n) < 0.5
    frequency = np.where(buyer, rng.gamma(2.0, 1.0, n), 0.0)
    logit = np.where(buyer, 1.2 * frequency - 2.0, 3.0 * raw - 2.5)
    outcome = rng.random(n) < 1 / (1 + np.exp(-logit))
    return np.column_stack([raw, frequency, rng.random(n)]), outcome


def _fit(x: np.ndarray, y: np.ndarray) -> Combination:
    return fit_combination(x, y, FEATURES, INCREASING, np.arange(len(x)) % 2 == 0)


def test_the_combination_ranks_better_than_either_signal_and_is_calibrated() -> None:
    x, y = _examples(4000, seed=0)
    combination = _fit(x, y)
    assert combination.model is not None
    test_x, test_y = _examples(4000, seed=1)  # other shoppers, the same world
    p = combination(test_x)
    assert auc(p, test_y) > max(auc(test_x[:, 0], test_y), auc(test_x[:, 1], test_y)) + 0.03
    assert abs(p.mean() - test_y.mean()) < 0.03  # calibrated on cross-fitted output: no in-sample optimism
    knots = combination.calibration
    assert np.all(np.diff(knots.probability) >= 0) and knots.examples == len(x)


def test_the_probability_never_falls_as_an_increasing_column_rises() -> None:
    x, y = _examples(3000, seed=2)
    combination = _fit(x, y)
    grid = np.linspace(0, 3, 60)
    for column in (0, 1):
        rows = np.tile(x[:50], (len(grid), 1))
        rows[:, column] = np.repeat(grid, 50)
        p = combination(rows).reshape(len(grid), 50)
        assert np.all(np.diff(p, axis=0) >= -1e-12)


def test_few_outcomes_fall_back_to_the_first_column_calibrated() -> None:
    x, y = _examples(400, seed=3)
    y = np.zeros(len(y), bool)
    y[: MIN_OUTCOMES - 1] = True
    combination = _fit(x, y)
    assert combination.model is None
    np.testing.assert_array_equal(combination(x), fit_isotonic(x[:, 0], y)(x[:, 0]))


def test_rows_without_a_first_column_are_not_examples_and_get_no_probability() -> None:
    x, y = _examples(2000, seed=4)
    with_missing = x.copy()
    with_missing[:100, 0] = np.nan
    combination = _fit(with_missing, y)
    assert combination.calibration.examples == 1900
    p = combination(with_missing)
    assert np.isnan(p[:100]).all() and not np.isnan(p[100:]).any()


def test_a_stored_combination_gives_the_same_probabilities_and_the_fit_is_reproducible() -> None:
    x, y = _examples(2000, seed=5)
    combination = _fit(x, y)
    again = Combination.from_dict(combination.to_dict())
    np.testing.assert_array_equal(again(x), combination(x))
    assert _fit(x, y).to_dict() == combination.to_dict()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "pickle"}, "method 'combination'"),
        ({"features": []}, "1 to 64 names"),
        ({"features": ["raw", "frequency", "other"]}, "reads features"),
        ({"model": 3}, "LightGBM text or null"),
        ({"model": "import os\n"}, "not a LightGBM text model"),
        ({"model": "x" * (MAX_MODEL_CHARS + 1)}, "at most"),
        ({"calibration": {"method": "isotonic", "raw": [0.2, 0.1], "probability": [0.1, 0.2]}}, "ascend"),
    ],
)
def test_a_stored_combination_is_checked(change: dict, message: str) -> None:
    x, y = _examples(2000, seed=6)
    stored = _fit(x, y).to_dict()
    with pytest.raises(ValueError, match=message):
        Combination.from_dict(stored | change)


def test_a_model_of_another_objective_is_refused() -> None:
    x, y = _examples(2000, seed=7)
    stored = _fit(x, y).to_dict()
    stored["model"] = stored["model"].replace("objective=binary", "objective=regression", 1)
    with pytest.raises(ValueError, match="must output probabilities"):
        Combination.from_dict(stored)
