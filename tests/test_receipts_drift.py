"""Receipts cannot drift silently: every file of a dataset is checked, and every odd value is named.

Each test reproduces one finding with the smallest input; errors must name the file, column and value.
"""

from __future__ import annotations

import inspect
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from recsys.data.loader import iter_receipts, read_receipts
from recsys.data.schema import ReceiptsError, validate_receipts

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2017, 3, 1, 12, 0)
UTC = timezone.utc
NY = "America/New_York"
AMBIGUOUS = datetime(2017, 11, 5, 1, 30)  # New York falls back at 02:00: 01:30 happens twice
NONEXISTENT = datetime(2017, 3, 12, 2, 30)  # New York springs forward at 02:00: 02:30 never happens


def receipts(n: int = 2, **overrides: object) -> pa.Table:
    """``n`` valid lines (aware UTC timestamps, quantity 1); ``None`` drops a column."""
    columns: dict[str, object] = {
        "shopper_id": pa.array(range(1, n + 1), pa.int64()),
        "basket_id": pa.array(range(10, 10 + n), pa.int64()),
        "product_id": pa.array(range(100, 100 + n), pa.int64()),
        "timestamp": pa.array([T0] * n, pa.timestamp("us", tz="UTC")),
        "quantity": pa.array([1.0] * n),
    }
    columns.update(overrides)
    return pa.table({k: v for k, v in columns.items() if v is not None})


def naive(*times: datetime) -> pa.Array:
    return pa.array(list(times), pa.timestamp("us"))


def write(directory: Path, **files: pa.Table) -> Path:
    """Write each table as ``directory/<name>.parquet``; the dataset reads them in name order."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, table in files.items():
        pq.write_table(table, directory / f"{name}.parquet")
    return directory


# Finding 5: a dataset scan casts every file to the first file's schema.


def test_a_file_without_quantity_is_named(tmp_path: Path) -> None:
    # Read as one dataset, the first file's missing `quantity` would switch off return dropping for all.
    source = write(tmp_path, a=receipts(quantity=None), b=receipts(quantity=pa.array([1.0, -1.0])))
    with pytest.raises(ReceiptsError, match=r"a\.parquet' lacks column quantity that 1 of 2 files have"):
        read_receipts(source)
    with pytest.raises(ReceiptsError, match=r"a\.parquet' lacks column quantity"):
        next(iter_receipts(source))


def test_naive_timestamps_in_a_later_file_are_named(tmp_path: Path) -> None:
    # The scan would read the naive file as UTC, ignoring the configured timezone.
    source = write(tmp_path, a=receipts(), b=receipts(timestamp=naive(T0, T0)))
    with pytest.raises(
        ReceiptsError, match=r"b\.parquet' has naive timestamps but .*a\.parquet' has tz-aware"
    ):
        read_receipts(source, timezone=NY)


def test_all_naive_files_are_localised_to_the_timezone(tmp_path: Path) -> None:
    source = write(tmp_path, a=receipts(timestamp=naive(T0, T0)), b=receipts(timestamp=naive(T0, T0)))
    out = read_receipts(source, timezone=NY)
    assert out.column("timestamp")[0].as_py() == T0.replace(tzinfo=UTC) + timedelta(hours=5)  # EST


def test_aware_files_in_different_zones_keep_their_instants(tmp_path: Path) -> None:
    berlin = pa.array([T0, T0], pa.timestamp("us", tz="Europe/Berlin"))
    source = write(tmp_path, a=receipts(), b=receipts(timestamp=berlin))
    out = read_receipts(source, timezone="UTC")
    assert {t.as_py() for t in out.column("timestamp")} == {T0.replace(tzinfo=UTC)}  # same wall-clock
    with pytest.raises(ReceiptsError, match=r"different zones \(Europe/Berlin, UTC\).*set `timezone`"):
        read_receipts(source)  # no zone to convert both to: the first file's would win silently


@pytest.mark.parametrize(
    "ids",
    [pa.array([101.5, 102.0]), pa.array([101.0, 102.0]), pa.array(["101", "102"])],
    ids=["fractional-float", "whole-float", "string"],
)
def test_non_integer_ids_in_a_later_file_are_named(tmp_path: Path, ids: pa.Array) -> None:
    # The scan would cast whole floats and numeric strings to int64 silently (and fail on 101.5 with a
    # message naming neither file nor column).
    source = write(tmp_path, a=receipts(), b=receipts(product_id=ids))
    pattern = rf"b\.parquet': column 'product_id' has dtype {ids.type}; expected an integer id"
    with pytest.raises(ReceiptsError, match=pattern):
        read_receipts(source)
    with pytest.raises(ReceiptsError, match=pattern):
        next(iter_receipts(source))  # refused from the footers, before the first batch


def test_integer_id_widths_may_differ_between_files(tmp_path: Path) -> None:
    source = write(tmp_path, a=receipts(product_id=pa.array([1, 2], pa.int32())), b=receipts())
    out = read_receipts(source)
    assert out.schema.field("product_id").type == pa.int64()
    assert out.column("product_id").to_pylist() == [1, 2, 100, 101]


def test_hive_partition_keys_count_as_columns_of_every_file(tmp_path: Path) -> None:
    write(tmp_path / "shopper_id=7", a=receipts(shopper_id=None))
    write(tmp_path / "shopper_id=8", a=receipts(shopper_id=None))
    out = read_receipts(tmp_path)
    assert sorted(out.column("shopper_id").to_pylist()) == [7, 7, 8, 8]


# Finding 6: naive local times that daylight saving makes ambiguous or nonexistent.


@pytest.mark.parametrize(
    ("moment", "option", "what"),
    [(AMBIGUOUS, "ambiguous_times", "ambiguous"), (NONEXISTENT, "nonexistent_times", "nonexistent")],
)
def test_daylight_saving_times_name_the_value_and_the_option(
    moment: datetime, option: str, what: str
) -> None:
    table = receipts(3, timestamp=naive(T0, moment, T0))
    pattern = rf"1 naive local time\(s\) that are {what} .* in {NY}, first {moment} at row 1; set `{option}`"
    with pytest.raises(ReceiptsError, match=pattern):
        validate_receipts(table, timezone=NY)


@pytest.mark.parametrize(
    ("moment", "option", "choice", "utc"),
    [
        (AMBIGUOUS, "ambiguous_times", "earliest", datetime(2017, 11, 5, 5, 30)),  # 01:30 EDT
        (AMBIGUOUS, "ambiguous_times", "latest", datetime(2017, 11, 5, 6, 30)),  # 01:30 EST
        (NONEXISTENT, "nonexistent_times", "earliest", datetime(2017, 3, 12, 6, 59, 59, 999999)),
        (NONEXISTENT, "nonexistent_times", "latest", datetime(2017, 3, 12, 7, 0)),  # 03:00 EDT
    ],
)
def test_daylight_saving_options_resolve(moment: datetime, option: str, choice: str, utc: datetime) -> None:
    out = validate_receipts(receipts(1, timestamp=naive(moment)), timezone=NY, **{option: choice})
    # compared in UTC: Python never equates an ambiguous local datetime with another zone's
    instant = out.column("timestamp").cast(pa.timestamp("us", tz="UTC"))[0].as_py()
    assert instant == utc.replace(tzinfo=UTC)


def test_daylight_saving_error_names_file_and_row_of_the_file(tmp_path: Path) -> None:
    times = naive(T0, T0, T0, AMBIGUOUS, T0)
    source = write(tmp_path, a=receipts(5, timestamp=naive(*[T0] * 5)), b=receipts(5, timestamp=times))
    pattern = rf"b\.parquet': column 'timestamp' .* first {AMBIGUOUS} at row 3; set `ambiguous_times`"
    with pytest.raises(ReceiptsError, match=pattern):
        list(iter_receipts(source, timezone=NY, batch_size=2))  # row 3 of the file is in its 2nd batch
    with pytest.raises(ReceiptsError, match=pattern):
        read_receipts(source, timezone=NY)
    assert read_receipts(source, timezone=NY, ambiguous_times="latest").num_rows == 10
    assert sum(t.num_rows for t in iter_receipts(source, timezone=NY, ambiguous_times="earliest")) == 10


def test_unknown_option_values_are_refused() -> None:
    with pytest.raises(ReceiptsError, match=r"`nonexistent_times` must be one of \['raise', 'earliest'"):
        validate_receipts(receipts(), nonexistent_times="shift_forward")
    with pytest.raises(ReceiptsError, match="`min_date` must be a date like 1990-01-01 or null; got 'soon'"):
        validate_receipts(receipts(), min_date="soon")


def test_hydra_configs_pass_the_options(tmp_path: Path) -> None:
    options = ("ambiguous_times", "nonexistent_times", "min_date", "max_date")
    parquet = OmegaConf.load(ROOT / "conf" / "data" / "parquet.yaml").receipts
    candidates = OmegaConf.load(ROOT / "conf" / "candidates.yaml")
    for option in options:
        assert option in parquet and option in candidates, option
    defaults = {name: inspect.signature(read_receipts).parameters[name].default for name in options}
    assert {o: parquet[o] for o in options} == defaults | {"min_date": "1990-01-01"}
    assert {o: candidates[o] for o in options} == defaults | {"min_date": "1990-01-01"}
    kwargs = {o: parquet[o] for o in options}
    assert read_receipts(write(tmp_path, a=receipts()), **kwargs).num_rows == 2


# Finding 7: NaN quantity was dropped as a return, null quantity kept.


def test_nan_quantity_is_unknown_like_null_and_kept(tmp_path: Path) -> None:
    quantity = pa.array([math.nan, None, 2.0, -1.0])
    table = receipts(4, quantity=quantity, price=pa.array([math.nan, None, 1.0, 1.0]))
    out = validate_receipts(table)
    assert out.column("quantity").to_pylist() == [None, None, 2.0]  # the return (-1) alone is dropped
    assert out.column("price").to_pylist() == [None, None, 1.0]
    assert read_receipts(write(tmp_path, a=table)).num_rows == 3
    assert validate_receipts(table, drop_returns=False).column("quantity").null_count == 2


# Finding 12: unreadable files, odd-schema files and implausible dates.


def test_corrupt_bytes_name_the_file(tmp_path: Path) -> None:
    source = write(tmp_path, a=receipts(), b=receipts(2000))
    data = bytearray((source / "b.parquet").read_bytes())
    data[100:400] = b"\xff" * 300  # inside the first column chunk; the footer stays readable
    (source / "b.parquet").write_bytes(bytes(data))
    with pytest.raises(ReceiptsError, match=r"b\.parquet': cannot be read: "):
        read_receipts(source)
    with pytest.raises(ReceiptsError, match=r"b\.parquet': cannot be read: "):
        list(iter_receipts(source))


def test_a_file_that_is_not_parquet_is_named(tmp_path: Path) -> None:
    source = write(tmp_path, a=receipts())
    (source / "b.parquet").write_bytes(b"shopper_id,basket_id\n1,2\n")
    with pytest.raises(ReceiptsError, match=r"b\.parquet"):
        read_receipts(source)


def test_an_odd_schema_file_blames_its_own_column(tmp_path: Path) -> None:
    # The scan would fill the missing column with nulls and blame "null values in 'timestamp'".
    odd = receipts().rename_columns(["shopper_id", "basket_id", "product_id", "ts", "quantity"])
    source = write(tmp_path, a=receipts(), b=odd)
    with pytest.raises(
        ReceiptsError, match=r"b\.parquet': missing required column\(s\): timestamp; the file"
    ):
        read_receipts(source)


@pytest.mark.parametrize(
    ("moment", "bound"),
    [(datetime(1900, 1, 1), "before min_date 1990-01-01"), (datetime(3000, 1, 1), "after now \\+ 1 day")],
)
def test_implausible_dates_are_named(tmp_path: Path, moment: datetime, bound: str) -> None:
    times = pa.array([T0, moment], pa.timestamp("us", tz="UTC"))
    pattern = rf"column 'timestamp' has 1 value\(s\) {bound}.*, first {moment}\+00:00 at row 1"
    with pytest.raises(ReceiptsError, match=pattern):
        validate_receipts(receipts(timestamp=times))
    source = write(tmp_path, a=receipts(), b=receipts(timestamp=times))
    with pytest.raises(ReceiptsError, match=r"b\.parquet': " + pattern):
        list(iter_receipts(source))


def test_date_bounds_are_configurable() -> None:
    old = receipts(timestamp=pa.array([datetime(1900, 1, 1)] * 2, pa.timestamp("us", tz="UTC")))
    assert validate_receipts(old, min_date=None).num_rows == 2
    assert validate_receipts(old, min_date="1899-12-31").num_rows == 2
    late = pa.array([T0, datetime(2017, 3, 2)], pa.timestamp("us", tz="UTC"))
    assert validate_receipts(receipts(timestamp=late), max_date="2017-03-02").num_rows == 2  # inclusive
    with pytest.raises(ReceiptsError, match=r"after max_date 2017-03-01, first 2017-03-02 00:00:00\+00:00"):
        validate_receipts(receipts(timestamp=late), max_date="2017-03-01")
    with pytest.raises(ReceiptsError, match="`min_date` 2018-01-01 is not before `max_date`"):
        validate_receipts(receipts(), min_date="2018-01-01", max_date="2017-01-01")
