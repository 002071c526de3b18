"""Global temporal split and next-basket targets.

Everything strictly before the cutoff is training data; a shopper's target is their first basket at or
after the cutoff (or every basket within a horizon). Nothing at or after the cutoff reaches training.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.data.schema import BASKET, PRODUCT, SHOPPER, TIMESTAMP
from recsys.data.vocabulary import Vocabulary


def parse_cutoff(cutoff: str | datetime, timezone: str) -> datetime:
    """A tz-aware cutoff; a naive string or datetime is read in ``timezone`` (the receipts' zone)."""
    from zoneinfo import ZoneInfo

    moment = datetime.fromisoformat(cutoff) if isinstance(cutoff, str) else cutoff
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=ZoneInfo(timezone))


def temporal_split(receipts: pa.Table, cutoff: datetime) -> tuple[pa.Table, pa.Table]:
    """(rows strictly before ``cutoff``, rows at or after it). When every row is on one side, that side
    is ``receipts`` itself, not a copy: callers often split tables already cut at the same date."""
    if cutoff.tzinfo is None:
        raise ValueError("cutoff must be timezone-aware; use parse_cutoff")
    before = pc.less(receipts.column(TIMESTAMP), pa.scalar(cutoff, receipts.schema.field(TIMESTAMP).type))
    earlier = pc.sum(before).as_py() or 0
    if earlier == receipts.num_rows:
        return receipts, receipts.slice(0, 0)
    if earlier == 0:
        return receipts.slice(0, 0), receipts
    return receipts.filter(before), receipts.filter(pc.invert(before))


@dataclass(frozen=True)
class Targets:
    """What each evaluated shopper bought after the cutoff, and what they had bought before."""

    shopper_ids: np.ndarray  # [n] int64, ascending
    items: list[np.ndarray]  # in-vocabulary target product ids (unique), non-empty
    all_items: list[np.ndarray]  # every target product id, out-of-vocabulary ones included
    history: list[np.ndarray]  # unique product ids bought in training (for repeat vs. explore)


def _group_unique(shoppers: np.ndarray, products: np.ndarray) -> dict[int, np.ndarray]:
    order = np.lexsort((products, shoppers))
    shoppers, products = shoppers[order], products[order]
    keep = np.ones(len(shoppers), dtype=bool)
    keep[1:] = (shoppers[1:] != shoppers[:-1]) | (products[1:] != products[:-1])
    shoppers, products = shoppers[keep], products[keep]
    uniq, starts = np.unique(shoppers, return_index=True)
    return dict(zip(uniq.tolist(), np.split(products, starts[1:]), strict=True))


def next_basket_targets(
    train: pa.Table, test: pa.Table, vocab: Vocabulary, horizon: timedelta | None = None
) -> Targets:
    """Targets for shoppers with at least one train basket and one test basket.

    Target = products of the shopper's first test basket (ordered by timestamp, then basket id), or
    of all its baskets within ``horizon`` of that first one. Shoppers whose in-vocabulary target is
    empty are dropped; ``all_items`` keeps out-of-vocabulary products for the "all items" variant.
    """
    trained = pc.unique(train.column(SHOPPER))
    test = test.filter(pc.is_in(test.column(SHOPPER), trained))
    baskets = test.select([SHOPPER, TIMESTAMP, BASKET]).group_by([SHOPPER, BASKET], use_threads=False)
    baskets = baskets.aggregate([(TIMESTAMP, "min")]).sort_by(
        [(SHOPPER, "ascending"), (f"{TIMESTAMP}_min", "ascending"), (BASKET, "ascending")]
    )
    shopper = baskets.column(SHOPPER).to_numpy()
    times = pc.cast(baskets.column(f"{TIMESTAMP}_min"), pa.int64()).to_numpy()
    first = np.ones(len(shopper), dtype=bool)
    first[1:] = shopper[1:] != shopper[:-1]
    if horizon is None:
        chosen = first
    else:
        first_time = np.maximum.accumulate(np.where(first, np.arange(len(first)), 0))
        chosen = times - times[first_time] < horizon // timedelta(microseconds=1)
    chosen_baskets = baskets.column(BASKET).to_numpy()[chosen]
    rows = test.filter(pc.is_in(test.column(BASKET), pa.array(chosen_baskets)))
    rows_shopper = rows.column(SHOPPER).to_numpy()
    rows_product = rows.column(PRODUCT).to_numpy()
    in_vocab = np.isin(rows_product, vocab.product_ids)
    all_items = _group_unique(rows_shopper, rows_product)
    items = _group_unique(rows_shopper[in_vocab], rows_product[in_vocab])
    shopper_ids = np.array(sorted(items), dtype=np.int64)
    history = _group_unique(train.column(SHOPPER).to_numpy(), train.column(PRODUCT).to_numpy())
    return Targets(
        shopper_ids=shopper_ids,
        items=[items[s] for s in shopper_ids.tolist()],
        all_items=[all_items[s] for s in shopper_ids.tolist()],
        history=[history[s] for s in shopper_ids.tolist()],
    )
