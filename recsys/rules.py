"""The rules of one recommendation request, shared by serving, the batch job and training's metrics.

A :class:`Rules` says how long a list to return and what may be on it; it carries no shopper data (the
history and its purchase times are the model inputs, :mod:`recsys.inputs`). Serving builds one per
request, the batch job one per job, and both hand it to :func:`recsys.scoring.recommend`, so the same
rules give the same answer everywhere. numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class RulesError(ValueError):
    """Rules that cannot be applied; the message names the field."""


@dataclass(frozen=True)
class Rules:
    """What one shopper's list may hold.

    - ``k``: positions to fill (at most; fewer when the rules leave fewer candidates).
    - ``exclude_purchased``: never recommend a product of the shopper's history.
    - ``min_score``: drop candidates scoring below it, so a shopper gets fewer (or no) products rather than
      irrelevant ones; with the repeat-aware scorer it is a next-basket probability. Never applied to the
      popularity fallback of a shopper with no known product.
    - ``explore_slots``: positions of the ``k`` reserved for the best products new to the shopper (a share
      of this list, so a list with explore slots is not a prefix of a longer one with the same slots).
    - ``repeat_aware``: score with the model's ranker when it has one and the purchase times are known
      (``recsys.ranker``); otherwise products rank by model score.
    """

    k: int = 10
    exclude_purchased: bool = False
    min_score: float | None = None
    explore_slots: int = 0
    repeat_aware: bool = True

    def __post_init__(self) -> None:
        for name in ("k", "explore_slots"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise RulesError(f"rules.{name} must be an integer, got {value!r}")
        if self.k < 1:
            raise RulesError(f"rules.k must be >= 1, got {self.k}")
        if self.explore_slots < 0:
            raise RulesError(f"rules.explore_slots must be >= 0, got {self.explore_slots}")
        for name in ("exclude_purchased", "repeat_aware"):
            if not isinstance(getattr(self, name), bool):
                raise RulesError(f"rules.{name} must be true or false, got {getattr(self, name)!r}")
        if self.min_score is not None:
            if isinstance(self.min_score, bool) or not isinstance(self.min_score, int | float):
                raise RulesError(f"rules.min_score must be a number or null, got {self.min_score!r}")
            if not math.isfinite(self.min_score):
                raise RulesError(f"rules.min_score must be finite, got {self.min_score!r}")
