"""Repeat-aware scoring: a shopper's own purchase history blended with the model's new-product candidates.

In grocery about half of a next basket was bought before, and a shopper's own purchase frequency is the
baseline to beat. The model (shopper encoder + item index) knows the catalogue but not how a household
repeats, so the final score of a candidate is a calibrated probability that it is in the next basket:

- every product of the history gets *repeat* features: baskets it was in, share of the shopper's baskets,
  time-decayed counts (30 and 120 day half-lives), days since last bought, purchase cycle (days since last
  bought over the shopper's mean interval for it), how often shoppers re-buy it at all, its popularity;
- every searched product new to the shopper gets *explore* features: the model's score, its popularity;
- one logistic regression over both (fitted on the validation split, ``training.scorer_fit``) turns features
  into P(in next basket), so repeat and new products compete on one scale and ``min_score`` is a
  probability.

Times are measured back from the shopper's own most recent purchase, so scores need no clock: the same
history gives the same answer whenever it is scored. Serving (:class:`serving.Recommender`), the batch
job (:mod:`batch.candidates`) and training's test metrics all reach :meth:`RepeatScorer.blend` through
:func:`recsys.scoring.recommend`. numpy only: no torch on the serving path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from recsys.data.sequences import concat_ranges
from recsys.inputs import Histories, pair_member

FEATURES = (
    "log_baskets",
    "basket_share",
    "log_decay_30d",
    "log_decay_120d",
    "log_days_since",
    "cycle",
    "has_cycle",
    "log_repeat_rate",
    "log_popularity",
    "log_history_baskets",
    "is_new",
    "new_score",
    "new_log_popularity",
)
HALF_LIVES_DAYS = (30.0, 120.0)
# Prior of the per-product repeat rate, (shoppers buying it twice + 1) / (shoppers buying it + 4): rare
# products are pulled towards 1/4 rather than to 0 or 1 on one or two shoppers.
_RATE_PRIOR = (1.0, 4.0)
NEW_CANDIDATES = 50  # the model's best new products per shopper that the scorer weighs (fit and use)


@dataclass(frozen=True)
class _Pairs:
    """Distinct (shopper, product) pairs of some histories and their repeat statistics."""

    owner: np.ndarray  # [P]
    rows: np.ndarray  # [P]
    baskets: np.ndarray  # [P] baskets containing the product
    decayed: tuple[np.ndarray, ...]  # per half-life: sum over those baskets of 2^(-age / half-life)
    days_since: np.ndarray  # [P] days from the product's last purchase to the shopper's last purchase
    days_first: np.ndarray  # [P] days from its first purchase to the shopper's last purchase
    shopper_baskets: np.ndarray  # [num_shoppers] baskets per shopper


def _pairs(histories: Histories) -> _Pairs:
    owner, rows, days = histories.owner, histories.rows, histories.days
    if not histories.timed.all():
        raise ValueError("repeat-aware scoring needs the purchase times of every history")
    last = np.full(histories.num_shoppers, -np.inf)
    np.maximum.at(last, owner, days)
    # distinct (shopper, time) = baskets; distinct (shopper, product, time) = a product's baskets
    order = np.lexsort((days, owner))
    new_basket = np.ones(len(order), dtype=bool)
    new_basket[1:] = (owner[order][1:] != owner[order][:-1]) | (days[order][1:] != days[order][:-1])
    shopper_baskets = np.bincount(owner[order][new_basket], minlength=histories.num_shoppers)

    order = np.lexsort((days, rows, owner))
    o, r, t = owner[order], rows[order], days[order]
    keep = np.ones(len(o), dtype=bool)
    keep[1:] = (o[1:] != o[:-1]) | (r[1:] != r[:-1]) | (t[1:] != t[:-1])
    o, r, t = o[keep], r[keep], t[keep]
    start = np.ones(len(o), dtype=bool)
    start[1:] = (o[1:] != o[:-1]) | (r[1:] != r[:-1])
    starts = np.flatnonzero(start)
    age = last[o] - t  # >= 0
    decayed = tuple(np.add.reduceat(np.exp2(-age / h), starts) if len(o) else age for h in HALF_LIVES_DAYS)
    ends = np.append(starts[1:], len(o)) - 1  # times ascend within a pair: last entry = most recent
    return _Pairs(
        o[starts],
        r[starts],
        np.diff(np.append(starts, len(o))),
        decayed,
        age[ends],
        age[starts],
        shopper_baskets,
    )


def item_statistics(histories: Histories, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Per item row [num_items]: the smoothed share of its buyers who bought it in two or more baskets,
    and its popularity (baskets containing it)."""
    pairs = _pairs(histories)
    buyers = np.bincount(pairs.rows, minlength=num_items)
    repeaters = np.bincount(pairs.rows[pairs.baskets >= 2], minlength=num_items)
    popularity = np.bincount(pairs.rows, weights=pairs.baskets, minlength=num_items)
    return (repeaters + _RATE_PRIOR[0]) / (buyers + _RATE_PRIOR[1]), popularity


def _feature_matrix(
    pairs: _Pairs,
    new_owner: np.ndarray,
    new_rows: np.ndarray,
    new_scores: np.ndarray,
    repeat_rate: np.ndarray,
    log_popularity: np.ndarray,
) -> np.ndarray:
    """[P + Q, F] features of the history pairs, then of the Q new candidates, columns in FEATURES order."""
    p, q = len(pairs.rows), len(new_rows)
    x = np.zeros((p + q, len(FEATURES)), dtype=np.float64)
    column = {name: i for i, name in enumerate(FEATURES)}
    baskets = pairs.baskets.astype(np.float64)
    # mean days between purchases of the product, over the span between its first and last purchase
    interval = (pairs.days_first - pairs.days_since) / np.maximum(baskets - 1, 1)
    repeat_part = {
        "log_baskets": np.log1p(baskets),
        "basket_share": baskets / np.maximum(pairs.shopper_baskets[pairs.owner], 1),
        "log_decay_30d": np.log1p(pairs.decayed[0]),
        "log_decay_120d": np.log1p(pairs.decayed[1]),
        "log_days_since": np.log1p(pairs.days_since),
        "cycle": np.where(baskets >= 2, np.log((pairs.days_since + 1) / (interval + 1)), 0.0),
        "has_cycle": (baskets >= 2).astype(np.float64),
        "log_repeat_rate": np.log(repeat_rate[pairs.rows]),
        "log_popularity": log_popularity[pairs.rows],
        "log_history_baskets": np.log1p(pairs.shopper_baskets[pairs.owner]),
    }
    for name, values in repeat_part.items():
        x[:p, column[name]] = values
    x[p:, column["is_new"]] = 1.0
    x[p:, column["new_score"]] = new_scores
    x[p:, column["new_log_popularity"]] = log_popularity[new_rows]
    x[p:, column["log_history_baskets"]] = np.log1p(pairs.shopper_baskets[new_owner])
    return x


def _best_new(
    pairs: _Pairs, rows: np.ndarray, scores: np.ndarray, new_candidates: int
) -> tuple[np.ndarray, ...]:
    """Each shopper's best ``new_candidates`` searched products that are new to it, by model score (ties
    to the smaller row): (owner, rows, scores) flat. The pool depends only on the search, never on how
    many products the caller wants, so a ranking of k products is the prefix of a longer one."""
    rows = np.asarray(rows, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((rows, -np.nan_to_num(scores, nan=-np.inf)), axis=-1)
    rows, scores = np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)
    owner = np.broadcast_to(np.arange(rows.shape[0], dtype=np.int64)[:, None], rows.shape)
    new = (rows >= 0) & np.isfinite(scores) & ~pair_member(owner, rows, pairs.owner, pairs.rows)
    new &= np.cumsum(new, axis=1) <= new_candidates
    return owner[new], rows[new], scores[new]


def features(
    histories: Histories,
    rows: np.ndarray,
    scores: np.ndarray,
    repeat_rate: np.ndarray,
    popularity: np.ndarray,
    new_candidates: int = NEW_CANDIDATES,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(owner [M], rows [M], features [M, F]) of every history product and of each shopper's best
    ``new_candidates`` searched products new to it (the scorer's candidate pool).

    ``rows`` / ``scores`` [B, C] are the model's candidates per shopper (-1 / NaN for none); a searched
    product the shopper bought before is scored once, as a repeat. ``repeat_rate`` and ``popularity``
    hold one entry per item row.
    """
    _check(histories, rows, len(repeat_rate))
    return _features(_pairs(histories), rows, scores, repeat_rate, popularity, new_candidates)


def _check(histories: Histories, rows: np.ndarray, num_items: int) -> None:
    if len(histories.rows) and histories.rows.max() >= num_items:
        raise ValueError(f"history item rows must be < {num_items}, the scorer's catalogue size")
    if rows.shape[0] != histories.num_shoppers:
        raise ValueError(f"{rows.shape[0]} candidate rows for {histories.num_shoppers} histories")


def _features(
    pairs: _Pairs,
    rows: np.ndarray,
    scores: np.ndarray,
    repeat_rate: np.ndarray,
    popularity: np.ndarray,
    new_candidates: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    new_owner, new_rows, new_scores = _best_new(pairs, rows, scores, new_candidates)
    log_popularity = np.log1p(np.asarray(popularity, dtype=np.float64))
    x = _feature_matrix(pairs, new_owner, new_rows, new_scores, repeat_rate, log_popularity)
    return np.concatenate([pairs.owner, new_owner]), np.concatenate([pairs.rows, new_rows]), x


@dataclass(frozen=True)
class RepeatScorer:
    """Logistic regression over :data:`FEATURES` plus the per-product statistics it needs.

    ``weights`` apply to standardised features ``(x - mean) / scale``; ``repeat_rate`` and ``popularity``
    have one entry per item row of the catalogue the scorer is used with; ``new_candidates`` is the size
    of each shopper's pool of new products, the same in the fit and wherever the scorer is applied.
    """

    weights: np.ndarray  # [F]
    bias: float
    mean: np.ndarray  # [F]
    scale: np.ndarray  # [F]
    repeat_rate: np.ndarray  # [N] per item row
    popularity: np.ndarray  # [N] per item row (train baskets)
    new_candidates: int = NEW_CANDIDATES

    def __post_init__(self) -> None:
        f = len(FEATURES)
        if self.weights.shape != (f,) or self.mean.shape != (f,) or self.scale.shape != (f,):
            raise ValueError(f"weights, mean and scale need {f} entries, one per feature of {FEATURES}")
        if self.repeat_rate.shape != self.popularity.shape or self.repeat_rate.ndim != 1:
            raise ValueError("repeat_rate and popularity need one entry per item row")
        finite = (self.weights, self.mean, self.scale, np.array([self.bias]))
        if not all(np.isfinite(a).all() for a in finite) or (self.scale <= 0).any():
            raise ValueError("weights, bias, mean and scale must be finite, and scale positive")
        if (
            not ((self.repeat_rate > 0) & (self.repeat_rate <= 1)).all()
            or not np.isfinite(self.popularity).all()
            or (self.popularity < 0).any()
        ):
            raise ValueError("repeat_rate entries must be in (0, 1] and popularity finite and >= 0")
        if isinstance(self.new_candidates, bool) or not isinstance(self.new_candidates, int):
            raise ValueError(f"new_candidates must be an integer, got {self.new_candidates!r}")
        if self.new_candidates < 0:
            raise ValueError(f"new_candidates must be >= 0, got {self.new_candidates}")

    @property
    def num_items(self) -> int:
        return len(self.repeat_rate)

    def probability(self, x: np.ndarray) -> np.ndarray:
        """P(in the next basket) [M] of feature rows [M, F]."""
        logits = ((x - self.mean) / self.scale) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-logits))

    def blend(
        self, histories: Histories, rows: np.ndarray, scores: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each shopper's history products and its pool of new products, scored by P(in the next basket).

        The pool is the shopper's best :attr:`new_candidates` searched products new to it (the search must
        hold that many beyond the history: :func:`recsys.scoring.search_size`). It does not depend on how
        many products a caller wants, so every list is the prefix of a longer one, and serving, the batch
        job and training agree.

        Returns rows [B, W] int64 (-1 padding) and scores [B, W] float32 (NaN padding), unordered: feed
        them to :func:`recsys.scoring.select`, which ranks and applies the rules.
        """
        rows = np.asarray(rows, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float32)
        _check(histories, rows, self.num_items)
        pairs = _pairs(histories)
        owner, item_rows, x = _features(
            pairs, rows, scores, self.repeat_rate, self.popularity, self.new_candidates
        )
        probability = self.probability(x).astype(np.float32)
        count = np.bincount(owner, minlength=histories.num_shoppers)
        width = max(int(count.max(initial=0)), 1)
        order = np.argsort(owner, kind="stable")
        slot = concat_ranges(np.zeros_like(count), count)  # position of each candidate within its shopper
        out_rows = np.full((histories.num_shoppers, width), -1, dtype=np.int64)
        out_scores = np.full((histories.num_shoppers, width), np.nan, dtype=np.float32)
        out_rows[owner[order], slot] = item_rows[order]
        out_scores[owner[order], slot] = probability[order]
        return out_rows, out_scores

    def to_dict(self) -> dict[str, Any]:
        """The fitted parameters as plain values (the per-item arrays travel apart: a bundle keeps them as
        ``items.parquet`` columns, a checkpoint as lists)."""
        return {
            "features": list(FEATURES),
            "half_lives_days": list(HALF_LIVES_DAYS),
            "weights": self.weights.tolist(),
            "bias": float(self.bias),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "new_candidates": self.new_candidates,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], repeat_rate: np.ndarray, popularity: np.ndarray) -> RepeatScorer:
        """Inverse of :meth:`to_dict`; refuses a scorer fitted on other features, or with missing, mistyped
        or non-finite values (ValueError naming the key)."""
        if not isinstance(data, dict):
            raise ValueError(f"a repeat scorer is a mapping, got {type(data).__name__}")
        if list(data.get("features", [])) != list(FEATURES) or list(data.get("half_lives_days", [])) != list(
            HALF_LIVES_DAYS
        ):
            raise ValueError(
                f"repeat scorer features {data.get('features')} / half-lives {data.get('half_lives_days')} "
                f"differ from this library's {list(FEATURES)} / {list(HALF_LIVES_DAYS)}"
            )
        values = {}
        for key in ("weights", "mean", "scale"):
            entry = data.get(key)
            if not isinstance(entry, list) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in entry
            ):
                raise ValueError(f"repeat scorer {key!r} must be a list of numbers")
            values[key] = np.asarray(entry, dtype=np.float64)
        bias = data.get("bias")
        if isinstance(bias, bool) or not isinstance(bias, int | float):
            raise ValueError(f"repeat scorer 'bias' must be a number, got {bias!r}")
        new_candidates = data.get("new_candidates")
        if isinstance(new_candidates, bool) or not isinstance(new_candidates, int):
            raise ValueError(f"repeat scorer 'new_candidates' must be an integer, got {new_candidates!r}")
        return cls(
            values["weights"],
            float(bias),
            values["mean"],
            values["scale"],
            np.asarray(repeat_rate, dtype=np.float64),
            np.asarray(popularity, dtype=np.float64),
            new_candidates,
        )
