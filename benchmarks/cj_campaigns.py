"""Coupon-campaign targeting on Complete Journey's recorded campaigns: the ranking stage's propensity
against the reference scorers.

For every campaign with a redeeming recipient that starts after the first receipt (24 of 30), its
recipients are ranked with data strictly before its start date (``recsys.evaluation.campaigns``) by

- past purchases: baskets containing one of the campaign's coupon products;
- past redemptions: coupon redemptions of any earlier campaign;
- the ranking stage (``--model``): the raw propensity score of buying one of the coupon products within
  the campaign's duration (``recsys.propensity``; the calibration keeps its order), from a ranker fitted
  on the receipts before the first of the start's month (``benchmarks.cj_rankers``: no network);
- coupon affinity (``--model``): the recipient's smoothed share of earlier campaigns it redeemed;
- ranking stage x affinity (``--model``): the calibrated propensity times the affinity, an estimate of
  P(redeem) = P(buy) x P(use the coupon | buy);

and scored by AUC and lift in the top 10% (mean over campaigns and redeemer-weighted, 95% bootstrap
intervals over campaigns), with paired differences; then the same AUCs over the low-activity recipients
(the bottom third of all households by baskets before the start), where both outcomes occur.

    python -m benchmarks.cj_campaigns [--model]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from datetime import date

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from benchmarks.cj_rankers import calibrated_propensity, histories_of, month_of, ranker_before, raw_scores
from recsys.data.completejourney import load_campaign_tables, load_complete_journey, load_products
from recsys.data.schema import BASKET, SHOPPER, TIMESTAMP
from recsys.evaluation.campaigns import (
    Campaign,
    Summary,
    auc,
    coupon_affinity,
    paired_summary,
    past_purchases,
    past_redemptions,
    recorded_campaigns,
    scores_before,
    summarise,
    top_lift,
)


def _line(name: str, metric: str, summary: Summary) -> str:
    return (
        f"| {name} | {metric} | {summary.mean:.3f} [{summary.mean_ci[0]:.3f}, {summary.mean_ci[1]:.3f}] "
        f"| {summary.weighted:.3f} [{summary.weighted_ci[0]:.3f}, {summary.weighted_ci[1]:.3f}] |"
    )


def ranking_stage(
    products: pa.Table, durations: dict[int, int]
) -> Callable[[Campaign, pa.Table], np.ndarray]:
    """A scorer: each recipient's raw propensity for the campaign's products over its duration (recipients
    without a known product score below everyone), from the ranker fitted before the start's month."""

    def score(campaign: Campaign, before: pa.Table) -> np.ndarray:
        ranker, vocab = ranker_before(before, products, month_of(campaign.start))
        recipients, duration = campaign.recipients, durations[campaign.campaign_id]
        histories = histories_of(before, vocab, recipients)
        raw = raw_scores(ranker, vocab, histories, campaign.products, campaign.start, duration)
        return np.nan_to_num(raw, nan=-1.0)

    return score


def redemption(
    products: pa.Table, durations: dict[int, int], affinity: Callable[[Campaign, pa.Table], np.ndarray]
) -> Callable[[Campaign, pa.Table], np.ndarray]:
    """A scorer: P(buy the products during the campaign), calibrated, times the recipient's coupon
    affinity (``recsys.evaluation.campaigns.coupon_affinity``): P(redeem) if the two are independent."""

    def score(campaign: Campaign, before: pa.Table) -> np.ndarray:
        buy = calibrated_propensity(before, products, campaign, durations[campaign.campaign_id])
        return buy * affinity(campaign, before)

    return score


def low_activity(campaign: Campaign, before: pa.Table) -> np.ndarray:
    """[recipients] bool: in the bottom third of all households by baskets before the start."""
    baskets = before.group_by([SHOPPER]).aggregate([(BASKET, "count_distinct")])
    counts = baskets.column(f"{BASKET}_count_distinct").to_numpy()
    threshold = np.quantile(counts, 1 / 3)
    ids = baskets.column(SHOPPER).to_numpy()
    mine = dict(zip(ids.tolist(), counts.tolist(), strict=True))
    return np.array([mine.get(int(r), 0) <= threshold for r in campaign.recipients])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timezone", default="America/New_York")
    parser.add_argument("--model", action="store_true", help="also the ranking stage (fits rankers)")
    args = parser.parse_args()

    started = time.perf_counter()
    receipts = load_complete_journey(timezone=args.timezone)
    tables = load_campaign_tables()
    first = pc.min(receipts.column(TIMESTAMP)).as_py()
    campaigns = recorded_campaigns(
        tables["campaigns"],
        tables["campaign_descriptions"],
        tables["coupons"],
        tables["coupon_redemptions"],
        args.timezone,
        first,
    )
    scorers = {
        "past purchases": past_purchases,
        "past redemptions": past_redemptions(tables["coupon_redemptions"], args.timezone),
    }
    if args.model:
        descriptions = tables["campaign_descriptions"].to_pylist()
        durations = {d["campaign_id"]: (d["end_date"] - d["start_date"]).days for d in descriptions}
        products = load_products()
        affinity = coupon_affinity(
            tables["campaigns"], tables["campaign_descriptions"], tables["coupon_redemptions"], args.timezone
        )
        scorers["ranking stage"] = ranking_stage(products, durations)
        scorers["coupon affinity"] = affinity
        scorers["ranking stage x affinity"] = redemption(products, durations, affinity)
    redeemers = np.array([c.redeemed.sum() for c in campaigns])
    low = [scores_before(c, receipts, low_activity) > 0 for c in campaigns]
    figures: dict[str, dict[str, np.ndarray]] = {}
    quiet: dict[str, list[float]] = {}
    for name, scorer in scorers.items():
        scores = [scores_before(c, receipts, scorer) for c in campaigns]
        figures[name] = {
            "AUC": np.array([auc(s, c.redeemed) for s, c in zip(scores, campaigns, strict=True)]),
            "lift@10%": np.array([top_lift(s, c.redeemed) for s, c in zip(scores, campaigns, strict=True)]),
        }
        quiet[name] = [
            auc(s[m], c.redeemed[m])
            for s, c, m in zip(scores, campaigns, low, strict=True)
            if 0 < c.redeemed[m].sum() < m.sum()
        ]
    print(f"{len(campaigns)} campaigns, {int(redeemers.sum())} redeeming recipients, {date.today()}")
    print("| scorer | metric | mean [95% CI] | redeemer-weighted [95% CI] |\n|---|---|---|---|")
    for name, metrics in figures.items():
        for metric, values in metrics.items():
            print(_line(name, metric, summarise(values, redeemers)))
    pairs = [("past redemptions", "past purchases")]
    if args.model:
        pairs += [("ranking stage", "past purchases"), ("ranking stage", "past redemptions"),
                  ("ranking stage x affinity", "past redemptions")]  # fmt: skip
    for better, worse in pairs:
        for metric in ("AUC", "lift@10%"):
            difference = paired_summary(figures[better][metric], figures[worse][metric], redeemers)
            print(_line(f"{better} - {worse}", metric, difference))
    print("\nLow-activity recipients (bottom third of households by baskets before the start):")
    for name, values in quiet.items():
        print(f"- {name}: mean AUC {np.mean(values):.3f} over {len(values)} campaigns with both outcomes")
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
