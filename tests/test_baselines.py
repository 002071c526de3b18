"""Baselines on tiny hand-made receipts with rankings worked out by hand."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pytest

from recsys.data.schema import BASKET, PRODUCT, SHOPPER, TIMESTAMP, receipts_schema
from recsys.data.split import Targets
from recsys.data.vocabulary import UNK, Vocabulary
from recsys.evaluation import baselines
from recsys.evaluation.protocol import (
    UNBOUGHT_POPULARITY,
    EvaluationData,
    new_product_targets,
    new_to_you_rankings,
)

START = datetime(2017, 1, 1, tzinfo=timezone.utc)
CUTOFF = datetime(2017, 3, 1, tzinfo=timezone.utc)  # day 59


def receipts(baskets: list[tuple[int, int, int, list[int]]]) -> pa.Table:
    """(shopper, basket, day after 2017-01-01 UTC, products) -> canonical receipts."""
    rows = [(s, b, p, START + timedelta(days=d)) for s, b, d, products in baskets for p in products]
    shoppers, basket_ids, products, times = zip(*rows, strict=True)
    columns = {SHOPPER: shoppers, BASKET: basket_ids, PRODUCT: products, TIMESTAMP: times}
    return pa.Table.from_pydict(columns, schema=receipts_schema("UTC", ()))


# Baskets per product: 20 -> 5, 50 -> 3, 10 -> 2, 30 -> 2, 40 -> 1, 60 -> 1, so the vocabulary
# order is 20, 50, 10, 30, 40, 60 (10 before 30 and 40 before 60 by product id).
TRAIN = receipts(
    [
        (1, 1, 0, [10, 20, 20]),  # 20 twice in one basket counts once
        (1, 2, 1, [10, 30]),
        (1, 3, 50, [40]),
        (2, 4, 2, [20, 50]),
        (2, 5, 3, [20, 50]),
        (2, 6, 4, [20]),
        (3, 7, 5, [30, 50]),
        (3, 8, 6, [20, 60]),
    ]
)
VOCAB = Vocabulary.build(TRAIN, min_baskets=1)
COLD = 9  # no train rows


def ranked_ids(indices: np.ndarray) -> list[list[int]]:
    return VOCAB.decode(indices).tolist()


def test_popularity_is_the_same_list_for_everyone() -> None:
    assert ranked_ids(baselines.popularity(VOCAB, 2, 3)) == [[20, 50, 10], [20, 50, 10]]
    assert baselines.popularity(VOCAB, 1, 100).shape == (1, 6)  # capped at the catalogue


def test_purchase_counts_count_distinct_baskets_in_the_order_asked() -> None:
    counts = baselines.purchase_counts(TRAIN, VOCAB, np.array([COLD, 2, 1]))
    assert counts.shape == (3, VOCAB.size)
    assert counts[0].nnz == 0
    index = dict(zip(VOCAB.product_ids.tolist(), range(2, VOCAB.size), strict=True))
    assert counts[1, index[20]] == 3 and counts[1, index[50]] == 2 and counts[1].nnz == 2
    assert {p: counts[2, index[p]] for p in (10, 20, 30, 40)} == {10: 2, 20: 1, 30: 1, 40: 1}


def test_purchase_counts_give_out_of_vocabulary_products_no_weight() -> None:
    vocab = Vocabulary.build(TRAIN, min_baskets=2)  # drops 40 and 60
    counts = baselines.purchase_counts(TRAIN, vocab, np.array([1]))
    assert counts[0, UNK] == 0
    assert counts.sum() == 4  # 10 twice, 20 and 30 once; 40 is unknown


def test_personal_frequency_pads_with_popularity_and_breaks_ties_by_it() -> None:
    ranked = baselines.personal_frequency(TRAIN, VOCAB, np.array([1, 2, 3, COLD]), k=6)
    assert ranked_ids(ranked) == [
        [10, 20, 30, 40, 50, 60],  # 10 twice; 20, 30, 40 once each, by popularity; then 50, 60
        [20, 50, 10, 30, 40, 60],
        [20, 50, 30, 60, 10, 40],  # four items once each, by popularity
        [20, 50, 10, 30, 40, 60],  # no history: popularity
    ]


def test_decay_lets_a_recent_purchase_outrank_an_older_frequent_one() -> None:
    # shopper 1: 10 on days 0 and 1, 20 on day 0, 30 on day 1, 40 on day 50; cutoff day 59
    counts = baselines.purchase_counts(TRAIN, VOCAB, np.array([1]), cutoff=CUTOFF, half_life_days=5)
    index_40 = int(VOCAB.encode(np.array([40]))[0])
    assert counts[0, index_40] == pytest.approx(0.5 ** (9 / 5))

    def ranking(half_life_days: float) -> list[int]:
        ranked = baselines.personal_frequency(TRAIN, VOCAB, np.array([1]), 6, CUTOFF, half_life_days)
        return ranked_ids(ranked)[0]

    # short: 40 (0.29) >> 10 (0.5^11.8 + 0.5^11.6) > 30 (0.5^11.6) > 20 (0.5^11.8)
    assert ranking(5) == [40, 10, 30, 20, 50, 60]
    # long: 10 (~1.92) > 40 (~0.994); recency still orders 30 (day 1) before 20 (day 0)
    assert ranking(1000) == [10, 40, 30, 20, 50, 60]


def test_decay_needs_a_cutoff() -> None:
    with pytest.raises(ValueError, match="cutoff"):
        baselines.purchase_counts(TRAIN, VOCAB, np.array([1]), half_life_days=5)


# Product 1 is bought alone by three shoppers and with 4 by one; 2 and 3 always together, 2 also
# alone by shopper 7; 4 once with 1, once with the niche 5, once alone (shopper 10).
# Popularity order: 1 (4 baskets), 2 (3), 4 (3), 3 (2), 5 (1).
KNN_TRAIN = receipts(
    [
        (1, 1, 0, [2, 3]),
        (2, 2, 0, [2, 3]),
        (3, 3, 0, [1]),
        (4, 4, 0, [1]),
        (5, 5, 0, [1]),
        (6, 6, 0, [1, 4]),
        (7, 7, 0, [2]),
        (8, 8, 0, [4, 5]),
        (10, 10, 0, [4]),
    ]
)
KNN_VOCAB = Vocabulary.build(KNN_TRAIN, min_baskets=1)


@pytest.mark.parametrize("neighbours", [None, 2])
def test_item_knn_ranks_similar_items_above_popular_ones(neighbours: int | None) -> None:
    shoppers = np.array([7, 10, COLD])
    ranked = KNN_VOCAB.decode(baselines.item_knn(KNN_TRAIN, KNN_VOCAB, shoppers, 5, neighbours))
    assert ranked.tolist() == [
        [2, 3, 1, 4, 5],  # 2 itself (cos 1), its partner 3 (2 / sqrt(6)), then popularity
        # 4 shares one shopper with 5 and one with 1, but cosine favours the niche 5:
        # 1 / sqrt(3 * 1) > 1 / sqrt(3 * 4) (raw co-counts would tie and pick the popular 1)
        [4, 5, 1, 2, 3],
        [1, 2, 4, 3, 5],  # no history: popularity
    ]


def test_item_knn_neighbours_prune_similar_items() -> None:
    # one neighbour per item keeps only itself: each shopper gets their own item, then popularity
    shoppers = np.array([7, 10])
    ranked = KNN_VOCAB.decode(baselines.item_knn(KNN_TRAIN, KNN_VOCAB, shoppers, 5, neighbours=1))
    assert ranked.tolist() == [[2, 1, 4, 3, 5], [4, 1, 2, 3, 5]]


def test_decayed_baskets_of_a_product_set_by_hand() -> None:
    """Shopper 1 holds 10 or 30 in baskets 1 (day 0) and 2 (day 1), one basket each however many of the
    products it holds; shopper 2 none; shopper 9 has no receipts; a basket on the cutoff does not count."""
    table = pa.concat_tables([TRAIN, receipts([(1, 9, 59, [10])])])
    got = baselines.decayed_baskets(table, np.array([10, 30]), np.array([1, 2, 3, 9]), CUTOFF, 59.0)
    np.testing.assert_allclose(got, [0.5 + 0.5 ** (58 / 59), 0.0, 0.5 ** (54 / 59), 0.0])
    with pytest.raises(ValueError, match="positive half-life"):
        baselines.decayed_baskets(table, np.array([10]), np.array([1]), CUTOFF, 0.0)


def test_popularity_among_unbought_skips_each_shoppers_products() -> None:
    """Vocabulary order 20, 50, 10, 30, 40, 60; bought products are skipped, unknown ones ignored, and a
    shopper who bought nearly everything gets what is left, padded."""
    history = [np.array([20, 10]), np.array([]), np.array([20, 50, 10, 30, 40, 99])]
    ranked = baselines.popularity_among_unbought(VOCAB, history, 3)
    assert ranked_ids(ranked) == [[50, 30, 40], [20, 50, 10], [60, -1, -1]]


def test_new_product_targets_keep_new_products_and_the_shoppers_with_one() -> None:
    targets = Targets(
        shopper_ids=np.array([1, 2, 3]),
        items=[np.array([10, 50]), np.array([20]), np.array([30, 60])],
        all_items=[np.array([10, 50, 77]), np.array([20, 78]), np.array([30, 60])],
        history=[np.array([10, 20, 30, 40]), np.array([20, 50]), np.array([20, 50, 60])],
    )
    data = EvaluationData(CUTOFF, TRAIN, VOCAB, targets)
    new = new_product_targets(data)
    assert new.targets.shopper_ids.tolist() == [1, 3]  # shopper 2's one target product is a repeat
    assert [t.tolist() for t in new.targets.items] == [[50], [30]]
    assert [t.tolist() for t in new.targets.all_items] == [[50, 77], [30]]
    assert [h.tolist() for h in new.targets.history] == [[10, 20, 30, 40], [20, 50, 60]]
    ranked = new_to_you_rankings(new, 2)[UNBOUGHT_POPULARITY]
    assert ranked.tolist() == [[50, 60], [10, 30]]
