"""Receipts partitioned by shopper, so that every shopper's whole history is read in one piece.

A shopper's shard and part are functions of a 64-bit hash of its id (splitmix64's finaliser, numpy only):
``shard = h % num_shards`` and ``part = (h // num_shards) % parts``. The assignment needs no sort and no
global state, so independent jobs (a SLURM array) agree on it, every shopper lands in exactly one part of
one shard, and the input may be in any order.

:func:`partition` streams the receipts once with ``pyarrow.dataset`` and appends this shard's rows to one
parquet file per part (a shuffle through local files). Its memory is bounded by the read batch plus the
rows buffered before a flush, whatever the input's size; afterwards a part is read whole, so ``parts`` is
chosen to keep a part to a few million rows. The files are complete once ``_partition.json`` is written
(last, atomically); a run that finds them complete for the same input and layout reuses them.

A shard of a single part needs no shuffle: :func:`gather` streams the same rows straight into memory, the
table :func:`read_part` would have read back. Both select the rows with :func:`split`.

Receipts already in shopper order need no shuffle either: when the row groups' shopper ranges (from the
footers' statistics) ascend through the files, :func:`runs` cuts the input into parts of consecutive
shoppers, each read straight from its row groups (shards still by hash: a shard keeps its shoppers' rows
of each). Part numbers then follow the input's order instead of the hash; every shopper is still in
exactly one part.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.data.loader import RowGroup
from recsys.data.schema import BASKET, PRODUCT, SHOPPER, TIMESTAMP
from recsys.io import write_json

COLUMNS = (SHOPPER, BASKET, PRODUCT, TIMESTAMP)  # all that ordering a history needs
DONE_FILE = "_partition.json"

# splitmix64 (Steele, Lea & Flood 2014): a bijective 64-bit mixer, so consecutive ids spread evenly
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def shopper_hash(shopper_ids: np.ndarray) -> np.ndarray:
    """[n] uint64 splitmix64 hashes of int64 ``shopper_ids`` (uint64 arithmetic wraps, as intended)."""
    z = np.asarray(shopper_ids, dtype=np.int64).view(np.uint64) + _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class Layout:
    """Which shard this job owns, and into how many parts it splits that shard."""

    shard_index: int
    num_shards: int
    parts: int

    def __post_init__(self) -> None:
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"need 0 <= shard_index ({self.shard_index}) < num_shards ({self.num_shards})")
        if self.parts < 1:
            raise ValueError(f"parts must be >= 1, got {self.parts}")

    @property
    def shard_name(self) -> str:
        """Directory name of the shard, e.g. ``shard=00003-of-00008`` (hive-style, sorts by index)."""
        return f"shard={self.shard_index:05d}-of-{self.num_shards:05d}"

    @staticmethod
    def part_name(part: int) -> str:
        return f"part-{part:05d}.parquet"

    def assign(self, shopper_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, part) of each shopper id, both [n] int64."""
        if self.num_shards == 1 and self.parts == 1:  # every shopper's: no hash to compute
            zeros = np.zeros(len(shopper_ids), dtype=np.int64)
            return zeros, zeros.copy()
        h = shopper_hash(shopper_ids)
        shards = np.uint64(self.num_shards)
        return (h % shards).astype(np.int64), ((h // shards) % np.uint64(self.parts)).astype(np.int64)


def partition(
    batches: Iterable[pa.Table],
    layout: Layout,
    directory: str | Path,
    signature: dict[str, Any],
    buffer_rows: int = 4_000_000,
    on_batch: Callable[[int], None] | None = None,
    columns: tuple[str, ...] = COLUMNS,
) -> list[int]:
    """Write this shard's rows of ``batches`` (canonical receipts) to ``directory/part-NNNNN.parquet``.

    Returns the rows of each part. ``signature`` describes the input and settings; when ``directory``
    already holds a finished partition with the same signature, layout and ``columns`` (those kept, see
    :func:`split`), it is reused without reading ``batches``; anything else there is removed first. Parts
    without rows get no file. ``on_batch`` is called with the row count of every batch read (progress).
    """
    directory = Path(directory)
    stamp = {"signature": signature, "layout": vars(layout), "columns": list(columns)}
    done = directory / DONE_FILE
    if done.exists():
        finished = json.loads(done.read_text())
        if {k: finished.get(k) for k in stamp} == json.loads(json.dumps(stamp)):
            return list(finished["rows"])
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)

    rows = [0] * layout.parts
    writers: dict[int, pq.ParquetWriter] = {}
    buffers: dict[int, list[pa.Table]] = {}
    buffered = 0

    def flush() -> None:
        for part, tables in buffers.items():
            table = pa.concat_tables(tables)
            if part not in writers:
                # uncompressed: scratch read back once; snappy made a partition pass ~40% slower
                path = directory / layout.part_name(part)
                writers[part] = pq.ParquetWriter(path, table.schema, compression="none")
            writers[part].write_table(table)
        buffers.clear()

    try:
        for batch in batches:
            if on_batch is not None:
                on_batch(batch.num_rows)
            for p, table in split(batch, layout, columns):
                buffers.setdefault(p, []).append(table)
                rows[p] += table.num_rows
                buffered += table.num_rows
            if buffered >= buffer_rows:
                flush()
                buffered = 0
        flush()
    finally:
        for writer in writers.values():
            writer.close()
    write_json(done, {**stamp, "rows": rows})
    return rows


def split(batch: pa.Table, layout: Layout, columns: tuple[str, ...] = COLUMNS) -> list[tuple[int, pa.Table]]:
    """This shard's rows of ``batch`` (canonical receipts, ``columns`` only: :data:`COLUMNS` and what a
    job reads beside them) as (part, rows), for each part that has any, in part order; a row keeps its
    order within its part. ValueError names a column the receipts lack."""
    missing = [c for c in columns if c not in batch.column_names]
    if missing:
        raise ValueError(f"the receipts lack column(s) {missing}, which this job reads")
    batch = batch.select(list(columns))
    shard, part = layout.assign(batch.column(SHOPPER).to_numpy())
    mine = np.flatnonzero(shard == layout.shard_index)
    if len(mine) == batch.num_rows and layout.parts == 1:
        return [(0, batch)] if len(mine) else []  # all of it, in one part: nothing to take
    order = mine[np.argsort(part[mine], kind="stable")]
    counts = np.bincount(part[order], minlength=layout.parts)
    table = batch.take(pa.array(order))
    starts = np.concatenate([[0], np.cumsum(counts)])
    return [(int(p), table.slice(starts[p], counts[p])) for p in np.flatnonzero(counts)]


@dataclass(frozen=True)
class Run:
    """A part of receipts in shopper order: its row groups and the shopper ids it owns, ``low <= id < high``
    (None: unbounded). A shopper whose rows straddle a cut puts that row group in both parts; each keeps
    its own ids of it."""

    groups: list[RowGroup]
    low: int | None
    high: int | None

    def owns_all(self, group: RowGroup) -> bool:
        """Whether every shopper ``group`` records is this part's (no rows of it to leave out)."""
        if group.shoppers is None:
            return False
        lowest, highest = group.shoppers
        return (self.low is None or lowest >= self.low) and (self.high is None or highest < self.high)


def runs(groups: Sequence[RowGroup], rows: int) -> list[Run] | None:
    """``groups`` (a source's row groups, in order) cut into parts of about ``rows`` receipt rows, or None
    when the input is not in shopper order by its footers (a group without statistics, or one whose
    lowest shopper id is below the highest of the group before it) or has a group of more than ``rows``
    rows (a part is read a group at a time: the partition pass bounds its memory instead).

    Once a part has ``rows`` rows, it ends before the next group's lowest shopper id: that shopper and
    the ones after it are the next part's, also where their rows begin in this part's last groups. Groups
    without rows are left out."""
    kept = [group for group in groups if group.rows]
    bounds = [group.shoppers for group in kept if group.shoppers is not None]
    if not kept or len(bounds) < len(kept) or max(group.rows for group in kept) > rows:
        return None
    if any(after[0] < before[1] for before, after in itertools.pairwise(bounds)):
        return None
    parts: list[Run] = []
    start, low, size = 0, None, 0
    for i, group in enumerate(kept[:-1]):
        size += group.rows
        cut = bounds[i + 1][0]
        # the part must keep some ids of its own: one shopper over many groups is not cut
        if size < rows or cut <= (bounds[start][0] if low is None else low):
            continue
        parts.append(Run(kept[start : i + 1], low, cut))
        start = i + 1
        while start > 0 and bounds[start - 1][1] >= cut:
            start -= 1  # groups holding rows of ``cut``: read again by the next part
        low, size = cut, 0
    parts.append(Run(kept[start:], low, None))
    return parts


def gather(
    batches: Iterable[pa.Table],
    layout: Layout,
    on_batch: Callable[[int], None] | None = None,
    columns: tuple[str, ...] = COLUMNS,
) -> pa.Table | None:
    """This shard's rows of ``batches`` in memory, for a layout of one part: the table :func:`partition`
    and :func:`read_part` would give, without writing it to disk and reading it back. None when the shard
    has no rows. ``on_batch`` is called with the row count of every batch read (progress)."""
    if layout.parts != 1:
        raise ValueError(f"gather reads a shard of one part; this layout has {layout.parts}")
    tables = []
    for batch in batches:
        if on_batch is not None:
            on_batch(batch.num_rows)
        tables += [table for _, table in split(batch, layout, columns)]
    return pa.concat_tables(tables) if tables else None


def read_part(directory: str | Path, layout: Layout, part: int) -> pa.Table | None:
    """The receipts of one part written by :func:`partition`, or None when the part has no rows."""
    path = Path(directory) / layout.part_name(part)
    return pq.read_table(path) if path.exists() else None


FOOTER_TAIL = 8  # a parquet file ends with its footer's length (4 bytes, little-endian) and b"PAR1"
MAX_FOOTER_BYTES = 64 << 20


def _footer_digest(path: str) -> str:
    """sha256 of a parquet file's footer (schema, row groups, their offsets and column statistics): a
    rewrite with other content changes it, and reading it costs one small read at the file's end."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size < FOOTER_TAIL:
            raise ValueError(f"{path} is not a parquet file ({size} bytes)")
        f.seek(size - FOOTER_TAIL)
        tail = f.read(FOOTER_TAIL)
        length = int.from_bytes(tail[:4], "little")
        if tail[4:] != b"PAR1" or not 0 < length <= min(MAX_FOOTER_BYTES, size - FOOTER_TAIL):
            raise ValueError(f"{path} is not a readable parquet file (no valid footer at its end)")
        f.seek(size - FOOTER_TAIL - length)
        return hashlib.sha256(f.read(length)).hexdigest()


def fingerprint(files: Iterable[str]) -> str:
    """Short hash of the input files' names, sizes, modification times and parquet footers: changes when
    the input does (also a rewrite of the same size), while reading only each file's footer."""
    entries = sorted(
        (str(f), os.path.getsize(f), os.stat(f).st_mtime_ns, _footer_digest(str(f))) for f in files
    )
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]
