"""Seeded receipts for the batch jobs' tests: shoppers with their own rhythm, a third of whom stop."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa

from recsys.data.schema import BASKET, PRICE, PRODUCT, QUANTITY, SHOPPER, TIMESTAMP

UTC = ZoneInfo("UTC")
AS_OF = datetime(2017, 6, 1, tzinfo=UTC)


def receipts(rows: list[tuple[int, int, int, datetime, float]]) -> pa.Table:
    shoppers, baskets, products, times, prices = zip(*rows, strict=True)
    return pa.table({
        SHOPPER: pa.array(shoppers, pa.int64()), BASKET: pa.array(baskets, pa.int64()),
        PRODUCT: pa.array(products, pa.int64()), TIMESTAMP: pa.array(times, pa.timestamp("us", tz="UTC")),
        QUANTITY: pa.array([1.0] * len(rows)), PRICE: pa.array(prices),
    })  # fmt: skip


def world(product_ids: np.ndarray, shoppers: int = 80, days: int = 200, seed: int = 0) -> pa.Table:
    """Seeded receipts from ``AS_OF - 150 days`` on; a third of the shoppers stop some time before."""
    rng = np.random.default_rng(seed)
    start = AS_OF - timedelta(days=150)
    rows, basket = [], 0
    for shopper in range(shoppers):
        every = rng.integers(3, 15)
        stop = days if shopper % 3 else int(rng.integers(60, 180))
        for day in range(int(rng.integers(0, every)), min(days, stop), int(every)):
            basket += 1
            when = start + timedelta(days=day, hours=int(rng.integers(8, 20)))
            for product in rng.choice(product_ids, size=int(rng.integers(1, 5)), replace=False):
                rows.append((1000 + shopper, basket, int(product), when, float(rng.uniform(0.5, 5))))
    return receipts(rows)
