"""Campaign-targeting evaluation (recsys.evaluation.campaigns): metrics by hand, no data on or after a
campaign's start reaching a scorer, and which campaigns are evaluated."""

from __future__ import annotations

from datetime import date, datetime
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pytest

from recsys.coupons import PRIOR_BASKETS, coupon_baskets, coupon_rate
from recsys.data.schema import BASKET, COUPON, PRODUCT, SHOPPER, TIMESTAMP
from recsys.evaluation.campaigns import (
    Campaign,
    auc,
    coupon_use,
    paired_auc,
    paired_summary,
    past_purchases,
    past_redemptions,
    recorded_campaigns,
    scores_before,
    summarise,
    top_lift,
)

ZONE = "America/New_York"


def local(*moment: int) -> datetime:
    return datetime(*moment, tzinfo=ZoneInfo(ZONE))


def receipts(rows: list[tuple[int, int, int, datetime]]) -> pa.Table:
    shoppers, baskets, products, times = zip(*rows, strict=True)
    return pa.table(
        {
            SHOPPER: pa.array(shoppers, pa.int64()),
            BASKET: pa.array(baskets, pa.int64()),
            PRODUCT: pa.array(products, pa.int64()),
            TIMESTAMP: pa.array(times, pa.timestamp("us", tz=ZONE)),
        }
    )


CAMPAIGN = Campaign(
    7, local(2017, 6, 1), np.array([1, 2, 3, 4]), np.array([True, False, True, False]), np.array([10, 11])
)


def test_auc_by_hand_with_ties_counting_half() -> None:
    labels = np.array([True, False, True, False, False])
    # redeemers at 0.9 and 0.5; non-redeemers 0.5, 0.2, 0.1: 5 of 6 pairs won, one tied
    assert auc(np.array([0.9, 0.5, 0.5, 0.2, 0.1]), labels) == pytest.approx(5.5 / 6)
    assert auc(np.ones(5), labels) == 0.5
    with pytest.raises(ValueError, match="both"):
        auc(np.ones(3), np.ones(3, dtype=bool))


def test_top_lift_takes_ceil_of_the_share_and_splits_a_boundary_tie() -> None:
    labels = np.zeros(20, dtype=bool)
    labels[[0, 5]] = True  # overall rate 0.1
    scores = np.arange(20, 0, -1).astype(float)  # recipient 0 is first
    assert top_lift(scores, labels) == pytest.approx((1 / 2) / 0.1)  # top 2: one redeemer
    assert top_lift(np.ones(20), labels) == pytest.approx(1.0)  # a constant score ranks no one
    tied = scores.copy()
    tied[[1, 2, 3]] = 0.5  # the 2nd place is shared by three recipients, none a redeemer ...
    tied[0] = 30.0
    assert top_lift(tied, labels, share=0.1) == pytest.approx((1 / 2) / 0.1)
    tied[[1, 2, 3]] = 100.0  # ... or three tied at the top, one of them a redeemer (recipient 0 moved)
    labels2 = labels.copy()
    labels2[[0, 1]] = [False, True]
    assert top_lift(tied, labels2, share=0.1) == pytest.approx((2 * 1 / 3) / 2 / 0.1)
    assert top_lift(np.linspace(1, 0, 21), np.r_[True, np.zeros(20, bool)]) == pytest.approx(1 / 3 / (1 / 21))


def test_past_purchases_count_baskets_of_the_coupon_products_before_the_start_only() -> None:
    table = receipts(
        [
            (1, 100, 10, local(2017, 5, 1)),
            (1, 100, 11, local(2017, 5, 1)),  # same basket: counted once
            (1, 101, 11, local(2017, 5, 20)),
            (2, 102, 99, local(2017, 5, 2)),  # not a coupon product
            (3, 103, 10, local(2017, 6, 1)),  # at the start: not before it
            (3, 104, 10, local(2017, 5, 31, 23, 59)),
            (9, 105, 10, local(2017, 5, 3)),  # not a recipient
        ]
    )
    assert scores_before(CAMPAIGN, table, past_purchases).tolist() == [2, 0, 1, 0]


def test_no_receipt_on_or_after_the_start_reaches_a_scorer() -> None:
    seen: list[pa.Table] = []

    def spy(campaign: Campaign, before: pa.Table) -> np.ndarray:
        seen.append(before)
        return np.zeros(len(campaign.recipients))

    table = receipts(
        [(1, 1, 10, local(2017, 5, 31)), (1, 2, 10, local(2017, 6, 1)), (2, 3, 10, local(2017, 7, 1))]
    )
    scores_before(CAMPAIGN, table, spy)
    assert seen[0].num_rows == 1 and seen[0].column(BASKET).to_pylist() == [1]
    with pytest.raises(ValueError, match="one finite score per recipient"):
        scores_before(CAMPAIGN, table, lambda c, r: np.zeros(3))


def test_past_redemptions_count_earlier_redemptions_of_any_campaign() -> None:
    redemptions = pa.table(
        {
            "household_id": [1, 1, 3, 3, 4],
            "redemption_date": [
                date(2017, 3, 1),
                date(2017, 5, 31),
                date(2017, 6, 1),
                date(2017, 1, 1),
                date(2017, 8, 1),
            ],
        }
    )
    scorer = past_redemptions(redemptions, ZONE)
    assert scores_before(CAMPAIGN, receipts([(1, 1, 10, local(2017, 1, 1))]), scorer).tolist() == [2, 0, 1, 0]


def test_coupon_use_is_the_smoothed_share_of_baskets_with_a_coupon_before_the_start() -> None:
    """By hand: shopper 1 has 2 baskets, one with a coupon line (either sign counts, a null does not);
    shopper 2 has 1 basket without; shopper 9 (no recipient) 1 with; recipients 3 and 4 have no receipt
    before the start (3's coupon basket is on the start day) and get the share itself."""
    rows = [
        (1, 100, 10, local(2017, 5, 1), 0.0),
        (1, 100, 11, local(2017, 5, 1), -0.5),  # a coupon, negative convention
        (1, 101, 11, local(2017, 5, 20), None),  # unknown: no coupon
        (2, 102, 99, local(2017, 5, 2), 0.0),
        (9, 105, 10, local(2017, 5, 3), 1.0),
        (3, 103, 10, local(2017, 6, 1), 1.0),  # at the start: not before it
    ]
    table = receipts([r[:4] for r in rows]).append_column(
        COUPON, pa.array([r[4] for r in rows], pa.float64())
    )
    # baskets with a coupon over all baskets before the start: 100 and 105 of 100, 101, 102 and 105
    share = 2 / 4
    one, two = (1 + share * PRIOR_BASKETS) / (2 + PRIOR_BASKETS), share * PRIOR_BASKETS / (1 + PRIOR_BASKETS)
    expected = [one, two, share, share]
    np.testing.assert_allclose(scores_before(CAMPAIGN, table, coupon_use), expected, rtol=1e-12)
    assert coupon_baskets(table, np.array([1, 2, 3, 9])).tolist() == [1, 0, 1, 1]
    with pytest.raises(ValueError, match=COUPON):
        coupon_baskets(receipts([r[:4] for r in rows]), np.array([1]))
    with pytest.raises(ValueError, match="baskets with a coupon"):
        coupon_rate(np.array([3]), np.array([2]))


def test_recorded_campaigns_keep_those_with_a_redeemer_starting_after_the_first_receipt() -> None:
    members = pa.table({"campaign_id": [1, 1, 1, 2, 2, 3, 3], "household_id": [5, 4, 6, 4, 5, 4, 5]})
    descriptions = pa.table(
        {"campaign_id": [1, 2, 3], "start_date": [date(2017, 3, 1), date(2016, 12, 1), date(2017, 4, 1)]}
    )
    coupons = pa.table({"campaign_id": [1, 1, 1, 2], "product_id": [30, 20, 30, 20]})
    redemptions = pa.table({"campaign_id": [1, 2, 1], "household_id": [6, 4, 9]})  # 9: not a recipient
    campaigns = recorded_campaigns(members, descriptions, coupons, redemptions, ZONE, local(2017, 1, 1))
    assert [c.campaign_id for c in campaigns] == [1]  # 2 starts before any receipt, 3 has no redeemer
    (first,) = campaigns
    assert first.recipients.tolist() == [4, 5, 6] and first.redeemed.tolist() == [False, False, True]
    assert first.products.tolist() == [20, 30] and first.start == local(2017, 3, 1)
    with pytest.raises(ValueError, match="campaign 4 has recipients but no start date"):
        recorded_campaigns(
            pa.table({"campaign_id": [4], "household_id": [1]}), descriptions, coupons, redemptions, ZONE,
            local(2017, 1, 1),
        )  # fmt: skip


def test_summaries_weight_by_redeemers_and_pair_on_the_same_resamples() -> None:
    summary = summarise(np.array([0.6, 0.8]), np.array([1, 3]))
    assert summary.campaigns == 2 and summary.mean == pytest.approx(0.7)
    assert summary.weighted == pytest.approx(0.75)
    assert summary.mean_ci[0] >= 0.6 - 1e-12 and summary.mean_ci[1] <= 0.8 + 1e-12
    same = paired_summary(np.array([0.6, 0.8, 0.7]), np.array([0.5, 0.7, 0.6]), np.array([1, 2, 3]))
    assert same.mean == pytest.approx(0.1) and same.mean_ci == pytest.approx((0.1, 0.1))


def test_paired_auc_compares_two_scorers_on_the_same_resamples() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.3
    good = labels + rng.normal(0, 0.8, 300)
    same = paired_auc(good, good.copy(), labels)
    assert same["difference"] == 0.0 and same["ci"] == [0.0, 0.0]  # paired: identical on every resample
    against_constant = paired_auc(good, np.zeros(300), labels)
    assert against_constant["reference_auc"] == 0.5 and against_constant["auc"] == auc(good, labels)
    low, high = against_constant["ci"]
    assert 0 < low <= against_constant["difference"] <= high
