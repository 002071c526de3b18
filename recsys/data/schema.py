"""The canonical receipts schema and its validation.

Every source (parquet files, Complete Journey, the synthetic generator) ends as a pyarrow table with
these columns, so everything downstream can rely on names, dtypes and the absence of nulls in keys.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

SHOPPER = "shopper_id"
BASKET = "basket_id"
PRODUCT = "product_id"
TIMESTAMP = "timestamp"
QUANTITY = "quantity"
PRICE = "price"

KEY_COLUMNS = (SHOPPER, BASKET, PRODUCT, TIMESTAMP)
OPTIONAL_COLUMNS = (QUANTITY, PRICE)
TIMESTAMP_UNIT = "us"


class ReceiptsError(ValueError):
    """Raised when receipts cannot be used as given; the message names the column and the problem."""


def receipts_schema(timezone: str, optional: tuple[str, ...] = OPTIONAL_COLUMNS) -> pa.Schema:
    """Schema of canonical receipts with timestamps in ``timezone`` and the given optional columns."""
    fields = [
        pa.field(SHOPPER, pa.int64(), nullable=False),
        pa.field(BASKET, pa.int64(), nullable=False),
        pa.field(PRODUCT, pa.int64(), nullable=False),
        pa.field(TIMESTAMP, pa.timestamp(TIMESTAMP_UNIT, tz=timezone), nullable=False),
    ]
    fields += [pa.field(name, pa.float64()) for name in optional]
    return pa.schema(fields)


def _cast_integer_key(column: pa.ChunkedArray, name: str) -> pa.ChunkedArray:
    if not pa.types.is_integer(column.type):
        raise ReceiptsError(
            f"column '{name}' has dtype {column.type}; expected an integer id (int64). "
            "Map string ids to integers before loading."
        )
    if pa.types.is_unsigned_integer(column.type) and len(column) and pc.max(column).as_py() > 2**63 - 1:
        raise ReceiptsError(f"column '{name}' has ids larger than int64 can hold")
    return column.cast(pa.int64())


def _cast_timestamp(column: pa.ChunkedArray, timezone: str | None) -> pa.ChunkedArray:
    if not pa.types.is_timestamp(column.type):
        raise ReceiptsError(
            f"column '{TIMESTAMP}' has dtype {column.type}; expected a timestamp (tz-aware, or naive with "
            "a configured timezone)"
        )
    if column.type.tz is None:
        if timezone is None:
            raise ReceiptsError(
                f"column '{TIMESTAMP}' holds naive timestamps and no timezone is configured; set "
                "`timezone` to the zone the timestamps were recorded in (e.g. 'UTC')"
            )
        column = pc.assume_timezone(column, timezone)
    if timezone is not None and column.type.tz != timezone:
        column = column.cast(pa.timestamp(column.type.unit, tz=timezone))
    return column.cast(pa.timestamp(TIMESTAMP_UNIT, tz=column.type.tz))


def validate_receipts(
    table: pa.Table,
    timezone: str | None = None,
    drop_returns: bool = True,
    drop_duplicates: bool = False,
) -> pa.Table:
    """Check ``table`` against the canonical schema and return it cast to canonical dtypes.

    - Missing key columns, non-integer ids, non-timestamp times, nulls in key columns and empty input
      raise :class:`ReceiptsError` naming the column.
    - Naive timestamps are localised to ``timezone`` (required then); aware ones are converted to it.
    - Returns: rows with ``quantity <= 0`` are dropped when ``drop_returns`` (the default), since a
      return is not a purchase signal; with ``drop_returns=False`` they are kept as they are.
    - Duplicate lines (identical in every canonical column) are kept by default, as a shopper can buy
      the same product twice in one basket on separate lines; ``drop_duplicates=True`` removes them.
    Extra columns are dropped; optional columns (quantity, price) are kept as float64 when present.
    """
    if table.num_rows == 0:
        raise ReceiptsError("receipts are empty: no rows to load")
    missing = [c for c in KEY_COLUMNS if c not in table.column_names]
    if missing:
        raise ReceiptsError(
            f"missing required column(s) {missing}; receipts need {list(KEY_COLUMNS)} "
            f"(found {table.column_names}); map source names with `columns`"
        )
    for name in KEY_COLUMNS:
        nulls = table.column(name).null_count
        if nulls:
            raise ReceiptsError(f"column '{name}' has {nulls} null value(s); key columns must not be null")

    columns = {name: _cast_integer_key(table.column(name), name) for name in (SHOPPER, BASKET, PRODUCT)}
    columns[TIMESTAMP] = _cast_timestamp(table.column(TIMESTAMP), timezone)
    for name in OPTIONAL_COLUMNS:
        if name in table.column_names:
            column = table.column(name)
            if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
                raise ReceiptsError(f"column '{name}' has dtype {column.type}; expected a number")
            columns[name] = column.cast(pa.float64())
    out = pa.table(columns)

    if drop_returns and QUANTITY in out.column_names:
        out = out.filter(pc.fill_null(pc.greater(out.column(QUANTITY), 0), True))
    if drop_duplicates:
        out = out.group_by(out.column_names, use_threads=False).aggregate([])
    if out.num_rows == 0:
        raise ReceiptsError("receipts are empty after dropping returns (quantity <= 0)")
    tz = out.schema.field(TIMESTAMP).type.tz
    return out.cast(receipts_schema(tz, tuple(c for c in OPTIONAL_COLUMNS if c in out.column_names)))
