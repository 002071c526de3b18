"""Coupon-campaign targeting on Complete Journey's recorded campaigns: the ranking stage's propensity
against the reference scorers.

For every campaign with a redeeming recipient that starts after the first receipt (24 of 30), its
recipients are ranked with data strictly before its start date (``recsys.evaluation.campaigns``) by

- past purchases: baskets containing one of the campaign's coupon products;
- past redemptions: coupon redemptions of any earlier campaign;
- coupon use: the recipient's smoothed share of baskets with a coupon discount in its receipts
  (``recsys.evaluation.campaigns.coupon_use``);
- the ranking stage (``--model``): the raw propensity score of buying one of the coupon products within
  the campaign's duration (``recsys.propensity``), from a ranker fitted on the receipts before the first
  of the start's month (``benchmarks.cj_rankers``: no network);
- coupon affinity (``--model``): the recipient's smoothed share of earlier campaigns it redeemed;
- ranking stage x affinity (``--model``): P(buy) as the audience job computes it (the raw score and the
  recipient's history of the products through ``recsys.combination``, ``cj_rankers.calibrated_propensity``)
  times the affinity, an estimate of P(redeem) = P(buy) x P(use the coupon | buy); ranking stage x
  coupon use the same with coupon use;
- learned redemption (``--model``): :func:`learned_redemption`, those scorers combined by
  ``recsys.combination`` fitted on the recipients of the campaigns that ended before the start;

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

from batch.audiences import cross_fold
from benchmarks.cj_rankers import calibrated_propensity, histories_of, month_of, ranker_before, raw_scores
from recsys.combination import fit_combination
from recsys.data.completejourney import load_campaign_tables, load_complete_journey, load_products
from recsys.data.schema import BASKET, SHOPPER, TIMESTAMP
from recsys.evaluation.campaigns import (
    Campaign,
    Summary,
    auc,
    coupon_affinity,
    coupon_use,
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


def purchase(products: pa.Table, durations: dict[int, int]) -> Callable[[Campaign, pa.Table], np.ndarray]:
    """A scorer: P(buy the products during the campaign), calibrated as the audience job calibrates it
    (``cj_rankers.calibrated_propensity``), computed once per campaign."""

    kept: dict[int, np.ndarray] = {}  # a campaign is always scored on the receipts before its start

    def score(campaign: Campaign, before: pa.Table) -> np.ndarray:
        if campaign.campaign_id not in kept:
            duration = durations[campaign.campaign_id]
            kept[campaign.campaign_id] = calibrated_propensity(before, products, campaign, duration)
        return kept[campaign.campaign_id]

    return score


def redemption(
    buy: Callable[[Campaign, pa.Table], np.ndarray], use: Callable[[Campaign, pa.Table], np.ndarray]
) -> Callable[[Campaign, pa.Table], np.ndarray]:
    """A scorer: P(buy) times a rate of using coupons (``coupon_affinity`` or ``coupon_use`` of
    ``recsys.evaluation.campaigns``): P(redeem) if the two are independent."""
    return lambda campaign, before: buy(campaign, before) * use(campaign, before)


def learned_redemption(
    campaigns: list[Campaign],
    receipts: pa.Table,
    columns: dict[str, Callable[[Campaign, pa.Table], np.ndarray]],
    ends: dict[int, date],
    redemptions: pa.Table,
) -> Callable[[Campaign, pa.Table], np.ndarray]:
    """A scorer: P(redeem) learned from the campaigns that ended before this one starts.

    Each earlier campaign's recipients are examples: the scorers ``columns`` evaluated at that campaign's
    start (the first is the one to fall back on), and whether the recipient redeemed one of its coupons
    before this campaign's start. ``recsys.combination`` fits them (monotone trees, isotonic calibration
    of the cross-fitted output, folds by household so a household's campaigns share a fold); with too few
    redemptions among them it is the first scorer alone, calibrated. Recipients rank as the audience job
    ranks: by that probability, ties broken by the combined score (so by the score's order)."""
    rows: dict[int, np.ndarray] = {}
    dated = redemptions.select(["campaign_id", "household_id", "redemption_date"]).to_pylist()

    def features_of(campaign: Campaign) -> np.ndarray:
        if campaign.campaign_id not in rows:  # each scorer sees the receipts before this campaign's start
            values = [scores_before(campaign, receipts, scorer) for scorer in columns.values()]
            rows[campaign.campaign_id] = np.column_stack(values)
        return rows[campaign.campaign_id]

    def score(campaign: Campaign, before: pa.Table) -> np.ndarray:
        del before  # every column is read through scores_before, at its own campaign's start
        day = campaign.start.date()
        earlier = [c for c in campaigns if ends[c.campaign_id] < day]
        used = {(r["campaign_id"], r["household_id"]) for r in dated if r["redemption_date"] < day}
        x = np.concatenate([features_of(c) for c in earlier] or [np.zeros((0, len(columns)))])
        y = np.concatenate([[(c.campaign_id, int(h)) in used for h in c.recipients] for c in earlier] or [[]])
        households = np.concatenate([c.recipients for c in earlier] or [np.zeros(0, np.int64)])
        names = tuple(name.replace(" ", "_") for name in columns)
        if len(x) == 0:  # nothing ended before: the first scorer as it is
            return features_of(campaign)[:, 0]
        combination = fit_combination(
            x, y.astype(bool), names, (True,) * len(columns), cross_fold(households)
        )
        return combination.score(features_of(campaign))  # the probabilities' order, ties broken

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
        "coupon use": coupon_use,
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
        buy = purchase(products, durations)
        scorers["ranking stage x affinity"] = redemption(buy, affinity)
        scorers["ranking stage x coupon use"] = redemption(buy, coupon_use)
        ends = {d["campaign_id"]: d["end_date"] for d in descriptions}
        columns = {  # the first is the fallback where too few earlier campaigns ended
            "ranking stage x affinity": scorers["ranking stage x affinity"],
            "coupon affinity": affinity,
            "past redemptions": scorers["past redemptions"],
            "past purchases": past_purchases,
            "ranking stage x coupon use": scorers["ranking stage x coupon use"],
            "coupon use": coupon_use,
        }
        scorers["learned redemption"] = learned_redemption(
            campaigns, receipts, columns, ends, tables["coupon_redemptions"]
        )
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
    pairs = [("past redemptions", "past purchases"), ("coupon use", "past redemptions")]
    if args.model:
        pairs += [("ranking stage", "past purchases"), ("ranking stage", "past redemptions"),
                  ("ranking stage x affinity", "past redemptions"),
                  ("ranking stage x coupon use", "past redemptions"),
                  ("learned redemption", "past redemptions"),
                  ("learned redemption", "ranking stage x affinity")]  # fmt: skip
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
