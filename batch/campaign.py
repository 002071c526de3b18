"""A campaign's specification: what it promotes, to how many shoppers, under which rules (YAML, validated).

    campaign_id: 18
    products: [1029743, 1082185]        # the coupon's products, or a selection from product metadata:
    select: {brand: National, product_category: FLUID MILK PRODUCTS}   # every listed column must match
    horizon_days: 14                    # P(buys one of the products within this many days)
    objective: redeem                   # buy (default): P(buy); redeem: P(buy) x the shopper's coupon
                                        # use (recsys.coupons; receipts need coupon_discount)
    audience: 5000                      # contacts at most (or budget and cost_per_contact)
    min_probability: 0.05               # never a shopper under it: better no message than an irrelevant one
    exploration: 0.1                    # this share of the audience is new to the products
    value: 1.0                          # value per conversion (allocation across campaigns)
    exclude:
      bought_within_days: 7             # no coupon for what the shopper has just bought
      opted_out: opted_out.txt          # shopper ids, one per line, beside the spec file

Loaded with ``yaml.safe_load`` (no tags, no code); unknown keys, wrong types and out-of-range values are
errors naming the key. A file the spec names (``opted_out``) is read from the spec's own directory only.
Limits: the spec file :data:`MAX_SPEC_BYTES`, :data:`MAX_PRODUCTS` products, :data:`MAX_OPTED_OUT` ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

MAX_SPEC_BYTES = 64 * 1024
MAX_PRODUCTS = 100_000
MAX_OPTED_OUT = 10_000_000
KEYS = {"campaign_id", "name", "products", "select", "horizon_days", "objective", "audience", "budget",
        "cost_per_contact", "min_probability", "exploration", "value", "exclude"}  # fmt: skip
OBJECTIVES = ("buy", "redeem")
EXCLUDE_KEYS = {"bought_within_days", "opted_out"}


class SpecError(ValueError):
    """An invalid campaign specification; the message names the key."""


@dataclass(frozen=True)
class CampaignSpec:
    """A validated campaign (see the module docstring for the keys)."""

    campaign_id: int
    audience: int
    min_probability: float = 0.0
    value: float = 1.0
    name: str = ""
    products: tuple[int, ...] = ()
    select: dict[str, str] = field(default_factory=dict)
    horizon_days: float = 28.0
    objective: str = "buy"
    exploration: float = 0.0
    bought_within_days: float | None = None
    opted_out: tuple[int, ...] = ()

    @classmethod
    def parse(cls, data: Any, base: Path | None = None) -> CampaignSpec:
        """A spec from parsed YAML ``data``; ``base`` is the directory files it names are read from
        (None: it may name no file)."""
        if not isinstance(data, dict):
            raise SpecError("a campaign spec is a mapping of keys to values")
        unknown = set(data) - KEYS
        if unknown:
            raise SpecError(f"unknown key(s) {sorted(unknown)}; known: {sorted(KEYS)}")
        campaign_id = _integer(data, "campaign_id", required=True)
        audience = _audience(data)
        products = data.get("products") or []
        if not isinstance(products, list) or not all(
            isinstance(p, int) and not isinstance(p, bool) for p in products
        ):
            raise SpecError("products must be a list of integer product ids")
        if len(products) > MAX_PRODUCTS:
            raise SpecError(f"{len(products)} products, over the limit of {MAX_PRODUCTS}")
        select = data.get("select") or {}
        if not isinstance(select, dict) or not all(isinstance(v, str | int) for v in select.values()):
            raise SpecError("select must map product metadata columns to values")
        if products and select:
            raise SpecError("give products (ids) or select (product metadata), not both")
        exclude = data.get("exclude") or {}
        if not isinstance(exclude, dict) or set(exclude) - EXCLUDE_KEYS:
            raise SpecError(f"exclude takes {sorted(EXCLUDE_KEYS)}")
        within = exclude.get("bought_within_days")
        objective = data.get("objective", "buy")
        if objective not in OBJECTIVES:
            raise SpecError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
        spec = cls(
            campaign_id=campaign_id,
            audience=audience,
            min_probability=_number(data, "min_probability", 0.0, 0.0, 1.0),
            value=_number(data, "value", 1.0, 0.0, math.inf, open_low=True),
            name=str(data.get("name", "")),
            products=tuple(sorted(set(products))),
            select={str(k): str(v) for k, v in select.items()},
            horizon_days=_number(data, "horizon_days", 28.0, 0.0, 366.0, open_low=True),
            objective=objective,
            exploration=_number(data, "exploration", 0.0, 0.0, 1.0),
            bought_within_days=None if within is None else _number(exclude, "bought_within_days", 0, 0, 3660),
            opted_out=_opted_out(exclude.get("opted_out"), base),
        )
        return spec

    def product_ids(self, products: pa.Table) -> np.ndarray:
        """The campaign's product ids [P] (ascending) among ``products`` (a product metadata table)."""
        if self.products:
            return np.asarray(self.products, dtype=np.int64)
        if not self.select:
            raise SpecError(f"campaign {self.campaign_id} names no products (products or select)")
        rows = products
        for column, value in self.select.items():
            if column not in products.column_names:
                raise SpecError(f"select names column {column!r}, which the product metadata lacks")
            rows = rows.filter(pc.equal(pc.cast(rows.column(column), pa.string()), value))
        ids = np.unique(rows.column("product_id").to_numpy().astype(np.int64))
        if len(ids) == 0:
            raise SpecError(f"select {self.select} matches no product")
        return ids


def load_spec(path: str | Path) -> CampaignSpec:
    """The campaign spec of the YAML file at ``path``."""
    path = Path(path)
    if path.stat().st_size > MAX_SPEC_BYTES:
        raise SpecError(f"{path} is over the spec limit of {MAX_SPEC_BYTES} bytes")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SpecError(f"{path} is not valid YAML: {error}") from error
    return CampaignSpec.parse(data, path.parent)


def _integer(data: dict, key: str, required: bool = False) -> int:
    value = data.get(key)
    if value is None and not required:
        return 0
    if not isinstance(value, int) or isinstance(value, bool):
        raise SpecError(f"{key} must be an integer, got {value!r}")
    return value


def _number(data: dict, key: str, default: float, low: float, high: float, open_low: bool = False) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SpecError(f"{key} must be a finite number, got {value!r}")
    if value < low or value > high or (open_low and value == low):
        raise SpecError(f"{key}={value} is out of range ({'(' if open_low else '['}{low}, {high}])")
    return float(value)


def _audience(data: dict) -> int:
    """Contacts at most: ``audience``, or ``floor(budget / cost_per_contact)``."""
    if "audience" in data:
        if "budget" in data or "cost_per_contact" in data:
            raise SpecError("give audience, or budget and cost_per_contact, not both")
        audience = _integer(data, "audience", required=True)
    elif "budget" not in data or "cost_per_contact" not in data:
        raise SpecError("give audience (contacts at most), or budget and cost_per_contact")
    else:
        budget = _number(data, "budget", -1.0, 0.0, math.inf)
        cost = _number(data, "cost_per_contact", -1.0, 0.0, math.inf, open_low=True)
        audience = int(budget // cost)
    if audience < 0:
        raise SpecError("audience must be >= 0")
    return audience


def _opted_out(name: Any, base: Path | None) -> tuple[int, ...]:
    """Shopper ids from the file ``name`` inside ``base`` (the spec's directory), one per line."""
    if name is None:
        return ()
    if base is None or not isinstance(name, str):
        raise SpecError("opted_out names a file beside the spec file")
    base = base.resolve()
    path = (base / name).resolve()
    if not path.is_relative_to(base) or not path.is_file():
        raise SpecError(f"opted_out {name!r} must be a file inside the spec's directory {base}")
    ids = []
    with path.open() as lines:
        for number, line in enumerate(lines, 1):
            if number > MAX_OPTED_OUT:
                raise SpecError(f"{path} has over {MAX_OPTED_OUT} ids")
            if line.strip():
                try:
                    ids.append(int(line))
                except ValueError as error:
                    raise SpecError(f"{path}:{number} is not a shopper id: {line.strip()!r}") from error
    return tuple(sorted(set(ids)))
