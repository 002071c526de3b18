"""Campaign propensity: how likely each shopper is to buy one of a campaign's products within a horizon.

The ranker (:mod:`recsys.ranker`) gives P(product in the shopper's next basket) for any (shopper,
product) pair (:func:`recsys.rank_features.pair_features`). A campaign's raw score combines those over
its products in two documented steps, and a calibration fitted where the outcome is known
(:mod:`recsys.calibration`) turns the raw score into a probability. The raw score is a rate, ``-log P(no
purchase)`` under the independence reading below, so that ``1 - exp(-raw)`` is that reading's
probability, and a campaign of thousands of products does not saturate it at 1.0 in floating point:

1. **Next basket**: ``h = -sum(log(1 - p))`` over the pairs scored, so ``1 - exp(-h)`` is the chance
   that one of them enters the next basket if the products entered it independently. Scored pairs
   (:func:`campaign_pairs`): the campaign's products the shopper bought, those among the network's
   searched candidates, and the campaign's :data:`POPULAR` most popular products, so a shopper new to
   the products is scored on the ones most likely to be its first. A product outside these counts as
   p = 0: the few most likely products carry the score.
2. **Horizon**: ``raw = n * h`` with ``n`` the baskets the shopper is expected to make in the horizon
   (independent baskets), at its own rate: baskets over the days from its first basket to the scoring
   date (at least one horizon long, at most a basket a day). The days without a basket up to the
   scoring date count, so a shopper who stopped coming scores lower than one who comes every week.

The ranker's features read times back from the shopper's last purchase (no clock); step 2 is where the
scoring date enters. numpy only.
"""

from __future__ import annotations

import numpy as np

from recsys.inputs import Histories, pair_keys, split_pair_keys
from recsys.rank_features import pair_features
from recsys.ranker import Ranker

POPULAR = 20  # the campaign's most popular products every shopper is scored on


def campaign_pairs(
    histories: Histories,
    searched: np.ndarray,
    campaign_rows: np.ndarray,
    popularity: np.ndarray,
    popular: int = POPULAR,
) -> tuple[np.ndarray, np.ndarray]:
    """The (owner, item row) pairs scored for a campaign of item rows ``campaign_rows``: each shopper's
    bought campaign products, its ``searched`` [S, C] rows (-1 none) among them, and the campaign's
    ``popular`` most ``popularity``-ranked products (ties to the smaller row). Sorted, each pair once."""
    campaign_rows = np.unique(np.asarray(campaign_rows, dtype=np.int64))
    s = histories.num_shoppers
    bought_owner, bought_rows = histories.distinct()
    mine = np.isin(bought_rows, campaign_rows)
    searched = np.asarray(searched, dtype=np.int64)
    hit = np.isin(searched, campaign_rows) & (searched >= 0)
    searched_owner = np.broadcast_to(np.arange(s)[:, None], searched.shape)[hit]
    best = campaign_rows[np.lexsort((campaign_rows, -popularity[campaign_rows]))][:popular]
    owner = np.concatenate([bought_owner[mine], searched_owner, np.repeat(np.arange(s), len(best))])
    rows = np.concatenate([bought_rows[mine], searched[hit], np.tile(best, s)])
    span = max(int(popularity.shape[0]), 1)
    return split_pair_keys(np.unique(pair_keys(owner, rows, span)), span)


def next_basket(
    ranker: Ranker,
    histories: Histories,
    searched_rows: np.ndarray,
    searched_scores: np.ndarray,
    campaign_rows: np.ndarray,
    popular: int = POPULAR,
    threads: int = 1,
) -> np.ndarray:
    """[S] ``-log P(the next basket holds none of the campaign's products)``, step 1 of the module
    docstring (NaN for a shopper without a known product: nothing to score it on)."""
    owner, rows = campaign_pairs(histories, searched_rows, campaign_rows, ranker.stats.popularity, popular)
    known = histories.lengths[owner] > 0
    owner, rows = owner[known], rows[known]
    x = pair_features(
        histories, owner, rows, searched_rows, searched_scores, ranker.stats, ranker.new_candidates
    )
    p = np.clip(ranker.probability(x, threads), 0.0, 1.0 - 1e-12)
    none = np.bincount(owner, weights=np.log1p(-p), minlength=histories.num_shoppers)  # log P(none)
    return np.where(histories.lengths > 0, -none, np.nan)


def expected_baskets(histories: Histories, as_of_days: float, horizon_days: float) -> np.ndarray:
    """[S] baskets each shopper is expected to make in ``horizon_days`` after ``as_of_days`` (days since
    the epoch): its baskets over the days from its first basket to ``as_of_days``, that span at least
    ``horizon_days``; at most one basket a day. 0 for a shopper without a history."""
    owner, days = histories.owner, histories.days
    # a basket: a distinct (shopper, time); sorted runs, not np.unique(axis=1), whose row sort is slow
    order = np.lexsort((days, owner))
    sorted_owner, sorted_days = owner[order], days[order]
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = (sorted_owner[1:] != sorted_owner[:-1]) | (sorted_days[1:] != sorted_days[:-1])
    baskets = np.bincount(sorted_owner[starts], minlength=histories.num_shoppers)
    first = np.full(histories.num_shoppers, np.inf)
    known = histories.lengths > 0
    if known.any():  # each shopper's entries are one run from its offset (owner ascends)
        first[known] = np.minimum.reduceat(days, histories.offsets[:-1][known])
    if (days >= as_of_days).any():
        raise ValueError("a history reaches the scoring date: only purchases before it may be scored")
    span = np.maximum(as_of_days - first, horizon_days)
    return np.where(baskets > 0, np.minimum(horizon_days * baskets / span, horizon_days), 0.0)


def raw_score(
    ranker: Ranker,
    histories: Histories,
    searched_rows: np.ndarray,
    searched_scores: np.ndarray,
    campaign_rows: np.ndarray,
    as_of_days: float,
    horizon_days: float,
    popular: int = POPULAR,
    threads: int = 1,
) -> np.ndarray:
    """[S] both steps: the raw score (a rate: ``1 - exp(-raw)`` is the uncalibrated P(one of the
    campaign's products within ``horizon_days`` after ``as_of_days``); NaN for a shopper without a known
    product). ``searched_rows`` / ``_scores``
    [S, C]: the network's searched candidates ([S, 0] for a ranker fitted without a network)."""
    h = next_basket(ranker, histories, searched_rows, searched_scores, campaign_rows, popular, threads)
    return expected_baskets(histories, as_of_days, horizon_days) * h
