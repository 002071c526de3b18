"""Behavioural segments of shoppers, their churn risk, and the marketing lever for each (torch-free).

- **Profiles** (:func:`profiles`): per shopper, from receipts strictly before ``as_of``: days since the
  last basket (recency), baskets and spend in the last ``window_days`` (frequency, monetary), all baskets,
  tenure, mean basket size, distinct products per basket, and days since last basket over the shopper's
  mean interval between baskets.
- **Churn** (:class:`ChurnModel`): P(no basket in the ``horizon_days`` after ``as_of``), a logistic
  regression on the profiles, fitted without looking past ``as_of``: features at ``as_of - horizon``,
  labels from ``[as_of - horizon, as_of)`` (:func:`fit_churn`). Logistic regression's output is a
  probability fitted by maximum likelihood, so its calibration is reported, not assumed.
- **Segments** (:func:`cluster`): spherical k-means (FAISS) on the bundle encoder's shopper embeddings,
  each segment then described by its members' profiles and churn (:func:`describe`) and given a name and a
  lever by the rules of :func:`lever`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.data.schema import BASKET, PRICE, PRODUCT, QUANTITY, SHOPPER, TIMESTAMP
from recsys.data.split import temporal_split

DAY_MICROS = 86_400_000_000
PROFILE_COLUMNS = (
    "recency_days",
    "frequency",
    "monetary",
    "baskets",
    "tenure_days",
    "basket_size",
    "breadth",
    "recency_over_interval",
)
LEVERS = ("repeat", "cross-sell", "up-sell", "win-back")
NEWTON_STEPS = 50
L2 = 1e-3


@dataclass(frozen=True)
class Profiles:
    """Per-shopper behaviour before ``as_of``: ``values`` [S, len(PROFILE_COLUMNS)] for ``shopper_ids``."""

    shopper_ids: np.ndarray  # [S] int64 ascending
    values: np.ndarray  # [S, F] float64

    def column(self, name: str) -> np.ndarray:
        return self.values[:, PROFILE_COLUMNS.index(name)]


def _micros(table: pa.Table) -> np.ndarray:
    return pc.cast(table.column(TIMESTAMP), pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy()


def profiles(receipts: pa.Table, as_of: datetime, window_days: float = 90.0) -> Profiles:
    """:class:`Profiles` of every shopper with a basket strictly before ``as_of``."""
    before, _ = temporal_split(receipts, as_of)
    spend = pc.multiply(before.column(PRICE).fill_null(0.0), before.column(QUANTITY))
    lines = pa.table({SHOPPER: before.column(SHOPPER), BASKET: before.column(BASKET), "time": _micros(before),
                      "spend": spend, PRODUCT: before.column(PRODUCT)})  # fmt: skip
    baskets = lines.group_by([SHOPPER, BASKET]).aggregate(
        [("time", "min"), ("spend", "sum"), (PRODUCT, "count")]
    )
    shopper = baskets.column(SHOPPER).to_numpy()
    ids, owner = np.unique(shopper, return_inverse=True)
    time = baskets.column("time_min").to_numpy()
    now = int(pa.scalar(as_of, pa.timestamp("us", tz="UTC")).value)
    recent = time >= now - window_days * DAY_MICROS
    count = np.bincount(owner, minlength=len(ids)).astype(np.float64)
    last = np.full(len(ids), np.iinfo(np.int64).min)
    first = np.full(len(ids), np.iinfo(np.int64).max)
    np.maximum.at(last, owner, time)
    np.minimum.at(first, owner, time)
    recency = (now - last) / DAY_MICROS
    tenure = (now - first) / DAY_MICROS
    span = (last - first) / DAY_MICROS
    interval = np.where(count > 1, span / np.maximum(count - 1, 1), np.nan)
    values = np.column_stack([
        recency,
        np.bincount(owner, weights=recent, minlength=len(ids)),
        np.bincount(owner, weights=baskets.column("spend_sum").to_numpy() * recent, minlength=len(ids)),
        count,
        tenure,
        np.bincount(owner, weights=baskets.column(f"{PRODUCT}_count").to_numpy(), minlength=len(ids)) / count,
        _distinct_products(lines, ids) / count,
        np.where(np.isnan(interval), recency / np.maximum(tenure, 1.0), recency / np.maximum(interval, 1.0)),
    ])  # fmt: skip
    return Profiles(ids.astype(np.int64), values)


def _distinct_products(lines: pa.Table, ids: np.ndarray) -> np.ndarray:
    pairs = lines.group_by([SHOPPER]).aggregate([(PRODUCT, "count_distinct")])
    position = np.searchsorted(ids, pairs.column(SHOPPER).to_numpy())
    out = np.zeros(len(ids))
    out[position] = pairs.column(f"{PRODUCT}_count_distinct").to_numpy()
    return out


def churned(receipts: pa.Table, shopper_ids: np.ndarray, start: datetime, horizon_days: float) -> np.ndarray:
    """Whether each of ``shopper_ids`` has no basket in ``[start, start + horizon_days)``: bool [S]."""
    _, after = temporal_split(receipts, start)
    within, _ = temporal_split(after, start + timedelta(days=horizon_days))
    return ~np.isin(shopper_ids, within.column(SHOPPER).to_numpy())


def _design(values: np.ndarray) -> np.ndarray:
    """Model inputs of profiles: counts and amounts on a log scale (heavy tails)."""
    return np.log1p(np.maximum(values, 0.0))


@dataclass(frozen=True)
class ChurnModel:
    """P(no basket within the horizon) = sigmoid(standardised log-profiles @ weights + bias)."""

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float
    horizon_days: float

    @classmethod
    def fit(cls, values: np.ndarray, labels: np.ndarray, horizon_days: float) -> ChurnModel:
        """Maximum likelihood (Newton's method, a small L2 penalty for separable data)."""
        x = _design(values)
        mean, scale = x.mean(axis=0), x.std(axis=0)
        scale[scale == 0] = 1.0
        z = np.column_stack([(x - mean) / scale, np.ones(len(x))])
        y = labels.astype(np.float64)
        theta = np.zeros(z.shape[1])
        penalty = np.r_[np.full(z.shape[1] - 1, L2), 0.0] * len(z)
        for _ in range(NEWTON_STEPS):
            p = 1.0 / (1.0 + np.exp(-(z @ theta)))
            gradient = z.T @ (p - y) + penalty * theta
            hessian = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty + 1e-9)
            step = np.linalg.solve(hessian, gradient)
            theta -= step
            if np.abs(step).max() < 1e-8:
                break
        return cls(mean, scale, theta[:-1], float(theta[-1]), horizon_days)

    def probability(self, values: np.ndarray) -> np.ndarray:
        z = (_design(values) - self.mean) / self.scale
        return 1.0 / (1.0 + np.exp(-(z @ self.weights + self.bias)))


def fit_churn(
    receipts: pa.Table, as_of: datetime, horizon_days: float = 28.0, window_days: float = 90.0
) -> ChurnModel:
    """A churn model for scoring at ``as_of`` that sees nothing on or after it: features at
    ``as_of - horizon_days``, labels (no basket) from ``[as_of - horizon_days, as_of)``."""
    before, _ = temporal_split(receipts, as_of)
    fit_at = as_of - timedelta(days=horizon_days)
    past = profiles(before, fit_at, window_days)
    labels = churned(before, past.shopper_ids, fit_at, horizon_days)
    if labels.all() or not labels.any():
        raise ValueError(
            f"churn needs shoppers who did and did not return in the {horizon_days} days before {as_of}"
        )
    return ChurnModel.fit(past.values, labels, horizon_days)


def cluster(embeddings: np.ndarray, k: int, seed: int, iterations: int = 25) -> np.ndarray:
    """Segment [S] of each shopper: spherical k-means (FAISS) on L2-normalised ``embeddings`` [S, d]."""
    if not 1 <= k <= len(embeddings):
        raise ValueError(f"need 1 <= k <= {len(embeddings)} shoppers, got k={k}")
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    kmeans = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=seed, spherical=True, verbose=False)
    kmeans.train(x)
    _, assigned = kmeans.index.search(x, 1)
    return assigned[:, 0].astype(np.int64)


@dataclass(frozen=True)
class Segment:
    """One segment's profile (member medians), churn, name and lever."""

    segment: int
    size: int
    medians: dict[str, float]
    churn: float  # mean churn probability of the members
    name: str
    lever: str


def lever(
    medians: dict[str, float], churn: float, overall: dict[str, float], overall_churn: float
) -> tuple[str, str]:
    """(name, lever) of a segment from its medians against everyone's, in this order of rules:

    1. churn risk at least 1.5x the average: *lapsing*, lever **win-back**;
    2. frequency at or above the median shopper's and basket size below it: *frequent, small baskets*,
       lever **up-sell**;
    3. frequency at or above the median and breadth (distinct products per basket) below it:
       *frequent, narrow*, lever **cross-sell**;
    4. frequency at or above the median: *loyal*, lever **repeat**;
    5. otherwise *occasional*, lever **cross-sell** (more reasons to come in).

    The spend level (``high`` / ``low`` spend against the median) is appended to the name."""
    spend = "high spend" if medians["monetary"] >= overall["monetary"] else "low spend"
    frequent = medians["frequency"] >= overall["frequency"]
    if churn >= 1.5 * overall_churn:
        name, chosen = "lapsing", "win-back"
    elif frequent and medians["basket_size"] < overall["basket_size"]:
        name, chosen = "frequent, small baskets", "up-sell"
    elif frequent and medians["breadth"] < overall["breadth"]:
        name, chosen = "frequent, narrow", "cross-sell"
    elif frequent:
        name, chosen = "loyal", "repeat"
    else:
        name, chosen = "occasional", "cross-sell"
    return f"{name}, {spend}", chosen


def describe(assigned: np.ndarray, values: np.ndarray, churn: np.ndarray) -> list[Segment]:
    """Each segment of ``assigned`` [S] with its members' medians of ``values`` [S, F], mean ``churn``,
    name and lever (:func:`lever`), largest first."""
    overall = dict(zip(PROFILE_COLUMNS, np.median(values, axis=0).tolist(), strict=True))
    overall_churn = float(churn.mean())
    segments = []
    for segment in np.unique(assigned):
        members = assigned == segment
        medians = dict(zip(PROFILE_COLUMNS, np.median(values[members], axis=0).tolist(), strict=True))
        name, chosen = lever(medians, float(churn[members].mean()), overall, overall_churn)
        segments.append(
            Segment(int(segment), int(members.sum()), medians, float(churn[members].mean()), name, chosen)
        )
    return sorted(segments, key=lambda s: (-s.size, s.segment))
