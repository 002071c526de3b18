"""Synthetic receipts: determinism, the canonical schema, and the planted structure (popularity,
habits, weekly rhythm, launches) measured the way a model would meet it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest

from recsys.data.schema import PRICE, QUANTITY, receipts_schema, validate_receipts
from recsys.data.synthetic import SyntheticConfig, generate, generate_table, products, write_parquet

# ~470k rows: large enough for stable shares, small enough to generate in well under a second.
SMALL = SyntheticConfig(num_shoppers=2_000, num_products=5_000, shoppers_per_chunk=700)
KEY_BASE = 10**7  # > any product id, so shopper * KEY_BASE + product identifies a (shopper, product) pair


@pytest.fixture(scope="module")
def receipts() -> pa.Table:
    return generate_table(SMALL)


def column(table: pa.Table, name: str) -> np.ndarray:
    values = table.column(name)
    return (values.cast(pa.int64()) if pa.types.is_timestamp(values.type) else values).to_numpy()


def top_share(table: pa.Table) -> float:
    """Share of the rows that buy one of the top 1% products."""
    counts = np.sort(np.unique(column(table, "product_id"), return_counts=True)[1])[::-1]
    return counts[: SMALL.num_products // 100].sum() / table.num_rows


def repeat_shares(table: pa.Table) -> tuple[float, float]:
    """Share of the lines of each shopper's later half bought by the shopper in the earlier half, and
    the same share against another shopper's earlier half (what popularity alone explains)."""
    shopper, product = column(table, "shopper_id"), column(table, "product_id")
    ids, first, inverse, counts = np.unique(
        shopper, return_index=True, return_inverse=True, return_counts=True
    )
    later = np.arange(len(shopper)) - first[inverse] >= (counts // 2)[inverse]  # rows are time-ordered
    earlier_keys = shopper[~later] * KEY_BASE + product[~later]
    own = np.isin(shopper[later] * KEY_BASE + product[later], earlier_keys).mean()
    neighbour = ids[(inverse[later] + 1) % len(ids)]
    other = np.isin(neighbour * KEY_BASE + product[later], earlier_keys).mean()
    return float(own), float(other)


def test_same_seed_same_output_other_seed_differs(receipts: pa.Table) -> None:
    assert generate_table(SMALL).equals(receipts)
    assert products(SMALL).equals(products(dataclasses.replace(SMALL)))
    other = generate_table(dataclasses.replace(SMALL, seed=1))
    assert not other.equals(receipts)
    assert not products(dataclasses.replace(SMALL, seed=1)).equals(products(SMALL))


def test_chunks_split_shoppers_without_changing_the_receipts(receipts: pa.Table) -> None:
    chunks = list(generate(SMALL))
    assert len(chunks) == 3  # 2,000 shoppers by 700
    for index, chunk in enumerate(chunks):
        ids = column(chunk, "shopper_id") - column(chunks[0], "shopper_id")[0]
        assert ids.min() == index * 700 and ids.max() == min(2_000, (index + 1) * 700) - 1
    assert generate_table(dataclasses.replace(SMALL, shoppers_per_chunk=333)).equals(receipts)


def test_output_is_canonical(receipts: pa.Table) -> None:
    assert receipts.schema == receipts_schema("UTC", (QUANTITY, PRICE))
    assert validate_receipts(receipts).equals(receipts)
    assert pc.min(receipts.column("quantity")).as_py() >= 1
    assert pc.min(receipts.column("price")).as_py() > 0
    catalogue = products(SMALL)
    assert catalogue.column_names == ["product_id", "department", "category", "brand", "price", "launch"]
    assert catalogue.schema.field("launch").type == pa.timestamp("us", tz="UTC")
    assert np.isin(column(receipts, "product_id"), column(catalogue, "product_id")).all()
    assert column(catalogue, "product_id").min() > SMALL.num_products  # ids are not indices


def test_popularity_is_zipf(receipts: pa.Table) -> None:
    assert top_share(receipts) > 0.15  # the top 1% of products; uniform popularity would give ~0.01
    assert top_share(generate_table(dataclasses.replace(SMALL, zipf_exponent=0.0))) < 0.05


def test_shoppers_rebuy_their_staples(receipts: pa.Table) -> None:
    own, other = repeat_shares(receipts)
    no_staples, _ = repeat_shares(generate_table(dataclasses.replace(SMALL, repeat_share=0.0)))
    assert own > 0.65
    assert own > 4 * other  # far beyond what the same popularity without a personal history gives
    assert own > no_staples + 0.08


def test_history_beats_popularity_on_the_last_basket(receipts: pa.Table) -> None:
    """The structure is learnable: a shopper's own top 10 catches far more of their last basket than
    the global top 10 does."""
    shopper, basket, product = (column(receipts, name) for name in ("shopper_id", "basket_id", "product_id"))
    last_basket = np.maximum.reduceat(basket, np.unique(shopper, return_index=True)[1])
    last = np.isin(basket, last_basket)
    keys, counts = np.unique(shopper[~last] * KEY_BASE + product[~last], return_counts=True)
    order = np.lexsort((-counts, keys // KEY_BASE))
    owners = keys[order] // KEY_BASE
    rank = np.arange(len(order)) - np.searchsorted(owners, owners)
    personal = np.isin(shopper[last] * KEY_BASE + product[last], keys[order][rank < 10]).mean()
    products_seen, totals = np.unique(product[~last], return_counts=True)
    popular = np.isin(product[last], products_seen[np.argsort(-totals)[:10]]).mean()
    assert personal > 0.3
    assert personal > 3 * popular


def test_weekly_rhythm_in_local_time() -> None:
    config = dataclasses.replace(SMALL, num_shoppers=500, timezone="America/New_York")
    table = generate_table(config)
    local = pc.local_timestamp(table.column("timestamp"))
    hours = np.bincount(pc.hour(local).to_numpy(), minlength=24)
    assert hours[:7].sum() == hours[22:].sum() == 0  # the store is closed at night, local time
    days = np.bincount(pc.day_of_week(local).to_numpy(), minlength=7) / table.num_rows  # Monday = 0
    assert days.argmax() == 5  # Saturday
    assert days.max() > 1.5 * days.min()


def test_no_purchase_before_launch(receipts: pa.Table) -> None:
    catalogue = products(SMALL)
    ids, launch = column(catalogue, "product_id"), column(catalogue, "launch")
    assert (np.diff(ids) > 0).all()
    index = np.searchsorted(ids, column(receipts, "product_id"))
    assert (column(receipts, "timestamp") >= launch[index]).all()
    new = launch > launch.min()
    assert new.sum() == round(SMALL.num_products * SMALL.new_product_share)
    assert len(np.unique(index[new[index]])) > new.sum() // 2  # launched products do sell afterwards


def test_baskets_have_one_time_and_one_shopper(receipts: pa.Table) -> None:
    per_basket = receipts.group_by("basket_id").aggregate(
        [("timestamp", "min"), ("timestamp", "max"), ("shopper_id", "count_distinct")]
    )
    assert pc.all(pc.equal(per_basket.column("timestamp_min"), per_basket.column("timestamp_max"))).as_py()
    assert pc.max(per_basket.column("shopper_id_count_distinct")).as_py() == 1  # basket ids are unique
    # Within a shopper, basket ids increase with time.
    shopper, basket, time = (column(receipts, name) for name in ("shopper_id", "basket_id", "timestamp"))
    same = shopper[1:] == shopper[:-1]
    assert (np.diff(basket)[same] >= 0).all() and (np.diff(time)[same] >= 0).all()


def test_write_parquet_reads_back(tmp_path: Path, receipts: pa.Table) -> None:
    stats = write_parquet(SMALL, tmp_path / "out")
    assert stats["rows"] == receipts.num_rows and stats["files"] == 3 and stats["seconds"] > 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"part-0000{i}.parquet" for i in range(3)]
    dataset = ds.dataset(tmp_path / "out", format="parquet")
    assert dataset.count_rows() == receipts.num_rows
    assert dataset.to_table().equals(receipts)
    with pytest.raises(FileExistsError, match="already holds parquet files"):
        write_parquet(SMALL, tmp_path / "out")


def test_invalid_config_names_the_rule() -> None:
    with pytest.raises(ValueError, match=r"0 <= repeat_share <= 1"):
        SyntheticConfig(repeat_share=1.5)
