"""The ranker: features by hand, candidate sources, clock-free, k-invariant, no leakage across internal
cutoffs, refusal of bad rankers, bundle round trip, serving."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from fastapi.testclient import TestClient

from benchmarks.serve_latency import STAGES, stage_report
from recsys.bundle import MAX_RANKER_BYTES, RANKER_FILE, BundleError, read_bundle, sha256_file
from recsys.candidate_sources import SOURCES, gather
from recsys.data.schema import PRODUCT, SHOPPER, TIMESTAMP
from recsys.data.sequences import build_sequences
from recsys.data.synthetic import SyntheticConfig, generate_table
from recsys.evaluation.protocol import prepare
from recsys.inputs import (
    Histories,
    first_occurrences,
    pair_keys,
    sorted_unique,
    split_pair_keys,
    stable_order,
)
from recsys.rank_features import (
    ItemStats,
    _distinct_tuples,
    _searched,
    basket_weights,
    feature_names,
    features,
    item_statistics,
)
from recsys.ranker import MAX_SIZE_PRIOR, VERSION, Ranker
from recsys.rules import Rules
from recsys.scoring import select
from serving.app import create_app
from serving.recommender import Recommender
from tests.bundles import SyntheticBundle, make_bundle
from tests.histories import histories_of
from tests.rankers import random_ranker
from training import checkpoint as checkpoints
from training.rank import RankerConfig, fit, internal_cutoffs

NAMES = feature_names(1)
F = {name: i for i, name in enumerate(NAMES)}


def stats_of(
    num_items: int, categories: list[int], neighbours: dict[int, list[tuple[int, float]]]
) -> ItemStats:
    width = max((len(v) for v in neighbours.values()), default=0)
    table, scores = np.full((num_items, width), -1), np.zeros((num_items, width))
    for row, pairs in neighbours.items():
        for j, (other, score) in enumerate(pairs):
            table[row, j], scores[row, j] = other, score
    return ItemStats(
        np.arange(num_items, dtype=np.float64) * 10,
        np.linspace(0.1, 0.9, num_items),
        np.linspace(-1, 1, num_items),
        np.full(num_items, 12.0),
        np.arange(num_items, dtype=np.float64) + 1,
        np.asarray(categories, dtype=np.int64)[:, None],
        table,
        scores,
    )


def test_features_match_a_hand_computation() -> None:
    # one shopper: item 3 on days 0, 10, 30 (twice on day 10: one basket), item 5 on day 30 only
    histories = histories_of([[3, 3, 3, 3, 5]], [[0.0, 10.0, 10.0, 30.0, 30.0]])
    stats = stats_of(8, [-1, -1, -1, 0, -1, 0, 1, -1], {3: [(6, 0.5)], 5: [(6, 0.25), (3, 1.0)]})
    searched = np.array([[5, 6, -1]]), np.array([[9.0, 2.5, np.nan]])
    found = features(histories, *searched, stats, new_candidates=50)
    assert found.owner.tolist() == [0, 0, 0] and found.rows.tolist() == [3, 5, 6]  # 5 is scored once
    assert found.source.tolist() == [SOURCES.index("history")] * 2 + [SOURCES.index("network")]
    item3, item5, new6 = found.x
    assert item3[F["log_baskets"]] == pytest.approx(math.log1p(3))
    assert item3[F["basket_share"]] == pytest.approx(3 / 3)  # three baskets: days 0, 10, 30
    assert item3[F["log_decay_30d"]] == pytest.approx(math.log1p(2 ** (-30 / 30) + 2 ** (-20 / 30) + 1))
    assert item3[F["log_decay_90d"]] == pytest.approx(math.log1p(2 ** (-30 / 90) + 2 ** (-20 / 90) + 1))
    basket_decay = 2 ** (-30 / 30) + 2 ** (-20 / 30) + 1  # every basket, decayed
    assert item5[F["decay_share_30d"]] == pytest.approx(1 / basket_decay)
    assert item3[F["log_days_since"]] == 0.0 and item3[F["log_days_first"]] == pytest.approx(math.log1p(30))
    assert item3[F["log_interval"]] == pytest.approx(math.log1p(15))  # 30 days over 2 gaps
    assert item3[F["cycle"]] == pytest.approx(math.log(1 / 16))  # 0 days since, 15-day mean interval
    assert np.isnan(item5[F["cycle"]]) and np.isnan(item5[F["log_interval"]])  # bought once: no cycle
    assert item3[F["streak"]] == 3 and item5[F["streak"]] == 1 and new6[F["streak"]] == 0
    assert item3[F["recent_share"]] == 1.0 and item5[F["recent_share"]] == pytest.approx(1 / 3)
    assert item5[F["basket_share"]] == pytest.approx(1 / 3)
    # the product across shoppers
    assert item3[F["log_popularity"]] == pytest.approx(math.log1p(30))
    assert item3[F["log_repeat_rate"]] == pytest.approx(math.log(stats.repeat_rate[3]))
    assert new6[F["trend"]] == pytest.approx(stats.trend[6]) and new6[F["log_buyers"]] == pytest.approx(
        math.log1p(7)
    )
    assert item3[F["log_item_interval"]] == pytest.approx(math.log1p(12))
    # the shopper: 3 baskets, 2 products, 4 (basket, product) entries, 15 days a basket, 20 since the last one
    for row in (item3, item5, new6):
        assert row[F["log_shopper_baskets"]] == pytest.approx(math.log1p(3))
        assert row[F["log_distinct"]] == pytest.approx(math.log1p(2))
        assert row[F["basket_size"]] == pytest.approx(4 / 3)
        assert row[F["log_mean_gap"]] == pytest.approx(math.log1p(15))
        assert row[F["log_last_gap"]] == pytest.approx(math.log1p(20))
    # categories: 3 and 5 share category 0 (every basket holds one), 6 is alone in category 1
    assert item3[F["cat_share_0"]] == 1.0 and item3[F["cat_log_days_since_0"]] == 0.0
    assert item5[F["in_cat_share_0"]] == pytest.approx(1 / 3) and item3[F["in_cat_share_0"]] == 1.0
    assert item3[F["cat_log_decay_30d_0"]] == pytest.approx(math.log1p(basket_decay))
    assert new6[F["cat_share_0"]] == 0.0 and np.isnan(new6[F["cat_log_days_since_0"]])
    # the network: 5 ranks first (score 9), 6 second; 3 was not searched
    assert item5[F["net_score"]] == 9.0 and item5[F["net_rank"]] == 0.0 and item5[F["net_gap"]] == 0.0
    assert new6[F["net_score"]] == 2.5 and new6[F["net_gap"]] == -6.5
    assert new6[F["net_rank"]] == pytest.approx(math.log1p(1))
    assert np.isnan(item3[F["net_score"]]) and np.isnan(item3[F["net_rank"]])
    # co-purchase: 6 neighbours both 3 and 5 (0.5 + 0.25), 3 neighbours 5 (1.0)
    assert new6[F["co_score"]] == pytest.approx(0.75) and item3[F["co_score"]] == 1.0
    assert item5[F["co_score"]] == 0.0
    assert (item3[F["is_new"]], item5[F["is_new"]], new6[F["is_new"]]) == (0.0, 0.0, 1.0)


def test_item_statistics_by_hand() -> None:
    # shopper 0: item 0 on days 1 and 4 (with item 2 on day 4), shopper 1: items 0 and 1 on day 0
    histories = histories_of([[0, 0, 2], [0, 1]], [[1.0, 4.0, 4.0], [0.0, 0.0]])
    stats = item_statistics(histories, np.array([[0], [0], [1], [-1]]), neighbours=2)
    np.testing.assert_allclose(stats.repeat_rate, [(1 + 1) / (2 + 4), 1 / 5, 1 / 5, 1 / 4])
    np.testing.assert_array_equal(stats.popularity, [3, 1, 1, 0])
    np.testing.assert_array_equal(stats.buyers, [2, 1, 1, 0])
    assert stats.interval[0] == 3.0 and np.isnan(stats.interval[1:]).all()
    # every purchase is in the last 28 days (before: none): log((count + 1) / 1)
    np.testing.assert_allclose(stats.trend, np.log([4, 2, 2, 1]))
    # co-purchase: 0 with 2 (day 4) and with 1 (day 0), one shared basket each, cosine over baskets
    assert stats.neighbours[0].tolist() == [1, 2]
    np.testing.assert_allclose(stats.neighbour_scores[0], [1 / math.sqrt(3), 1 / math.sqrt(3)])
    assert stats.neighbours[1].tolist() == [0, -1] and stats.neighbours[3].tolist() == [-1, -1]


def test_candidate_sources_propose_new_products_once() -> None:
    # item 3 (category 0) is bought; 6 neighbours it; 4 and 7 are category 0's popular products
    histories = histories_of([[3, 3]], [[0.0, 7.0]])
    stats = stats_of(8, [-1, 0, -1, 0, 0, -1, -1, 0], {3: [(6, 0.5), (4, 0.1)]})
    searched = np.array([[4, 2]]), np.array([[1.0, 0.5]])
    found = features(histories, *searched, stats, 1, co_purchase_candidates=2, category_candidates=2)
    source = dict(zip(found.rows.tolist(), (SOURCES[s] for s in found.source), strict=True))
    # 4 is the network's (its first source); 6 co-purchase; 7 then 1 are category 0's most popular
    assert source == {3: "history", 4: "network", 6: "co_purchase", 7: "category"}
    assert len(set(found.rows.tolist())) == len(found.rows)


def test_gather_dedupes_pairs_of_int32_inputs_whose_packed_key_overflows_int32() -> None:
    # shopper 60,000 with product 40,000: 60,000 * 40,001 is past int32, so a wrapped key sorts it first
    i32 = np.int32
    history = np.array([0, 60_000], i32), np.array([5, 40_000], i32), np.array([1, 1], i32)
    network = np.array([60_000, 60_000], i32), np.array([40_000, 7], i32), np.array([0, 1], i32)
    empty = np.array([], i32), np.array([], i32), np.array([], np.float64)
    owner, rows, source = gather(
        history, network, empty, np.zeros((40_001, 0), i32), np.zeros(40_001), (0, 2, 0, 0), np.ones(2)
    )
    assert owner.tolist() == [0, 60_000, 60_000] and rows.tolist() == [5, 7, 40_000]
    assert [SOURCES[s] for s in source] == ["history", "network", "history"]


def test_pair_keys_are_int64_ordered_and_round_trip_for_int32_inputs() -> None:
    owner, rows = np.array([60_000, 0, 60_000], np.int32), np.array([7, 40_000, 40_000], np.int32)
    keys = pair_keys(owner, rows, 40_001)
    assert keys.dtype == np.int64 and np.argsort(keys).tolist() == [1, 0, 2]  # owner first, then row
    back_owner, back_rows = split_pair_keys(keys, 40_001)
    assert back_owner.tolist() == owner.tolist() and back_rows.tolist() == rows.tolist()


@pytest.mark.parametrize("scale", [7, 2**40, 2**62], ids=["small", "packed", "overflow-fallback"])
def test_sort_helpers_match_numpys(scale: int) -> None:
    """sorted_unique, stable_order and first_occurrences are np.unique / the stable argsort / np.unique's
    first indices, whether the keys and positions fit one packed int64 or fall back on numpy's sort."""
    rng = np.random.default_rng(0)
    for keys in (rng.integers(-scale, scale, 500), rng.integers(-1, 2, 500) * (scale - 1), np.zeros(0, int)):
        keys = keys.astype(np.int64)
        np.testing.assert_array_equal(sorted_unique(keys), np.unique(keys))
        np.testing.assert_array_equal(stable_order(keys), np.argsort(keys, kind="stable"))
        np.testing.assert_array_equal(first_occurrences(keys), np.unique(keys, return_index=True)[1])


def test_searched_candidates_are_ordered_whatever_the_searchs_order() -> None:
    """Best first with ties to the smaller row, from a search's output in order or not, padding (-1 rows,
    -inf scores) and NaN scores included, without a floating-point warning."""
    rows = np.array([[4, 2, 7, -1], [3, 1, 5, 6], [2, 9, 8, 1]])
    scores = np.array([[0.9, 0.5, 0.5, -np.inf], [0.2, 0.2, np.nan, -np.inf], [0.1, 0.3, 0.3, 0.3]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        owner, found, score, rank = _searched(rows, scores, np.array([4, 4, 4]))
    assert owner.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert found.tolist() == [2, 4, 7, 1, 3, 1, 2, 8, 9]  # by owner, then row
    assert rank.tolist() == [1, 0, 2, 0, 1, 0, 3, 1, 2]  # 2 and 7 tie: 2 first; 1, 8, 9 tie: row order
    assert score.tolist() == [0.5, 0.9, 0.5, 0.2, 0.2, 0.3, 0.1, 0.3, 0.3]


@pytest.mark.parametrize("spans", [(9, 11, 13), (2**31, 2**31, 2**31)], ids=["packed", "lexsort-fallback"])
def test_distinct_tuples_are_the_sorted_distinct_rows(spans: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    columns = tuple(rng.integers(0, min(span, 4), 300).astype(np.int64) for span in spans)
    columns = (columns[0], columns[1] * (spans[1] // 4), columns[2])
    expected = np.unique(np.stack(columns, axis=1), axis=0)  # rows, sorted by column 0, then 1, then 2
    found = _distinct_tuples(columns, spans)
    np.testing.assert_array_equal(np.stack(found, axis=1), expected)


def test_the_history_source_keeps_the_most_bought_products() -> None:
    # 3 in baskets on days 0 and 30, 5 on day 0, 6 on day 29: the 90-day decayed counts order 3, 6, 5
    histories = histories_of([[3, 5, 6, 3]], [[0.0, 0.0, 29.0, 30.0]])
    stats = stats_of(8, [-1] * 8, {})
    searched = np.array([[5, 1]]), np.array([[2.0, 1.0]])
    found = features(histories, *searched, stats, 1, history_candidates=2)
    assert found.rows.tolist() == [1, 3, 6]  # 5 is left out, and never proposed again as new
    assert [SOURCES[s] for s in found.source] == ["network", "history", "history"]


def test_the_size_factor_matches_a_hand_computation() -> None:
    # baskets: day 0 {1, 2}, day 1 {1}, day 2 {2, 3, 4}; product 5 is the network's, never bought
    histories = histories_of([[1, 2, 1, 2, 3, 4]], [[0.0, 0.0, 1.0, 2.0, 2.0, 2.0]])
    stats = stats_of(8, [-1] * 8, {})
    searched = np.array([[5]]), np.array([[1.0]])

    def weight(size: int) -> float:  # one hit's worth to NDCG@10 in a basket of ``size`` products
        return 1.0 / sum(1.0 / math.log2(j + 2) for j in range(min(size, 10)))

    mean = (weight(2) + weight(1) + weight(3)) / 3  # the shopper's average basket
    expected = {
        1: (weight(2) + weight(1) + mean) / (3 * mean),  # two baskets plus one prior basket of the mean
        2: (weight(2) + weight(3) + mean) / (3 * mean),
        3: (weight(3) + mean) / (2 * mean),
        4: (weight(3) + mean) / (2 * mean),
        5: 1.0,
    }
    found = features(histories, *searched, stats, 1, size_prior=1.0)
    assert dict(zip(found.rows.tolist(), found.size_factor.tolist(), strict=True)) == pytest.approx(expected)
    assert expected[1] > 1 > expected[3]  # bought on a small trip: worth more per hit than a big shop's
    heavy = features(histories, *searched, stats, 1, size_prior=1e6)
    np.testing.assert_allclose(heavy.size_factor, 1.0, atol=1e-5)  # the prior swamps three baskets
    assert (features(histories, *searched, stats, 1).size_factor == 1.0).all()  # no prior: probability
    nobody = features(histories_of([[], []]), np.array([[5], [6]]), np.ones((2, 1)), stats, 1, size_prior=1.0)
    assert nobody.rows.tolist() == [5, 6] and nobody.size_factor.tolist() == [1.0, 1.0]  # no baskets at all
    np.testing.assert_allclose(
        basket_weights(np.array([1, 3, 10, 60])), [1, weight(3), weight(10), weight(10)]
    )


def test_lists_follow_probability_times_the_size_factor() -> None:
    rng = np.random.default_rng(6)
    rows = [rng.integers(0, 30, 14) for _ in range(6)]
    days = [np.sort(rng.integers(0, 60, 14)).astype(np.float64) for _ in range(6)]
    searched = rng.integers(0, 30, (6, 25)), rng.standard_normal((6, 25)).astype(np.float32)
    model = random_ranker(30, size_prior=2.0)
    histories = histories_of(rows, days)
    blended, probability, keys = model.blend(histories, *searched)
    found = model.candidates(histories, *searched)
    valid = blended >= 0
    np.testing.assert_allclose(
        np.sort(keys[valid]), np.sort(model.probability(found.x) * found.size_factor), rtol=1e-6
    )
    ranked, values = select(blended, probability, 10, order=keys)
    plain = Ranker(model.model, model.stats, model.features, model.new_candidates)  # no prior
    by_probability, _ = select(*plain.blend(histories, *searched)[:2], 10)
    assert not np.array_equal(ranked, by_probability)  # the factor reorders some lists
    for b in range(6):  # each list is the best 10 by key, its scores the probabilities
        key_of = dict(zip(blended[b][valid[b]].tolist(), keys[b][valid[b]].tolist(), strict=True))
        listed = [key_of[r] for r in ranked[b] if r >= 0]
        assert listed == sorted(listed, reverse=True)
        p_of = dict(zip(blended[b][valid[b]].tolist(), probability[b][valid[b]].tolist(), strict=True))
        np.testing.assert_allclose(values[b][ranked[b] >= 0], [p_of[r] for r in ranked[b] if r >= 0])
    again = Ranker.from_parts(model.to_dict(), model.model, model.item_columns())
    assert again.size_prior == 2.0 and again.to_dict() == model.to_dict()
    older = {k: v for k, v in model.to_dict().items() if k != "size_prior"}  # a ranker from before
    assert Ranker.from_parts(older, model.model, model.item_columns()).size_prior is None
    for bad in (0, -1.0, float("nan"), float("inf"), MAX_SIZE_PRIOR * 10, 10**400, True, "1"):
        with pytest.raises(ValueError, match="size_prior"):
            Ranker.from_parts(model.to_dict() | {"size_prior": bad}, model.model, model.item_columns())


def test_scores_need_no_clock_and_are_probabilities() -> None:
    rng = np.random.default_rng(1)
    rows = [rng.integers(0, 30, 12) for _ in range(5)]
    days = [np.sort(rng.uniform(0, 200, 12)).round() for _ in range(5)]
    candidates = rng.integers(0, 30, (5, 20))
    candidate_scores = rng.standard_normal((5, 20)).astype(np.float32)
    model = random_ranker(30)
    a = model.blend(histories_of(rows, days), candidates, candidate_scores)
    b = model.blend(histories_of(rows, [d + 12345.5 for d in days]), candidates, candidate_scores)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], rtol=1e-6)
    valid = a[0] >= 0
    assert ((a[1][valid] > 0) & (a[1][valid] < 1)).all() and np.isnan(a[1][~valid]).all()
    assert len(np.unique(a[1][valid])) > 5  # the scores depend on the pair


def test_blend_does_not_depend_on_how_many_candidates_were_searched() -> None:
    rng = np.random.default_rng(2)
    n, k = 200, 5
    history = [rng.integers(0, n, 6) for _ in range(4)]
    days = [np.arange(6.0) * 7 for _ in range(4)]
    scores = rng.standard_normal((4, n)).astype(np.float32)
    order = np.argsort(-scores, axis=1)
    model = random_ranker(n, seed=3, new_candidates=k)
    answers = []
    for searched in (k + 6, 40, n):  # the pool needs new_candidates + distinct history products
        rows = order[:, :searched]
        found = np.take_along_axis(scores, rows, 1)
        blended, values, keys = model.blend(histories_of(history, days), rows, found)
        answers.append([select(blended, values, want, order=keys) for want in (3, 10, 40)])
    for lists in answers[1:]:
        for (rows, values), (first_rows, first_values) in zip(lists, answers[0], strict=True):
            np.testing.assert_array_equal(rows, first_rows)
            np.testing.assert_allclose(values, first_values)
    for (short, _), (long, _) in zip(answers[0][:-1], answers[0][1:], strict=True):  # k-invariance
        np.testing.assert_array_equal(short, long[:, : short.shape[1]])


def test_bad_rankers_and_histories_are_refused() -> None:
    good = random_ranker(5)
    with pytest.raises(ValueError, match="declares"):
        Ranker(good.model, good.stats, good.features[:-1], 50)
    with pytest.raises(ValueError, match="not features of this library"):
        Ranker(good.model, good.stats, ("log_counts",), 50)
    with pytest.raises(ValueError, match="cannot be read"):
        Ranker(good.model[: len(good.model) // 2] + "garbage", good.stats, good.features, 50)
    with pytest.raises(ValueError, match="version"):
        Ranker.from_parts(good.to_dict() | {"version": VERSION + 1}, good.model, good.item_columns())
    with pytest.raises(ValueError, match="new_candidates"):
        Ranker.from_parts(good.to_dict() | {"new_candidates": "50"}, good.model, good.item_columns())
    with pytest.raises(ValueError, match="missing"):
        Ranker.from_parts(good.to_dict(), good.model, {"popularity": good.stats.popularity})
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        Ranker.from_parts(good.to_dict(), good.model, good.item_columns() | {"repeat_rate": np.zeros(5)})
    thresholds = next(line for line in good.model.splitlines() if line.startswith("threshold="))
    first = thresholds.split("=")[1].split()[0]
    # the same byte count (tree_sizes): LightGBM writes a last bin's bound as inf, never a NaN
    infinite = good.model.replace(thresholds, thresholds.replace(first, "inf".ljust(len(first)), 1), 1)
    Ranker(infinite, good.stats, good.features, 50)
    with pytest.raises(ValueError, match="non-finite"):
        Ranker(infinite.replace("threshold=inf", "threshold=nan", 1), good.stats, good.features, 50)
    regression = good.model.replace("objective=binary", "objective=regression")
    with pytest.raises(ValueError, match="probabilities"):
        Ranker(regression, good.stats, good.features, 50)
    untimed = histories_of([[1]])
    untimed = type(untimed)(untimed.offsets, untimed.rows, untimed.micros, np.zeros(1, bool), untimed.unknown)
    with pytest.raises(ValueError, match="purchase times"):
        good.blend(untimed, np.zeros((1, 1), np.int64), np.ones((1, 1)))
    with pytest.raises(ValueError, match="must be < 5"):
        good.blend(histories_of([[7]]), np.zeros((1, 1), np.int64), np.ones((1, 1)))


def test_a_ranker_switch_must_be_a_boolean() -> None:
    assert RankerConfig.from_config({"cutoff_network": True}).cutoff_network
    with pytest.raises(ValueError, match=r"\['cutoff_network'\] must be true or false"):
        RankerConfig.from_config({"cutoff_network": "false"})


def test_the_cutoff_network_and_its_setting_come_together() -> None:
    """ranker.cutoff_network without the cutoff network, or the network without the setting, is refused
    before any work."""
    for config, cutoff_module in ((RankerConfig(new_candidates=0, cutoff_network=True), None),
                                  (RankerConfig(new_candidates=0), object())):  # fmt: skip
        with pytest.raises(ValueError, match="cutoff_network=true needs the cutoff network"):
            fit(None, None, None, None, config, cutoff_module=cutoff_module)  # type: ignore[arg-type]


def test_internal_cutoffs_never_see_a_later_purchase() -> None:
    """A product first bought after an internal cutoff is that cutoff's label at most: never in its
    histories, its item statistics or its candidates' features."""
    receipts = generate_table(SyntheticConfig(num_shoppers=300, num_products=80, seed=5))
    val_cutoff = datetime(2017, 11, 3, tzinfo=timezone.utc)
    planted_time = val_cutoff - timedelta(days=10)  # after the first internal cutoff (14 days before)
    shopper = pc.min(receipts.column(SHOPPER)).as_py()
    planted = 10**9
    row = {c: receipts.column(c)[0].as_py() for c in receipts.column_names} | {
        SHOPPER: shopper, PRODUCT: planted, TIMESTAMP: planted_time, "basket_id": 10**12,
    }  # fmt: skip
    receipts = pa.concat_tables([receipts, pa.Table.from_pylist([row], schema=receipts.schema)])
    val = prepare(receipts, val_cutoff, min_baskets=1)
    assert planted in val.vocab.product_ids.tolist()
    config = RankerConfig(cutoffs=3, spacing_days=14)
    for data in internal_cutoffs(val, config, None):
        assert pc.max(data.train.column(TIMESTAMP)).as_py() < data.cutoff < val_cutoff
        assert planted not in data.train.column(PRODUCT).to_pylist()
        targets = dict(zip(data.targets.shopper_ids.tolist(), data.targets.items, strict=True))
        everyone = Histories.from_sequences(build_sequences(data.train, data.vocab))
        stats = item_statistics(everyone, np.zeros((data.vocab.num_products, 0), np.int64))
        assert stats.popularity[data.vocab.rows(np.array([planted]))[0]] == 0
        labelled = planted in targets.get(shopper, np.zeros(0)).tolist()
        first_after = pc.min(
            receipts.filter(
                pc.and_(
                    pc.equal(receipts.column(SHOPPER), shopper),
                    pc.greater_equal(receipts.column(TIMESTAMP), data.cutoff),
                )
            ).column(TIMESTAMP)
        ).as_py()
        assert labelled == (first_after == planted_time)  # a label only where it is the next basket


@pytest.fixture(scope="module")
def ranked_bundle(tmp_path_factory: pytest.TempPathFactory) -> SyntheticBundle:
    return make_bundle(
        tmp_path_factory.mktemp("ranked") / "bundle", num_items=40, repeat=random_ranker(40, seed=4)
    )


def _rewrite(path: Path, name: str, data: bytes) -> None:
    """Replace a bundle file and record its new checksum: a coherent bundle with other content."""
    (path / name).write_bytes(data)
    manifest = json.loads((path / "bundle.json").read_text())
    manifest["files"][name] = {"sha256": sha256_file(path / name), "bytes": len(data)}
    (path / "bundle.json").write_text(json.dumps(manifest))


def test_bundle_round_trip_and_refusals(ranked_bundle: SyntheticBundle, tmp_path: Path) -> None:
    bundle = read_bundle(ranked_bundle.path)
    assert bundle.repeat is not None and (ranked_bundle.path / RANKER_FILE).is_file()
    assert bundle.manifest["ranker"]["version"] == VERSION
    assert bundle.manifest["ranker"]["features"] == list(bundle.repeat.features)
    assert "ranker_repeat_rate" in bundle.items.column_names

    corrupt = shutil.copytree(ranked_bundle.path, tmp_path / "corrupt")
    text = (corrupt / RANKER_FILE).read_bytes()
    (corrupt / RANKER_FILE).write_bytes(text.replace(b"Tree=0", b"Tree=9"))
    with pytest.raises(BundleError, match=r"ranker\.txt is corrupt"):
        read_bundle(corrupt)
    _rewrite(corrupt, RANKER_FILE, b"not a model\n")  # checksums agree, the model does not parse
    with pytest.raises(BundleError, match=r"invalid ranker.*cannot be read"):
        read_bundle(corrupt)

    edits = {
        "version": (lambda m: m["ranker"].update(version=VERSION + 1), "invalid ranker.*version"),
        "features": (lambda m: m["ranker"]["features"].__setitem__(0, "log_counts"), "invalid ranker"),
        "file": (lambda m: m["files"].pop(RANKER_FILE), "'files' must list exactly"),
        # refused from the manifest alone, before a byte of the (here small) file is read
        "oversized": (
            lambda m: m["files"][RANKER_FILE].update(bytes=MAX_RANKER_BYTES + 1),
            r"ranker\.txt declares \d+ bytes, above this reader's limit",
        ),
        # an integer far beyond a float: refused by name, not an OverflowError out of the reader
        "size_prior": (lambda m: m["ranker"].update(size_prior=10**400), "invalid ranker.*size_prior"),
        "size_prior_text": (lambda m: m["ranker"].update(size_prior="1"), "invalid ranker.*size_prior"),
    }
    for name, (change, message) in edits.items():
        edited = shutil.copytree(ranked_bundle.path, tmp_path / name)
        manifest = json.loads((edited / "bundle.json").read_text())
        change(manifest)
        (edited / "bundle.json").write_text(json.dumps(manifest))
        with pytest.raises(BundleError, match=message):
            read_bundle(edited)


def test_serving_uses_the_ranker_given_timestamps(ranked_bundle: SyntheticBundle) -> None:
    recommender = Recommender.load(ranked_bundle.path)
    ids = ranked_bundle.product_ids
    history = [int(ids[i]) for i in (3, 7, 3, 9, 3)]
    seconds = [0.0, 0.0, 86_400.0 * 7, 86_400.0 * 7, 86_400.0 * 14]
    aware = recommender.recommend(history, Rules(k=8), timestamps=seconds)
    plain = recommender.recommend(history, Rules(k=8))
    assert aware.repeat_aware and not plain.repeat_aware
    assert all(0 < s < 1 for s in aware.scores)  # probabilities, listed by probability x size factor

    # the same answer computed by hand: brute-force model scores, the ranker's blend, the shared select
    scores = ranked_bundle.brute_force_scores(history).astype(np.float32)
    model = read_bundle(ranked_bundle.path).repeat
    assert model is not None
    histories = histories_of([[3, 7, 3, 9, 3]], [np.array(seconds) / 86_400.0])
    blended, probabilities, keys = model.blend(
        histories, np.argsort(-scores)[None, :], np.sort(scores)[::-1][None, :]
    )
    rows, values = select(blended, probabilities, 8, order=keys)
    assert aware.product_ids == ids[rows[0]].tolist()
    np.testing.assert_allclose(aware.scores, values[0], rtol=1e-5)

    floor = aware.scores[2]
    floored = recommender.recommend(history, Rules(k=8, min_score=floor), timestamps=seconds)
    assert floored.product_ids == [
        p for p, s in zip(aware.product_ids, aware.scores, strict=True) if s >= floor
    ]
    batch = recommender.recommend_batch([history, history, []], Rules(k=8), timestamps=[seconds, None, []])
    assert batch[0] == aware and batch[1] == plain and batch[2].fallback
    with pytest.raises(ValueError, match="one finite number per history entry"):
        recommender.recommend(history, timestamps=seconds[:-1])


def test_the_latency_benchmark_stages_match_serving(
    ranked_bundle: SyntheticBundle, capsys: pytest.CaptureFixture[str]
) -> None:
    # benchmarks.serve_latency times a ranked request stage by stage; each staged list must be served's
    recommender = Recommender.load(ranked_bundle.path)
    rng = np.random.default_rng(3)
    ids = ranked_bundle.product_ids
    requests = [([], [])]  # the fallback has no stages and is skipped
    for length in (1, 5, 30, 120):
        days = np.sort(rng.integers(0, 90, length)).astype(np.float64)
        requests.append((ids[rng.integers(0, len(ids), length)].tolist(), (days * 86_400.0).tolist()))
    stage_report(recommender, read_bundle(ranked_bundle.path), requests, Rules(k=8))
    lines = capsys.readouterr().out.splitlines()
    stages, trees = lines[1 : 1 + len(STAGES)], lines[1 + len(STAGES) :]
    assert "all 4 /" in lines[0] and [line.split()[0] for line in stages] == list(STAGES)
    assert all(float(line.split()[1]) > 0 for line in stages)
    # then the served trees against LightGBM's predictor on the same rows (it raises if they disagree)
    assert len(trees) == 5 and "4 requests" in trees[0]
    assert [line.split()[0] for line in trees[1:3]] == ["onnxruntime", "lightgbm"]
    assert "1 thread(s)" in trees[3] and "2 thread(s)" in trees[4]


def test_http_timestamps(ranked_bundle: SyntheticBundle) -> None:
    client = TestClient(create_app(ranked_bundle.path))
    ids = ranked_bundle.product_ids.tolist()
    body = {"history": ids[:3], "timestamps": [0, 0, 86400.5], "k": 5}
    answer = client.post("/recommend", json=body)
    assert answer.status_code == 200 and answer.json()["repeat_aware"] is True
    bad = client.post("/recommend", json=body | {"timestamps": [0, 1]})
    assert bad.status_code == 422 and "3 history entries" in bad.text
    assert client.post("/recommend", json=body | {"timestamps": [0, "x", 1]}).status_code == 422


def test_an_old_checkpoint_scorer_is_refused_naming_the_fix() -> None:
    state = {"caddie": {"repeat_scorer": {"weights": [0.0]}}}
    with pytest.raises(checkpoints.CheckpointError, match=r"python -m training\.rank"):
        checkpoints.scorer(state)
