"""A batch job's shard: which parts of the receipts it owns, what identifies its input, its partition pass.

Every job over all shoppers (candidates, audiences) splits the receipts the same way
(:mod:`batch.partition`): shard ``shard_index`` of ``num_shards`` owns the shoppers hashing to it, in
``parts`` parts of about ``rows_per_part`` receipt rows (an input in shopper order is cut into parts
of whole row groups instead of by hash, with no partition pass). The keys read from a job's config are
those of ``conf/candidates.yaml`` under the same names (receipts, columns, timezone, drop_returns, time
rules, shards, parts, read and partition buffers, keep_partitions, progress).
"""

from __future__ import annotations

import contextlib
import functools
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from batch.manifests import CandidatesError
from batch.partition import COLUMNS, Layout, Run, fingerprint, gather, partition, read_part, runs
from recsys.data.loader import iter_receipts, row_groups
from recsys.data.schema import SHOPPER

TIME_RULES = ("ambiguous_times", "nonexistent_times", "min_date", "max_date")
PARTITIONS_DIR = "_partitions"  # a leading underscore: pyarrow.dataset readers of the output skip it


def time_rules(cfg: DictConfig) -> dict[str, str | None]:
    """The receipts' time rules as plain strings (which rows are read depends on them)."""
    return {key: None if cfg[key] is None else str(cfg[key]) for key in TIME_RULES}


def receipts_identity(cfg: DictConfig, dataset: ds.Dataset) -> dict[str, Any]:
    """What a resumed run must read again to reuse finished parts: the source, a fingerprint of every
    file (names, sizes, modification times, parquet footers) and every setting that changes the rows."""
    return {
        "source": str(Path(cfg.receipts).resolve()),
        "files": fingerprint(dataset.files),
        "columns": OmegaConf.to_container(cfg.columns),
        "timezone": cfg.timezone,
        "drop_returns": cfg.drop_returns,
        **time_rules(cfg),
    }


Runs = list[Run]  # each part's row groups and shoppers, for receipts in shopper order (batch.partition.runs)


def layout(cfg: DictConfig, num_rows: int, output: Path) -> tuple[Layout, Runs | None]:
    """This shard's layout (``parts=null``: enough parts that one holds about ``rows_per_part`` rows),
    and, for several parts of receipts in shopper order by their footers, each part's row groups (None:
    parts by hash); refused when ``output`` holds shards of another ``num_shards``.

    Receipts in shopper order are cut between shoppers only, so their parts hold about, not exactly,
    ``rows_per_part`` rows; a ``parts`` set in the config is honoured exactly, by hash."""
    if cfg.num_shards < 1:
        raise CandidatesError(f"need num_shards >= 1, got {cfg.num_shards}")
    parts = cfg.parts or max(1, math.ceil(num_rows / cfg.num_shards / cfg.rows_per_part))
    ordered = None
    if cfg.parts is None and parts > 1:  # one part is streamed with no partition pass anyway
        groups = row_groups(cfg.receipts, OmegaConf.to_container(cfg.columns), cfg.timezone)
        ordered = runs(groups, math.ceil(num_rows / parts))
    try:
        found = Layout(cfg.shard_index, cfg.num_shards, parts if ordered is None else len(ordered))
    except ValueError as error:
        raise CandidatesError(str(error)) from error
    foreign = sorted(
        p.name for p in output.glob("shard=*-of-*") if not p.name.endswith(f"-of-{found.num_shards:05d}")
    )
    if foreign:
        raise CandidatesError(
            f"{output} holds shards of another num_shards ({foreign[0]}); use another output"
        )
    return found, ordered


def part_reader(
    cfg: DictConfig,
    found: Layout,
    receipts: dict[str, Any],
    directory: Path,
    num_rows: int,
    pending: list[int],
    ordered: Runs | None,
    timings: Any | None = None,
    columns: tuple[str, ...] = COLUMNS,
) -> tuple[Callable[[int], pa.Table | None], int]:
    """How a job reads a part's receipts, and the receipt rows still to process (for an ETA).

    Receipts in shopper order (``ordered``, from :func:`layout`): a part is read from its row groups,
    keeping this shard's rows, with no partition pass. Otherwise, several parts: the partition pass
    streams the receipts once and writes this shard's parts to ``directory`` (reused when a finished pass
    of the same input, ``receipts``, and layout is there), and each part is read back. One part: it would
    be written only to be read back whole, so its rows are streamed into memory instead
    (:func:`batch.partition.gather`), unless ``keep_partitions`` asks for the files. ``timings`` (a
    :class:`batch.pipeline.Timings`) gets the partition pass's seconds. A part keeps ``columns`` (the
    ordering's :data:`batch.partition.COLUMNS` and any the job reads beside them)."""
    empty = CandidatesError(
        f"shard {found.shard_index} of {found.num_shards} is empty: no shopper of {cfg.receipts} "
        "hashes to it (fewer shoppers than shards?)"
    )

    def batches() -> Iterator[pa.Table]:
        return iter_receipts(
            cfg.receipts, OmegaConf.to_container(cfg.columns), cfg.timezone, cfg.read_batch_rows,
            cfg.drop_returns, **time_rules(cfg),
        )  # fmt: skip

    if ordered is not None:
        rows_left = sum(group.rows for index in pending for group in ordered[index].groups)
        reader = functools.partial(_read_run, cfg, found, ordered, columns=columns)
        return reader, math.ceil(rows_left / found.num_shards)
    if found.parts == 1 and not cfg.keep_partitions:

        def streamed(index: int) -> pa.Table:
            table = gather(batches(), found, columns=columns)
            if table is None:
                raise empty
            return table

        return streamed, math.ceil(num_rows / found.num_shards)  # the shard's rows are known only later
    bar = tqdm(total=num_rows, unit="row", unit_scale=True, disable=not cfg.progress, desc="partition")
    with bar, timings.stage("partition") if timings is not None else contextlib.nullcontext():
        rows = partition(
            batches(), found, directory, receipts, cfg.partition_buffer_rows, bar.update, columns
        )
    if sum(rows) == 0:
        raise empty
    return functools.partial(read_part, directory, found), sum(rows[p] for p in pending)


def _read_run(
    cfg: DictConfig, found: Layout, ordered: Runs, index: int, columns: tuple[str, ...] = COLUMNS
) -> pa.Table | None:
    """This shard's receipts of part ``index`` of an input in shopper order, None when it has none.

    The footers' statistics decided where the parts were cut: a row group holding shoppers outside the
    range its footer records would put a shopper in two parts, or in none, so it is refused."""
    run = ordered[index]
    batches = iter_receipts(
        cfg.receipts, OmegaConf.to_container(cfg.columns), cfg.timezone, cfg.read_batch_rows,
        cfg.drop_returns, **time_rules(cfg), row_groups=run.groups,
    )  # fmt: skip
    tables = []
    for group, table in zip(run.groups, batches, strict=True):
        if not table.num_rows:
            continue
        ids = table.column(SHOPPER)
        found_range = pc.min_max(ids).as_py()
        if group.shoppers is None or not (
            group.shoppers[0] <= found_range["min"] <= found_range["max"] <= group.shoppers[1]
        ):
            raise CandidatesError(
                f"receipts file {group.path!r}, row group {group.index}: shopper ids "
                f"{found_range['min']}..{found_range['max']} outside the range "
                f"{'unknown' if group.shoppers is None else '..'.join(map(str, group.shoppers))} its "
                "footer's statistics record; rewrite the file (its statistics are wrong)"
            )
        if not run.owns_all(group):  # a cut runs through it: keep this part's shoppers
            mine = pc.greater_equal(ids, run.low) if run.low is not None else None
            if run.high is not None:
                below = pc.less(ids, run.high)
                mine = below if mine is None else pc.and_(mine, below)
            table = table.filter(mine)
        tables.append(table)
    return gather(tables, Layout(found.shard_index, found.num_shards, 1), columns=columns)


def remove_partitions(directory: Path) -> None:
    """Delete a finished shard's partition files, and their parent once no other shard's are left."""
    if directory.exists():
        shutil.rmtree(directory)
        with contextlib.suppress(OSError):  # other shards may still be using theirs
            directory.parent.rmdir()
