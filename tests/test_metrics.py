"""Top-k selection and ranking metrics against hand-computed values."""

from __future__ import annotations

from math import log2

import numpy as np
import pytest

from recsys.evaluation.metrics import EMPTY, paired_difference, ranking_metrics, shopper_metrics, top_k


def ids(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def test_top_k_breaks_ties_at_the_boundary_by_smaller_index() -> None:
    scores = np.array(
        [
            [0.5, 0.9, 0.5, 0.5, 0.1, 0.5],  # four 0.5s compete for the last two places
            [3.0, 1.0, 1.0, 1.0, 1.0, 2.0],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [0.1, 0.2, 0.2, 0.2, 0.2, 0.7],
        ]
    )
    assert top_k(scores, 3).tolist() == [[1, 0, 2], [0, 5, 1], [0, 1, 2], [5, 1, 2]]


def test_top_k_matches_a_full_sort_with_many_ties() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(50, 200)).astype(np.float32)  # ~50 ties per value and row
    expected = np.stack([np.lexsort((np.arange(200), -row))[:120] for row in scores])
    assert np.array_equal(top_k(scores, 120), expected)


def test_top_k_returns_minus_inf_as_empty_and_caps_k_at_the_catalogue() -> None:
    scores = np.array([[-np.inf, 2.0, -np.inf], [1.0, 1.0, np.inf]])
    ranked = top_k(scores, 10)
    assert ranked.shape == (2, 3) and ranked.dtype == np.int64
    assert ranked.tolist() == [[1, EMPTY, EMPTY], [2, 0, 1]]


def test_top_k_rejects_nan() -> None:
    with pytest.raises(ValueError, match="NaN"):
        top_k(np.array([[1.0, np.nan]]), 1)


# Three shoppers:       ranked          target
#   A                   1 2 3 4         {2, 4, 9}: hits at ranks 2 and 4
#   B                   5 6 7 8         {5}: hit at rank 1
#   C                   7 1 2 3         {8}: no hit
RANKED = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [7, 1, 2, 3]])
TARGETS = [ids(2, 4, 9), ids(5), ids(8)]


def test_recall_ndcg_hr_mrr_on_a_hand_example() -> None:
    metrics = ranking_metrics(RANKED, TARGETS, ks=(2, 4))
    # @2: A has 1 of 3 (IDCG over 2 places), B has 1 of 1, C nothing
    assert metrics["recall@2"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert metrics["ndcg@2"] == pytest.approx((1 / log2(3)) / (1 + 1 / log2(3)) / 3 + 1 / 3)
    assert metrics["ndcg@2"] == pytest.approx(0.4622842690781805)
    assert metrics["hr@2"] == pytest.approx(2 / 3)
    assert metrics["mrr@2"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    # @4: A has 2 of 3 (IDCG over 3 places)
    assert metrics["recall@4"] == pytest.approx((2 / 3 + 1) / 3)
    ndcg_a = (1 / log2(3) + 1 / log2(5)) / (1 + 1 / log2(3) + 1 / 2)
    assert metrics["ndcg@4"] == pytest.approx((ndcg_a + 1) / 3)
    assert metrics["hr@4"] == pytest.approx(2 / 3)
    assert metrics["mrr@4"] == pytest.approx(0.5)
    assert metrics["num_shoppers"] == 3
    assert "coverage@2" not in metrics and "repeat_share" not in metrics


def test_coverage_counts_distinct_recommended_products() -> None:
    metrics = ranking_metrics(RANKED, TARGETS, ks=(2, 4), num_products=10)
    assert metrics["coverage@2"] == pytest.approx(5 / 10)  # {1, 2, 5, 6, 7}
    assert metrics["coverage@4"] == pytest.approx(8 / 10)  # 1..8


def test_empty_slots_are_never_hits_nor_covered() -> None:
    # even against a target holding EMPTY (e.g. unknown products decoded by the vocabulary)
    ranked = np.array([[EMPTY, EMPTY, 3], [EMPTY, EMPTY, EMPTY]])
    metrics = ranking_metrics(ranked, [ids(EMPTY, 3), ids(4)], ks=(3,), num_products=4)
    assert metrics["recall@3"] == pytest.approx((1 / 2 + 0) / 2)
    assert metrics["mrr@3"] == pytest.approx((1 / 3 + 0) / 2)
    assert metrics["coverage@3"] == pytest.approx(1 / 4)


def test_k_beyond_the_ranking_width_uses_what_is_there() -> None:
    # two products in the catalogue, k = 10: the ideal DCG still spans min(|target|, 10) = 3 places
    metrics = ranking_metrics(np.array([[4, 5]]), [ids(5, 6, 7)], ks=(10,))
    assert metrics["recall@10"] == pytest.approx(1 / 3)
    assert metrics["ndcg@10"] == pytest.approx((1 / log2(3)) / (1 + 1 / log2(3) + 1 / 2))
    assert metrics["hr@10"] == 1.0
    assert metrics["mrr@10"] == pytest.approx(0.5)


def test_repeat_and_explore_split_on_a_hand_example() -> None:
    #        ranked    target      history    repeats  explores
    #   A    1 3 5     {1, 2, 3}   {1, 2, 9}  {1, 2}   {3}
    #   B    6 7 4     {4}         {}         -        {4}
    #   C    8 1 2     {8}         {8}        {8}      -
    ranked = np.array([[1, 3, 5], [6, 7, 4], [8, 1, 2]])
    targets = [ids(1, 2, 3), ids(4), ids(8)]
    history = [ids(1, 2, 9), ids(), ids(8)]
    metrics = ranking_metrics(ranked, targets, ks=(2, 3), history=history)
    assert metrics["recall@2_repeat"] == pytest.approx((1 / 2 + 1) / 2)  # over A and C
    assert metrics["recall@2_explore"] == pytest.approx((1 + 0) / 2)  # over A and B
    assert metrics["recall@3_repeat"] == pytest.approx((1 / 2 + 1) / 2)
    assert metrics["recall@3_explore"] == pytest.approx((1 + 1) / 2)
    assert metrics["repeat_share"] == pytest.approx(3 / 5)  # pooled: 2 + 0 + 1 of 3 + 1 + 1


def test_repeat_recall_is_nan_when_no_shopper_has_repeats() -> None:
    metrics = ranking_metrics(np.array([[1, 2]]), [ids(2)], ks=(2,), history=[ids(7)])
    assert metrics["recall@2_explore"] == 1.0
    assert np.isnan(metrics["recall@2_repeat"])
    assert metrics["repeat_share"] == 0.0


def test_empty_targets_are_refused_with_their_count() -> None:
    with pytest.raises(ValueError, match="2 of 3 shoppers have an empty target"):
        ranking_metrics(RANKED, [ids(1), ids(), ids()], ks=(2,))


def test_a_product_listed_twice_in_one_row_is_refused() -> None:
    with pytest.raises(ValueError, match="more than once"):
        ranking_metrics(np.array([[1, 2, 1]]), [ids(1)], ks=(3,))


def test_per_shopper_metrics_average_to_the_macro_metrics_and_pair() -> None:
    rng = np.random.default_rng(4)
    targets = [rng.choice(30, size=rng.integers(1, 6), replace=False) for _ in range(50)]
    a = np.stack([rng.permutation(30)[:10] for _ in range(50)])
    b = np.stack([rng.permutation(30)[:10] for _ in range(50)])
    per = shopper_metrics(a, targets, 10)
    macro = ranking_metrics(a, targets, (10,))
    for name in ("recall@10", "ndcg@10", "hr@10"):
        assert per[name].mean() == pytest.approx(macro[name])
    mean, low, high = paired_difference(per["recall@10"], shopper_metrics(b, targets, 10)["recall@10"])
    diff = per["recall@10"] - shopper_metrics(b, targets, 10)["recall@10"]
    assert mean == pytest.approx(diff.mean()) and low < mean < high
    assert high - mean == pytest.approx(1.96 * diff.std(ddof=1) / np.sqrt(50))
    assert paired_difference(per["recall@10"], per["recall@10"]) == (0.0, 0.0, 0.0)
