"""The shared scorer: exclusion, score floor, explore slots, ties, padding, candidate counts."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.rules import Rules
from recsys.scoring import recommend, search_size, select
from tests.histories import histories_of

NONE: np.ndarray = np.empty(0, dtype=np.int64)


def _select(rows: list[list[int]], scores: list[list[float]], k: int, **kwargs: object) -> tuple[list, list]:
    out_rows, out_scores = select(np.array(rows), np.array(scores, dtype=np.float32), k, **kwargs)
    assert out_rows.dtype == np.int64 and out_scores.dtype == np.float32
    assert out_rows.shape == out_scores.shape == (len(rows), k)
    return out_rows.tolist(), [[None if np.isnan(s) else round(float(s), 4) for s in r] for r in out_scores]


def test_keeps_score_order_and_cuts_to_k() -> None:
    rows, scores = _select([[4, 2, 9, 7]], [[0.9, 0.8, 0.5, 0.1]], 3)
    assert rows == [[4, 2, 9]] and scores == [[0.9, 0.8, 0.5]]


def test_reorders_unsorted_candidates() -> None:
    rows, _ = _select([[4, 2, 9]], [[0.1, 0.8, 0.5]], 3)
    assert rows == [[2, 9, 4]]


def test_ties_rank_the_smaller_row_first() -> None:
    rows, scores = _select([[9, 3, 5, 1]], [[0.5, 0.5, 0.7, 0.5]], 4)
    assert rows == [[5, 1, 3, 9]] and scores == [[0.7, 0.5, 0.5, 0.5]]


def test_pads_with_minus_one_and_nan() -> None:
    # -1 rows (FAISS found fewer) and NaN scores are no candidates; k above C pads too.
    rows, scores = _select([[3, -1, 8], [-1, -1, -1]], [[0.3, 9.0, np.nan], [1.0, 1.0, 1.0]], 4)
    assert rows == [[3, -1, -1, -1], [-1, -1, -1, -1]]
    assert scores == [[0.3, None, None, None], [None] * 4]


def test_exclusion_is_per_shopper_and_refills_from_further_down() -> None:
    rows, _ = _select(
        [[1, 2, 3, 4], [1, 2, 3, 4]], [[0.9, 0.8, 0.7, 0.6]] * 2, 2, exclude=[np.array([1, 3]), NONE]
    )
    assert rows == [[2, 4], [1, 2]]


def test_min_score_returns_fewer_or_zero_items() -> None:
    scores = [[0.9, 0.5, 0.2], [0.1, 0.05, 0.0]]
    rows, _ = _select([[1, 2, 3], [4, 5, 6]], scores, 3, min_score=0.5)
    assert rows == [[1, 2, -1], [-1, -1, -1]]  # the floor itself is kept


def test_min_score_per_shopper_with_nan_for_none() -> None:
    rows, _ = _select([[1, 2], [3, 4]], [[0.9, 0.2], [0.9, 0.2]], 2, min_score=np.array([0.5, np.nan]))
    assert rows == [[1, -1], [3, 4]]


def test_repeated_row_keeps_its_best_score() -> None:
    rows, scores = _select([[7, 2, 7]], [[0.1, 0.5, 0.9]], 3)
    assert rows == [[7, 2, -1]] and scores == [[0.9, 0.5, None]]


def test_explore_slots_reserve_the_best_new_items() -> None:
    # Rows 1-3 were bought before; 8 and 9 are new. Two slots go to 8 and 9, the rest by score.
    candidates, scores = [[1, 2, 3, 8, 9]], [[0.9, 0.8, 0.7, 0.6, 0.5]]
    history = [np.array([1, 2, 3])]
    rows, _ = _select(candidates, scores, 3, history=history, explore_slots=2)
    assert rows == [[1, 8, 9]]
    rows, _ = _select(candidates, scores, 3, history=history, explore_slots=0)
    assert rows == [[1, 2, 3]]


def test_explore_slots_no_effect_when_top_k_already_has_new_items() -> None:
    rows, _ = _select([[8, 1, 2, 9]], [[0.9, 0.8, 0.7, 0.6]], 3, history=[np.array([1, 2])], explore_slots=1)
    assert rows == [[8, 1, 2]]


def test_explore_slots_fall_back_to_score_when_too_few_new_items() -> None:
    rows, _ = _select(
        [[1, 2, 3, 8]], [[0.9, 0.8, 0.7, 0.6]], 3, history=[np.array([1, 2, 3])], explore_slots=2
    )
    assert rows == [[1, 2, 8]]


def test_explore_slots_skip_excluded_and_below_floor() -> None:
    rows, _ = _select(
        [[1, 8, 9, 10]],
        [[0.9, 0.8, 0.7, 0.1]],
        2,
        exclude=[np.array([8])],
        min_score=0.5,
        history=[np.array([1])],
        explore_slots=1,
    )
    assert rows == [[1, 9]]


def test_order_keys_rank_while_min_score_reads_the_scores() -> None:
    # keys rank (ties to the smaller row); the floor keeps scores >= 0.3 whatever their keys; the returned
    # scores are the candidates' own, so a list ordered by keys need not have descending scores
    rows = [[1, 2, 3, 4, 5]]
    scores = [[0.9, 0.4, 0.35, 0.2, 0.5]]
    keys = np.array([[0.5, 0.8, 0.5, 0.9, np.nan]], dtype=np.float32)  # NaN key: no candidate
    out, values = _select(rows, scores, 4, order=keys, min_score=0.3)
    assert out == [[2, 1, 3, -1]] and values == [[0.4, 0.9, 0.35, None]]
    longer, _ = _select(rows, scores, 5, order=keys)
    shorter, _ = _select(rows, scores, 2, order=keys)
    assert longer == [[4, 2, 1, 3, -1]] and shorter == [longer[0][:2]]  # the same ranking at every k
    with pytest.raises(ValueError, match="order"):
        select(np.array(rows), np.array(scores, np.float32), 2, order=np.zeros((1, 4), np.float32))


def test_matches_a_plain_sort_on_random_input() -> None:
    rng = np.random.default_rng(0)
    rows = np.stack([rng.permutation(50)[:20] for _ in range(8)])
    scores = rng.integers(0, 5, size=rows.shape).astype(np.float32)  # many ties
    exclude = [rng.choice(50, size=rng.integers(0, 6), replace=False) for _ in range(8)]
    out_rows, _ = select(rows, scores, 10, exclude=exclude, min_score=1.0)
    for b in range(8):
        kept = [(-s, r) for r, s in zip(rows[b], scores[b], strict=True) if r not in exclude[b] and s >= 1.0]
        expected = [r for _, r in sorted(kept)][:10]
        assert out_rows[b].tolist() == expected + [-1] * (10 - len(expected))


def test_rejects_bad_shapes_and_arguments() -> None:
    with pytest.raises(ValueError, match="shape"):
        select(np.zeros((2, 3), np.int64), np.zeros((2, 4), np.float32), 1)
    with pytest.raises(ValueError, match="one row set per shopper"):
        select(np.zeros((2, 3), np.int64), np.zeros((2, 3), np.float32), 1, exclude=[NONE])
    with pytest.raises(ValueError, match="k"):
        select(np.zeros((2, 3), np.int64), np.zeros((2, 3), np.float32), -1)


def test_search_size() -> None:
    histories = histories_of([[1, 2], [3, 4, 5, 6, 7, 3, 3]])  # 2 and 5 distinct products
    assert search_size(histories, Rules(k=10), None, 1000) == 10
    assert search_size(histories, Rules(k=10, exclude_purchased=True), None, 1000) == 15
    # Explore slots need the best new rows past everything bought before.
    assert search_size(histories, Rules(k=10, explore_slots=3), None, 1000) == 10
    assert search_size(histories, Rules(k=2, explore_slots=3), None, 1000) == 7
    assert search_size(histories, [Rules(k=4), Rules(k=1)], None, 1000) == 4
    assert search_size(histories, Rules(k=10, exclude_purchased=True), None, 12) == 12  # the catalogue


def test_search_size_is_enough() -> None:
    rng = np.random.default_rng(1)
    num_items, k = 200, 10
    for _ in range(20):
        scores = rng.standard_normal(num_items).astype(np.float32)
        history = rng.choice(num_items, size=rng.integers(1, 40), replace=False)
        for rules in (Rules(k=k, exclude_purchased=True), Rules(k=k, explore_slots=3)):
            c = search_size(histories_of([history.tolist()]), rules, None, num_items)
            order = np.argsort(-scores)
            bought = [history] if rules.exclude_purchased else None
            args = {"exclude": bought, "history": [history], "explore_slots": rules.explore_slots}
            full = select(order[None], scores[order][None], k, **args)[0]
            truncated = select(order[None, :c], scores[order][None, :c], k, **args)[0]
            assert np.array_equal(full, truncated)


def test_recommend_gives_the_fallback_to_empty_histories_and_applies_each_shoppers_rules() -> None:
    histories = histories_of([[0, 1], [], [2]])
    rows = np.array([[1, 3, 4, 0], [-1] * 4, [2, 4, 0, 3]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6], [np.nan] * 4, [0.9, 0.8, 0.7, 0.6]], np.float32)
    popularity = np.array([5, 9, 7, 1, 0])
    fallback = np.array([1, 2, 0, 3, 4])
    every = [Rules(k=2, exclude_purchased=True), Rules(k=3), Rules(k=3, min_score=0.75)]
    ranked = recommend(histories, rows, scores, every, None, fallback, popularity)
    assert ranked.rows.tolist() == [[3, 4, -1], [1, 2, 0], [2, 4, -1]]
    assert ranked.scores[1].tolist() == [9.0, 7.0, 5.0]  # popularity
    assert ranked.fallback.tolist() == [False, True, False] and not ranked.repeat_aware.any()
