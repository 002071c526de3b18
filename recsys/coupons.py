"""Coupon use: how often a shopper's baskets carry a coupon discount, the "uses the coupon" half of
P(redeem) = P(buy the products) x P(use a coupon).

A receipt line's ``coupon_discount`` (``recsys.data.schema.COUPON``) is not 0 where a coupon was used on
it (either sign convention; null is unknown and counts as no coupon). A shopper's rate is the share of its
baskets with such a line, pulled towards the share over every shopper's baskets by
:data:`PRIOR_BASKETS` baskets, so a shopper with one or two baskets is neither first nor last on them.
Far more households use some coupon than redeem one of a retailer's recorded campaigns, so the rate ranks
shoppers where past redemptions have nothing to count (docs/results.md, "Campaign targeting"). numpy and
pyarrow only.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.data.schema import BASKET, COUPON, SHOPPER
from recsys.data.sequences import positions

PRIOR_BASKETS = 10.0


def coupon_baskets(receipts: pa.Table, shopper_ids: np.ndarray) -> np.ndarray:
    """[S] int64: baskets of each of ``shopper_ids`` (ascending) in ``receipts`` with a coupon discount.

    Raises ValueError naming the column when the receipts do not carry it."""
    if COUPON not in receipts.column_names:
        raise ValueError(f"coupon use needs the receipts' {COUPON!r} column (the line's coupon discount)")
    used = pc.fill_null(pc.not_equal(receipts.column(COUPON), 0.0), False)
    lines = pa.table({SHOPPER: receipts.column(SHOPPER), BASKET: receipts.column(BASKET), "used": used})
    lines = lines.filter(lines.column("used"))
    per_shopper = lines.group_by([SHOPPER]).aggregate([(BASKET, "count_distinct")])
    out = np.zeros(len(shopper_ids), np.int64)
    at, known = positions(np.asarray(shopper_ids, np.int64), per_shopper.column(SHOPPER).to_numpy())
    out[at[known]] = per_shopper.column(f"{BASKET}_count_distinct").to_numpy()[known]
    return out


def coupon_rate(with_coupon: np.ndarray, baskets: np.ndarray) -> np.ndarray:
    """[S] each shopper's smoothed share of baskets with a coupon, ``(c + m * PRIOR_BASKETS) / (n +
    PRIOR_BASKETS)``, from its baskets with a coupon ``c`` [S] and all its baskets ``n`` [S]; ``m`` is the
    share over these shoppers together, so pass every shopper scored at once (a part of them would move
    ``m``)."""
    c, n = np.asarray(with_coupon, np.float64), np.asarray(baskets, np.float64)
    if c.shape != n.shape or (c < 0).any() or (c > n).any():
        raise ValueError("need 0 <= baskets with a coupon <= baskets, one of each per shopper")
    share = c.sum() / max(n.sum(), 1.0)
    return (c + share * PRIOR_BASKETS) / (n + PRIOR_BASKETS)
