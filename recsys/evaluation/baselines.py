"""Baselines of docs/evaluation.md: global popularity, personal frequency (optionally decayed), item kNN,
and popularity among the products a shopper never bought (the reference of "new to you" lists).

Each ranking function returns vocabulary indices ``[n, min(k, vocab.num_products)]`` (int64, best
first; decode with ``vocab.decode``) for the given shoppers, computed from the train receipts alone.
Scores go through one path, sparse score rows -> dense blocks -> :func:`top_k`, where ties go to the
smaller index: higher train popularity, then smaller product id, as the protocol requires. A shopper
without train rows scores zero everywhere and so gets the popularity list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from recsys.data.schema import BASKET, PRODUCT, SHOPPER, TIMESTAMP
from recsys.data.sequences import positions
from recsys.data.vocabulary import NUM_RESERVED, PAD, PRODUCTS, UNK, Vocabulary, product_count, to_indices
from recsys.evaluation.metrics import top_k

# Rows of dense [rows, V] scores materialised at once (about 32 MB of float64).
_BLOCK_ELEMENTS = 1 << 22
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def popularity(vocab: Vocabulary, num_shoppers: int, k: int) -> np.ndarray:
    """The ``k`` most popular products for everyone: indices ``2 .. 2 + k`` (the all-zero scores' ranking)."""
    ranked = to_indices(np.arange(min(k, vocab.num_products)))
    return np.tile(ranked, (num_shoppers, 1))


def popularity_among_unbought(vocab: Vocabulary, history: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Per shopper, the ``k`` most popular products it never bought (``history``: the product ids each
    shopper bought in training), as vocabulary indices ``[n, k]``, ``PAD``-padded where fewer are left."""
    order = np.arange(NUM_RESERVED, vocab.size)  # popularity order, as :func:`popularity`'s
    ranked = np.full((len(history), k), PAD, dtype=np.int64)
    for row, bought in enumerate(history):
        # the first k + |bought| products hold the k best unbought ones
        head = order[: k + len(bought)]
        kept = head[~np.isin(head, vocab.encode(bought))][:k]
        ranked[row, : len(kept)] = kept
    return ranked


def purchase_counts(
    train: pa.Table,
    vocab: Vocabulary,
    shopper_ids: np.ndarray,
    cutoff: datetime | None = None,
    half_life_days: float | None = None,
) -> sp.csr_matrix:
    """``[n, vocab.size]`` weights: distinct train baskets of shopper i containing vocabulary item j.

    With ``half_life_days`` each basket weighs ``0.5 ** ((cutoff - basket time) / half_life_days)``,
    the basket time being its earliest row's timestamp; ``cutoff`` (tz-aware) is then required.
    Out-of-vocabulary products (``UNK``) get no weight; shoppers without train rows get an empty row.
    Rows follow ``shopper_ids`` (any order, repeats allowed).
    """
    if half_life_days is not None:
        if cutoff is None or cutoff.tzinfo is None:
            raise ValueError("half_life_days needs a timezone-aware cutoff to decay from")
        if half_life_days <= 0:
            raise ValueError(f"half_life_days must be positive; got {half_life_days}")
    shoppers, row_of = np.unique(np.asarray(shopper_ids, dtype=np.int64), return_inverse=True)
    rows = train.filter(pc.is_in(train.column(SHOPPER), value_set=pa.array(shoppers)))
    items = rows.select([SHOPPER, BASKET, PRODUCT]).group_by([SHOPPER, BASKET, PRODUCT], use_threads=False)
    items = items.aggregate([])  # a product bought twice in one basket counts once
    if half_life_days is None:
        weight = np.ones(items.num_rows)
    else:
        baskets = rows.group_by([SHOPPER, BASKET], use_threads=False).aggregate([(TIMESTAMP, "min")])
        items = items.join(baskets, keys=[SHOPPER, BASKET])
        age_days = _age_days(cutoff, pc.cast(items.column(f"{TIMESTAMP}_min"), pa.int64()).to_numpy())
        weight = 0.5 ** (age_days / half_life_days)
    row = np.searchsorted(shoppers, items.column(SHOPPER).to_numpy())
    col = vocab.encode(items.column(PRODUCT))
    keep = col != UNK
    row, col, weight = row[keep], col[keep], weight[keep]
    # Sum each (shopper, item) in a canonical order, so items bought in the same baskets get bit-equal
    # weights and tie exactly (scipy would sum duplicates in an arbitrary order).
    order = np.lexsort((weight, col, row))
    row, col, weight = row[order], col[order], weight[order]
    first = np.flatnonzero(np.concatenate([[True], (row[1:] != row[:-1]) | (col[1:] != col[:-1])]))
    total = np.add.reduceat(weight, first) if len(first) else weight
    counts = sp.csr_matrix((total, (row[first], col[first])), shape=(len(shoppers), vocab.size))
    return counts[row_of]


def decayed_baskets(
    receipts: pa.Table,
    products: np.ndarray,
    shopper_ids: np.ndarray,
    cutoff: datetime,
    half_life_days: float,
) -> np.ndarray:
    """[S] for each of ``shopper_ids`` (ascending), its baskets before ``cutoff`` holding one of
    ``products``, each weighing ``0.5 ** (age / half_life_days)`` from the basket's earliest row: the
    decayed purchase frequency of a set of products (a brand's, a category's), the reference a
    propensity must beat."""
    if cutoff.tzinfo is None or half_life_days <= 0:
        raise ValueError("decayed baskets need a timezone-aware cutoff and a positive half-life")
    kind = receipts.schema.field(TIMESTAMP).type
    rows = receipts.filter(
        pc.and_(
            pc.less(receipts.column(TIMESTAMP), pa.scalar(cutoff, kind)),
            pc.is_in(receipts.column(PRODUCT), pa.array(np.asarray(products, np.int64))),
        )
    )
    baskets = rows.group_by([SHOPPER, BASKET], use_threads=False).aggregate([(TIMESTAMP, "min")])
    age = _age_days(cutoff, pc.cast(baskets.column(f"{TIMESTAMP}_min"), pa.int64()).to_numpy())
    shoppers = np.asarray(shopper_ids, dtype=np.int64)
    owners = baskets.column(SHOPPER).to_numpy()
    at, known = positions(shoppers, owners)
    out = np.zeros(len(shoppers))
    np.add.at(out, at[known], 0.5 ** (age[known] / half_life_days))
    return out


def _age_days(cutoff: datetime, basket_us: np.ndarray) -> np.ndarray:
    """Days from basket times (microseconds since the epoch) to ``cutoff``."""
    return ((cutoff - _EPOCH) // timedelta(microseconds=1) - basket_us) / 86_400_000_000


def personal_frequency(
    train: pa.Table,
    vocab: Vocabulary,
    shopper_ids: np.ndarray,
    k: int,
    cutoff: datetime | None = None,
    half_life_days: float | None = None,
) -> np.ndarray:
    """Each shopper's items by :func:`purchase_counts` (decayed with ``half_life_days``), best first.

    Equal weights, zero included, are ordered by popularity then product id, so the list is padded
    with the most popular items the shopper has not bought.
    """
    weights = purchase_counts(train, vocab, shopper_ids, cutoff, half_life_days)
    return _rank(lambda rows: weights[rows], len(shopper_ids), vocab.size, k)


def item_knn(
    train: pa.Table, vocab: Vocabulary, shopper_ids: np.ndarray, k: int, neighbours: int | None = None
) -> np.ndarray:
    """Item-based kNN: ``score(s, j) = sum_i w(s, i) * cos(i, j)``.

    ``w`` is :func:`purchase_counts`; ``cos`` is the cosine similarity of items over the binary
    shopper x item matrix of every train shopper. ``cos(i, i) = 1``, so items already bought keep
    their own weight (grocery baskets are mostly repeats). With ``neighbours``, each item ``i`` keeps
    only its ``neighbours`` most similar items ``j`` (itself included). A dense V x V matrix is never
    built: scores are ``(W @ Xn.T) @ Xn`` per block of shoppers.
    """
    weights = purchase_counts(train, vocab, shopper_ids)
    bought = purchase_counts(train, vocab, pc.unique(train.column(SHOPPER)).to_numpy())
    bought.data[:] = 1.0
    norms = np.sqrt(np.asarray(bought.sum(axis=0)).ravel())
    normalised = (bought @ sp.diags(np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0))).tocsr()
    transposed = normalised.T.tocsr()
    if neighbours is None:
        return _rank(lambda rows: (weights[rows] @ transposed) @ normalised, len(shopper_ids), vocab.size, k)
    similarity = _nearest(transposed, normalised, neighbours)
    return _rank(lambda rows: weights[rows] @ similarity, len(shopper_ids), vocab.size, k)


def _nearest(transposed: sp.csr_matrix, normalised: sp.csr_matrix, neighbours: int) -> sp.csr_matrix:
    """Item x item cosine similarities, keeping each row's ``neighbours`` largest positive entries."""
    size = normalised.shape[1]
    step = max(1, _BLOCK_ELEMENTS // size)
    rows, cols, values = [], [], []
    for start in range(0, size, step):
        block = (transposed[start : start + step] @ normalised).toarray()
        best = top_k(block, neighbours)
        value = np.take_along_axis(block, best, axis=1)
        positive = value > 0
        rows.append(start + np.nonzero(positive)[0])
        cols.append(best[positive])
        values.append(value[positive])
    data = (np.concatenate(values), (np.concatenate(rows), np.concatenate(cols)))
    return sp.csr_matrix(data, shape=(size, size))


def _rank(scores: Callable[[slice], sp.csr_matrix], num_rows: int, size: int, k: int) -> np.ndarray:
    """Top-``k`` product indices of sparse score rows ``[num_rows, size]``, one dense block at a time.

    The reserved columns are cut off before ranking, so pad and unknown are never recommended.
    """
    step = max(1, _BLOCK_ELEMENTS // size)
    blocks = [np.empty((0, min(k, product_count(size))), dtype=np.int64)]
    for start in range(0, num_rows, step):
        dense = scores(slice(start, start + step)).toarray()[:, PRODUCTS]
        blocks.append(to_indices(top_k(dense, k)))
    return np.concatenate(blocks)
