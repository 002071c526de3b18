"""The one scorer: searched candidates in, final recommendations out.

Online serving and the batch candidate job both call :func:`select`, so the rules below (exclusions,
score floor, explore slots, tie order) cannot drift apart between them. Rows are item rows of a bundle
(``items.parquet`` row = FAISS id); scores are higher-is-better. numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def popularity_order(product_ids: np.ndarray, popularity: np.ndarray) -> np.ndarray:
    """Rows from most to least popular, ties by smaller product id: the fallback for empty histories."""
    return np.lexsort((product_ids, -np.asarray(popularity)))


def candidates_needed(
    k: int,
    exclude_sizes: Sequence[int] | np.ndarray,
    history_sizes: Sequence[int] | np.ndarray | None = None,
    explore_slots: int = 0,
    repeat_aware: bool = False,
) -> int:
    """How many candidates per shopper to search so that :func:`select` can still fill ``k`` positions.

    ``exclude_sizes`` (and ``history_sizes``) hold one count of distinct rows per shopper. Each excluded row
    can knock out one candidate, so ``k + max(exclude)`` suffices; explore slots also need the best
    ``explore_slots`` rows outside the history among the candidates, which can take
    ``explore_slots + exclude + history``. The repeat-aware scorer (``recsys.repeat``) scores history rows
    itself and drops them from the search, so it needs ``k + history`` to keep ``k`` new ones. Callers
    clamp the result to the catalogue size.
    """
    if k < 0 or explore_slots < 0:
        raise ValueError(f"k ({k}) and explore_slots ({explore_slots}) must be >= 0")
    excluded = np.asarray(exclude_sizes, dtype=np.int64).reshape(-1)
    needed = k + int(excluded.max(initial=0))
    if explore_slots > 0 and history_sizes is not None:
        history = np.asarray(history_sizes, dtype=np.int64).reshape(-1)
        if excluded.size and excluded.shape != history.shape:
            raise ValueError("exclude_sizes and history_sizes need one entry per shopper")
        both = history + excluded if excluded.size else history
        needed = max(needed, min(explore_slots, k) + int(both.max(initial=0)))
    if repeat_aware and history_sizes is not None:
        needed = max(needed, k + int(np.asarray(history_sizes, dtype=np.int64).max(initial=0)))
    return needed


def pair_member(
    owner: np.ndarray, rows: np.ndarray, set_owner: np.ndarray, set_rows: np.ndarray
) -> np.ndarray:
    """Whether each (``owner``, ``rows``) pair (arrays broadcast together) is one of the pairs
    (``set_owner``, ``set_rows``); negative rows never are. One vectorised ``isin`` over pairs packed into
    a single int64 key, shared by every "did this shopper buy that item" question."""
    owner, rows = np.broadcast_arrays(np.asarray(owner, np.int64), np.asarray(rows, np.int64))
    set_owner, set_rows = np.asarray(set_owner, np.int64), np.asarray(set_rows, np.int64)
    keep = set_rows >= 0
    set_owner, set_rows = set_owner[keep], set_rows[keep]
    if set_rows.size == 0 or rows.size == 0:
        return np.zeros(rows.shape, dtype=bool)
    span = max(int(rows.max()), int(set_rows.max())) + 1
    return np.isin(owner * span + rows, set_owner * span + set_rows) & (rows >= 0)


def _member(rows: np.ndarray, sets: Sequence[np.ndarray]) -> np.ndarray:
    """[B, C] bool: ``rows[b, c]`` is in ``sets[b]`` (negative rows never are)."""
    if len(sets) != rows.shape[0]:
        raise ValueError(f"need one row set per shopper: got {len(sets)} for {rows.shape[0]} shoppers")
    arrays = [np.asarray(s, dtype=np.int64).reshape(-1) for s in sets]
    flat = np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int64)
    owner = np.repeat(np.arange(len(arrays), dtype=np.int64), [len(a) for a in arrays])
    return pair_member(np.arange(rows.shape[0])[:, None], rows, owner, flat)


def select(
    candidate_rows: np.ndarray,
    candidate_scores: np.ndarray,
    k: int,
    exclude: Sequence[np.ndarray] | None = None,
    min_score: float | np.ndarray | None = None,
    history: Sequence[np.ndarray] | None = None,
    explore_slots: int | np.ndarray = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Pick each shopper's final ``k`` items from searched candidates.

    Args:
        candidate_rows: [B, C] int64 item rows, ``-1`` for none (e.g. FAISS found fewer).
        candidate_scores: [B, C] float32, higher is better; NaN counts as no candidate.
        k: positions to fill per shopper.
        exclude: per shopper, rows never to recommend (purchased products, unavailable products).
        min_score: drop candidates scoring below it: a float, or [B] per shopper with NaN for none.
            Shoppers then get fewer items (or none) rather than irrelevant ones.
        history: per shopper, rows bought before; only used by ``explore_slots``.
        explore_slots: positions reserved for the best candidates NOT in the history, where there are
            that many (an int, or [B] per shopper); the other positions take the best remaining ones.

    Returns:
        rows [B, k] int64 padded with -1 and scores [B, k] float32 padded with NaN, best first; equal
        scores rank the smaller row first, and a row listed twice keeps its best score.
    """
    rows = np.asarray(candidate_rows, dtype=np.int64)
    scores = np.asarray(candidate_scores, dtype=np.float32)
    if rows.ndim != 2 or rows.shape != scores.shape:
        raise ValueError(
            f"candidate rows {rows.shape} and scores {scores.shape} must be the same [B, C] shape"
        )
    num_shoppers = rows.shape[0]
    explore = np.broadcast_to(np.asarray(explore_slots, dtype=np.int64), (num_shoppers,))
    if k < 0 or (explore < 0).any():
        raise ValueError(f"k ({k}) and explore_slots ({explore_slots}) must be >= 0")

    valid = (rows >= 0) & ~np.isnan(scores)
    if min_score is not None:
        # float64 so that a float32 score equal to the floor's float32 rounding is not kept by accident
        floor = np.broadcast_to(np.asarray(min_score, dtype=np.float64), (num_shoppers,))[:, None]
        valid &= np.isnan(floor) | (scores >= floor)
    if exclude is not None:
        valid &= ~_member(rows, exclude)

    # Per shopper: valid first, then score descending, then row ascending (the deterministic tie order).
    order = np.lexsort((rows, -scores, ~valid), axis=-1)
    rows = np.take_along_axis(rows, order, axis=1)
    scores = np.take_along_axis(scores, order, axis=1)
    valid = np.take_along_axis(valid, order, axis=1)

    # A repeated row keeps its first (best-ranked) occurrence: np.unique's first index in row-major order.
    span = int(rows.max(initial=0)) + 1
    keys = np.where(valid, np.arange(num_shoppers, dtype=np.int64)[:, None] * span + rows, -1).reshape(-1)
    first = np.zeros(keys.size, dtype=bool)
    first[np.unique(keys, return_index=True)[1]] = True
    valid &= first.reshape(valid.shape)

    reserved = np.zeros_like(valid)
    if (explore > 0).any():
        novel = valid if history is None else valid & ~_member(rows, history)
        reserved = novel & (np.cumsum(novel, axis=1) <= np.minimum(explore, k)[:, None])
    others = valid & ~reserved
    room = k - reserved.sum(axis=1, keepdims=True)
    keep = reserved | (others & (np.cumsum(others, axis=1) <= room))

    # Move kept entries to the front, preserving their (score) order, then cut or pad to k.
    front = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    out_rows = np.full((num_shoppers, k), -1, dtype=np.int64)
    out_scores = np.full((num_shoppers, k), np.nan, dtype=np.float32)
    width = front.shape[1]
    kept = np.take_along_axis(keep, front, axis=1)
    out_rows[:, :width] = np.where(kept, np.take_along_axis(rows, front, axis=1), -1)
    out_scores[:, :width] = np.where(kept, np.take_along_axis(scores, front, axis=1), np.nan)
    return out_rows, out_scores
