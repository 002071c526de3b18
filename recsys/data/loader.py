"""Reading receipts from parquet files, directories and partitioned datasets.

Sources are read with ``pyarrow.dataset`` so a directory of files, a hive-partitioned tree and a single
file look the same, and so data larger than memory can be streamed batch by batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds

from recsys.data.schema import KEY_COLUMNS, OPTIONAL_COLUMNS, ReceiptsError, validate_receipts


def open_dataset(source: str | Path | list[str]) -> ds.Dataset:
    """A parquet dataset over a file, a directory (hive partitions discovered) or a list of files."""
    paths = [source] if isinstance(source, (str, Path)) else source
    for path in paths:
        if not Path(path).exists():
            raise ReceiptsError(f"receipts source {str(path)!r} does not exist")
    return ds.dataset(
        source if isinstance(source, list) else str(source), format="parquet", partitioning="hive"
    )


def _projection(dataset: ds.Dataset, columns: Mapping[str, str] | None) -> dict[str, ds.Expression]:
    """Canonical name -> source field, for the key columns and whichever optional columns exist."""
    mapping = dict(columns or {})
    unknown = set(mapping) - set(KEY_COLUMNS) - set(OPTIONAL_COLUMNS)
    if unknown:
        raise ReceiptsError(f"`columns` maps unknown canonical name(s) {sorted(unknown)}")
    available = set(dataset.schema.names)
    missing = [
        f"{c} (source column {mapping.get(c, c)!r})"
        for c in KEY_COLUMNS
        if mapping.get(c, c) not in available
    ]
    if missing:
        raise ReceiptsError(
            f"missing required column(s): {', '.join(missing)}; the source has {sorted(available)}"
        )
    wanted = [c for c in KEY_COLUMNS] + [c for c in OPTIONAL_COLUMNS if mapping.get(c, c) in available]
    return {c: ds.field(mapping.get(c, c)) for c in wanted}


def read_receipts(
    source: str | Path | list[str],
    columns: Mapping[str, str] | None = None,
    timezone: str | None = None,
    drop_returns: bool = True,
    drop_duplicates: bool = False,
) -> pa.Table:
    """Read and validate all receipts of ``source`` into memory.

    ``columns`` maps canonical names to source column names (e.g. ``{"shopper_id": "household_id"}``);
    ``timezone`` is the zone of naive timestamps (aware ones are converted to it). See
    :func:`recsys.data.schema.validate_receipts` for returns and duplicates.
    """
    dataset = open_dataset(source)
    table = dataset.to_table(columns=_projection(dataset, columns))
    return validate_receipts(
        table, timezone=timezone, drop_returns=drop_returns, drop_duplicates=drop_duplicates
    )


def iter_receipts(
    source: str | Path | list[str],
    columns: Mapping[str, str] | None = None,
    timezone: str | None = None,
    batch_size: int = 1_000_000,
    drop_returns: bool = True,
) -> Iterator[pa.Table]:
    """Stream validated receipts in batches of at most ``batch_size`` rows, never the whole table.

    Batches that are empty once returns are dropped are skipped; an entirely empty source raises.
    Duplicate removal needs the whole table, so it is not offered here.
    """
    dataset = open_dataset(source)
    projection = _projection(dataset, columns)
    seen_rows = 0
    for batch in dataset.to_batches(columns=projection, batch_size=batch_size):
        if batch.num_rows == 0:
            continue
        seen_rows += batch.num_rows
        table = pa.Table.from_batches([batch])
        try:
            yield validate_receipts(table, timezone=timezone, drop_returns=drop_returns)
        except ReceiptsError as error:
            if "after dropping returns" not in str(error):
                raise
    if seen_rows == 0:
        raise ReceiptsError(f"receipts are empty: {source!s} has no rows")
