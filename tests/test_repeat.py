"""The repeat-aware scorer: features by hand, clock-free, blending rules, bundle round trip, serving."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from recsys.bundle import BundleError, read_bundle
from recsys.inputs import Histories
from recsys.repeat_scorer import FEATURES, RepeatScorer, features, item_statistics
from recsys.rules import Rules
from recsys.scoring import select
from serving.app import create_app
from serving.recommender import Recommender
from tests.bundles import SyntheticBundle, make_bundle
from tests.histories import histories_of

F = {name: i for i, name in enumerate(FEATURES)}


def scorer(num_items: int, seed: int = 0, new_candidates: int = 50) -> RepeatScorer:
    rng = np.random.default_rng(seed)
    return RepeatScorer(
        rng.standard_normal(len(FEATURES)),
        -2.0,
        rng.standard_normal(len(FEATURES)),
        rng.uniform(0.5, 2.0, len(FEATURES)),
        rng.uniform(0.05, 0.9, num_items),
        rng.integers(1, 50, num_items).astype(np.float64),
        new_candidates,
    )


def test_features_match_a_hand_computation() -> None:
    # one shopper: item 3 on days 0, 10, 30 (twice on day 10: one basket), item 5 on day 30 only
    histories = histories_of([[3, 3, 3, 3, 5]], [[0.0, 10.0, 10.0, 30.0, 30.0]])
    model = scorer(8)
    searched = np.array([[5, 6, -1]]), np.array([[9.0, 2.5, np.nan]])
    owner, rows, x = features(histories, *searched, model.repeat_rate, model.popularity)
    assert owner.tolist() == [0, 0, 0] and rows.tolist() == [3, 5, 6]  # 5 is scored once, as a repeat
    item3, item5, new6 = x
    assert item3[F["log_baskets"]] == pytest.approx(math.log1p(3))
    assert item3[F["basket_share"]] == pytest.approx(3 / 3)  # three baskets: days 0, 10, 30
    assert item3[F["log_decay_30d"]] == pytest.approx(math.log1p(2 ** (-30 / 30) + 2 ** (-20 / 30) + 1))
    assert item3[F["log_decay_120d"]] == pytest.approx(math.log1p(2 ** (-30 / 120) + 2 ** (-20 / 120) + 1))
    assert item3[F["log_days_since"]] == 0.0
    assert item3[F["cycle"]] == pytest.approx(math.log(1 / 16))  # 0 days since, 15-day mean interval
    assert item3[F["has_cycle"]] == 1.0 and item5[F["has_cycle"]] == 0.0 and item5[F["cycle"]] == 0.0
    assert item5[F["basket_share"]] == pytest.approx(1 / 3)
    assert item3[F["log_repeat_rate"]] == pytest.approx(math.log(model.repeat_rate[3]))
    assert item3[F["log_popularity"]] == pytest.approx(math.log1p(model.popularity[3]))
    assert item3[F["is_new"]] == 0.0 and new6[F["is_new"]] == 1.0
    assert new6[F["new_score"]] == 2.5 and new6[F["log_baskets"]] == 0.0
    assert new6[F["new_log_popularity"]] == pytest.approx(math.log1p(model.popularity[6]))
    assert new6[F["log_history_baskets"]] == item3[F["log_history_baskets"]] == pytest.approx(math.log1p(3))


def test_item_statistics() -> None:
    # item 0: shopper 0 twice, shopper 1 once; item 1: shopper 1 once
    histories = histories_of([[0, 0], [0, 1]], [[1.0, 2.0], [0.0, 0.0]])
    rate, popularity = item_statistics(histories, 3)
    np.testing.assert_allclose(rate, [(1 + 1) / (2 + 4), (0 + 1) / (1 + 4), 1 / 4])
    np.testing.assert_array_equal(popularity, [3, 1, 0])


def test_scores_need_no_clock_and_are_probabilities() -> None:
    rng = np.random.default_rng(1)
    rows = [rng.integers(0, 30, 12) for _ in range(5)]
    days = [np.sort(rng.uniform(0, 200, 12)).round() for _ in range(5)]
    candidates = rng.integers(0, 30, (5, 20))
    candidate_scores = rng.standard_normal((5, 20)).astype(np.float32)
    model = scorer(30)
    a = model.blend(histories_of(rows, days), candidates, candidate_scores)
    b = model.blend(histories_of(rows, [d + 12345.5 for d in days]), candidates, candidate_scores)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], rtol=1e-6)
    valid = a[0] >= 0
    assert ((a[1][valid] > 0) & (a[1][valid] < 1)).all() and np.isnan(a[1][~valid]).all()


def test_blend_does_not_depend_on_how_many_candidates_were_searched() -> None:
    rng = np.random.default_rng(2)
    n, k = 200, 5
    history = [rng.integers(0, n, 6) for _ in range(4)]
    days = [np.arange(6.0) * 7 for _ in range(4)]
    scores = rng.standard_normal((4, n)).astype(np.float32)
    order = np.argsort(-scores, axis=1)
    model = scorer(n, seed=3, new_candidates=k)
    answers = []
    for searched in (k + 6, 40, n):  # the pool needs new_candidates + distinct history products
        rows = order[:, :searched]
        blended = model.blend(histories_of(history, days), rows, np.take_along_axis(scores, rows, 1))
        answers.append(select(*blended, k))
    for rows, values in answers[1:]:
        np.testing.assert_array_equal(rows, answers[0][0])
        np.testing.assert_allclose(values, answers[0][1])


def test_bad_scorers_and_histories_are_refused() -> None:
    good = scorer(5)
    with pytest.raises(ValueError, match="one per feature"):
        RepeatScorer(good.weights[:-1], 0.0, good.mean, good.scale, good.repeat_rate, good.popularity)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        RepeatScorer(good.weights, 0.0, good.mean, good.scale, np.full(5, np.nan), good.popularity)
    data = good.to_dict() | {"features": ["log_baskets"]}
    with pytest.raises(ValueError, match="differ from this library"):
        RepeatScorer.from_dict(data, good.repeat_rate, good.popularity)
    with pytest.raises(ValueError, match="finite"):
        RepeatScorer(
            np.full(len(FEATURES), np.nan), 0.0, good.mean, good.scale, good.repeat_rate, good.popularity
        )
    with pytest.raises(ValueError, match="new_candidates"):
        RepeatScorer.from_dict(good.to_dict() | {"new_candidates": "50"}, good.repeat_rate, good.popularity)
    untimed = histories_of([[1]])
    untimed = Histories(untimed.offsets, untimed.rows, untimed.micros, np.zeros(1, bool), untimed.unknown)
    with pytest.raises(ValueError, match="purchase times"):
        good.blend(untimed, np.zeros((1, 1), np.int64), np.ones((1, 1)))
    with pytest.raises(ValueError, match="must be < 5"):
        good.blend(histories_of([[7]]), np.zeros((1, 1), np.int64), np.ones((1, 1)))


@pytest.fixture(scope="module")
def repeat_bundle(tmp_path_factory: pytest.TempPathFactory) -> SyntheticBundle:
    return make_bundle(tmp_path_factory.mktemp("repeat") / "bundle", num_items=40, repeat=scorer(40, seed=4))


def test_bundle_round_trip_and_corruption(repeat_bundle: SyntheticBundle, tmp_path: Path) -> None:
    bundle = read_bundle(repeat_bundle.path)
    assert bundle.repeat is not None and "repeat_rate" in bundle.items.column_names
    assert bundle.manifest["repeat_scorer"]["features"] == list(FEATURES)
    broken = tmp_path / "broken"
    shutil.copytree(repeat_bundle.path, broken)
    manifest = (broken / "bundle.json").read_text().replace('"log_baskets"', '"log_counts"')
    (broken / "bundle.json").write_text(manifest)
    with pytest.raises(BundleError, match="invalid repeat_scorer"):
        read_bundle(broken)


def test_serving_uses_the_scorer_given_timestamps(repeat_bundle: SyntheticBundle) -> None:
    recommender = Recommender.load(repeat_bundle.path)
    ids = repeat_bundle.product_ids
    history = [int(ids[i]) for i in (3, 7, 3, 9, 3)]
    seconds = [0.0, 0.0, 86_400.0 * 7, 86_400.0 * 7, 86_400.0 * 14]
    aware = recommender.recommend(history, Rules(k=8), timestamps=seconds)
    plain = recommender.recommend(history, Rules(k=8))
    assert aware.repeat_aware and not plain.repeat_aware
    assert all(0 < s < 1 for s in aware.scores) and aware.scores == sorted(aware.scores, reverse=True)

    # the same answer computed by hand: brute-force model scores, the scorer's blend, the shared select
    scores = repeat_bundle.brute_force_scores(history).astype(np.float32)
    model = read_bundle(repeat_bundle.path).repeat
    assert model is not None
    histories = histories_of([[3, 7, 3, 9, 3]], [np.array(seconds) / 86_400.0])
    rows, values = select(
        *model.blend(histories, np.argsort(-scores)[None, :], np.sort(scores)[::-1][None, :]), 8
    )
    assert aware.product_ids == ids[rows[0]].tolist()
    np.testing.assert_allclose(aware.scores, values[0], rtol=1e-5)

    floor = aware.scores[2]
    floored = recommender.recommend(history, Rules(k=8, min_score=floor), timestamps=seconds)
    assert len(floored.product_ids) == 3
    batch = recommender.recommend_batch([history, history, []], Rules(k=8), timestamps=[seconds, None, []])
    assert batch[0] == aware and batch[1] == plain and batch[2].fallback
    with pytest.raises(ValueError, match="one finite number per history entry"):
        recommender.recommend(history, timestamps=seconds[:-1])


def test_http_timestamps(repeat_bundle: SyntheticBundle) -> None:
    client = TestClient(create_app(repeat_bundle.path))
    ids = repeat_bundle.product_ids.tolist()
    body = {"history": ids[:3], "timestamps": [0, 0, 86400.5], "k": 5}
    answer = client.post("/recommend", json=body)
    assert answer.status_code == 200 and answer.json()["repeat_aware"] is True
    bad = client.post("/recommend", json=body | {"timestamps": [0, 1]})
    assert bad.status_code == 422 and "3 history entries" in bad.text
    assert client.post("/recommend", json=body | {"timestamps": [0, "x", 1]}).status_code == 422
