"""Top-k selection and the ranking metrics of docs/evaluation.md (pure numpy).

Conventions shared by the whole project:
- a ranking is an ``[n, K]`` int64 array, best first; ``EMPTY`` (-1) marks a slot with nothing in it
  (fewer candidates than K, or a vocabulary index that decodes to no product) and is never a hit;
- ties between scores go to the smaller vocabulary index, which is the protocol's tie-break (higher
  train popularity, then smaller product id) because the vocabulary is ordered that way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recsys.inputs import sorted_unique

EMPTY = -1

# Rows of a [rows, V] score block handled at once, so temporaries stay around 32 MB per array.
_BLOCK_ELEMENTS = 1 << 22


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores of each row, ``[n, min(k, V)]`` int64, highest first.

    Ties go to the smaller index, so the result is deterministic whatever the tie pattern. A slot
    whose score is ``-inf`` is returned as ``EMPTY`` (-1): mask candidates with ``-inf`` and they are
    never recommended, even when fewer than ``k`` finite scores remain. NaN scores raise ValueError.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [n, V]; got shape {scores.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    n, v = scores.shape
    width = min(k, v)
    out = np.empty((n, width), dtype=np.int64)
    if width == 0:
        return out
    rows = max(1, _BLOCK_ELEMENTS // v)
    for start in range(0, n, rows):
        out[start : start + rows] = _top_k_block(scores[start : start + rows], width)
    return out


def _top_k_block(scores: np.ndarray, k: int) -> np.ndarray:
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; rankings of NaN are undefined")
    n, v = scores.shape
    # Everything above the k-th largest score is in; the remaining places go to the scores equal to
    # it with the smallest indices (argpartition alone would pick among those arbitrarily).
    kth = np.partition(scores, v - k, axis=1)[:, v - k, None]
    above = scores > kth
    at = scores == kth
    room = k - above.sum(axis=1, keepdims=True)
    chosen = above | (at & (np.cumsum(at, axis=1) <= room))
    index = np.nonzero(chosen)[1].reshape(n, k)  # ascending index within each row
    values = np.take_along_axis(scores, index, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")  # stable: equal scores keep index order
    ranked = np.take_along_axis(index, order, axis=1)
    ranked[np.take_along_axis(values, order, axis=1) == -np.inf] = EMPTY
    return ranked


def ranking_metrics(
    ranked: np.ndarray,
    targets: Sequence[np.ndarray],
    ks: Sequence[int] = (10, 20),
    history: Sequence[np.ndarray] | None = None,
    num_products: int | None = None,
) -> dict[str, float]:
    """Macro-averaged metrics of ranked product ids ``[n, K]`` against each shopper's target ids.

    For each ``k`` in ``ks`` (a ranking narrower than ``k`` is scored on what it has):
    - ``recall@k`` = hits in the top k / |target|;
    - ``ndcg@k``: binary gains, discount ``1 / log2(rank + 1)``, ideal DCG over ``min(|target|, k)``;
    - ``hr@k``: 1 if any hit; ``mrr@k``: 1 / rank of the first hit, 0 without one;
    - ``coverage@k`` (with ``num_products``): distinct ids in all top-k lists / ``num_products``;
    - ``recall@k_repeat`` / ``recall@k_explore`` (with ``history``, the ids each shopper bought in
      train): recall of the target restricted to repeat / new items, averaged over the shoppers that
      have such items (NaN if none has); plus ``repeat_share``, repeats among all target items pooled.
    ``num_shoppers`` is n. Targets and history are sets (duplicates count once). ``EMPTY`` slots are
    never hits; a product repeated within one ranked row, or an empty target, raises ValueError.
    """
    ranked = np.asarray(ranked, dtype=np.int64)
    if ranked.ndim != 2:
        raise ValueError(f"ranked must be 2-D [n, K]; got shape {ranked.shape}")
    n = len(ranked)
    if n == 0:
        raise ValueError("no shoppers to evaluate")
    if len(targets) != n:
        raise ValueError(f"{n} ranked rows but {len(targets)} targets")
    if history is not None and len(history) != n:
        raise ValueError(f"{n} ranked rows but {len(history)} histories")
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1; got {list(ks)}")
    if num_products is not None and num_products < 1:
        raise ValueError(f"num_products must be >= 1; got {num_products}")
    bought_ids = [] if history is None else history
    hit, size, codes, ranked_keys, target_keys = _hits(ranked, targets, bought_ids)
    target_rows = target_keys // len(codes)
    if history is not None:
        history_keys = _pair_keys(history, codes)
        bought = _contained(ranked_keys, history_keys)
        repeat_size = np.bincount(target_rows[_contained(target_keys, history_keys)], minlength=n)

    discount = 1.0 / np.log2(np.arange(2, max(ks) + 2))
    ideal = np.cumsum(discount)
    metrics: dict[str, float] = {}
    for k in ks:
        top = hit[:, :k]
        hits = top.sum(axis=1)
        metrics[f"recall@{k}"] = float(np.mean(hits / size))
        dcg = top @ discount[: top.shape[1]]
        metrics[f"ndcg@{k}"] = float(np.mean(dcg / ideal[np.minimum(size, k) - 1]))
        metrics[f"hr@{k}"] = float(np.mean(hits > 0))
        reciprocal = np.where(top, 1.0 / np.arange(1, top.shape[1] + 1), 0.0)
        metrics[f"mrr@{k}"] = float(np.mean(reciprocal.max(axis=1, initial=0.0)))
        if num_products is not None:
            listed = ranked[:, :k]
            metrics[f"coverage@{k}"] = len(sorted_unique(listed[listed != EMPTY])) / num_products
        if history is not None:
            repeats = top & bought[:, :k]
            metrics[f"recall@{k}_repeat"] = _mean_ratio(repeats.sum(axis=1), repeat_size)
            metrics[f"recall@{k}_explore"] = _mean_ratio((top & ~repeats).sum(axis=1), size - repeat_size)
    if history is not None:
        metrics["repeat_share"] = float(repeat_size.sum() / size.sum())
    metrics["num_shoppers"] = float(n)
    return metrics


def _hits(
    ranked: np.ndarray, targets: Sequence[np.ndarray], extra_ids: Sequence[np.ndarray] = ()
) -> tuple[np.ndarray, ...]:
    """(hit [n, K] bool, target sizes [n], product codes, ranked keys, sorted target keys) of rankings
    against targets; ``extra_ids`` are further id sets the caller will look up with the same codes."""
    n = len(ranked)
    ordered = np.sort(ranked, axis=1)
    if ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != EMPTY)).any():
        raise ValueError("a ranked row recommends the same product more than once")
    # Membership of (row, product) pairs, vectorised: give every product a dense code and every pair
    # the key row * len(codes) + code, then look keys up in sorted arrays (no per-row loop).
    codes = sorted_unique(np.concatenate([ranked.ravel(), *targets, *extra_ids]).astype(np.int64))
    ranked_keys = np.arange(n)[:, None] * len(codes) + np.searchsorted(codes, ranked)
    target_keys = _pair_keys(targets, codes)
    size = np.bincount(target_keys // len(codes), minlength=n)
    if (size == 0).any():
        raise ValueError(
            f"{int((size == 0).sum())} of {n} shoppers have an empty target; drop them before evaluating"
        )
    hit = _contained(ranked_keys, target_keys) & (ranked != EMPTY)
    return hit, size, codes, ranked_keys, target_keys


def shopper_metrics(ranked: np.ndarray, targets: Sequence[np.ndarray], k: int) -> dict[str, np.ndarray]:
    """Per-shopper ``recall@k``, ``ndcg@k`` and ``hr@k`` [n] (their means are :func:`ranking_metrics`'),
    for paired comparisons of two rankings of the same shoppers (:func:`paired_difference`)."""
    ranked = np.asarray(ranked, dtype=np.int64)
    if len(targets) != len(ranked):
        raise ValueError(f"{len(ranked)} ranked rows but {len(targets)} targets")
    hit, size, *_ = _hits(ranked, targets)
    top = hit[:, :k]
    hits = top.sum(axis=1)
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.cumsum(discount)
    dcg = top @ discount[: top.shape[1]]
    return {
        f"recall@{k}": hits / size,
        f"ndcg@{k}": dcg / ideal[np.minimum(size, k) - 1],
        f"hr@{k}": (hits > 0).astype(np.float64),
    }


def paired_difference(a: np.ndarray, b: np.ndarray, z: float = 1.96) -> tuple[float, float, float]:
    """Mean of the per-shopper differences ``a - b`` and its normal-approximation confidence interval
    (``z`` = 1.96: 95%), over the same shoppers: (mean, low, high)."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if diff.ndim != 1 or len(diff) < 2:
        raise ValueError("a paired difference needs two [n] arrays over the same n >= 2 shoppers")
    mean = float(diff.mean())
    half = z * float(diff.std(ddof=1)) / np.sqrt(len(diff))
    return mean, mean - half, mean + half


def _pair_keys(groups: Sequence[np.ndarray], codes: np.ndarray) -> np.ndarray:
    """Sorted unique keys of the (row, product) pairs in ``groups`` (one id array per row)."""
    lengths = [len(group) for group in groups]
    rows = np.repeat(np.arange(len(groups)), lengths)
    ids = np.concatenate([np.asarray(group, dtype=np.int64).ravel() for group in groups])
    return sorted_unique(rows * len(codes) + np.searchsorted(codes, ids))


def _contained(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Whether each of ``keys`` occurs in the sorted array ``sorted_keys``."""
    if len(sorted_keys) == 0:
        return np.zeros(keys.shape, dtype=bool)
    position = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[position] == keys


def _mean_ratio(numerator: np.ndarray, denominator: np.ndarray) -> float:
    """Mean of numerator / denominator over the rows with a positive denominator (NaN if none)."""
    valid = denominator > 0
    return float(np.mean(numerator[valid] / denominator[valid])) if valid.any() else float("nan")
