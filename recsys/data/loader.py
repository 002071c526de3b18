"""Reading receipts from parquet files, directories and partitioned datasets.

Sources are opened with ``pyarrow.dataset`` so a directory of files, a hive-partitioned tree and a single
file look the same, and so data larger than memory can be streamed batch by batch. The files are then
read one by one, each with its own schema: a dataset scan would cast every file to the first file's
schema, so a later file with other columns, float ids or naive timestamps would be read silently wrong.
Every file's schema (its footer, cheap to read) is checked before any data is, and every error names
the file.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds

from recsys.data.schema import (
    COUPON,
    DEFAULT_MIN_DATE,
    ID_COLUMNS,
    KEY_COLUMNS,
    OPTIONAL_COLUMNS,
    PRICE,
    QUANTITY,
    SHOPPER,
    TIMESTAMP,
    DateBound,
    ReceiptsError,
    TimeRules,
    conform_receipts,
    finish_receipts,
    id_type_problem,
    number_type_problem,
    timestamp_type_problem,
)


def open_dataset(source: str | Path | list[str]) -> ds.Dataset:
    """A parquet dataset over a file, a directory (hive partitions discovered) or a list of files."""
    paths = [source] if isinstance(source, (str, Path)) else source
    for path in paths:
        if not Path(path).exists():
            raise ReceiptsError(f"receipts source {str(path)!r} does not exist")
    try:
        return ds.dataset(
            source if isinstance(source, list) else str(source), format="parquet", partitioning="hive"
        )
    except (OSError, pa.ArrowException) as error:  # e.g. a file that is not parquet or is truncated
        raise ReceiptsError(f"cannot open receipts source {str(source)!r}: {error}") from error


@dataclass(frozen=True)
class RowGroup:
    """One row group of a receipts file (:func:`row_groups`): the unit an input in shopper order is cut by."""

    path: str
    index: int  # within its file
    rows: int
    first_row: int  # its first row's number in its file, so errors name the file's row
    shoppers: tuple[int, int] | None  # (lowest, highest) shopper id from the footer's statistics, if any


@dataclass(frozen=True)
class _File:
    """One file of a dataset, with what is needed to read it by its own schema."""

    path: str
    fragment: ds.Fragment
    schema: pa.Schema  # the file's own columns plus its hive partition keys
    sources: dict[str, str]  # canonical name -> source column, for the columns read

    @property
    def projection(self) -> dict[str, ds.Expression]:
        return {canonical: ds.field(source) for canonical, source in self.sources.items()}

    def error(self, message: object) -> ReceiptsError:
        return ReceiptsError(f"receipts file {self.path!r}: {message}")

    def batches(self, batch_size: int) -> Iterator[pa.RecordBatch]:
        """The file's batches; a read error (corrupt bytes) names the file."""
        try:
            yield from self.fragment.to_batches(
                schema=self.schema, columns=self.projection, batch_size=batch_size
            )
        except (OSError, pa.ArrowException) as error:
            raise self.error(f"cannot be read: {error}") from error

    def table(self, row_group: int | None = None) -> pa.Table:
        """The whole file, or one of its row groups; a read error (corrupt bytes) names the file."""
        try:
            fragment = self.fragment
            if row_group is not None:
                fragment = fragment.subset(row_group_ids=[row_group])
            return fragment.to_table(schema=self.schema, columns=self.projection)
        except (OSError, pa.ArrowException) as error:
            raise self.error(f"cannot be read: {error}") from error

    def row_groups(self) -> list[RowGroup]:
        """The file's row groups, with the shopper ids' range where the footer records it."""
        try:
            metadata = self.fragment.metadata
        except (OSError, pa.ArrowException) as error:
            raise self.error(f"cannot be read: {error}") from error
        source = self.sources[SHOPPER]
        leaves = [metadata.schema.column(j).path for j in range(metadata.num_columns)]
        # a hive partition key has no statistics: its rows' ids are not known from the footer
        column = leaves.index(source) if source in leaves else None
        integer = pa.types.is_integer(self.schema.field(source).type)
        groups, first = [], 0
        for index in range(metadata.num_row_groups):
            group = metadata.row_group(index)
            stats = None if column is None else group.column(column).statistics
            known = integer and stats is not None and stats.has_min_max
            shoppers = (int(stats.min), int(stats.max)) if known else None
            groups.append(RowGroup(self.path, index, group.num_rows, first, shoppers))
            first += group.num_rows
        return groups


def _file_schema(dataset: ds.Dataset, fragment: ds.Fragment) -> pa.Schema:
    """The fragment's physical schema (from its footer) plus the partition keys its path encodes."""
    try:
        schema = fragment.physical_schema
    except (OSError, pa.ArrowException) as error:
        raise ReceiptsError(f"receipts file {fragment.path!r} cannot be read: {error}") from error
    for key in ds.get_partition_keys(fragment.partition_expression):
        if key not in schema.names:
            schema = schema.append(dataset.schema.field(key))
    return schema


def _source_name(canonical: str, source: str) -> str:
    return canonical if source == canonical else f"{canonical} (source column {source!r})"


def _check_file(file: _File, source_names: Mapping[str, str]) -> None:
    """Refuse a file whose columns cannot hold canonical receipts, before reading its data."""
    available = set(file.schema.names)
    missing = [_source_name(c, source_names[c]) for c in KEY_COLUMNS if source_names[c] not in available]
    if missing:
        raise file.error(
            f"missing required column(s): {', '.join(missing)}; the file has {sorted(available)}"
        )
    for canonical in file.projection:
        dtype = file.schema.field(source_names[canonical]).type
        if canonical in ID_COLUMNS:
            problem = id_type_problem(canonical, dtype)
        elif canonical == TIMESTAMP:
            problem = timestamp_type_problem(dtype)
        else:
            problem = number_type_problem(canonical, dtype)
        if problem and source_names[canonical] != canonical:
            problem += f" (source column {source_names[canonical]!r})"
        if problem:
            raise file.error(problem)


def _check_agreement(files: list[_File], source_names: Mapping[str, str], timezone: str | None) -> None:
    """Refuse files that disagree in what changes the result: optional columns and kinds of timestamps.

    Integer widths may differ (all are cast to int64 losslessly) and aware timestamps may be in
    different zones when ``timezone`` is set (they are converted, the instant is kept).
    """
    for name in OPTIONAL_COLUMNS:
        having = [f.path for f in files if name in f.projection]
        if having and len(having) < len(files):
            lacking = next(f.path for f in files if name not in f.projection)
            effect = {QUANTITY: "return dropping", PRICE: "price bands", COUPON: "coupon use"}[name]
            raise ReceiptsError(
                f"receipts file {lacking!r} lacks column {_source_name(name, source_names[name])} that "
                f"{len(having)} of {len(files)} files have (e.g. {having[0]!r}); every file must have the "
                f"same columns, or {effect} would silently differ between files"
            )
    zones = {f.path: f.schema.field(source_names[TIMESTAMP]).type.tz for f in files}
    naive = [path for path, tz in zones.items() if tz is None]
    if naive and len(naive) < len(files):
        aware = next(path for path, tz in zones.items() if tz is not None)
        raise ReceiptsError(
            f"receipts file {naive[0]!r} has naive timestamps but {aware!r} has tz-aware ones "
            f"({zones[aware]}); refusing to guess whether the naive ones are local times in "
            f"`timezone` ({timezone}) or UTC: write every file's timestamps the same way"
        )
    distinct = sorted({tz for tz in zones.values() if tz is not None})
    if timezone is None and len(distinct) > 1:
        raise ReceiptsError(
            f"receipts files have timestamps in different zones ({', '.join(distinct)}) and no `timezone` "
            "is configured to convert them to; set `timezone`"
        )


def _files(
    source: str | Path | list[str],
    columns: Mapping[str, str] | None,
    timezone: str | None,
    only: set[str] | None = None,
) -> list[_File]:
    """Every file of ``source`` (or those of its files whose paths are in ``only``) with its schema
    checked, in the dataset's order; reads only footers."""
    mapping = dict(columns or {})
    unknown = set(mapping) - set(KEY_COLUMNS) - set(OPTIONAL_COLUMNS)
    if unknown:
        raise ReceiptsError(f"`columns` maps unknown canonical name(s) {sorted(unknown)}")
    source_names = {c: mapping.get(c, c) for c in KEY_COLUMNS + OPTIONAL_COLUMNS}
    dataset = open_dataset(source)
    files = []
    for fragment in dataset.get_fragments():
        if only is not None and fragment.path not in only:
            continue
        schema = _file_schema(dataset, fragment)
        wanted = list(KEY_COLUMNS) + [c for c in OPTIONAL_COLUMNS if source_names[c] in schema.names]
        file = _File(fragment.path, fragment, schema, {c: source_names[c] for c in wanted})
        _check_file(file, source_names)
        files.append(file)
    _check_agreement(files, source_names, timezone)
    return files


def read_receipts(
    source: str | Path | list[str],
    columns: Mapping[str, str] | None = None,
    timezone: str | None = None,
    drop_returns: bool = True,
    drop_duplicates: bool = False,
    *,
    ambiguous_times: str = "raise",
    nonexistent_times: str = "raise",
    min_date: DateBound = DEFAULT_MIN_DATE,
    max_date: DateBound = None,
) -> pa.Table:
    """Read and validate all receipts of ``source`` into memory.

    ``columns`` maps canonical names to source column names (e.g. ``{"shopper_id": "household_id"}``);
    ``timezone`` is the zone of naive timestamps (aware ones are converted to it). See
    :func:`recsys.data.schema.validate_receipts` for returns, duplicates, daylight-saving times
    (``ambiguous_times``, ``nonexistent_times``) and the plausible dates (``min_date``, ``max_date``).
    Every file's schema is checked first; errors name the file.
    """
    rules = TimeRules.from_options(timezone, ambiguous_times, nonexistent_times, min_date, max_date)
    files = _files(source, columns, timezone)
    parts, rows = [], 0
    for file in files:
        table = file.table()
        if table.num_rows == 0:
            continue
        rows += table.num_rows
        try:
            parts.append(conform_receipts(table, rules, drop_returns))
        except ReceiptsError as error:
            raise file.error(error) from None
    if rows == 0:
        raise ReceiptsError(f"receipts are empty: {source!s} has no rows")
    return finish_receipts(pa.concat_tables(parts), drop_duplicates)


def iter_receipts(
    source: str | Path | list[str],
    columns: Mapping[str, str] | None = None,
    timezone: str | None = None,
    batch_size: int = 1_000_000,
    drop_returns: bool = True,
    *,
    ambiguous_times: str = "raise",
    nonexistent_times: str = "raise",
    min_date: DateBound = DEFAULT_MIN_DATE,
    max_date: DateBound = None,
    row_groups: Sequence[RowGroup] | None = None,
) -> Iterator[pa.Table]:
    """Stream validated receipts in batches of at most ``batch_size`` rows, never the whole table.

    Options are those of :func:`read_receipts`. Every file's schema is checked before the first batch
    (from the footers only); a batch never spans two files. Batches that are empty once returns are
    dropped are skipped; an entirely empty source raises. Duplicate removal needs the whole table, so it
    is not offered here. ``row_groups`` (of :func:`row_groups`): only these are read, in this order, one
    batch for each whatever its size, also when it is empty once returns are dropped; only their files'
    schemas are checked then (:func:`row_groups` checked every file's).
    """
    rules = TimeRules.from_options(timezone, ambiguous_times, nonexistent_times, min_date, max_date)
    # row groups name their files: the others' footers need not be read again
    only = None if row_groups is None else {group.path for group in row_groups}
    files = _files(source, columns, timezone, only)
    if row_groups is not None:
        yield from _read_row_groups(files, row_groups, rules, drop_returns)
        return
    seen_rows = 0
    for file in files:
        file_rows = 0  # row numbers in errors count from the file's start
        for batch in file.batches(batch_size):
            if batch.num_rows == 0:
                continue
            try:
                table = conform_receipts(pa.Table.from_batches([batch]), rules, drop_returns, file_rows)
            except ReceiptsError as error:
                raise file.error(error) from None
            file_rows += batch.num_rows
            if table.num_rows:
                yield table
        seen_rows += file_rows
    if seen_rows == 0:
        raise ReceiptsError(f"receipts are empty: {source!s} has no rows")


def row_groups(
    source: str | Path | list[str], columns: Mapping[str, str] | None = None, timezone: str | None = None
) -> list[RowGroup]:
    """Every row group of ``source``'s files, in the order :func:`iter_receipts` reads them, with the
    shopper ids' range each file's footer records (footers only; every file's schema is checked)."""
    return [group for file in _files(source, columns, timezone) for group in file.row_groups()]


def _read_row_groups(
    files: list[_File], groups: Sequence[RowGroup], rules: TimeRules, drop_returns: bool
) -> Iterator[pa.Table]:
    by_path = {file.path: file for file in files}
    for group in groups:
        file = by_path.get(group.path)
        if file is None:
            raise ReceiptsError(f"receipts file {group.path!r} is not part of the source any more")
        try:
            yield conform_receipts(file.table(group.index), rules, drop_returns, group.first_row)
        except ReceiptsError as error:
            raise file.error(error) from None
