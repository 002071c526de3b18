"""A batch job's shard: which parts of the receipts it owns, what identifies its input, its partition pass.

Every job over all shoppers (candidates, audiences) splits the receipts the same way
(:mod:`batch.partition`): shard ``shard_index`` of ``num_shards`` owns the shoppers hashing to it, in
``parts`` parts of about ``rows_per_part`` receipt rows. The keys read from a job's config are those of
``conf/candidates.yaml`` under the same names (receipts, columns, timezone, drop_returns, time rules,
shards, parts, read and partition buffers, progress).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from batch.manifests import CandidatesError
from batch.partition import Layout, fingerprint, partition
from recsys.data.loader import iter_receipts

TIME_RULES = ("ambiguous_times", "nonexistent_times", "min_date", "max_date")


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


def layout(cfg: DictConfig, num_rows: int, output: Path) -> Layout:
    """This shard's layout (``parts=null``: enough parts that one holds about ``rows_per_part`` rows);
    refused when ``output`` holds shards of another ``num_shards``."""
    parts = cfg.parts or max(1, math.ceil(num_rows / cfg.num_shards / cfg.rows_per_part))
    try:
        found = Layout(cfg.shard_index, cfg.num_shards, parts)
    except ValueError as error:
        raise CandidatesError(str(error)) from error
    foreign = sorted(
        p.name for p in output.glob("shard=*-of-*") if not p.name.endswith(f"-of-{found.num_shards:05d}")
    )
    if foreign:
        raise CandidatesError(
            f"{output} holds shards of another num_shards ({foreign[0]}); use another output"
        )
    return found


def partition_shard(
    cfg: DictConfig, found: Layout, receipts: dict[str, Any], directory: Path, num_rows: int
) -> list[int]:
    """Stream the receipts once and write this shard's parts to ``directory`` (reused when a finished
    partition of the same input and layout is there); the rows of each part."""
    bar = tqdm(total=num_rows, unit="row", unit_scale=True, disable=not cfg.progress, desc="partition")
    with bar:
        batches = iter_receipts(
            cfg.receipts, OmegaConf.to_container(cfg.columns), cfg.timezone, cfg.read_batch_rows,
            cfg.drop_returns, **time_rules(cfg),
        )  # fmt: skip
        rows = partition(batches, found, directory, receipts, cfg.partition_buffer_rows, bar.update)
    if sum(rows) == 0:
        raise CandidatesError(
            f"shard {found.shard_index} of {found.num_shards} is empty: no shopper of {cfg.receipts} "
            "hashes to it (fewer shoppers than shards?)"
        )
    return rows
