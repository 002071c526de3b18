"""Ranking features: one numpy function from histories and candidate products to the ranker's inputs.

The ranker (:mod:`recsys.ranker`) scores (shopper, product) pairs. :func:`features` computes every pair's
row of :data:`FEATURES` from what serving, the batch job and training all have: the shopper's timed
history (:class:`recsys.inputs.Histories`), the network's searched candidates, and per-product
statistics of the training data (:class:`ItemStats`, computed by :func:`item_statistics` once per cutoff
and carried by checkpoints and bundles). Training's internal cutoffs, validation, test metrics, serving
and the batch job all call it, so a feature cannot mean one thing in the fit and another in production.

Candidates (:func:`features` returns them with their rows) come from the sources of
:data:`recsys.candidate_sources.SOURCES`: every product of the history, the network's best new products,
and, where the ranker was fitted with them, co-purchase neighbours of the recent baskets and popular new
products of the shopper's categories. Times are measured back from the shopper's own most recent
purchase, so features need no clock: the same history gives the same row whenever it is scored. A value
that does not exist (a cycle of a product bought once, the network score of a product it did not find)
is NaN, which the trees treat as missing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from recsys.candidate_sources import gather
from recsys.data.sequences import concat_ranges
from recsys.inputs import Histories, pair_keys, sorted_unique, split_pair_keys, stable_order

HALF_LIVES_DAYS = (14.0, 30.0, 90.0, 365.0)
RECENT_BASKETS = 5  # "bought in the shopper's last baskets" counts over this many
TREND_DAYS = 28.0  # a product's trend: baskets in the last TREND_DAYS over the mean of the 3 windows before
# A basket's weight is what one of its products is worth to a macro-averaged NDCG@SIZE_DEPTH: 1 / the ideal
# DCG of min(size, SIZE_DEPTH) hits (between Recall's 1 / size and a hit rate's 1).
SIZE_DEPTH = 10
_IDEAL_DCG = np.cumsum(1.0 / np.log2(np.arange(2, SIZE_DEPTH + 2)))
# Prior of the per-product repeat rate, (shoppers buying it twice + 1) / (shoppers buying it + 4): rare
# products are pulled towards 1/4 rather than to 0 or 1 on one or two shoppers.
_RATE_PRIOR = (1.0, 4.0)

PAIR = (
    "log_baskets",
    "basket_share",
    *(f"log_decay_{h:g}d" for h in HALF_LIVES_DAYS),
    "decay_share_30d",
    "log_days_since",
    "log_days_first",
    "log_interval",
    "cycle",
    "streak",
    "recent_share",
)
ITEM = ("log_popularity", "log_repeat_rate", "trend", "log_item_interval", "log_buyers")
SHOPPER = ("log_shopper_baskets", "log_distinct", "basket_size", "log_mean_gap", "log_last_gap")
CATEGORY = ("cat_share", "cat_log_days_since", "cat_log_decay_30d", "in_cat_share")
NETWORK = ("net_score", "net_gap", "net_rank")
CO_PURCHASE = ("co_score",)
SOURCE = ("is_new",)


def category_features(levels: int) -> tuple[str, ...]:
    """The category block's names for ``levels`` levels of product categories (level 0 the coarsest)."""
    return tuple(f"{name}_{level}" for level in range(levels) for name in CATEGORY)


def feature_names(levels: int) -> tuple[str, ...]:
    """Every column :func:`features` returns, in order, for ``levels`` category levels."""
    return (*PAIR, *ITEM, *SHOPPER, *category_features(levels), *NETWORK, *CO_PURCHASE, *SOURCE)


@dataclass(frozen=True)
class ItemStats:
    """Per item row statistics of the training data before one cutoff (one entry per catalogue row).

    ``categories`` [N, L] holds each product's category code at ``L`` levels (-1 unknown);
    ``neighbours`` / ``neighbour_scores`` [N, M] each product's co-purchase neighbours (-1 / 0 padding).
    """

    popularity: np.ndarray  # [N] baskets containing the product
    repeat_rate: np.ndarray  # [N] smoothed share of its buyers who bought it in two or more baskets
    trend: np.ndarray  # [N] log((last window + 1) / (mean of the previous three + 1))
    interval: np.ndarray  # [N] days between a buyer's purchases, over every repeat buyer (NaN: none)
    buyers: np.ndarray  # [N] shoppers who bought it
    categories: np.ndarray  # [N, L] int64 codes, -1 unknown
    neighbours: np.ndarray  # [N, M] int64 item rows, -1 padding
    neighbour_scores: np.ndarray  # [N, M] float64

    def __post_init__(self) -> None:
        n = len(self.popularity)
        vectors = (self.popularity, self.repeat_rate, self.trend, self.interval, self.buyers)
        if any(a.shape != (n,) for a in vectors):
            raise ValueError("item statistics need one entry per item row")
        if self.categories.ndim != 2 or len(self.categories) != n:
            raise ValueError("categories must be [items, levels]")
        if (
            self.neighbours.ndim != 2
            or len(self.neighbours) != n
            or self.neighbours.shape != self.neighbour_scores.shape
        ):
            raise ValueError("neighbours and neighbour_scores must be [items, M]")
        if not ((self.repeat_rate > 0) & (self.repeat_rate <= 1)).all():
            raise ValueError("repeat_rate entries must be in (0, 1]")
        finite = (self.popularity, self.trend, self.buyers, self.neighbour_scores)
        if not all(np.isfinite(a).all() for a in finite) or (self.popularity < 0).any():
            raise ValueError("popularity, trend, buyers and neighbour scores must be finite, popularity >= 0")
        if (self.categories < -1).any() or (self.neighbours < -1).any() or (self.neighbours >= n).any():
            raise ValueError("category codes must be >= -1 and neighbours item rows or -1")

    @property
    def num_items(self) -> int:
        return len(self.popularity)

    @cached_property
    def category_levels(self) -> tuple[tuple[np.ndarray, int], ...]:
        """Per level, the products' codes [N] (contiguous, where a column of ``categories`` is strided) and
        the span of the codes: read by every request, so computed once."""
        columns = (np.ascontiguousarray(self.categories[:, level]) for level in range(self.levels))
        return tuple((code, int(code.max(initial=0)) + 1) for code in columns)

    @property
    def levels(self) -> int:
        return self.categories.shape[1]


@dataclass(frozen=True)
class _Entries:
    """A history's distinct (shopper, product, basket) entries, sorted by shopper, product, then time."""

    owner: np.ndarray
    rows: np.ndarray
    basket: np.ndarray  # global basket id: baskets are numbered by shopper, then time
    age: np.ndarray  # days from the basket to the shopper's last basket
    reverse: np.ndarray  # the basket's position from the shopper's last (0 = the last basket)
    shopper_baskets: np.ndarray  # [S]
    shopper_rows: np.ndarray  # [S] distinct (basket, product) entries per shopper
    basket_age: np.ndarray  # [num baskets] each basket's age
    basket_owner: np.ndarray  # [num baskets]
    basket_weight: np.ndarray  # [num baskets] each basket's :func:`basket_weights` of its distinct products


def _entries(histories: Histories) -> _Entries:
    owner, rows, days = histories.owner, histories.rows, histories.days
    order = np.lexsort((days, owner))
    o, r, t = owner[order], rows[order], days[order]
    new_basket = np.ones(len(o), dtype=bool)
    new_basket[1:] = (o[1:] != o[:-1]) | (t[1:] != t[:-1])
    basket = np.cumsum(new_basket) - 1
    basket_owner = o[new_basket]
    shopper_baskets = np.bincount(basket_owner, minlength=histories.num_shoppers)
    first_basket = np.concatenate([[0], np.cumsum(shopper_baskets)[:-1]])
    last_day = np.full(histories.num_shoppers, np.nan)
    last_day[basket_owner] = t[new_basket]  # baskets ascend in time: the last write is the latest
    basket_age = last_day[basket_owner] - t[new_basket]
    ordinal = np.arange(len(basket_owner)) - first_basket[basket_owner]
    basket_reverse = shopper_baskets[basket_owner] - 1 - ordinal

    o, r, b = _distinct_tuples(
        (o, r, basket), (histories.num_shoppers, r.max(initial=0) + 1, len(basket_owner))
    )
    return _Entries(
        o,
        r,
        b,
        basket_age[b],
        basket_reverse[b],
        shopper_baskets,
        np.bincount(o, minlength=histories.num_shoppers),
        basket_age,
        basket_owner,
        basket_weights(np.bincount(b, minlength=len(basket_owner))),
    )


def basket_weights(sizes: np.ndarray) -> np.ndarray:
    """Each basket's weight [n] from its number of distinct products [n] (>= 1): one over the ideal DCG of
    min(size, :data:`SIZE_DEPTH`) hits, so a product of a 1-product basket weighs 1 and one of a basket of
    10 or more about 0.22."""
    return 1.0 / _IDEAL_DCG[np.clip(sizes, 1, SIZE_DEPTH) - 1]


@dataclass(frozen=True)
class _Pairs:
    """Distinct (shopper, product) pairs of some histories and their purchase statistics."""

    owner: np.ndarray  # [P]
    rows: np.ndarray  # [P]
    baskets: np.ndarray  # [P] baskets containing the product
    decayed: tuple[np.ndarray, ...]  # per half-life: sum over those baskets of 2^(-age / half-life)
    days_since: np.ndarray  # [P] days from the product's last purchase to the shopper's last purchase
    days_first: np.ndarray  # [P] days from its first purchase to the shopper's last purchase
    streak: np.ndarray  # [P] the shopper's most recent baskets in a row that contain it
    recent: np.ndarray  # [P] of the shopper's last RECENT_BASKETS baskets, how many contain it
    weight: np.ndarray  # [P] sum of the basket weights of those baskets


def _runs(keys: tuple[np.ndarray, ...]) -> np.ndarray:
    """Start positions of the runs of equal key tuples (arrays sorted by them)."""
    if not len(keys[0]):
        return np.zeros(0, dtype=np.int64)
    start = np.zeros(len(keys[0]), dtype=bool)
    start[0] = True
    for key in keys:
        start[1:] |= key[1:] != key[:-1]
    return np.flatnonzero(start)


def _distinct_tuples(columns: tuple[np.ndarray, ...], spans: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """The distinct rows of some non-negative int64 ``columns`` (column i in ``[0, spans[i])``), sorted by
    the first column, then the next: the columns packed into one int64 key and sorted, several times
    cheaper than ``np.lexsort`` of the columns, which it falls back on where the key would not fit."""
    if math.prod(max(int(span), 1) for span in spans) <= np.iinfo(np.int64).max:
        keys = np.zeros(len(columns[0]), dtype=np.int64)
        for column, span in zip(columns, spans, strict=True):
            keys = keys * max(int(span), 1) + column
        keys = sorted_unique(keys)
        out = []
        for span in spans[:0:-1]:
            keys, column = np.divmod(keys, max(int(span), 1))
            out.append(column)
        return (keys, *out[::-1])
    ordered = tuple(column[np.lexsort(columns[::-1])] for column in columns)
    first = _runs(ordered)
    return tuple(column[first] for column in ordered)


def _pairs(entries: _Entries) -> _Pairs:
    o, r, age, reverse = entries.owner, entries.rows, entries.age, entries.reverse
    starts = _runs((o, r))
    # baskets ascend within a pair: its last entry is the latest (no entries: no pairs)
    ends = np.append(starts[1:], len(o))[: len(starts)] - 1
    counts = ends - starts + 1
    decayed = tuple(np.add.reduceat(np.exp2(-age / h), starts) if len(o) else age for h in HALF_LIVES_DAYS)
    # entry j from a pair's end (0 = latest) continues the streak while it is the shopper's basket j from
    # the end; the streak is the first j where it is not
    from_end = np.repeat(ends, counts) - np.arange(len(o))
    breaks = np.where(reverse == from_end, np.iinfo(np.int64).max, from_end)
    streak = np.minimum(np.minimum.reduceat(breaks, starts), counts) if len(o) else counts
    recent = np.add.reduceat((reverse < RECENT_BASKETS).astype(np.int64), starts) if len(o) else counts
    weights = entries.basket_weight[entries.basket]
    weight = np.add.reduceat(weights, starts) if len(o) else weights
    return _Pairs(o[starts], r[starts], counts, decayed, age[ends], age[starts], streak, recent, weight)


def item_statistics(
    histories: Histories,
    categories: np.ndarray,
    neighbours: int = 0,
    recent_baskets: int = RECENT_BASKETS,
) -> ItemStats:
    """:class:`ItemStats` of every shopper's ``histories`` (the training data before a cutoff, whose end
    is the latest purchase in them); ``categories`` [N, L] are the products' category codes.

    ``neighbours`` > 0 keeps each product's best ``neighbours`` co-purchase neighbours: products bought in
    the same baskets, scored by the count of shared baskets over the square root of both popularities
    (cosine over baskets). Only baskets among each shopper's last ``recent_baskets`` are counted once
    more, so the table stays small; a product's neighbours never include itself.
    """
    num_items = len(categories)
    if len(histories.rows) and histories.rows.max() >= num_items:
        raise ValueError(f"history item rows must be < {num_items}, the catalogue size")
    entries = _entries(histories)
    pairs = _pairs(entries)
    buyers = np.bincount(pairs.rows, minlength=num_items).astype(np.float64)
    repeaters = np.bincount(pairs.rows[pairs.baskets >= 2], minlength=num_items)
    popularity = np.bincount(pairs.rows, weights=pairs.baskets, minlength=num_items)
    span = np.bincount(pairs.rows, weights=pairs.days_first - pairs.days_since, minlength=num_items)
    gaps = np.bincount(pairs.rows, weights=pairs.baskets - 1.0, minlength=num_items)
    interval = np.where(gaps > 0, span / np.maximum(gaps, 1), np.nan)
    # the trend needs a clock: the end of these histories (their latest purchase), fixed when they are fitted
    days = histories.days
    end = days.max(initial=0.0)
    day_of_entry = np.empty(len(entries.rows))
    if len(days):
        last = np.full(histories.num_shoppers, -np.inf)
        np.maximum.at(last, histories.owner, days)
        day_of_entry = last[entries.owner] - entries.age
    window = np.floor((end - day_of_entry) / TREND_DAYS).astype(np.int64)
    recent = np.bincount(entries.rows[window == 0], minlength=num_items)
    before = np.bincount(entries.rows[(window >= 1) & (window <= 3)], minlength=num_items) / 3.0
    trend = np.log((recent + 1.0) / (before + 1.0))
    table, scores = _co_purchase(entries, num_items, popularity, neighbours, recent_baskets)
    return ItemStats(
        popularity,
        (repeaters + _RATE_PRIOR[0]) / (buyers + _RATE_PRIOR[1]),
        trend,
        interval,
        buyers,
        np.asarray(categories, dtype=np.int64),
        table,
        scores,
    )


def _co_purchase(
    entries: _Entries, num_items: int, popularity: np.ndarray, neighbours: int, recent_baskets: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each product's best ``neighbours`` co-purchased products [N, M] and their cosine scores."""
    if neighbours <= 0 or not len(entries.rows):
        return np.full((num_items, 0), -1, dtype=np.int64), np.zeros((num_items, 0))
    keep = entries.reverse < recent_baskets
    basket, rows = entries.basket[keep], entries.rows[keep]
    order = np.lexsort((rows, basket))
    basket, rows = basket[order], rows[order]
    starts = _runs((basket,))
    sizes = np.diff(np.append(starts, len(basket)))
    # every ordered pair of products within a basket: entry e pairs with each entry of its own basket
    size_of_entry = np.repeat(sizes, sizes)
    first = np.repeat(np.arange(len(basket)), size_of_entry)
    second = concat_ranges(np.repeat(starts, sizes), size_of_entry)
    a, b = rows[first], rows[second]
    distinct = a != b
    keys, shared = np.unique(pair_keys(a[distinct], b[distinct], num_items), return_counts=True)
    a, b = split_pair_keys(keys, num_items)
    score = shared / np.sqrt(np.maximum(popularity[a], 1) * np.maximum(popularity[b], 1))
    order = np.lexsort((b, -score, a))
    a, b, score = a[order], b[order], score[order]
    rank = np.arange(len(a)) - np.repeat(_runs((a,)), np.diff(np.append(_runs((a,)), len(a))))
    top = rank < neighbours
    table = np.full((num_items, neighbours), -1, dtype=np.int64)
    scores = np.zeros((num_items, neighbours))
    table[a[top], rank[top]], scores[a[top], rank[top]] = b[top], score[top]
    return table, scores


def _lookup(
    owner: np.ndarray, rows: np.ndarray, table_owner: np.ndarray, table_rows: np.ndarray, span: int
) -> np.ndarray:
    """Position in the (owner, row)-sorted table of each (owner, row) pair, or -1 where it is absent."""
    keys = pair_keys(table_owner, table_rows, span)
    wanted = pair_keys(owner, rows, span)
    at = np.searchsorted(keys, wanted)
    at = np.minimum(at, max(len(keys) - 1, 0))
    found = (len(keys) > 0) & (keys[at] == wanted) if len(keys) else np.zeros(len(wanted), dtype=bool)
    return np.where(found, at, -1)


def _take(values: np.ndarray, at: np.ndarray, missing: float) -> np.ndarray:
    """``values[at]`` where ``at`` >= 0, else ``missing`` (``at`` from :func:`_lookup`)."""
    out = np.full(len(at), missing, dtype=np.float64)
    out[at >= 0] = values[at[at >= 0]]
    return out


def _searched(
    rows: np.ndarray, scores: np.ndarray, depth: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The searched candidates each shopper surely has, whatever the search size: the best ``depth[s]`` by
    score (ties to the smaller row), flat as (owner, rows, scores, rank) sorted by owner then row."""
    rows = np.asarray(rows, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    key = -np.nan_to_num(scores, nan=-np.inf)
    # a search returns its candidates best first: the sort is needed only where ties are out of row order
    # (compared, not subtracted: padding's infinite keys would make NaN differences)
    later, earlier = key[:, 1:], key[:, :-1]
    if not ((later > earlier) | ((later == earlier) & (rows[:, 1:] >= rows[:, :-1]))).all():
        order = np.lexsort((rows, key), axis=-1)
        rows, scores = np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)
    owner = np.broadcast_to(np.arange(rows.shape[0], dtype=np.int64)[:, None], rows.shape)
    rank = np.broadcast_to(np.arange(rows.shape[1], dtype=np.int64)[None, :], rows.shape)
    valid = (rows >= 0) & np.isfinite(scores) & (rank < depth[:, None])
    # by owner, then row (then rank, the order a stable sort by the first two keeps)
    o, r, k = _distinct_tuples(
        (owner[valid], rows[valid], rank[valid]), (rows.shape[0], rows.max(initial=0) + 1, rows.shape[1])
    )
    return o, r, scores[o, k], k


@dataclass(frozen=True)
class Candidates:
    """Every candidate (shopper, product) pair, flat, and the feature rows of :data:`feature_names`."""

    owner: np.ndarray  # [M]
    rows: np.ndarray  # [M]
    source: np.ndarray  # [M] int8 index into recsys.candidate_sources.SOURCES: where the pair came from
    x: np.ndarray  # [M, F] float64
    size_factor: np.ndarray  # [M] float64: what a hit on the pair is worth (:func:`features`)


def features(
    histories: Histories,
    rows: np.ndarray,
    scores: np.ndarray,
    stats: ItemStats,
    new_candidates: int,
    co_purchase_candidates: int = 0,
    category_candidates: int = 0,
    history_candidates: int = 0,
    size_prior: float | None = None,
) -> Candidates:
    """Every candidate of every shopper, its feature row (columns :func:`feature_names`) and, with a
    ``size_prior``, its size factor (else 1): how much more a hit on the product is worth to the
    shopper's macro-averaged Recall and NDCG than one of its average basket (:func:`_size_factor`).

    Candidates, each pair once (a product of several sources counts as the first): the shopper's
    ``history_candidates`` history products of the largest 90-day decayed counts (0: every one);
    the shopper's best ``new_candidates`` searched products new to it; its best ``co_purchase_candidates``
    new co-purchase neighbours of its last :data:`RECENT_BASKETS` baskets; the ``category_candidates``
    most popular new products of its most bought finest-level category.

    ``rows`` / ``scores`` [S, C] are the network's searched candidates per shopper (-1 / NaN for none), at
    least ``new_candidates`` + the shopper's distinct products of them
    (:func:`recsys.scoring.search_size`); only that many best ones are read, so the answer does not depend
    on how many more were searched.
    """
    context = _Context.of(histories, rows, scores, stats, new_candidates)
    owner, item_rows, source = gather(
        (context.pairs.owner, context.pairs.rows, context.pairs.baskets),
        (context.searched[0], context.searched[1], context.searched[3]),  # owner, rows, rank
        context.co,
        stats.categories,
        stats.popularity,
        (history_candidates, new_candidates, co_purchase_candidates, category_candidates),
        context.pairs.decayed[HALF_LIVES_DAYS.index(90.0)],
    )
    factor = (
        np.ones(len(owner))
        if size_prior is None
        else _size_factor(context.entries, context.pairs, owner, item_rows, stats.num_items, size_prior)
    )
    return Candidates(owner, item_rows, source, context.matrix(owner, item_rows), factor)


def _size_factor(
    entries: _Entries, pairs: _Pairs, owner: np.ndarray, rows: np.ndarray, span: int, prior: float
) -> np.ndarray:
    """How much more a hit on each (shopper ``owner``, item ``rows``) pair is worth than one of the
    shopper's average basket [M]: the mean :func:`basket_weights` of the shopper's baskets that contain
    the product over the mean of all its baskets, with ``prior`` baskets of the shopper's mean added to
    the product's (1 for a product it never bought).

    A macro-averaged metric divides a household's hits by its next basket's size (Recall) or ideal DCG
    (NDCG), so the expected metric of a list is the sum over its products of P(in the basket) times
    E[basket weight | in the basket]. The ranker gives the probability; a product the household buys on
    small trips (milk, bread) is worth more per hit than one it buys only in its big weekly shop, and
    the shopper's own baskets estimate by how much, shrunk by the prior where they are few.
    """
    shoppers = len(entries.shopper_baskets)
    # not in place: with no basket at all, bincount ignores the weights and counts in integers
    mean = np.bincount(entries.basket_owner, weights=entries.basket_weight, minlength=shoppers) / np.maximum(
        entries.shopper_baskets, 1
    )
    at = _lookup(owner, rows, pairs.owner, pairs.rows, span)
    bought = at >= 0
    factor = np.ones(len(owner))
    shopper_mean = mean[owner[bought]]
    factor[bought] = (pairs.weight[at[bought]] + prior * shopper_mean) / (
        (pairs.baskets[at[bought]] + prior) * shopper_mean
    )
    return factor


def pair_features(
    histories: Histories,
    owner: np.ndarray,
    rows: np.ndarray,
    searched_rows: np.ndarray,
    searched_scores: np.ndarray,
    stats: ItemStats,
    new_candidates: int,
) -> np.ndarray:
    """The feature rows [M, F] of given (shopper position ``owner``, item ``rows``) pairs, whatever source
    would or would not have proposed them (a campaign's products, say); the network features read the
    same best searched candidates as :func:`features` with ``new_candidates``."""
    owner, rows = np.asarray(owner, dtype=np.int64), np.asarray(rows, dtype=np.int64)
    if owner.shape != rows.shape or owner.ndim != 1:
        raise ValueError(f"owner {owner.shape} and rows {rows.shape} must be the same 1-D shape")
    if len(rows) and (rows.min() < 0 or rows.max() >= stats.num_items):
        raise ValueError(f"pair item rows must be in [0, {stats.num_items})")
    if len(owner) and (owner.min() < 0 or owner.max() >= histories.num_shoppers):
        raise ValueError(f"pair owners must be in [0, {histories.num_shoppers})")
    context = _Context.of(histories, searched_rows, searched_scores, stats, new_candidates)
    return context.matrix(owner, rows)


@dataclass(frozen=True)
class _Context:
    """What every feature row of some histories reads: their entries and pairs, the network's searched
    candidates and the co-purchase neighbours of their recent baskets."""

    histories: Histories
    entries: _Entries
    pairs: _Pairs
    searched: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # owner, rows, scores, rank
    co: tuple[np.ndarray, np.ndarray, np.ndarray]  # owner, rows, score
    stats: ItemStats

    @classmethod
    def of(
        cls, histories: Histories, rows: np.ndarray, scores: np.ndarray, stats: ItemStats, new_candidates: int
    ) -> _Context:
        if not histories.timed.all():
            raise ValueError("ranking needs the purchase times of every history")
        if len(histories.rows) and histories.rows.max() >= stats.num_items:
            raise ValueError(f"history item rows must be < {stats.num_items}, the ranker's catalogue size")
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[0] != histories.num_shoppers:
            raise ValueError(f"candidate rows {rows.shape} for {histories.num_shoppers} histories")
        entries = _entries(histories)
        pairs = _pairs(entries)
        distinct = np.bincount(pairs.owner, minlength=histories.num_shoppers)
        searched = _searched(rows, scores, new_candidates + distinct)
        co = _co_candidates(*_recent_products(entries), stats)
        return cls(histories, entries, pairs, searched, co, stats)

    def matrix(self, owner: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return _matrix(
            self.histories, self.entries, self.pairs, owner, rows, self.searched, self.co, self.stats
        )


def _matrix(
    histories: Histories,
    entries: _Entries,
    pairs: _Pairs,
    owner: np.ndarray,
    rows: np.ndarray,
    searched: tuple[np.ndarray, ...],
    co: tuple[np.ndarray, np.ndarray, np.ndarray],
    stats: ItemStats,
) -> np.ndarray:
    names = feature_names(stats.levels)
    column = {name: i for i, name in enumerate(names)}
    x = np.full((len(owner), len(names)), np.nan)
    span = max(int(stats.num_items), 1)
    at = _lookup(owner, rows, pairs.owner, pairs.rows, span)
    bought = at >= 0
    p = at[bought]
    shopper_baskets = entries.shopper_baskets.astype(np.float64)
    baskets = np.zeros(len(owner))
    baskets[bought] = pairs.baskets[p]

    def put(name: str, values: np.ndarray, where: np.ndarray | None = None) -> None:
        if where is None:
            x[:, column[name]] = values
        else:
            x[where, column[name]] = values

    # the shopper's own purchases of the product: 0 for a product it never bought, NaN where undefined
    put("log_baskets", np.log1p(baskets))
    put("basket_share", baskets / np.maximum(shopper_baskets[owner], 1))
    # the shopper's 30-day decayed basket count, the share's denominator (the one half-life a share reads)
    basket_decay = np.bincount(
        entries.basket_owner, weights=np.exp2(-entries.basket_age / 30.0), minlength=histories.num_shoppers
    )
    for i, h in enumerate(HALF_LIVES_DAYS):
        decayed = np.zeros(len(owner))
        decayed[bought] = pairs.decayed[i][p]
        put(f"log_decay_{h:g}d", np.log1p(decayed))
        if h == 30.0:
            put("decay_share_30d", decayed / np.maximum(basket_decay[owner], 1e-9))
    put("log_days_since", np.log1p(pairs.days_since[p]), bought)
    put("log_days_first", np.log1p(pairs.days_first[p]), bought)
    repeated = bought.copy()
    repeated[bought] = pairs.baskets[p] >= 2
    q = at[repeated]
    interval = (pairs.days_first[q] - pairs.days_since[q]) / (pairs.baskets[q] - 1)
    put("log_interval", np.log1p(interval), repeated)
    put("cycle", np.log((pairs.days_since[q] + 1) / (interval + 1)), repeated)
    streak = np.zeros(len(owner))
    streak[bought] = pairs.streak[p]
    put("streak", streak)
    recent = np.zeros(len(owner))
    recent[bought] = pairs.recent[p]
    put("recent_share", recent / np.minimum(np.maximum(shopper_baskets[owner], 1), RECENT_BASKETS))

    # the product across all shoppers
    put("log_popularity", np.log1p(stats.popularity[rows]))
    put("log_repeat_rate", np.log(stats.repeat_rate[rows]))
    put("trend", stats.trend[rows])
    put("log_item_interval", np.log1p(stats.interval[rows]))
    put("log_buyers", np.log1p(stats.buyers[rows]))

    # the shopper
    put("log_shopper_baskets", np.log1p(shopper_baskets[owner]))
    put("log_distinct", np.log1p(np.bincount(pairs.owner, minlength=histories.num_shoppers)[owner]))
    put("basket_size", (entries.shopper_rows / np.maximum(shopper_baskets, 1))[owner])
    first_age = np.zeros(histories.num_shoppers)
    np.maximum.at(first_age, entries.basket_owner, entries.basket_age)
    mean_gap = np.where(shopper_baskets > 1, first_age / np.maximum(shopper_baskets - 1, 1), np.nan)
    put("log_mean_gap", np.log1p(mean_gap[owner]))
    last_gap = np.full(histories.num_shoppers, np.nan)
    second = entries.basket_owner[1:] == entries.basket_owner[:-1]  # basket i + 1 of the same shopper
    last_gap[entries.basket_owner[:-1][second]] = entries.basket_age[:-1][second]  # the latest write wins
    put("log_last_gap", np.log1p(last_gap[owner]))

    # the product's categories in the shopper's history
    for level, (code, cat_span) in enumerate(stats.category_levels):
        known = code[entries.rows] >= 0
        cat_owner, cat_code, cat_basket = (
            entries.owner[known],
            code[entries.rows[known]],
            entries.basket[known],
        )
        cat_owner, cat_code, cat_basket = _distinct_tuples(
            (cat_owner, cat_code, cat_basket),
            (histories.num_shoppers, cat_span, len(entries.basket_owner)),
        )
        starts = _runs((cat_owner, cat_code))
        counts = np.diff(np.append(starts, len(cat_owner)))
        ages = entries.basket_age[cat_basket]
        cat_ages = np.minimum.reduceat(ages, starts) if len(starts) else ages
        cat_decay = np.add.reduceat(np.exp2(-ages / 30.0), starts) if len(starts) else ages
        candidate_code = code[rows]
        hit = _lookup(owner, np.maximum(candidate_code, 0), cat_owner[starts], cat_code[starts], cat_span)
        hit[candidate_code < 0] = -1
        found = hit >= 0
        cat_baskets = _take(counts.astype(np.float64), hit, 0.0)
        put(
            f"cat_share_{level}",
            np.where(candidate_code >= 0, cat_baskets / np.maximum(shopper_baskets[owner], 1), np.nan),
        )
        put(f"cat_log_days_since_{level}", np.log1p(cat_ages[hit[found]]), found)
        put(
            f"cat_log_decay_30d_{level}",
            np.log1p(_take(cat_decay, hit, 0.0)),
        )
        put(f"in_cat_share_{level}", baskets[found] / cat_baskets[found], found)

    # the network: its score, the gap to the shopper's best score, and the rank, where it searched the pair
    net_owner, net_rows, net_scores, net_rank = searched
    hit = _lookup(owner, rows, net_owner, net_rows, span)
    found = hit >= 0
    best = np.full(histories.num_shoppers, np.nan)
    best[net_owner[net_rank == 0]] = net_scores[net_rank == 0]
    put("net_score", net_scores[hit[found]], found)
    put("net_gap", net_scores[hit[found]] - best[owner[found]], found)
    put("net_rank", np.log1p(net_rank[hit[found]]), found)

    # co-purchase: the product's best score as a neighbour of the shopper's last baskets' products
    co_owner, co_rows, co_scores = co
    hit = _lookup(owner, rows, co_owner, co_rows, span)
    put("co_score", _take(co_scores, hit, 0.0))
    put("is_new", (~bought).astype(np.float64))
    return x


def _co_candidates(
    recent_owner: np.ndarray, recent_rows: np.ndarray, stats: ItemStats
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (shopper, product) that is a co-purchase neighbour of a product of the shopper's last
    :data:`RECENT_BASKETS` baskets, with the sum of those neighbour scores: flat, sorted by owner, row."""
    neighbours = stats.neighbours.shape[1]
    if neighbours == 0 or not len(recent_rows):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    o = np.repeat(recent_owner, neighbours)
    n = stats.neighbours[recent_rows].reshape(-1)
    s = stats.neighbour_scores[recent_rows].reshape(-1)
    keep = n >= 0
    span = stats.num_items
    keys = pair_keys(o[keep], n[keep], span)
    order = stable_order(keys)  # stable: each pair's scores are summed in the table's order
    keys = keys[order]
    first = np.ones(len(keys), dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    run = np.cumsum(first) - 1  # each entry's pair
    distinct = keys[first]
    return *split_pair_keys(distinct, span), np.bincount(run, weights=s[keep][order], minlength=len(distinct))


def _recent_products(entries: _Entries) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (owner, row) of the products in each shopper's last :data:`RECENT_BASKETS` baskets."""
    recent = entries.reverse < RECENT_BASKETS
    o, r = entries.owner[recent], entries.rows[recent]
    first = _runs((o, r))  # entries are sorted by owner then row
    return o[first], r[first]
