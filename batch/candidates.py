"""Batch candidate generation: the top-K products of every shopper in a receipts dataset.

    python -m batch.candidates receipts=PATH output=PATH bundle=PATH k=50               # ONNX + FAISS, CPU
    python -m batch.candidates receipts=PATH output=PATH checkpoint=PATH device=cuda batch_size=16384
    python -m batch.candidates ... rules.exclude_purchased=true rules.unavailable=PATH rules.explore_slots=5

Sharded: each shard is an independent job (``num_shards=N shard_index=I``), e.g. one SLURM array task
per shard; a shard's output is guarded by a lock file (:mod:`batch.lock`), so two runs of one shard
never write at once.

Output: one row per shopper, ``shopper_id`` int64, ``product_ids`` list<int64> and ``scores``
list<float32> best first, as serving lists them (repeat-aware scores are probabilities, ordered by
probability times the basket-size factor where the ranker has one), ``fallback`` bool (no known product
in the history: the most popular products, scored by popularity, as serving answers)::

    output/shard=00003-of-00008/part-00012.parquet
    output/shard=00003-of-00008/_manifest.json   job (model id, K, rules, input), per-part rows and sha256
    output/_manifest.json                        every shard's, written once all shards are complete

How a shard runs: :func:`batch.partition.partition` streams the receipts once and splits the shard's rows
by a hash of ``shopper_id`` into parts, so each shopper's whole history is in one part; then
:func:`batch.pipeline.process` reads, encodes, scores and writes part by part (:mod:`batch.manifests`).
A shard of a single part writes no partition files: its rows are streamed straight into memory
(:func:`batch.partition.gather`), unless ``keep_partitions`` asks for the files. Receipts in shopper
order (by their parquet footers' statistics) need no partition pass at all: a part is a run of whole row
groups, read straight from the input (:func:`batch.partition.runs`). The output equals
serving's ``Recommender.recommend_batch`` for the same histories and rules.

Memory: the read batch (``read_batch_rows``) plus the partition buffer (``partition_buffer_rows``) while
partitioning; then about 3x the receipts of ``read_threads + 1`` parts (~32 bytes per receipt row), each
part's [shoppers, max_len] int64 history matrix, ONNX Runtime's activations for ``onnx.encode_rows``
shoppers (kept by its arena at their peak), and one part's output. ``rows_per_part`` bounds the parts
(``parts=null`` derives their number from the input's row count), so memory does not grow with the input.

Resuming: a re-run with the same settings keeps every part already written and checked, and computes the
others. The job's identity, which a resumed run must match, holds the model's full id (a bundle's id
covers its manifest and every file) and a fingerprint of every input file (names, sizes, modification
times and parquet footers), so changed receipts or a changed bundle are never mixed with stale output.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from batch.engines import Engine, OnnxEngine, TorchEngine, onnx_settings
from batch.lock import LockError, locked
from batch.manifests import MANIFEST_FILE, CandidatesError, ShardManifest, combine_shards
from batch.partition import Layout
from batch.pipeline import Concurrency, Progress, Timings, process
from batch.shards import PARTITIONS_DIR, part_reader, receipts_identity, remove_partitions
from batch.shards import layout as shard_layout
from recsys.bundle import sha256_file
from recsys.data.loader import open_dataset
from recsys.data.schema import PRODUCT
from recsys.rules import Rules, RulesError

log = logging.getLogger(__name__)

MAX_UNAVAILABLE_BYTES = 256 << 20  # the unavailable-products list a job reads

__all__ = ["MANIFEST_FILE", "CandidatesError", "main", "run"]


def read_product_ids(path: str | Path) -> np.ndarray:
    """Product ids from a parquet file (a ``product_id`` column) or a text file (one id per line; blank
    lines and ``#`` comments ignored)."""
    path = Path(path)
    if not path.is_file():
        raise CandidatesError(f"rules.unavailable: {str(path)!r} does not exist")
    if path.stat().st_size > MAX_UNAVAILABLE_BYTES:
        raise CandidatesError(f"rules.unavailable: {path} is larger than {MAX_UNAVAILABLE_BYTES} bytes")
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        if PRODUCT not in table.column_names:
            raise CandidatesError(
                f"rules.unavailable: {path} has no {PRODUCT!r} column ({table.column_names})"
            )
        return table.column(PRODUCT).cast(pa.int64()).drop_null().to_numpy()
    ids = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            ids.append(int(text))
        except ValueError:
            raise CandidatesError(
                f"rules.unavailable: {path} line {number} is not a product id: {line!r}"
            ) from None
    return np.asarray(ids, dtype=np.int64)


def open_engine(
    bundle: str | None,
    checkpoint: str | None,
    device: str,
    threads: int | None,
    unavailable: np.ndarray,
    onnx: dict[str, Any] | None = None,
) -> Engine:
    """The ONNX engine for ``bundle`` (CPU, with the session settings ``onnx``: ``encode_rows`` and
    ``graph_optimization``) or the torch engine for ``checkpoint``; exactly one is set."""
    if bundle is not None and checkpoint is None:
        if device != "cpu":
            raise CandidatesError(
                f"bundle= runs on CPU (ONNX Runtime + FAISS); device={device} needs checkpoint="
            )
        return OnnxEngine(bundle, threads, unavailable, **(onnx or {}))
    if checkpoint is not None and bundle is None:
        return TorchEngine(checkpoint, device, unavailable, threads)
    raise CandidatesError("set exactly one of bundle=PATH (ONNX + FAISS, CPU) or checkpoint=PATH (torch)")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Generate this shard's candidates as configured by ``conf/candidates.yaml``; returns its manifest."""
    timings = Timings("partition", "read", "encode", "top_k", "select", "write", "total")
    output = Path(cfg.output)
    layout_name = Layout(cfg.shard_index, cfg.num_shards, 1).shard_name if cfg.num_shards >= 1 else "shard"
    try:
        with locked(output / f".{layout_name}.lock"):
            with timings.stage("total"):
                manifest, layout, partitions = _run(cfg, timings)
            seconds = {k: round(v, 3) for k, v in timings.seconds.items()}
            result = manifest.save(complete=True, seconds=seconds)
            if not cfg.keep_partitions:
                remove_partitions(partitions)
    except LockError as error:
        raise CandidatesError(str(error)) from error
    log.info(
        "%s: %d shoppers (%d fallback); stage seconds %s",
        layout.shard_name,
        result["rows"],
        result["fallback_rows"],
        result["seconds"],
    )
    combine_shards(output, layout.num_shards, manifest.job)
    return result


def _rules(cfg: DictConfig, engine: Engine) -> Rules:
    """The job's rules; the repeat-aware scorer only where the model has one."""
    try:
        return Rules(
            k=cfg.k,
            exclude_purchased=cfg.rules.exclude_purchased,
            min_score=None if cfg.rules.min_score is None else float(cfg.rules.min_score),
            explore_slots=cfg.rules.explore_slots,
            repeat_aware=bool(cfg.rules.repeat_aware) and engine.repeat is not None,
        )
    except RulesError as error:
        raise CandidatesError(str(error)) from error


def _run(cfg: DictConfig, timings: Timings) -> tuple[ShardManifest, Layout, Path]:
    """Check the settings, then partition and process whatever parts of the shard are not written yet."""
    if cfg.batch_size < 1:
        raise CandidatesError(f"need batch_size >= 1, got {cfg.batch_size}")
    try:
        onnx = onnx_settings(OmegaConf.to_container(cfg.onnx))
    except ValueError as error:
        raise CandidatesError(str(error)) from error
    unavailable_path = cfg.rules.unavailable
    unavailable = read_product_ids(unavailable_path) if unavailable_path else np.zeros(0, np.int64)
    engine = open_engine(cfg.bundle, cfg.checkpoint, cfg.device, cfg.threads, unavailable, onnx)
    rules = _rules(cfg, engine)
    concurrency = Concurrency(cfg.batch_size, max(1, cfg.read_threads), max(1, cfg.select_threads))
    output = Path(cfg.output)
    dataset = open_dataset(cfg.receipts)
    num_rows = dataset.count_rows()
    layout, ordered = shard_layout(cfg, num_rows, output)
    receipts = receipts_identity(cfg, dataset)
    rules_description: dict[str, Any] = dataclasses.asdict(rules) | {"unavailable": None}
    del rules_description["k"]  # the job's own key
    if unavailable_path:
        rules_description["unavailable"] = {
            "path": str(unavailable_path),
            "sha256": sha256_file(Path(unavailable_path)),
            "in_catalogue": int(engine.blocked.sum()),
        }
    job = {
        "model": engine.identity,
        "k": rules.k,
        "rules": rules_description,
        "receipts": receipts,
        "num_shards": layout.num_shards,
        "parts": layout.parts,
        "parts_by": "hash" if ordered is None else "row_groups",
    }
    directory = output / layout.shard_name
    directory.mkdir(parents=True, exist_ok=True)
    shard = {"index": layout.shard_index, "count": layout.num_shards}
    manifest = ShardManifest(directory, job, shard, cfg.overwrite)
    combined = output / MANIFEST_FILE
    if combined.exists() and json.loads(combined.read_text())["job"] != manifest.job:
        combined.unlink()  # it describes the job this one replaces
    pending = [p for p in range(layout.parts) if layout.part_name(p) not in manifest.parts]
    partitions = Path(cfg.partition_dir or output / PARTITIONS_DIR) / layout.shard_name
    if not pending:
        return manifest, layout, partitions
    if manifest.parts:
        done = layout.parts - len(pending)
        log.info("%s: %d of %d parts already written, resuming", layout.shard_name, done, layout.parts)

    part_receipts, rows_left = part_reader(
        cfg, layout, receipts, partitions, num_rows, pending, ordered, timings
    )
    progress = Progress(rows_left, cfg.progress, layout.shard_name)
    with progress.bar:
        process(
            engine, layout, pending, part_receipts, directory, manifest, rules, concurrency, progress, timings
        )
    return manifest, layout, partitions


@hydra.main(version_base="1.3", config_path="../conf", config_name="candidates")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
