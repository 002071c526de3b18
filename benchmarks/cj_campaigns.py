"""Coupon-campaign targeting on Complete Journey's recorded campaigns: the reference scorers.

For every campaign with a redeeming recipient that starts after the first receipt (24 of 30), its
recipients are ranked with data strictly before its start date (``recsys.evaluation.campaigns``) by

- past purchases: baskets containing one of the campaign's coupon products;
- past redemptions: coupon redemptions of any earlier campaign;

and scored by AUC and lift in the top 10% (mean over campaigns and redeemer-weighted, 95% bootstrap
intervals over campaigns), plus the paired difference of the two.

    python -m benchmarks.cj_campaigns
"""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow.compute as pc

from recsys.data.completejourney import load_campaign_tables, load_complete_journey
from recsys.data.schema import TIMESTAMP
from recsys.evaluation.campaigns import (
    Summary,
    auc,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timezone", default="America/New_York")
    args = parser.parse_args()

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
    redeemers = np.array([c.redeemed.sum() for c in campaigns])
    figures: dict[str, dict[str, np.ndarray]] = {}
    for name, scorer in scorers.items():
        scores = [scores_before(c, receipts, scorer) for c in campaigns]
        figures[name] = {
            "AUC": np.array([auc(s, c.redeemed) for s, c in zip(scores, campaigns, strict=True)]),
            "lift@10%": np.array([top_lift(s, c.redeemed) for s, c in zip(scores, campaigns, strict=True)]),
        }
    print(f"{len(campaigns)} campaigns, {int(redeemers.sum())} redeeming recipients")
    print("| scorer | metric | mean [95% CI] | redeemer-weighted [95% CI] |\n|---|---|---|---|")
    for name, metrics in figures.items():
        for metric, values in metrics.items():
            print(_line(name, metric, summarise(values, redeemers)))
    for metric in ("AUC", "lift@10%"):
        difference = paired_summary(
            figures["past redemptions"][metric], figures["past purchases"][metric], redeemers
        )
        print(_line("redemptions - purchases", metric, difference))


if __name__ == "__main__":
    main()
