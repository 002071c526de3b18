"""Contact allocation: which (shopper, campaign) contacts to send in a week, under contact caps.

Given the expected value of contacting shopper ``i`` for campaign ``j`` (its calibrated probability, times
the campaign's value per conversion when there is one) for the eligible pairs (at or above the
campaign's probability threshold, outside cool-downs), choose contacts maximising the total expected
value subject to

- each shopper: at most ``shopper_cap`` contacts (e.g. 2 messages a week);
- each campaign: at most ``audience[j]`` contacts (its audience size, or budget / cost per contact);
- optionally, at most ``max_campaigns`` campaigns send anything.

Two solvers:

- :func:`exact`: the integer program through ``scipy.optimize.milp`` (HiGHS). For small instances and
  for measuring the other's gap.
- :func:`allocate`: a Lagrangian method for millions of shoppers, numpy only. A price ``λ_j`` per
  campaign turns the problem into one per shopper (take the ``shopper_cap`` best positive
  ``value - λ_j``); prices are moved towards the level at which each campaign's demand fits its
  audience, the allocation they give is cut to the audiences and filled greedily, and the prices give
  an upper bound on the optimum (weak duality), so every run reports a certified gap.

Without ``max_campaigns`` the constraints are those of a bipartite degree-constrained subgraph (a totally
unimodular matrix), so the linear relaxation is already integral and the dual bound is tight at the
optimum; ``max_campaigns`` is handled by keeping the campaigns worth most and solving again, a heuristic
whose gap the bound still measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PRICE_ITERATIONS = 60
MIN_STEP = 0.1  # the price step below which the prices count as settled
SETTLED = 1e-6  # a relative fall of the bound smaller than this is no progress
MAX_FILL_ROUNDS = 1000


@dataclass(frozen=True)
class Problem:
    """One week's allocation problem over ``S`` shoppers and ``C`` campaigns."""

    values: np.ndarray  # [S, C] expected value of each contact; 0 where the pair is not eligible
    shopper_cap: int  # contacts per shopper
    audience: np.ndarray  # [C] contacts per campaign
    max_campaigns: int | None = None  # campaigns that may send at all

    def __post_init__(self) -> None:
        values, audience = np.asarray(self.values), np.asarray(self.audience)
        if values.ndim != 2 or audience.shape != (values.shape[1],):
            raise ValueError(f"values must be [shoppers, campaigns] and audience [campaigns]; got "
                             f"{values.shape} and {audience.shape}")  # fmt: skip
        if not np.isfinite(values).all() or (values < 0).any():
            raise ValueError("expected values must be finite and >= 0 (0 marks an ineligible pair)")
        if self.shopper_cap < 0 or (audience < 0).any():
            raise ValueError("caps must be >= 0")
        if self.max_campaigns is not None and self.max_campaigns < 0:
            raise ValueError("max_campaigns must be >= 0")

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape


@dataclass(frozen=True)
class Allocation:
    """Chosen contacts and what they are worth."""

    contacts: np.ndarray  # [S, C] bool
    value: float  # total expected value of the contacts
    bound: float  # an upper bound on the optimum (the exact solver's: its optimum)

    @property
    def gap(self) -> float:
        """Relative distance to the bound: 0 is proven optimal."""
        return 0.0 if self.bound <= 0 else max(0.0, 1.0 - self.value / self.bound)


def check(problem: Problem, contacts: np.ndarray) -> None:
    """Raise ValueError naming the first violated rule of ``contacts`` [S, C] for ``problem``."""
    if contacts.shape != problem.shape:
        raise ValueError(f"contacts are {contacts.shape}, the problem is {problem.shape}")
    if (contacts & (problem.values <= 0)).any():
        raise ValueError("a contact was chosen for an ineligible pair")
    per_shopper = contacts.sum(axis=1)
    if (per_shopper > problem.shopper_cap).any():
        raise ValueError(f"a shopper has {per_shopper.max()} contacts, over the cap of {problem.shopper_cap}")
    over = np.flatnonzero(contacts.sum(axis=0) > problem.audience)
    if len(over):
        raise ValueError(f"campaign {over[0]} exceeds its audience of {problem.audience[over[0]]}")
    used = int(contacts.any(axis=0).sum())
    if problem.max_campaigns is not None and used > problem.max_campaigns:
        raise ValueError(f"{used} campaigns send, over the limit of {problem.max_campaigns}")


def exact(problem: Problem, time_limit: float | None = None) -> Allocation:
    """The optimal allocation, from HiGHS' mixed-integer solver (``scipy.optimize.milp``)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix, hstack, vstack

    shoppers, campaigns = np.nonzero(problem.values > 0)  # one variable per eligible pair
    n, (num_shoppers, num_campaigns) = len(shoppers), problem.shape
    pairs = np.arange(n)
    by_shopper = coo_matrix((np.ones(n), (shoppers, pairs)), shape=(num_shoppers, n))
    by_campaign = coo_matrix((np.ones(n), (campaigns, pairs)), shape=(num_campaigns, n))
    cost = -problem.values[shoppers, campaigns].astype(np.float64)
    if problem.max_campaigns is None:
        matrix = vstack([by_shopper, by_campaign])
        upper = np.r_[np.full(num_shoppers, problem.shopper_cap), problem.audience].astype(np.float64)
        constraints = [LinearConstraint(matrix, -np.inf, upper)]
    else:
        # y_j = 1 lets campaign j send: its audience row becomes sum_i x_ij - audience_j * y_j <= 0
        sends = coo_matrix(-np.diag(problem.audience.astype(np.float64)))
        matrix = vstack([hstack([by_shopper, coo_matrix((num_shoppers, num_campaigns))]),
                         hstack([by_campaign, sends]),
                         hstack([coo_matrix((1, n)), coo_matrix(np.ones((1, num_campaigns)))])])  # fmt: skip
        upper = np.r_[np.full(num_shoppers, problem.shopper_cap), np.zeros(num_campaigns),
                      problem.max_campaigns].astype(np.float64)  # fmt: skip
        constraints = [LinearConstraint(matrix, -np.inf, upper)]
        cost = np.r_[cost, np.zeros(num_campaigns)]
    options = {} if time_limit is None else {"time_limit": time_limit}
    result = milp(cost, constraints=constraints, integrality=np.ones(len(cost)), bounds=Bounds(0, 1),
                  options=options)  # fmt: skip
    if result.x is None:
        raise RuntimeError(f"the exact solver found no allocation: {result.message}")
    contacts = np.zeros(problem.shape, dtype=bool)
    chosen = result.x[:n] > 0.5
    contacts[shoppers[chosen], campaigns[chosen]] = True
    value = float(problem.values[contacts].sum())
    bound = -float(result.mip_dual_bound) if result.status != 0 else value
    return Allocation(contacts, value, max(bound, value))


def allocate(problem: Problem, iterations: int = PRICE_ITERATIONS) -> Allocation:
    """A near-optimal allocation for large instances (Lagrangian prices, then a greedy fill), with the
    dual bound of the best prices seen."""
    # campaign-major float32: every step below runs over one campaign's contiguous row of shoppers
    values = np.ascontiguousarray(problem.values.T, dtype=np.float32)  # [C, S]
    audience = np.asarray(problem.audience, dtype=np.int64)
    cap = min(problem.shopper_cap, values.shape[0])
    contacts, value, bound = _priced(values, audience, cap, iterations)
    if problem.max_campaigns is not None and contacts.any(axis=1).sum() > problem.max_campaigns:
        worth = (values * contacts).sum(axis=1)
        dropped = np.argsort(-worth, kind="stable")[problem.max_campaigns :]
        values[dropped] = 0.0
        # the bound of the unrestricted problem still bounds the restricted choice's optimum
        contacts, value, _ = _priced(values, audience, cap, iterations)
    return Allocation(np.ascontiguousarray(contacts.T), value, max(bound, value))


def _priced(
    values: np.ndarray, audience: np.ndarray, cap: int, iterations: int
) -> tuple[np.ndarray, float, float]:
    """(contacts [C, S], their value, the best dual bound) for campaign-major ``values`` [C, S]."""
    if cap == 0 or not (values > 0).any():
        return np.zeros(values.shape, dtype=bool), 0.0, 0.0
    prices = np.zeros(len(values))
    best_bound, best_prices, step = np.inf, prices, 1.0
    reduced = np.empty_like(values)  # one buffer for every iteration's reduced values
    for _ in range(iterations):
        bound, clearing = _dual(values, audience, cap, prices, _reduced(values, prices, reduced))
        if bound < best_bound:
            improved = bound < best_bound * (1.0 - SETTLED)
            best_bound, best_prices = bound, prices
        else:
            improved = False
        if not improved:
            step *= 0.5  # the bound stopped falling: move the prices by less, and stop once settled
            if step < MIN_STEP:
                break
        prices = (1.0 - step) * prices + step * clearing
    chosen = _choices(_reduced(values, best_prices, reduced), cap)
    chosen = _fill(values, audience, cap, _cut(values, audience, chosen))
    return chosen, float(values[chosen].astype(np.float64).sum()), best_bound


def _reduced(values: np.ndarray, prices: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out`` [C, S] filled with the reduced values ``max(value - price, 0)`` of ``values`` [C, S] at
    ``prices`` [C]."""
    np.subtract(values, prices.astype(np.float32)[:, None], out=out)
    return np.maximum(out, 0.0, out=out)


def _top(reduced: np.ndarray, width: int) -> np.ndarray:
    """Per shopper, its ``width`` largest ``reduced`` values [width, S], descending (zeros where it has
    fewer), as running maxima over the campaigns' rows."""
    top = np.zeros((width, reduced.shape[1]), dtype=np.float32)
    for row in reduced:
        for m in range(width - 1, 0, -1):  # insert into the sorted list, from its end
            np.maximum(top[m], np.minimum(top[m - 1], row), out=top[m])
        np.maximum(top[0], row, out=top[0])
    return top


def _dual(
    values: np.ndarray, audience: np.ndarray, cap: int, prices: np.ndarray, reduced: np.ndarray
) -> tuple[float, np.ndarray]:
    """The Lagrangian bound at ``prices`` and, per campaign, the price at which its demand would just fit
    its audience if the other prices stayed; ``reduced`` is :func:`_reduced` at ``prices``."""
    num_shoppers = values.shape[1]
    top = _top(reduced, cap + 1)  # [cap + 1, S]
    bound = float((prices * audience).sum() + top[:cap].astype(np.float64).sum())
    # shopper i takes j at price p iff value - p beats its cap-th best other option (or 0): among the
    # others, that is the (cap + 1)-th best reduced value if j is in its top cap, else the cap-th
    kth, following = top[cap - 1], top[cap]
    clearing = np.zeros(len(values))
    for j, (row, gain) in enumerate(zip(values, reduced, strict=True)):
        if audience[j] >= num_shoppers:
            continue
        threshold = np.where(gain >= kth, following, kth)
        margin = np.where(row > 0, row - threshold, 0.0)  # the highest price j could ask of each shopper
        at = num_shoppers - 1 - audience[j]  # the (audience + 1)-th largest margin clears the campaign
        clearing[j] = max(0.0, float(np.partition(margin, at)[at]))
    return bound, clearing


def _choices(reduced: np.ndarray, cap: int) -> np.ndarray:
    """What every shopper takes at the prices of ``reduced`` (:func:`_reduced`) [C, S]: its ``cap`` best
    positive reduced values (a tie at the cap goes to the earlier campaign)."""
    kth = _top(reduced, cap)[cap - 1]
    taken = np.zeros(reduced.shape[1], dtype=np.int64)
    chosen = np.zeros(reduced.shape, dtype=bool)
    for j, gain in enumerate(reduced):
        chosen[j] = (gain > 0) & (gain >= kth) & (taken < cap)
        taken += chosen[j]
    return chosen


def _cut(values: np.ndarray, audience: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """``chosen`` [C, S] with each campaign over its audience cut to its most valuable contacts."""
    for j in np.flatnonzero(chosen.sum(axis=1) > audience):
        members = np.flatnonzero(chosen[j])
        chosen[j, members[np.argsort(-values[j, members], kind="stable")[audience[j] :]]] = False
    return chosen


def _fill(values: np.ndarray, audience: np.ndarray, cap: int, chosen: np.ndarray) -> np.ndarray:
    """Greedy fill of the capacity left [C, S]: in rounds, every shopper with room proposes its most
    valuable eligible campaign not yet chosen that has room, and each campaign accepts its best proposals."""
    for _ in range(MAX_FILL_ROUNDS):
        room = audience - chosen.sum(axis=1)  # [C]
        open_shoppers = np.flatnonzero(chosen.sum(axis=0) < cap)
        if len(open_shoppers) == 0 or not (room > 0).any():
            break
        offers = np.where(~chosen[:, open_shoppers] & (room > 0)[:, None], values[:, open_shoppers], 0.0)
        best = offers.argmax(axis=0)
        worth = offers[best, np.arange(len(open_shoppers))]
        proposing = worth > 0
        if not proposing.any():
            break
        shoppers, campaigns, worth = open_shoppers[proposing], best[proposing], worth[proposing]
        order = np.lexsort((-worth, campaigns))  # by campaign, most valuable first
        shoppers, campaigns = shoppers[order], campaigns[order]
        first = np.searchsorted(campaigns, campaigns)  # position of each campaign's first proposal
        accepted = np.arange(len(campaigns)) - first < room[campaigns]
        chosen[campaigns[accepted], shoppers[accepted]] = True
    return chosen


def independent(problem: Problem) -> Allocation:
    """The plan without coordination, as a reference: each campaign takes its own top audience, then every
    shopper over the cap keeps its most valuable contacts (so campaigns end up short where they overlap)."""
    values = problem.values
    chosen = np.zeros(problem.shape, dtype=bool)
    for j in range(problem.shape[1]):
        eligible = np.flatnonzero(values[:, j] > 0)
        best = eligible[np.argsort(-values[eligible, j], kind="stable")[: problem.audience[j]]]
        chosen[best, j] = True
    if problem.max_campaigns is not None:
        worth = (values * chosen).sum(axis=0)
        chosen[:, np.argsort(-worth, kind="stable")[problem.max_campaigns :]] = False
    ranked = np.argsort(-np.where(chosen, values, -1.0), axis=1, kind="stable")[:, problem.shopper_cap :]
    np.put_along_axis(chosen, ranked, False, axis=1)
    return Allocation(chosen, float(values[chosen].sum()), np.inf)
