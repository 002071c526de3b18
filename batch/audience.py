"""A campaign's audience from per-shopper probabilities: the threshold, exclusions, the exploration share.

:func:`select_audience` takes each shopper's calibrated probability of buying the campaign's products
within its horizon and when the shopper last bought them, and returns the ranked audience:

- never a shopper under ``min_probability``, opted out, or who bought the products within
  ``bought_within_days``: the audience is smaller than asked rather than padded (the shortfall is
  reported);
- ``exploration`` of the audience is new to the products (never bought them), ranked by their own
  probability; the share is exact (to one shopper of rounding): when one pool runs short, the audience
  shrinks so that the share still holds;
- every member's segment: ``repeat`` (bought the products within ``lapse_days``), ``lapsed`` (bought them
  before that) or ``new`` (never);
- the cost of exploring (expected conversions given up against the plain top of the ranking of the same
  size) and its benefit (shoppers new to the products reached beyond that top).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batch.campaign import CampaignSpec

SEGMENTS = ("repeat", "lapsed", "new")
LAPSE_DAYS = 90.0


@dataclass(frozen=True)
class Audience:
    """The chosen shoppers (positions into the scored arrays), best first, and what it cost."""

    members: np.ndarray  # [A] int64 positions, by probability descending (ties: smaller position first)
    segment: np.ndarray  # [A] int8 index into SEGMENTS
    eligible: int  # shoppers passing the threshold and exclusions
    shortfall: int  # audience asked minus audience given
    explorers: int  # members new to the products
    expected_conversions: float  # sum of the members' probabilities
    exploration_cost: float  # expected conversions of the plain top of the same size, minus the above
    exploration_reach: int  # new-to-products members beyond those the plain top would have had


def select_audience(
    spec: CampaignSpec,
    shopper_ids: np.ndarray,
    probability: np.ndarray,
    days_since_bought: np.ndarray,
    lapse_days: float = LAPSE_DAYS,
) -> Audience:
    """The audience of ``spec`` among shoppers ``shopper_ids`` [S] with ``probability`` [S] and days since
    they last bought one of its products [S] (``inf``: never)."""
    probability = np.asarray(probability, dtype=np.float64)
    if not (np.isfinite(probability) & (probability >= 0) & (probability <= 1)).all():
        raise ValueError("probabilities must be finite and within [0, 1]")
    new = np.isinf(days_since_bought)
    eligible = probability >= spec.min_probability
    if spec.bought_within_days is not None:
        eligible &= ~(days_since_bought <= spec.bought_within_days)
    if spec.opted_out:
        eligible &= ~np.isin(shopper_ids, np.asarray(spec.opted_out, dtype=np.int64))
    order = np.lexsort((np.arange(len(probability)), -probability))  # best first, ties by position
    ranked = order[eligible[order]]
    if spec.exploration == 0.0:  # no reserved share: the plain top, whoever it is
        size = min(spec.audience, len(ranked))
        members = ranked[:size]
    else:
        ranked_new, ranked_old = ranked[new[ranked]], ranked[~new[ranked]]
        size = _size(spec.audience, spec.exploration, len(ranked_new), len(ranked_old))
        explore = _explorers(spec.exploration, size)
        members = np.concatenate([ranked_new[:explore], ranked_old[: size - explore]])
        members = members[np.lexsort((members, -probability[members]))]
    segment = np.where(new[members], 2, np.where(days_since_bought[members] <= lapse_days, 0, 1)).astype(
        np.int8
    )
    plain = ranked[:size]
    return Audience(
        members=members,
        segment=segment,
        eligible=len(ranked),
        shortfall=spec.audience - size,
        explorers=int(new[members].sum()),
        expected_conversions=float(probability[members].sum()),
        exploration_cost=float(probability[plain].sum() - probability[members].sum()),
        exploration_reach=int(new[members].sum() - new[plain].sum()),
    )


def _explorers(share: float, size: int) -> int:
    """Members of an audience of ``size`` reserved for shoppers new to the products (half rounds up)."""
    return int(np.floor(share * size + 0.5))


def _size(asked: int, share: float, new: int, old: int) -> int:
    """The largest audience <= ``asked`` whose exploration share can be filled from ``new`` explorers and
    ``old`` other eligible shoppers."""
    size = min(asked, new + old, int((new + 0.5) / share) if share > 0 else asked)
    if share < 1:
        size = min(size, int((old + 0.5) / (1 - share)))
    # the bounds above are within rounding of the answer: step down the last few
    while size > 0 and (_explorers(share, size) > new or size - _explorers(share, size) > old):
        size -= 1
    return size
