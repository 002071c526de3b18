"""The report's top categories per segment (batch/segment.py ``top_categories``): the vectorised count
against the definition, one purchase line at a time."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from batch.segment import top_categories
from recsys.data.schema import PRODUCT, SHOPPER


def by_definition(
    receipts: pa.Table, shopper_ids: np.ndarray, assigned: np.ndarray, categories: dict[int, str], count: int
) -> dict[int, list[tuple[str, float]]]:
    """Each line's category name looked up on its own, then counted per segment with ``np.unique``."""
    members = dict(zip(shopper_ids.tolist(), assigned.tolist(), strict=True))
    owners = receipts.column(SHOPPER).to_pylist()
    segment = np.array([members.get(s, -1) for s in owners])  # -1: a shopper of no segment
    names = np.array(
        [categories.get(p) or "unknown" for p in receipts.column(PRODUCT).to_pylist()], dtype=object
    )
    result = {}
    for s in np.unique(assigned):
        values, counts = np.unique(names[segment == s], return_counts=True)
        order = np.argsort(-counts, kind="stable")[:count]
        result[int(s)] = [(str(values[i]), float(counts[i] / counts.sum())) for i in order]
    return result


@pytest.mark.parametrize("seed", range(8))
def test_top_categories_match_the_line_by_line_count(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shoppers, products, lines = int(rng.integers(1, 60)), int(rng.integers(1, 40)), int(rng.integers(0, 2000))
    shopper_ids = np.sort(rng.choice(10_000, shoppers, replace=False)).astype(np.int64)
    assigned = rng.integers(0, 5, shoppers)  # some segments may have no lines, some shoppers neither
    product_ids = rng.choice(1000, products, replace=False).astype(np.int64)
    # few names, so counts tie; None and "" are "unknown", as are products left out of the metadata
    pool = ["dairy", "bakery", "produce", "unknown", "", None]
    described = product_ids[rng.random(products) < 0.8]
    categories = {int(p): pool[int(rng.integers(0, len(pool)))] for p in rng.permutation(described)}
    # on odd seeds some lines are of shoppers outside shopper_ids (counted in no segment)
    buyers = shopper_ids[: max(1, shoppers - 3)] if seed % 2 == 0 else rng.choice(20_000, 5 + shoppers)
    table = pa.table({
        SHOPPER: pa.array(rng.choice(buyers, lines), pa.int64()),
        PRODUCT: pa.array(rng.choice(product_ids, lines), pa.int64()),
    })  # fmt: skip
    for count in (1, 3, 10):
        got = top_categories(table, shopper_ids, assigned, categories, count)
        assert got == by_definition(table, shopper_ids, assigned, categories, count)
        assert list(got) == sorted(got)


def test_without_any_metadata_every_line_is_unknown() -> None:
    table = pa.table({SHOPPER: pa.array([1, 1, 2], pa.int64()), PRODUCT: pa.array([0, 5, 7], pa.int64())})
    assert top_categories(table, np.array([1, 2]), np.array([3, 4]), {}) == {
        3: [("unknown", 1.0)],
        4: [("unknown", 1.0)],
    }


def test_no_lines_give_every_segment_no_categories() -> None:
    table = pa.table({SHOPPER: pa.array([], pa.int64()), PRODUCT: pa.array([], pa.int64())})
    assert top_categories(table, np.array([1, 2]), np.array([0, 1]), {5: "dairy"}) == {0: [], 1: []}
