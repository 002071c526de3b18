"""The canonical receipts schema and its validation.

Every source (parquet files, Complete Journey, the synthetic generator) ends as a pyarrow table with
these columns, so everything downstream can rely on names, dtypes and the absence of nulls in keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from datetime import timezone as dt_timezone

import pyarrow as pa
import pyarrow.compute as pc

SHOPPER = "shopper_id"
BASKET = "basket_id"
PRODUCT = "product_id"
TIMESTAMP = "timestamp"
QUANTITY = "quantity"
PRICE = "price"
# the line's coupon discount (any sign convention: a coupon was used on the line where it is not 0; null
# where unknown), read by coupon targeting (recsys.evaluation.campaigns.coupon_use)
COUPON = "coupon_discount"

KEY_COLUMNS = (SHOPPER, BASKET, PRODUCT, TIMESTAMP)
ID_COLUMNS = (SHOPPER, BASKET, PRODUCT)
OPTIONAL_COLUMNS = (QUANTITY, PRICE, COUPON)
TIMESTAMP_UNIT = "us"

# How naive local times that a daylight-saving change makes ambiguous (clocks fall back: the time
# happens twice) or nonexistent (clocks spring forward over it) are resolved; the values are those of
# pyarrow.compute.assume_timezone's `ambiguous` and `nonexistent` options.
LOCAL_TIME_CHOICES = ("raise", "earliest", "latest")
# Receipts before this day are taken as a broken clock or a sentinel value (1900-01-01), not a sale.
DEFAULT_MIN_DATE = "1990-01-01"
# Slack for "now" as the default upper bound: clocks and zones of the writers may be a little ahead.
FUTURE_SLACK = timedelta(days=1)

DateBound = date | str | None


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


def _parse_date(option: str, value: DateBound) -> date | None:
    if value is None or isinstance(value, date):
        return value.date() if isinstance(value, datetime) else value
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        raise ReceiptsError(f"`{option}` must be a date like 1990-01-01 or null; got {value!r}") from None


@dataclass(frozen=True)
class TimeRules:
    """How timestamps are interpreted and checked; build it with :meth:`from_options`.

    ``lower`` (inclusive) and ``upper`` (exclusive) are the plausible instants; ``None``: no lower bound.
    """

    timezone: str | None
    ambiguous: str
    nonexistent: str
    min_date: date | None
    max_date: date | None
    lower: datetime | None
    upper: datetime

    @classmethod
    def from_options(
        cls,
        timezone: str | None = None,
        ambiguous_times: str = "raise",
        nonexistent_times: str = "raise",
        min_date: DateBound = DEFAULT_MIN_DATE,
        max_date: DateBound = None,
    ) -> TimeRules:
        """Check the options once, so that a typo fails before any data is read.

        ``min_date`` (inclusive, UTC midnight; ``None``: no lower bound) and ``max_date`` (inclusive,
        up to the end of that day in UTC; ``None``: now + 1 day) bound the plausible timestamps.
        """
        for option, value in (("ambiguous_times", ambiguous_times), ("nonexistent_times", nonexistent_times)):
            if value not in LOCAL_TIME_CHOICES:
                raise ReceiptsError(f"`{option}` must be one of {list(LOCAL_TIME_CHOICES)}; got {value!r}")
        low, high = _parse_date("min_date", min_date), _parse_date("max_date", max_date)
        lower = datetime.combine(low, time(), dt_timezone.utc) if low else None
        if high is None:
            upper = datetime.now(dt_timezone.utc) + FUTURE_SLACK
        else:
            upper = datetime.combine(high + timedelta(days=1), time(), dt_timezone.utc)
        if lower is not None and lower >= upper:
            raise ReceiptsError(f"`min_date` {low} is not before `max_date` ({upper:%Y-%m-%d %H:%M} UTC)")
        return cls(timezone, ambiguous_times, nonexistent_times, low, high, lower, upper)


def id_type_problem(name: str, dtype: pa.DataType) -> str | None:
    """Why ``dtype`` cannot hold the id column ``name`` (``None``: it can); checkable from a file footer."""
    if pa.types.is_integer(dtype):
        return None
    hint = "Map string ids to integers before loading."
    if pa.types.is_floating(dtype):
        # pandas writes an integer column with a missing value as float; a float id may already have
        # lost digits (above 2**53) or hold fractions, so it is not cast, even when the values look whole.
        hint = "Float ids are refused even when whole; write them as integers (e.g. Int64 in pandas)."
    return f"column '{name}' has dtype {dtype}; expected an integer id (int64). {hint}"


def timestamp_type_problem(dtype: pa.DataType) -> str | None:
    """Why ``dtype`` cannot hold the timestamp column (``None``: it can)."""
    if pa.types.is_timestamp(dtype):
        return None
    return (
        f"column '{TIMESTAMP}' has dtype {dtype}; expected a timestamp (tz-aware, or naive with "
        "a configured timezone)"
    )


def number_type_problem(name: str, dtype: pa.DataType) -> str | None:
    """Why ``dtype`` cannot hold the optional numeric column ``name`` (``None``: it can)."""
    if pa.types.is_integer(dtype) or pa.types.is_floating(dtype):
        return None
    return f"column '{name}' has dtype {dtype}; expected a number"


def _cast_integer_key(column: pa.ChunkedArray, name: str) -> pa.ChunkedArray:
    problem = id_type_problem(name, column.type)
    if problem:
        raise ReceiptsError(problem)
    if pa.types.is_unsigned_integer(column.type) and len(column) and pc.max(column).as_py() > 2**63 - 1:
        raise ReceiptsError(f"column '{name}' has ids larger than int64 can hold")
    return column.cast(pa.int64())


def _show(scalar: pa.Scalar) -> str:
    try:
        return str(scalar.as_py())
    except (ValueError, OverflowError):  # beyond what Python's datetime can show
        return f"{scalar.value} {scalar.type.unit} since 1970"


def _first(mask: pa.ChunkedArray) -> tuple[int, int]:
    """How many rows ``mask`` selects and the index of the first (the mask is known to select some)."""
    return pc.sum(mask).as_py(), pc.indices_nonzero(mask.combine_chunks())[0].as_py()


def _local_time_error(
    column: pa.ChunkedArray, rules: TimeRules, first_row: int, error: pa.ArrowInvalid
) -> ReceiptsError:
    """Name the first ambiguous or nonexistent local time behind ``error`` and the option resolving it."""
    zone = rules.timezone
    cases = [  # option, its value, what the time is
        ("ambiguous_times", rules.ambiguous, "ambiguous (clocks fall back, so it happened twice)"),
        ("nonexistent_times", rules.nonexistent, "nonexistent (clocks spring forward over it)"),
    ]
    try:
        early = pc.assume_timezone(column, zone, ambiguous="earliest", nonexistent="earliest")
        for option, choice, what in cases:
            if choice != "raise":
                continue
            # The two resolutions of a local time differ exactly where it is ambiguous (or nonexistent).
            late = {"ambiguous": "earliest", "nonexistent": "earliest", option.split("_")[0]: "latest"}
            bad = pc.not_equal(early, pc.assume_timezone(column, zone, **late))
            if pc.any(bad).as_py():
                count, index = _first(bad)
                return ReceiptsError(
                    f"column '{TIMESTAMP}' has {count} naive local time(s) that are {what} in {zone}, "
                    f"first {_show(column[index])} at row {first_row + index}; set `{option}` to "
                    "'earliest' (the earlier instant) or 'latest' (the later one), or fix the source"
                )
    except pa.ArrowInvalid:
        pass  # not a daylight-saving problem (e.g. an unknown zone): report pyarrow's own words
    return ReceiptsError(f"column '{TIMESTAMP}': cannot localise naive timestamps to {zone!r}: {error}")


def _cast_timestamp(column: pa.ChunkedArray, rules: TimeRules, first_row: int) -> pa.ChunkedArray:
    problem = timestamp_type_problem(column.type)
    if problem:
        raise ReceiptsError(problem)
    timezone = rules.timezone
    if column.type.tz is None:
        if timezone is None:
            raise ReceiptsError(
                f"column '{TIMESTAMP}' holds naive timestamps and no timezone is configured; set "
                "`timezone` to the zone the timestamps were recorded in (e.g. 'UTC')"
            )
        try:
            column = pc.assume_timezone(
                column, timezone, ambiguous=rules.ambiguous, nonexistent=rules.nonexistent
            )
        except pa.ArrowInvalid as error:
            raise _local_time_error(column, rules, first_row, error) from None
    if timezone is not None and column.type.tz != timezone:
        column = column.cast(pa.timestamp(column.type.unit, tz=timezone))
    try:
        return column.cast(pa.timestamp(TIMESTAMP_UNIT, tz=column.type.tz))
    except pa.ArrowInvalid as error:  # nanoseconds that microseconds cannot hold
        raise ReceiptsError(f"column '{TIMESTAMP}' cannot be cast to microseconds: {error}") from None


def _check_dates(column: pa.ChunkedArray, rules: TimeRules, first_row: int) -> None:
    """Refuse timestamps outside the plausible range, naming the first offender."""
    if len(column) == 0:
        return
    low, high = (value.as_py() for value in pc.min_max(column).values())
    if rules.lower is not None and low < rules.lower:
        count, index = _first(pc.less(column, pa.scalar(rules.lower, column.type)))
        raise ReceiptsError(
            f"column '{TIMESTAMP}' has {count} value(s) before min_date {rules.min_date}, first "
            f"{_show(column[index])} at row {first_row + index}; fix the source, or set `min_date` to an "
            "earlier date (null: no lower bound) if such old receipts are real"
        )
    if high >= rules.upper:
        count, index = _first(pc.greater_equal(column, pa.scalar(rules.upper, column.type)))
        now = f"now + 1 day ({rules.upper:%Y-%m-%d %H:%M} UTC)"
        bound = f"max_date {rules.max_date}" if rules.max_date else now
        raise ReceiptsError(
            f"column '{TIMESTAMP}' has {count} value(s) after {bound}, first {_show(column[index])} at "
            f"row {first_row + index}; fix the source, or set `max_date` to a later date"
        )


def _number(column: pa.ChunkedArray, name: str) -> pa.ChunkedArray:
    problem = number_type_problem(name, column.type)
    if problem:
        raise ReceiptsError(problem)
    if pa.types.is_floating(column.type):
        # pandas writes a missing number as NaN, pyarrow as null: both mean "unknown", so both are null
        # (a NaN quantity would otherwise compare as "not > 0" and be dropped as a return).
        nan = pc.is_nan(column)
        if pc.any(nan).as_py():
            column = pc.if_else(nan, pa.scalar(None, column.type), column)
    return column.cast(pa.float64())


def conform_receipts(
    table: pa.Table, rules: TimeRules, drop_returns: bool = True, first_row: int = 0
) -> pa.Table:
    """Check one piece of receipts (a file or a batch of one) and cast it to the canonical schema.

    The per-row part of :func:`validate_receipts`, without the whole-table steps (refusing empty input,
    duplicates, refusing what is empty after dropping returns) that :func:`finish_receipts` does.
    ``first_row`` is the position of the table's first row in its file, so errors name the file's row.
    """
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

    columns = {name: _cast_integer_key(table.column(name), name) for name in ID_COLUMNS}
    columns[TIMESTAMP] = _cast_timestamp(table.column(TIMESTAMP), rules, first_row)
    _check_dates(columns[TIMESTAMP], rules, first_row)
    for name in OPTIONAL_COLUMNS:
        if name in table.column_names:
            columns[name] = _number(table.column(name), name)
    out = pa.table(columns)
    if drop_returns and QUANTITY in out.column_names:
        # a null (or NaN) quantity is unknown, not a return: the line is kept as a purchase
        kept = pc.fill_null(pc.greater(out.column(QUANTITY), 0), True)
        if not pc.all(kept).as_py():  # filtering copies every column: only when there is a return
            out = out.filter(kept)
    tz = out.schema.field(TIMESTAMP).type.tz
    return out.cast(receipts_schema(tz, tuple(c for c in OPTIONAL_COLUMNS if c in out.column_names)))


def finish_receipts(table: pa.Table, drop_duplicates: bool = False) -> pa.Table:
    """The whole-table steps on conformed receipts: optional duplicate removal, refusing an empty result."""
    if drop_duplicates:
        table = table.group_by(table.column_names, use_threads=False).aggregate([]).cast(table.schema)
    if table.num_rows == 0:
        raise ReceiptsError("receipts are empty after dropping returns (quantity <= 0)")
    return table


def validate_receipts(
    table: pa.Table,
    timezone: str | None = None,
    drop_returns: bool = True,
    drop_duplicates: bool = False,
    *,
    ambiguous_times: str = "raise",
    nonexistent_times: str = "raise",
    min_date: DateBound = DEFAULT_MIN_DATE,
    max_date: DateBound = None,
) -> pa.Table:
    """Check ``table`` against the canonical schema and return it cast to canonical dtypes.

    - Missing key columns, non-integer ids (float ids too), non-timestamp times, nulls in key columns
      and empty input raise :class:`ReceiptsError` naming the column.
    - Naive timestamps are localised to ``timezone`` (required then); aware ones are converted to it.
      Naive times that daylight saving makes ambiguous or nonexistent raise, naming the first, unless
      ``ambiguous_times`` / ``nonexistent_times`` is ``"earliest"`` or ``"latest"``
      (as in :func:`pyarrow.compute.assume_timezone`).
    - Timestamps before ``min_date`` (default 1990-01-01; ``None``: no bound) or after ``max_date``
      (inclusive; ``None``: now + 1 day) raise, naming the first.
    - Returns: rows with ``quantity <= 0`` are dropped when ``drop_returns`` (the default), since a
      return is not a purchase signal; with ``drop_returns=False`` they are kept as they are. A null or
      NaN quantity (or price) is unknown: it becomes null and the line is kept as a purchase.
    - Duplicate lines (identical in every canonical column) are kept by default, as a shopper can buy
      the same product twice in one basket on separate lines; ``drop_duplicates=True`` removes them.
    Extra columns are dropped; optional columns (quantity, price) are kept as float64 when present.
    """
    rules = TimeRules.from_options(timezone, ambiguous_times, nonexistent_times, min_date, max_date)
    if table.num_rows == 0:
        raise ReceiptsError("receipts are empty: no rows to load")
    return finish_receipts(conform_receipts(table, rules, drop_returns), drop_duplicates)
