"""The one scorer: searched candidates in, final recommendations out.

Serving, the batch candidate job and training's metrics all call :func:`recommend` (after searching
:func:`search_size` candidates per shopper), so the rules (``recsys.rules``: exclusions, score floor,
explore slots), the ranker (``recsys.ranker``), the popularity fallback and the tie order cannot drift apart.
Rows are item rows (``items.parquet`` row = FAISS id); scores are higher-is-better. numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recsys.inputs import Histories, first_occurrences, pair_keys, pair_member
from recsys.ranker import Ranker
from recsys.rules import Rules


def popularity_order(product_ids: np.ndarray, popularity: np.ndarray) -> np.ndarray:
    """Rows from most to least popular, ties by smaller product id: the fallback for empty histories."""
    return np.lexsort((product_ids, -np.asarray(popularity)))


def _in_row_sets(rows: np.ndarray, sets: Sequence[np.ndarray]) -> np.ndarray:
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
    order: np.ndarray | None = None,
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
        order: [B, C] keys that rank the candidates (higher first) where they should not rank by score
            (:meth:`recsys.ranker.Ranker.blend`'s); ``min_score`` still reads the scores. None: by score.

    Returns:
        rows [B, k] int64 padded with -1 and scores [B, k] float32 padded with NaN, best first; equal
        keys rank the smaller row first, and a row listed twice keeps its best-ranked occurrence.
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
        valid &= ~_in_row_sets(rows, exclude)

    rank_by = scores
    if order is not None:
        rank_by = np.asarray(order, dtype=np.float32)
        if rank_by.shape != rows.shape:
            raise ValueError(f"order {rank_by.shape} must be the candidates' shape {rows.shape}")
        valid &= ~np.isnan(rank_by)
    # Per shopper: valid first, then key descending, then row ascending (the deterministic tie order).
    ranking = np.lexsort((rows, -rank_by, ~valid), axis=-1)
    rows = np.take_along_axis(rows, ranking, axis=1)
    scores = np.take_along_axis(scores, ranking, axis=1)
    valid = np.take_along_axis(valid, ranking, axis=1)

    # A repeated row keeps its first (best-ranked) occurrence in row-major order.
    span = int(rows.max(initial=0)) + 1
    keys = np.where(valid, pair_keys(np.arange(num_shoppers)[:, None], rows, span), -1).reshape(-1)
    first = np.zeros(keys.size, dtype=bool)
    first[first_occurrences(keys)] = True
    valid &= first.reshape(valid.shape)

    reserved = np.zeros_like(valid)
    if (explore > 0).any():
        novel = valid if history is None else valid & ~_in_row_sets(rows, history)
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


@dataclass(frozen=True)
class Ranked:
    """Each shopper's final list, best first."""

    rows: np.ndarray  # [S, K] int64 item rows, -1 padding (K = the largest k asked for)
    scores: np.ndarray  # [S, K] float32, NaN padding
    fallback: np.ndarray  # [S] bool: no known product, so the most popular products, scored by popularity
    repeat_aware: np.ndarray  # [S] bool: scored by the ranker (P(in the next basket))


def _per_shopper(rules: Rules | Sequence[Rules], count: int) -> list[Rules]:
    if isinstance(rules, Rules):
        return [rules] * count
    if len(rules) != count:
        raise ValueError(f"{len(rules)} rules for {count} shoppers")
    return list(rules)


def repeat_aware(histories: Histories, rules: Rules | Sequence[Rules], scorer: Ranker | None) -> np.ndarray:
    """[S] bool: which shoppers the ranker ranks (it exists, the rules ask for it, the
    shopper's purchase times are known and it has a known product)."""
    wanted = np.array([r.repeat_aware for r in _per_shopper(rules, histories.num_shoppers)], dtype=bool)
    return wanted & histories.timed & (histories.lengths > 0) & (scorer is not None)


def search_size(
    histories: Histories, rules: Rules | Sequence[Rules], scorer: Ranker | None, num_items: int
) -> int:
    """How many candidates per shopper to search so that :func:`recommend` can fill every list.

    Each excluded history product can knock out one candidate, so ``k + distinct`` suffices with
    ``exclude_purchased``; explore slots need the best ``explore_slots`` products outside the history,
    ``explore_slots + distinct``; the ranker weighs the network's pool of ``new_candidates`` new
    products, ``new_candidates + distinct``. Clamped to the catalogue.
    """
    every = _per_shopper(rules, histories.num_shoppers)
    if not every:
        return 0
    k = np.array([r.k for r in every])
    excluded = np.array([r.exclude_purchased for r in every])
    explore = np.minimum([r.explore_slots for r in every], k)
    aware = repeat_aware(histories, every, scorer)
    if not (excluded.any() or explore.any() or aware.any()):  # the plain request: no history sizes needed
        return int(min(num_items, k.max()))
    distinct = histories.distinct_sizes()
    needed = np.maximum(k + excluded * distinct, np.where(explore > 0, explore + distinct, 0))
    if scorer is not None:
        needed = np.maximum(needed, np.where(aware, scorer.new_candidates + distinct, 0))
    return int(min(num_items, needed.max()))


def recommend(
    histories: Histories,
    rows: np.ndarray,
    scores: np.ndarray,
    rules: Rules | Sequence[Rules],
    scorer: Ranker | None,
    fallback: np.ndarray,
    popularity: np.ndarray,
) -> Ranked:
    """Every shopper's list from its searched candidates, by one set of rules or one per shopper.

    Args:
        histories: the shoppers (``recsys.inputs``); those with no known product get the fallback.
        rows, scores: [S, C] searched item rows (-1 for none) and model scores, at least
            :func:`search_size` of them per shopper (ignored for fallback shoppers).
        rules: one :class:`~recsys.rules.Rules` for all, or one per shopper.
        scorer: the model's ranker, or None; used where :func:`repeat_aware` says.
        fallback: item rows in fallback order (most popular first; unavailable ones already removed).
        popularity: [N] per item row, the fallback's scores.
    """
    every = _per_shopper(rules, histories.num_shoppers)
    count = histories.num_shoppers
    width = max((r.k for r in every), default=0)
    out_rows = np.full((count, width), -1, dtype=np.int64)
    out_scores = np.full((count, width), np.nan, dtype=np.float32)
    empty = histories.lengths == 0
    aware = repeat_aware(histories, every, scorer)
    for i in np.flatnonzero(empty):
        top = fallback[: every[i].k]
        out_rows[i, : len(top)], out_scores[i, : len(top)] = top, np.asarray(popularity)[top]
    groups: dict[tuple[bool, int], list[int]] = {}
    for i in np.flatnonzero(~empty):
        groups.setdefault((bool(aware[i]), every[i].k), []).append(int(i))
    # one select per (scorer, k): explore slots are reserved within each shopper's own k
    for (scored, k), members in groups.items():
        group = np.asarray(members)
        part = histories.take(group)
        candidates, order = (rows[group], scores[group]), None
        if scored and scorer is not None:  # repeat_aware() is False everywhere without a scorer
            *candidates, order = scorer.blend(part, *candidates)
        group_rules = [every[i] for i in members]
        floor = np.array([np.nan if r.min_score is None else r.min_score for r in group_rules])
        excludes = [r.exclude_purchased for r in group_rules]
        explore = np.array([r.explore_slots for r in group_rules])
        history = None  # per shopper, the rows it bought: only where a rule reads them
        if any(excludes) or explore.any():
            owner, bought = part.distinct()
            history = np.split(bought, np.searchsorted(owner, np.arange(1, len(group))))
        out_rows[group, :k], out_scores[group, :k] = select(
            *candidates,
            k,
            exclude=None
            if history is None or not any(excludes)
            else [h if e else h[:0] for h, e in zip(history, excludes, strict=True)],
            min_score=None if np.isnan(floor).all() else floor,
            history=history,
            explore_slots=explore,
            order=order,
        )
    return Ranked(out_rows, out_scores, empty, aware)
