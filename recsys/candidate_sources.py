"""Candidate sources of the ranker: which (shopper, product) pairs it scores.

The ranker (:mod:`recsys.ranker`) can only rank what a source proposes, so each source's candidate recall
(the share of next-basket products it proposes) bounds the final lists; ``training.rank`` measures it on
validation. A pair proposed by several sources is scored once and counted for the first of
:data:`SOURCES`. Each source's size is fixed by the ranker, never by how many products a caller wants,
so a ranking of k products is the prefix of a longer one. numpy only.
"""

from __future__ import annotations

import numpy as np

from recsys.data.sequences import concat_ranges
from recsys.inputs import first_occurrences, pair_keys, pair_member, split_pair_keys

SOURCES = ("history", "network", "co_purchase", "category")
TOP_CATEGORIES = 3  # the category source reads the shopper's most bought finest-level categories


def _best(owner: np.ndarray, key: np.ndarray, rows: np.ndarray, size: int) -> np.ndarray:
    """Positions of each owner's ``size`` smallest ``key`` entries (ties to the smaller row)."""
    order = np.lexsort((rows, key, owner))
    starts = np.flatnonzero(np.r_[True, owner[order][1:] != owner[order][:-1]]) if len(owner) else order
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.append(starts, len(order))))
    return order[rank < size]


def _category_candidates(
    history: tuple[np.ndarray, np.ndarray, np.ndarray],
    codes: np.ndarray,
    popularity: np.ndarray,
    size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Each shopper's ``size`` most popular never-bought products of its :data:`TOP_CATEGORIES` most
    bought categories (``codes`` [N], -1 unknown): (owner, rows) flat."""
    owner, rows, baskets = history
    known = codes[rows] >= 0
    span = int(codes.max(initial=0)) + 1
    keys, inverse = np.unique(pair_keys(owner[known], codes[rows[known]], span), return_inverse=True)
    weight = np.bincount(inverse, weights=baskets[known], minlength=len(keys))
    bought_in = np.bincount(inverse, minlength=len(keys))
    key_shopper, key_category = split_pair_keys(keys, span)
    top = _best(key_shopper, -weight, key_category, TOP_CATEGORIES)
    shopper, category, bought_in = key_shopper[top], key_category[top], bought_in[top]
    # products of each category, most popular first (ties to the smaller row)
    catalogue = np.flatnonzero(codes >= 0)
    order = catalogue[np.lexsort((catalogue, -popularity[catalogue], codes[catalogue]))]
    starts = np.searchsorted(codes[order], np.arange(span))
    sizes = np.diff(np.append(starts, len(order)))
    # enough of each category's best products that ``size`` new ones remain after the bought ones go
    take = np.minimum(sizes[category], size + bought_in)
    positions = concat_ranges(starts[category], take)
    o, r = np.repeat(shopper, take), order[positions]
    new = ~pair_member(o, r, owner, rows)
    o, r = o[new], r[new]
    keep = _best(o, -popularity[r], r, size)
    return o[keep], r[keep]


def gather(
    history: tuple[np.ndarray, np.ndarray, np.ndarray],
    network: tuple[np.ndarray, np.ndarray, np.ndarray],
    co_purchase: tuple[np.ndarray, np.ndarray, np.ndarray],
    categories: np.ndarray,
    popularity: np.ndarray,
    sizes: tuple[int, int, int, int],
    history_weight: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every candidate pair once: (owner, rows, source index into :data:`SOURCES`), sorted by owner, row.

    ``history``: the shopper's distinct products (owner, rows, baskets containing them); ``network``: its
    searched products (owner, rows, rank by score); ``co_purchase``: co-purchase neighbours of its recent
    baskets (owner, rows, score); ``categories`` [N, L] the products' category codes (the finest level,
    the last, is read); ``sizes``: how many new products the network, co-purchase and category sources
    propose per shopper, and how many history products (0: all), the ones of largest ``history_weight``
    (a decayed purchase count per history pair).
    """
    hist_owner, hist_rows, _ = history
    history_size, new_size, co_size, category_size = sizes
    kept = (
        np.arange(len(hist_rows))
        if history_size == 0
        else _best(hist_owner, -history_weight, hist_rows, history_size)
    )
    owners, rows = [hist_owner[kept]], [hist_rows[kept]]
    sources = [np.zeros(len(kept), np.int8)]

    def add(owner: np.ndarray, item_rows: np.ndarray, key: np.ndarray, size: int, source: int) -> None:
        new = ~pair_member(owner, item_rows, hist_owner, hist_rows)
        owner, item_rows, key = owner[new], item_rows[new], key[new]
        keep = _best(owner, key, item_rows, size)
        owners.append(owner[keep])
        rows.append(item_rows[keep])
        sources.append(np.full(len(keep), source, np.int8))

    add(*network, new_size, 1)
    if co_size:
        co_owner, co_rows, co_score = co_purchase
        add(co_owner, co_rows, -co_score, co_size, 2)
    if category_size and categories.shape[1]:
        cat_owner, cat_rows = _category_candidates(history, categories[:, -1], popularity, category_size)
        add(cat_owner, cat_rows, -popularity[cat_rows], category_size, 3)
    owner, item_rows, source = np.concatenate(owners), np.concatenate(rows), np.concatenate(sources)
    # a pair proposed twice keeps its first source
    span = int(item_rows.max(initial=0)) + 1
    first = first_occurrences(pair_keys(owner, item_rows, span))
    return owner[first], item_rows[first], source[first]
