"""A small real ranker for tests: LightGBM fitted on the features of seeded random histories."""

from __future__ import annotations

import numpy as np

from recsys.rank_features import feature_names, features, item_statistics
from recsys.ranker import Ranker
from tests.histories import histories_of
from training.rank import RankerConfig, fit_booster


def random_ranker(
    num_items: int,
    seed: int = 0,
    new_candidates: int = 50,
    levels: int = 1,
    neighbours: int = 3,
    co_purchase_candidates: int = 0,
    category_candidates: int = 0,
    size_prior: float | None = 1.0,
) -> Ranker:
    """A ranker over ``num_items`` item rows whose scores vary with the history, the network score and the
    product: fitted on 80 random shoppers, whose labels favour products bought often and scored high."""
    rng = np.random.default_rng(seed)
    rows = [rng.integers(0, num_items, rng.integers(3, 25)) for _ in range(80)]
    days = [np.sort(rng.integers(0, 120, len(r))).astype(np.float64) for r in rows]
    histories = histories_of(rows, days)
    categories = rng.integers(-1, 4, (num_items, levels))
    stats = item_statistics(histories, categories, neighbours)
    searched = np.stack([rng.permutation(num_items)[: min(num_items, 30)] for _ in rows])
    scores = rng.standard_normal(searched.shape).astype(np.float32)
    found = features(histories, searched, scores, stats, min(new_candidates, 10), co_purchase_candidates,
                     category_candidates)  # fmt: skip
    names = feature_names(levels)
    x = found.x
    signal = np.nan_to_num(x[:, names.index("log_baskets")]) + 0.5 * np.nan_to_num(
        x[:, names.index("net_score")]
    )
    labels = rng.random(len(x)) < 1 / (1 + np.exp(-(2 * signal - 2 + 0.3 * (found.rows % 5))))
    config = RankerConfig(max_rounds=8, num_leaves=7, min_data_in_leaf=5, num_threads=1, seed=seed)
    booster = fit_booster(x, labels, list(names), config)
    return Ranker(booster.model_to_string(), stats, names, new_candidates, co_purchase_candidates,
                  category_candidates, size_prior=size_prior)  # fmt: skip
