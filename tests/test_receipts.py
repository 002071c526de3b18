"""Receipts schema validation and the parquet loader: every bad input gets a message naming it."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.data.loader import iter_receipts, read_receipts
from recsys.data.schema import ReceiptsError, validate_receipts

T0 = datetime(2017, 3, 1, 12, 0)


def raw(**overrides: object) -> pa.Table:
    columns: dict[str, object] = {
        "shopper_id": pa.array([1, 1, 2], pa.int64()),
        "basket_id": pa.array([10, 10, 20], pa.int64()),
        "product_id": pa.array([5, 6, 5], pa.int64()),
        "timestamp": pa.array([T0, T0, T0], pa.timestamp("us", tz="UTC")),
        "quantity": pa.array([1.0, 2.0, 1.0]),
    }
    columns.update(overrides)
    return pa.table({k: v for k, v in columns.items() if v is not None})


def test_valid_receipts_get_canonical_dtypes() -> None:
    out = validate_receipts(raw(shopper_id=pa.array([1, 1, 2], pa.int32())), timezone="America/New_York")
    assert out.schema.field("shopper_id").type == pa.int64()
    assert out.schema.field("timestamp").type == pa.timestamp("us", tz="America/New_York")
    assert out.num_rows == 3


@pytest.mark.parametrize("column", ["shopper_id", "basket_id", "product_id", "timestamp"])
def test_missing_column_is_named(column: str) -> None:
    with pytest.raises(ReceiptsError, match=rf"missing required column\(s\) \['{column}'\]"):
        validate_receipts(raw(**{column: None}))


@pytest.mark.parametrize("column", ["shopper_id", "basket_id", "product_id"])
def test_null_key_is_named(column: str) -> None:
    with pytest.raises(ReceiptsError, match=rf"column '{column}' has 1 null value"):
        validate_receipts(raw(**{column: pa.array([1, None, 2], pa.int64())}))


def test_null_timestamp_is_named() -> None:
    with pytest.raises(ReceiptsError, match="column 'timestamp' has 1 null value"):
        validate_receipts(raw(timestamp=pa.array([T0, None, T0], pa.timestamp("us", tz="UTC"))))


def test_string_ids_are_refused() -> None:
    with pytest.raises(ReceiptsError, match="column 'product_id' has dtype string; expected an integer id"):
        validate_receipts(raw(product_id=pa.array(["a", "b", "c"])))


def test_non_timestamp_time_is_refused() -> None:
    with pytest.raises(ReceiptsError, match="column 'timestamp' has dtype int64; expected a timestamp"):
        validate_receipts(raw(timestamp=pa.array([1, 2, 3], pa.int64())))


def test_naive_timestamps_need_a_timezone() -> None:
    naive = pa.array([T0, T0, T0], pa.timestamp("us"))
    with pytest.raises(ReceiptsError, match="naive timestamps and no timezone is configured"):
        validate_receipts(raw(timestamp=naive))
    localised = validate_receipts(raw(timestamp=naive), timezone="UTC")
    assert localised.column("timestamp")[0].as_py() == T0.replace(tzinfo=timezone.utc)


def test_aware_timestamps_are_converted_not_shifted() -> None:
    out = validate_receipts(raw(), timezone="America/New_York")
    assert out.column("timestamp")[0].as_py() == T0.replace(tzinfo=timezone.utc)  # same instant


def test_non_numeric_quantity_is_refused() -> None:
    with pytest.raises(ReceiptsError, match="column 'quantity' has dtype string; expected a number"):
        validate_receipts(raw(quantity=pa.array(["1", "2", "3"])))


def test_empty_input_is_refused() -> None:
    with pytest.raises(ReceiptsError, match="receipts are empty"):
        validate_receipts(raw().slice(0, 0))


def test_returns_are_dropped_by_default_and_kept_on_request() -> None:
    table = raw(quantity=pa.array([1.0, -1.0, 0.0]))
    assert validate_receipts(table).num_rows == 1
    assert validate_receipts(table, drop_returns=False).num_rows == 3


def test_only_returns_is_an_error() -> None:
    with pytest.raises(ReceiptsError, match="empty after dropping returns"):
        validate_receipts(raw(quantity=pa.array([0.0, -1.0, 0.0])))


def test_duplicate_lines_kept_by_default_dropped_on_request() -> None:
    table = pa.concat_tables([raw(), raw()])
    assert validate_receipts(table).num_rows == 6
    assert validate_receipts(table, drop_duplicates=True).num_rows == 3


def write(tmp_path: Path, table: pa.Table, name: str = "part-0.parquet") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, tmp_path / name)
    return tmp_path


def test_loader_maps_source_columns(tmp_path: Path) -> None:
    source = raw().rename_columns(["household", "basket_id", "sku", "ts", "quantity"])
    out = read_receipts(
        write(tmp_path, source), columns={"shopper_id": "household", "product_id": "sku", "timestamp": "ts"}
    )
    assert out.column_names == ["shopper_id", "basket_id", "product_id", "timestamp", "quantity"]
    assert out.column("product_id").to_pylist() == [5, 6, 5]


def test_loader_names_missing_source_column(tmp_path: Path) -> None:
    with pytest.raises(ReceiptsError, match=r"shopper_id \(source column 'household'\)"):
        read_receipts(write(tmp_path, raw()), columns={"shopper_id": "household"})


def test_loader_refuses_unknown_mapping(tmp_path: Path) -> None:
    with pytest.raises(ReceiptsError, match=r"unknown canonical name\(s\) \['store'\]"):
        read_receipts(write(tmp_path, raw()), columns={"store": "store_id"})


def test_loader_refuses_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ReceiptsError, match="does not exist"):
        read_receipts(tmp_path / "nope")


def test_loader_reads_hive_partitions(tmp_path: Path) -> None:
    write(tmp_path / "week=1", raw())
    write(tmp_path / "week=2", raw(shopper_id=pa.array([3, 3, 4], pa.int64())))
    out = read_receipts(tmp_path)
    assert sorted(set(out.column("shopper_id").to_pylist())) == [1, 2, 3, 4]


def test_streaming_yields_bounded_batches_and_keeps_every_row(tmp_path: Path) -> None:
    big = pa.concat_tables([raw()] * 100)
    batches = list(iter_receipts(write(tmp_path, big), batch_size=50))
    assert all(b.num_rows <= 50 for b in batches)
    assert sum(b.num_rows for b in batches) == 300


def test_streaming_an_empty_source_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ReceiptsError, match="has no rows"):
        list(iter_receipts(write(tmp_path, raw().slice(0, 0))))
