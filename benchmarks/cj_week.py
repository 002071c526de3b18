"""A week of Complete Journey's real campaigns under a contact cap: the allocated plan against each campaign
taking its own top audience, judged on the recorded redemptions.

The ten latest-starting evaluable campaigns (``recsys.evaluation.campaigns.recorded_campaigns``) are
planned as one week. Each may contact only its recorded recipients (the only households whose response
is known), at most half of them (so that choosing matters), with at most ``--cap`` contacts per
household over the week. Each (recipient, campaign) pair's value is its estimated P(redeem): the
calibrated propensity of buying one of the campaign's coupon products during the campaign
(``recsys.propensity``, from a ranker fitted before the first of the start's month,
``benchmarks.cj_rankers``; isotonic calibration on every household's purchases in the campaign's length
before its start) times the household's rate of using coupons: by default its coupon use (``--use
coupons``, ``recsys.evaluation.campaigns.coupon_use``: its share of baskets with a coupon discount, what
the audience job's ``objective: redeem`` multiplies by), or its coupon affinity (``--use affinity``,
``recsys.evaluation.campaigns.coupon_affinity``: earlier campaigns redeemed), all from data before its
start.

Plans (``batch.allocation``): the allocation (the exact MILP, and the Lagrangian method) and the
uncoordinated reference (each campaign its top audience, then each household over the cap keeps its most
probable contacts). Reported: contacts, expected redemptions (sum of the values) and the recorded
redemptions among the contacted pairs, with a 95% bootstrap interval over households for the paired
difference against the reference.

    python -m benchmarks.cj_week [--cap 2] [--campaigns 10] [--use coupons|affinity]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow.compute as pc

from batch.allocation import Allocation, Problem, allocate, exact, independent
from benchmarks.cj_rankers import calibrated_propensity
from recsys.data.completejourney import load_campaign_tables, load_complete_journey, load_products
from recsys.data.schema import TIMESTAMP
from recsys.data.split import temporal_split
from recsys.evaluation.campaigns import coupon_affinity, coupon_use, recorded_campaigns

BOOTSTRAP = 2000


def judged(plan: Allocation, redeemed: np.ndarray, values: np.ndarray) -> tuple[int, float, np.ndarray]:
    """Contacts, expected conversions, and each household's recorded redemptions among its contacts."""
    contacts = plan.contacts
    return int(contacts.sum()), float(values[contacts].sum()), (contacts & redeemed).sum(axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timezone", default="America/New_York")
    parser.add_argument("--cap", type=int, default=2, help="contacts per household over the week")
    parser.add_argument("--campaigns", type=int, default=10)
    parser.add_argument("--use", choices=("coupons", "affinity"), default="coupons",
                        help="the rate of using coupons P(buy) is multiplied by")  # fmt: skip
    args = parser.parse_args()
    started = time.perf_counter()
    receipts = load_complete_journey(timezone=args.timezone)
    products = load_products()
    tables = load_campaign_tables()
    first = pc.min(receipts.column(TIMESTAMP)).as_py()
    campaigns = recorded_campaigns(
        tables["campaigns"], tables["campaign_descriptions"], tables["coupons"],
        tables["coupon_redemptions"], args.timezone, first,
    )  # fmt: skip
    week = sorted(campaigns, key=lambda c: (c.start, c.campaign_id))[-args.campaigns :]
    durations = {
        d["campaign_id"]: (d["end_date"] - d["start_date"]).days
        for d in tables["campaign_descriptions"].to_pylist()
    }
    use = coupon_use
    if args.use == "affinity":
        use = coupon_affinity(
            tables["campaigns"], tables["campaign_descriptions"], tables["coupon_redemptions"], args.timezone
        )
    households = np.unique(np.concatenate([c.recipients for c in week]))
    values = np.zeros((len(households), len(week)), dtype=np.float32)
    redeemed = np.zeros(values.shape, dtype=bool)
    for j, campaign in enumerate(week):
        at = np.searchsorted(households, campaign.recipients)
        before, _ = temporal_split(receipts, campaign.start)
        buy = calibrated_propensity(before, products, campaign, durations[campaign.campaign_id])
        values[at, j] = buy * use(campaign, before)  # P(redeem) = P(buy) x P(use the coupon | buy)
        redeemed[at, j] = campaign.redeemed
    audience = np.array([int(np.ceil(len(c.recipients) / 2)) for c in week])
    problem = Problem(values, args.cap, audience)
    plans = {"allocation (exact MILP)": exact(problem), "allocation (Lagrangian)": allocate(problem),
             "each campaign its top, then the cap": independent(problem)}  # fmt: skip
    baseline = plans["each campaign its top, then the cap"]
    reference = judged(baseline, redeemed, values)[2]
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(households), (BOOTSTRAP, len(households)))
    print(f"{len(week)} campaigns ({', '.join(str(c.campaign_id) for c in week)}), {len(households):,} "
          f"recipient households, audiences {audience.sum():,} in all, cap {args.cap} per household, "
          f"{int(redeemed.sum())} recorded redeeming pairs\n")  # fmt: skip
    print("| plan | contacts | expected redemptions | recorded redemptions | Δ vs reference [95% CI] |")
    print("|---|---|---|---|---|")
    for name, plan in plans.items():
        contacts, expected, per_household = judged(plan, redeemed, values)
        difference = per_household - reference
        low, high = np.percentile(difference[draws].sum(axis=1), [2.5, 97.5])
        cell = "" if plan is baseline else f"{difference.sum():+d} [{low:+.0f}, {high:+.0f}]"
        print(f"| {name} | {contacts:,} | {expected:.1f} | {int(per_household.sum())} | {cell} |")
    at_cap = (plans["allocation (exact MILP)"].contacts.sum(axis=1) >= args.cap).sum()
    print(f"\nhouseholds at the cap in the exact plan: {at_cap:,}; {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
