"""Coupon-campaign targeting on recorded campaigns: who received each one, who redeemed, and how well a
score computed before the campaign ranked its recipients (docs/evaluation.md, "Campaign targeting").

For each campaign, the recipients are ranked by a score that sees only data strictly before the
campaign's start date (local midnight in the receipts' zone; :func:`scores_before` enforces it), and
the ranking is judged against who redeemed one of its coupons:

- AUC: the probability that a random redeemer outranks a random non-redeemer, ties counting half;
- lift in the top 10%: the redemption rate among the best-ranked ``ceil(10%)`` recipients over the
  campaign's rate. Recipients tied at the boundary enter in proportion (the expected lift over random
  orders of the tie), so a constant score has lift 1 and no result depends on row order.

Campaigns are summarised by their mean and by the redeemer-weighted mean, with a bootstrap interval over
campaigns (:func:`summarise`); two scorers are compared on the same resampled campaigns
(:func:`paired_summary`). numpy only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.coupons import coupon_baskets, coupon_rate
from recsys.data.schema import BASKET, PRODUCT, SHOPPER
from recsys.data.sequences import positions
from recsys.data.split import parse_cutoff, temporal_split

TOP_SHARE = 0.1
BOOTSTRAP_SAMPLES = 2000


@dataclass(frozen=True)
class Campaign:
    """One recorded campaign: its start (tz-aware), recipients (ascending ids), which of them redeemed,
    and the products its coupons apply to."""

    campaign_id: int
    start: datetime
    recipients: np.ndarray  # [n] int64 shopper ids, ascending, unique
    redeemed: np.ndarray  # [n] bool
    products: np.ndarray  # int64 product ids, unique


def recorded_campaigns(
    members: pa.Table,
    descriptions: pa.Table,
    coupons: pa.Table,
    redemptions: pa.Table,
    timezone: str,
    first_receipt: datetime,
) -> list[Campaign]:
    """The campaigns that can be evaluated, in id order: those with at least one redeeming recipient that
    start after ``first_receipt`` (a campaign starting before any receipt has nothing to score with).

    Tables: ``members`` (campaign_id, household_id), ``descriptions`` (campaign_id, start_date),
    ``coupons`` (campaign_id, product_id; duplicates allowed), ``redemptions`` (campaign_id,
    household_id). ``start_date`` is a calendar date read as local midnight in ``timezone``.
    """
    starts = dict(
        zip(
            descriptions.column("campaign_id").to_pylist(),
            descriptions.column("start_date").to_pylist(),
            strict=True,
        )
    )
    campaigns = []
    for campaign_id in sorted(set(members.column("campaign_id").to_pylist())):
        if campaign_id not in starts:
            raise ValueError(f"campaign {campaign_id} has recipients but no start date")
        start = parse_cutoff(datetime.combine(starts[campaign_id], datetime.min.time()), timezone)
        recipients = np.unique(_of(members, campaign_id, "household_id"))
        redeemed = np.isin(recipients, _of(redemptions, campaign_id, "household_id"))
        if start <= first_receipt or not redeemed.any():
            continue
        products = np.unique(_of(coupons, campaign_id, "product_id"))
        campaigns.append(Campaign(int(campaign_id), start, recipients, redeemed, products))
    return campaigns


def _of(table: pa.Table, campaign_id: int, column: str) -> np.ndarray:
    rows = table.filter(pc.equal(table.column("campaign_id"), campaign_id))
    return rows.column(column).to_numpy().astype(np.int64)


def scores_before(
    campaign: Campaign, receipts: pa.Table, score: Callable[[Campaign, pa.Table], np.ndarray]
) -> np.ndarray:
    """``score(campaign, receipts before its start)`` [n recipients]: the one door through which a scorer
    sees the receipts, so nothing on or after the start date reaches it."""
    before, _ = temporal_split(receipts, campaign.start)
    values = np.asarray(score(campaign, before), dtype=np.float64)
    if values.shape != campaign.recipients.shape or not np.isfinite(values).all():
        raise ValueError(f"campaign {campaign.campaign_id}: need one finite score per recipient")
    return values


def past_purchases(campaign: Campaign, receipts: pa.Table) -> np.ndarray:
    """Baskets of each recipient containing one of the campaign's products."""
    rows = receipts.filter(pc.is_in(receipts.column(PRODUCT), pa.array(campaign.products)))
    rows = rows.filter(pc.is_in(rows.column(SHOPPER), pa.array(campaign.recipients)))
    baskets = rows.group_by([SHOPPER]).aggregate([(BASKET, "count_distinct")])
    return _per_recipient(campaign, baskets.column(SHOPPER), baskets.column(f"{BASKET}_count_distinct"))


def past_redemptions(redemptions: pa.Table, timezone: str) -> Callable[[Campaign, pa.Table], np.ndarray]:
    """A scorer counting each recipient's coupon redemptions (any campaign) before the campaign starts.

    ``redemptions`` has household_id and redemption_date (a calendar date, local in ``timezone``); a
    redemption on the start date itself is not before it."""
    dates = redemptions.column("redemption_date").to_pylist()
    households = redemptions.column("household_id").to_numpy().astype(np.int64)

    def score(campaign: Campaign, receipts: pa.Table) -> np.ndarray:
        del receipts  # scored from the redemptions alone
        earlier = np.array([date < campaign.start.date() for date in dates], dtype=bool)
        shoppers, counts = np.unique(households[earlier], return_counts=True)
        return _per_recipient(campaign, shoppers, counts)

    return score


def coupon_affinity(
    members: pa.Table, descriptions: pa.Table, redemptions: pa.Table, timezone: str
) -> Callable[[Campaign, pa.Table], np.ndarray]:
    """A scorer: each recipient's rate of using the coupons it receives, from campaigns before this one:
    ``(k + 1/2) / (n + 1)`` with ``n`` the campaigns it received that started before the start and ``k``
    those it redeemed before the start (a Jeffreys prior, so a household never coupon-tested gets 1/2).

    Multiplied by the propensity of buying the products it estimates P(redeem) = P(buy) x P(use the
    coupon | buy), if the two are independent."""
    starts = {
        row["campaign_id"]: parse_cutoff(datetime.combine(row["start_date"], datetime.min.time()), timezone)
        for row in descriptions.select(["campaign_id", "start_date"]).to_pylist()
    }
    received = members.select(["campaign_id", "household_id"]).to_pylist()
    used = redemptions.select(["campaign_id", "household_id", "redemption_date"]).to_pylist()

    def score(campaign: Campaign, receipts: pa.Table) -> np.ndarray:
        del receipts  # scored from the campaign tables alone
        earlier = {c for c, start in starts.items() if start < campaign.start}
        got = {(r["household_id"], r["campaign_id"]) for r in received if r["campaign_id"] in earlier}
        redeemed = {
            (r["household_id"], r["campaign_id"])
            for r in used
            if r["campaign_id"] in earlier and r["redemption_date"] < campaign.start.date()
        }
        offered = Counter(h for h, _ in got)
        taken = Counter(h for h, _ in redeemed & got)  # a redemption counts for a coupon received
        recipients = campaign.recipients.tolist()
        n = np.array([offered[h] for h in recipients], dtype=np.float64)
        k = np.array([taken[h] for h in recipients], dtype=np.float64)
        return (k + 0.5) / (n + 1.0)

    return score


def coupon_use(campaign: Campaign, receipts: pa.Table) -> np.ndarray:
    """Each recipient's coupon-use rate (:func:`recsys.coupons.coupon_rate`) over the receipts' shoppers:
    its smoothed share of baskets with a coupon discount (any coupon). Multiplied by the propensity of
    buying the products it estimates P(redeem) as :func:`coupon_affinity` does; recipients without
    receipts get the share over every shopper's baskets."""
    counted = receipts.group_by([SHOPPER]).aggregate([(BASKET, "count_distinct")])
    # a recipient without receipts adds no basket to the share, and gets it as its rate
    shoppers = np.union1d(counted.column(SHOPPER).to_numpy(), campaign.recipients)
    baskets = np.zeros(len(shoppers), np.int64)
    at, _ = positions(shoppers, counted.column(SHOPPER).to_numpy())
    baskets[at] = counted.column(f"{BASKET}_count_distinct").to_numpy()
    rate = coupon_rate(coupon_baskets(receipts, shoppers), baskets)
    return rate[positions(shoppers, campaign.recipients)[0]]


def _per_recipient(
    campaign: Campaign, shoppers: pa.Array | np.ndarray, values: pa.Array | np.ndarray
) -> np.ndarray:
    out = np.zeros(len(campaign.recipients))
    shoppers, values = np.asarray(shoppers, dtype=np.int64), np.asarray(values, dtype=np.float64)
    position = np.searchsorted(campaign.recipients, shoppers)
    known = (position < len(out)) & (campaign.recipients[np.minimum(position, len(out) - 1)] == shoppers)
    out[position[known]] = values[known]
    return out


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for boolean ``labels`` (Mann-Whitney, ties count half)."""
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        raise ValueError("AUC needs both redeemers and non-redeemers")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    midrank = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # 1-based ranks, ties averaged
    return float((midrank[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def paired_auc(
    scores: np.ndarray, reference: np.ndarray, labels: np.ndarray, samples: int = 200, seed: int = 0
) -> dict[str, float]:
    """AUC of ``scores`` and of ``reference`` on the same ``labels``, their difference and its 95%
    interval from ``samples`` bootstrap resamples of the shoppers (both scorers on each resample;
    resamples with a single outcome are skipped)."""
    labels = np.asarray(labels, dtype=bool)
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(samples):
        draw = rng.integers(0, len(labels), len(labels))
        if 0 < labels[draw].sum() < len(draw):
            differences.append(auc(scores[draw], labels[draw]) - auc(reference[draw], labels[draw]))
    model, base = auc(scores, labels), auc(reference, labels)
    low, high = np.percentile(differences, [2.5, 97.5]) if differences else (np.nan, np.nan)
    return {"auc": model, "reference_auc": base, "difference": model - base, "ci": [float(low), float(high)]}


def top_lift(scores: np.ndarray, labels: np.ndarray, share: float = TOP_SHARE) -> float:
    """Redemption rate of the top ``ceil(share * n)`` recipients over the overall rate; a tie straddling
    the boundary contributes its redeemers in proportion to the places left (expected over tie orders)."""
    size = int(np.ceil(share * len(scores)))
    values, inverse = np.unique(-scores, return_inverse=True)  # best score first
    counts = np.bincount(inverse, minlength=len(values))
    hits = np.bincount(inverse, weights=labels.astype(np.float64), minlength=len(values))
    before = np.cumsum(counts) - counts  # recipients ranked above each tie group
    taken = np.clip(size - before, 0, counts)  # how many of each group make the top
    expected = float((hits * taken / counts).sum())
    return expected / size / labels.mean()


@dataclass(frozen=True)
class Summary:
    """One metric over campaigns: its mean and redeemer-weighted mean, with 95% bootstrap intervals."""

    campaigns: int
    mean: float
    mean_ci: tuple[float, float]
    weighted: float
    weighted_ci: tuple[float, float]


def summarise(values: np.ndarray, redeemers: np.ndarray, seed: int = 0) -> Summary:
    """:class:`Summary` of per-campaign ``values`` (campaigns resampled with replacement)."""
    values, weights = np.asarray(values, dtype=np.float64), np.asarray(redeemers, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(values), (BOOTSTRAP_SAMPLES, len(values)))
    means = values[draws].mean(axis=1)
    weighted = (values[draws] * weights[draws]).sum(axis=1) / weights[draws].sum(axis=1)
    return Summary(
        len(values),
        float(values.mean()),
        _interval(means),
        float((values * weights).sum() / weights.sum()),
        _interval(weighted),
    )


def paired_summary(
    values: np.ndarray, reference: np.ndarray, redeemers: np.ndarray, seed: int = 0
) -> Summary:
    """:class:`Summary` of ``values - reference`` per campaign: both scorers on the same resampled
    campaigns, so the interval is of the difference."""
    return summarise(np.asarray(values) - np.asarray(reference), redeemers, seed)


def _interval(samples: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(samples, [2.5, 97.5])
    return float(low), float(high)
