"""Campaign propensity (recsys/propensity.py), its pair features (recsys/rank_features.pair_features) and
the calibration (recsys/calibration.py), against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.calibration import MAX_KNOTS, Calibration, expected_calibration_error, fit_isotonic
from recsys.propensity import campaign_pairs, expected_baskets, next_basket
from recsys.rank_features import features, pair_features
from tests.histories import histories_of
from tests.rankers import random_ranker


def test_isotonic_calibration_pools_violators_and_shrinks_each_block() -> None:
    raw = np.array([0.1, 0.2, 0.2, 0.3, 0.4, 0.5])
    outcome = np.array([0, 1, 0, 0, 1, 1], dtype=bool)
    fitted = fit_isotonic(raw, outcome)
    # 0.2 pools to 1/2, which violates 0.3's 0: the two pool to 1 hit in 3; 0.1 is 0 in 1, 0.4-0.5 2 in 2;
    # each block's rate is then (hits + 1/2) / (n + 1)
    np.testing.assert_allclose(fitted(raw), [0.5 / 2, 1.5 / 4, 1.5 / 4, 1.5 / 4, 2.5 / 3, 2.5 / 3])
    assert np.all(np.diff(fitted(np.linspace(-1, 2, 200))) >= 0)  # monotone everywhere, flat outside
    assert fitted(np.array([np.nan]))[0] != fitted(np.array([np.nan]))[0]  # NaN stays NaN
    again = Calibration.from_dict(fitted.to_dict())
    np.testing.assert_array_equal(again.raw, fitted.raw)
    assert (again.examples, again.positives) == (6, 3)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "platt"}, "method 'isotonic'"),
        ({"raw": [0.2, 0.1], "probability": [0.1, 0.2]}, "must ascend"),
        ({"raw": [0.1, 0.2], "probability": [0.3, 0.2]}, "must ascend"),
        ({"raw": [0.1, 0.2], "probability": [0.3, 1.2]}, r"\[0, 1\]"),
        ({"raw": ["0.1", 0.2]}, "numbers only"),
        ({"raw": [0.0] * (MAX_KNOTS + 1)}, "at most"),
        ({"examples": -1}, "integers >= 0"),
    ],
)
def test_a_stored_calibration_is_checked(change: dict, message: str) -> None:
    stored = {
        "method": "isotonic",
        "raw": [0.1, 0.2],
        "probability": [0.1, 0.3],
        "examples": 4,
        "positives": 1,
    }
    with pytest.raises(ValueError, match=message):
        Calibration.from_dict(stored | change)


def test_expected_calibration_error_of_a_perfect_and_a_shifted_forecast() -> None:
    outcome = np.array([0, 0, 0, 1] * 25, dtype=bool)
    assert expected_calibration_error(np.full(100, 0.25), outcome, bins=1) == pytest.approx(0.0)
    assert expected_calibration_error(np.full(100, 0.45), outcome, bins=1) == pytest.approx(0.2)


def _world(seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    rows = [rng.integers(0, 30, rng.integers(2, 12)) for _ in range(12)]
    days = [np.sort(rng.integers(0, 90, len(r))).astype(np.float64) + 19000 for r in rows]
    histories = histories_of(rows, days)
    searched = np.stack([rng.permutation(30)[:20] for _ in rows])
    scores = rng.standard_normal(searched.shape).astype(np.float32)
    return histories, searched, scores


def test_pair_features_equal_the_candidate_features_of_the_same_pairs() -> None:
    ranker = random_ranker(30, new_candidates=5)
    histories, searched, scores = _world()
    found = features(histories, searched, scores, ranker.stats, 5)
    x = pair_features(histories, found.owner, found.rows, searched, scores, ranker.stats, 5)
    np.testing.assert_array_equal(x, found.x)


def test_next_basket_combines_the_pairs_as_independent_products_into_a_rate() -> None:
    ranker = random_ranker(30, new_candidates=5)
    histories, searched, scores = _world(1)
    campaign = np.array([2, 7, 11, 19])
    owner, rows = campaign_pairs(histories, searched, campaign, ranker.stats.popularity, popular=2)
    bought_owner, bought_rows = histories.distinct()
    top = campaign[np.lexsort((campaign, -ranker.stats.popularity[campaign]))][:2]
    for s in range(histories.num_shoppers):  # bought, searched, or among the 2 most popular
        expected = set(bought_rows[bought_owner == s]) | set(searched[s]) | set(top)
        assert set(rows[owner == s]) == expected & set(campaign)
    p = ranker.probability(pair_features(histories, owner, rows, searched, scores, ranker.stats, 5))
    hand = [-np.log(np.prod(1 - p[owner == s])) for s in range(histories.num_shoppers)]
    np.testing.assert_allclose(next_basket(ranker, histories, searched, scores, campaign, popular=2), hand)


def test_the_horizon_counts_the_shoppers_own_rate_up_to_the_scoring_date() -> None:
    # baskets on days 0, 10, 20 (two products on day 20), scored on day 30: 3 baskets over 30 days
    histories = histories_of(
        [np.array([1, 2, 3, 4]), np.array([5])], [np.array([0.0, 10, 20, 20]), np.array([29.0])]
    )
    n = expected_baskets(histories, 30.0, 14.0)
    np.testing.assert_allclose(n, [14 * 3 / 30, 14 * 1 / 14])  # the second: a span of at least one horizon
    with pytest.raises(ValueError, match="reaches the scoring date"):
        expected_baskets(histories, 20.0, 14.0)


def test_shoppers_without_a_known_product_get_no_score() -> None:
    ranker = random_ranker(30, new_candidates=5)
    empty = histories_of([np.array([], np.int64)] * 2, [np.array([])] * 2)
    searched = np.full((2, 0), -1, dtype=np.int64)
    h = next_basket(ranker, empty, searched, searched.astype(np.float32), np.array([1, 2]))
    assert np.isnan(h).all()
