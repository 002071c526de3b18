"""Batch candidate generation: the top-K products of every shopper in a receipts dataset.

    python -m export.candidates receipts=PATH output=PATH bundle=PATH k=50               # ONNX + FAISS, CPU
    python -m export.candidates receipts=PATH output=PATH checkpoint=PATH device=cuda batch_size=16384
    python -m export.candidates ... rules.exclude_purchased=true rules.unavailable=PATH rules.explore_slots=5

Sharded (each shard is an independent job; hydra-submitit-launcher is not installed, so a SLURM array):

    sbatch --array=0-7 --gpus=1 --wrap 'python -m export.candidates receipts=PATH output=PATH \\
        checkpoint=PATH device=cuda num_shards=8 shard_index=$SLURM_ARRAY_TASK_ID'

Output: one row per shopper, ``shopper_id`` int64, ``product_ids`` list<int64> and ``scores``
list<float32> best first, ``fallback`` bool (no known product in the history: the most popular products,
scored by popularity, as serving answers)::

    output/shard=00003-of-00008/part-00012.parquet
    output/shard=00003-of-00008/_manifest.json   job (model id, K, rules, input), per-part rows and sha256
    output/_manifest.json                        every shard's, written once all shards are complete

How a shard runs: :func:`export.partition.partition` streams the receipts once and splits the shard's rows
by a hash of ``shopper_id`` into parts, so each shopper's whole history is in one part. Then, part by
part: ``read_threads`` threads read and group the next parts (a history becomes its most recent
``max_len`` known products as vocabulary indices; unknown products are dropped, as serving drops them);
the main thread encodes and searches ``batch_size`` shoppers at a time; ``select_threads`` threads apply
the rules with :func:`recsys.scoring.select`, serving's own scorer; one thread writes each finished part.
So the output equals serving's ``Recommender.recommend_batch`` for the same histories and settings.

Memory: the read batch (``read_batch_rows``) plus the partition buffer (``partition_buffer_rows``) while
partitioning; then about 3x the receipts of ``read_threads + 1`` parts (~32 bytes per receipt row), each
part's [shoppers, max_len] int64 history matrix, and one part's output. ``rows_per_part`` bounds the parts
(``parts=null`` derives their number from the input's row count), so memory does not grow with the input.

Resuming: parts are written to a hidden temporary file, checksummed and renamed into place, and only then
recorded in the shard's manifest. A re-run with the same settings keeps every recorded part whose sha256
still matches and computes the others, so a killed job ends with exactly one row per shopper.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from export.engines import Engine, OnnxEngine, TorchEngine
from export.partition import Layout, fingerprint, partition, read_part
from recsys.bundle import sha256_file
from recsys.data.loader import iter_receipts, open_dataset
from recsys.data.schema import PRODUCT, SHOPPER
from recsys.data.sequences import Sequences, build_sequences
from recsys.data.vocabulary import NUM_RESERVED
from recsys.io import atomic_path, write_json
from recsys.repeat import Histories
from recsys.scoring import candidates_needed, popularity_order, select

log = logging.getLogger(__name__)

FORMAT = "caddie-candidates"
FORMAT_VERSION = 1
MANIFEST_FILE = "_manifest.json"
PARTITIONS_DIR = "_partitions"  # a leading underscore: pyarrow.dataset readers of the output skip it
MAX_QUEUED_BATCHES = 4  # batches searched but not yet selected: bounds memory when selection lags
SCHEMA = pa.schema(
    [
        pa.field(SHOPPER, pa.int64(), nullable=False),
        pa.field("product_ids", pa.list_(pa.int64())),
        pa.field("scores", pa.list_(pa.float32())),
        pa.field("fallback", pa.bool_()),
    ]
)


class CandidatesError(ValueError):
    """A job that cannot run as configured; the message names the setting or input at fault."""


@dataclass(frozen=True)
class Rules:
    """The scorer's rules (unavailable products are the engine's, see :mod:`export.engines`)."""

    k: int
    exclude_purchased: bool = False
    min_score: float | None = None
    explore_slots: int = 0
    repeat_aware: bool = False  # score with the model's repeat-aware scorer (recsys.repeat)

    @property
    def needs_history(self) -> bool:
        return self.exclude_purchased or self.explore_slots > 0 or self.repeat_aware


@dataclass(frozen=True)
class Part:
    """One part's shoppers, ready to encode: everything a batch needs is a slice of these arrays."""

    index: int
    shopper_ids: np.ndarray  # [S] int64, ascending
    lengths: np.ndarray  # [S] known products in each history
    item_ids: np.ndarray  # [S, max_len] int64 most recent known products, left-padded vocabulary indices
    gaps: np.ndarray  # [S, max_len] float32 their purchase gaps (Sequences.gaps), for basket-aware models
    bought: np.ndarray  # distinct item rows of each history, concatenated (empty unless the rules need it)
    bought_offsets: np.ndarray  # [S + 1] shopper s owns bought[bought_offsets[s]:bought_offsets[s + 1]]
    receipts: int  # receipt rows read
    known: Sequences | None = None  # the whole known histories with times, for repeat-aware scoring


@dataclass(frozen=True)
class Batch:
    """A batch's shoppers and, for those with a history, the searched candidates."""

    shopper_ids: np.ndarray  # [B]
    encoded: np.ndarray  # [E] positions in the batch of shoppers with a known product
    bought: list[np.ndarray] | None  # [E] distinct rows per encoded shopper, when the rules need them
    rows: np.ndarray  # [E, C] candidate rows
    scores: np.ndarray  # [E, C]
    histories: Histories | None = None  # [E] the encoded shoppers' histories, for repeat-aware scoring


def read_product_ids(path: str | Path) -> np.ndarray:
    """Product ids from a parquet file (a ``product_id`` column) or a text file (one id per line; blank
    lines and ``#`` comments ignored)."""
    path = Path(path)
    if not path.is_file():
        raise CandidatesError(f"rules.unavailable: {str(path)!r} does not exist")
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
    bundle: str | None, checkpoint: str | None, device: str, threads: int | None, unavailable: np.ndarray
) -> Engine:
    """The ONNX engine for ``bundle`` (CPU) or the torch engine for ``checkpoint``; exactly one is set."""
    if bundle is not None and checkpoint is None:
        if device != "cpu":
            raise CandidatesError(
                f"bundle= runs on CPU (ONNX Runtime + FAISS); device={device} needs checkpoint="
            )
        return OnnxEngine(bundle, threads, unavailable)
    if checkpoint is not None and bundle is None:
        return TorchEngine(checkpoint, device, unavailable, threads)
    raise CandidatesError("set exactly one of bundle=PATH (ONNX + FAISS, CPU) or checkpoint=PATH (torch)")


def load_part(directory: Path, layout: Layout, index: int, engine: Engine, rules: Rules) -> Part:
    """Read one part's receipts and turn them into encoder inputs (a shopper with no known product keeps
    its row, with length 0: it gets the popularity fallback)."""
    table = read_part(directory, layout, index)
    if table is None:
        empty = np.zeros(0, dtype=np.int64)
        shape = (0, engine.max_len)
        return Part(
            index,
            empty,
            empty,
            np.zeros(shape, np.int64),
            np.zeros(shape, np.float32),
            empty,
            np.zeros(1, np.int64),
            0,
        )
    shopper_ids = np.unique(table.column(SHOPPER).to_numpy())
    known = build_sequences(table, engine.vocab, drop_unknown=True).select(shopper_ids)
    bought, counts = np.zeros(0, dtype=np.int64), np.zeros(len(shopper_ids), dtype=np.int64)
    if rules.needs_history:
        # distinct (shopper, item) pairs, vectorised through one int64 key per pair
        size = engine.vocab.size
        owner = np.repeat(np.arange(len(shopper_ids), dtype=np.int64), known.lengths)
        keys = np.unique(owner * size + known.items)
        bought = keys % size - NUM_RESERVED
        counts = np.bincount(keys // size, minlength=len(shopper_ids))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Part(
        index,
        shopper_ids,
        known.lengths,
        *known.model_inputs(engine.max_len),
        bought,
        offsets,
        table.num_rows,
        known if rules.repeat_aware else None,
    )


def search(engine: Engine, part: Part, start: int, stop: int, rules: Rules, timings: Timings) -> Batch:
    """Encode and search shoppers ``start:stop`` of ``part``, with as many candidates as the rules need."""
    lengths = part.lengths[start:stop]
    encoded = np.flatnonzero(lengths > 0)
    bought = None
    if rules.needs_history:
        offsets = part.bought_offsets[start : stop + 1]
        pieces = np.split(part.bought[offsets[0] : offsets[-1]], offsets[1:-1] - offsets[0])
        bought = [pieces[i] for i in encoded]
    if len(encoded) == 0:
        empty = np.zeros((0, 0))
        return Batch(
            part.shopper_ids[start:stop], encoded, bought, empty.astype(np.int64), empty.astype(np.float32)
        )
    sizes = [len(b) for b in bought] if bought is not None else []
    wanted = candidates_needed(
        rules.k,
        sizes if rules.exclude_purchased else [],
        sizes if rules.needs_history else None,
        rules.explore_slots,
        rules.repeat_aware,
    )
    histories = None
    if part.known is not None:
        histories = Histories.from_sequences(part.known.select(part.shopper_ids[start:stop][encoded]))
    # padded to the longest history of the batch, as serving pads: less work than max_len for short ones
    width = int(lengths.max(initial=0).clip(max=engine.max_len))
    columns = slice(engine.max_len - width, None)
    item_ids = np.ascontiguousarray(part.item_ids[start:stop][encoded, columns])
    gaps = np.ascontiguousarray(part.gaps[start:stop][encoded, columns])
    with timings.stage("encode"):
        shoppers = engine.encode(item_ids, gaps)
    with timings.stage("top_k"):
        rows, scores = engine.top(shoppers, min(wanted, engine.num_items))
    return Batch(part.shopper_ids[start:stop], encoded, bought, rows, scores, histories)


def finish(batch: Batch, rules: Rules, engine: Engine, fallback: np.ndarray) -> pa.RecordBatch:
    """Apply the rules to a searched batch and build its output rows; others get ``fallback`` rows."""
    count, k = len(batch.shopper_ids), rules.k
    rows = np.full((count, k), -1, dtype=np.int64)
    scores = np.full((count, k), np.nan, dtype=np.float32)
    rows[:, : len(fallback)] = fallback
    scores[:, : len(fallback)] = engine.vocab.popularity[fallback]
    is_fallback = np.ones(count, dtype=bool)
    if len(batch.encoded):
        candidates = batch.rows, batch.scores
        if batch.histories is not None:
            assert engine.repeat is not None
            candidates = engine.repeat.blend(batch.histories, *candidates, k)
        picked, picked_scores = select(
            *candidates,
            k,
            exclude=batch.bought if rules.exclude_purchased else None,
            min_score=rules.min_score,
            history=batch.bought,
            explore_slots=rules.explore_slots,
        )
        rows[batch.encoded], scores[batch.encoded] = picked, picked_scores
        is_fallback[batch.encoded] = False
    valid = rows >= 0  # select puts what it keeps first, so each shopper's valid entries are a prefix
    offsets = pa.array(np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int32))
    return pa.record_batch(
        [
            pa.array(batch.shopper_ids, pa.int64()),
            pa.ListArray.from_arrays(offsets, pa.array(engine.vocab.product_ids[rows[valid]], pa.int64())),
            pa.ListArray.from_arrays(offsets, pa.array(scores[valid], pa.float32())),
            pa.array(is_fallback),
        ],
        schema=SCHEMA,
    )


def write_part(directory: Path, name: str, batches: list[pa.RecordBatch]) -> dict[str, Any]:
    """Write a part atomically (hidden temporary file, then ``os.replace``); returns its manifest entry."""
    table = pa.Table.from_batches(batches, schema=SCHEMA)
    with atomic_path(directory / name) as tmp:
        pq.write_table(table, tmp)
        return {
            "rows": table.num_rows,
            "fallback": int(pc.sum(table.column("fallback")).as_py() or 0),
            "sha256": sha256_file(tmp),
            "bytes": tmp.stat().st_size,
        }


class ShardManifest:
    """The shard's ``_manifest.json``: the job, and each finished part (rewritten as each one lands)."""

    def __init__(self, directory: Path, job: dict[str, Any], shard: dict[str, int], overwrite: bool) -> None:
        self.path = directory / MANIFEST_FILE
        self.job, self.shard = json.loads(json.dumps(job, default=str)), shard
        self.parts: dict[str, dict[str, Any]] = {}
        for stale in directory.glob(".*.tmp-*"):  # left by a killed run (this shard has one job at a time)
            stale.unlink()
        try:
            previous = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except json.JSONDecodeError:  # e.g. lost in a crash of the machine: its parts are recomputed
            log.warning("%s is unreadable; recomputing every part of this shard", self.path)
            return
        if previous.get("job") == self.job and previous.get("shard") == shard:
            # a recorded part counts only if its file is still the one that was recorded
            self.parts = {
                name: entry
                for name, entry in previous["parts"].items()
                if (directory / name).is_file() and sha256_file(directory / name) == entry["sha256"]
            }
        elif overwrite:
            shutil.rmtree(directory)
            directory.mkdir(parents=True)
        else:
            before = previous.get("job", {})
            changed = sorted(key for key in {*self.job, *before} if self.job.get(key) != before.get(key))
            raise CandidatesError(
                f"{directory} holds the output of another job (changed: {', '.join(changed) or 'shard'}); "
                "write to another output, or pass overwrite=true to replace this shard"
            )

    def record(self, name: str, entry: dict[str, Any]) -> None:
        self.parts[name] = entry
        self.save(complete=False)

    def save(self, complete: bool, **extra: Any) -> dict[str, Any]:
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "job": self.job,
            "shard": self.shard,
            "complete": complete,
            "rows": sum(entry["rows"] for entry in self.parts.values()),
            "fallback_rows": sum(entry["fallback"] for entry in self.parts.values()),
            "parts": dict(sorted(self.parts.items())),
            "updated_at": datetime.now(timezone.utc).isoformat(),
            **extra,
        }
        write_json(self.path, manifest)
        return manifest


def combine_shards(output: Path, num_shards: int, job: dict[str, Any]) -> dict[str, Any] | None:
    """Write ``output/_manifest.json`` over all shards if every one is complete (else return None).

    Any shard may be the last to finish, so each one tries; the content is the same whoever writes it.
    """
    shards = {}
    for index in range(num_shards):
        path = output / Layout(index, num_shards, 1).shard_name / MANIFEST_FILE
        if not path.exists():
            return None
        manifest = json.loads(path.read_text())
        if not manifest["complete"] or manifest["job"] != job:
            return None
        shards[path.parent.name] = {key: manifest[key] for key in ("rows", "fallback_rows", "parts")}
    combined = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "job": job,
        "num_shards": num_shards,
        "rows": sum(shard["rows"] for shard in shards.values()),
        "fallback_rows": sum(shard["fallback_rows"] for shard in shards.values()),
        "shards": shards,
    }
    write_json(output / MANIFEST_FILE, combined)
    return combined


class _Progress:
    """A shoppers/s bar whose total (for the ETA) is estimated from the receipt rows still to read, since
    a part's shoppers are only counted once it is read."""

    def __init__(self, rows_left: int, enabled: bool, name: str) -> None:
        self.bar = tqdm(total=None, unit="shopper", unit_scale=True, disable=not enabled, desc=name)
        self.rows_left, self.rows_read, self.shoppers_read = rows_left, 0, 0

    def part_read(self, part: Part) -> None:
        self.rows_left -= part.receipts
        self.rows_read += part.receipts
        self.shoppers_read += len(part.shopper_ids)
        per_row = self.shoppers_read / max(self.rows_read, 1)
        self.bar.total = self.shoppers_read + round(self.rows_left * per_row)
        self.bar.refresh()


class Timings:
    """Seconds per stage, summed over the threads that run it."""

    def __init__(self, *stages: str) -> None:
        self.seconds = dict.fromkeys(stages, 0.0)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.seconds[name] += time.perf_counter() - began


@dataclass(frozen=True)
class Concurrency:
    """Shoppers per encode, parts read ahead of the encoder (in parallel), threads applying the rules."""

    batch_size: int = 4096
    read_threads: int = 1
    select_threads: int = 1


def _process(
    engine: Engine,
    layout: Layout,
    pending: list[int],
    partitions: Path,
    directory: Path,
    manifest: ShardManifest,
    rules: Rules,
    concurrency: Concurrency,
    progress: _Progress,
    timings: Timings,
) -> None:
    """Encode ``pending`` parts on this thread while the next ones are read and finished batches selected
    and written on others (numpy and pyarrow release the GIL in the heavy work)."""
    available = popularity_order(engine.vocab.product_ids, engine.vocab.popularity)
    fallback = available[~engine.blocked[available]][: rules.k]

    def read(index: int) -> Part:
        with timings.stage("read"):
            return load_part(partitions, layout, index, engine, rules)

    def select_batch(batch: Batch) -> pa.RecordBatch:
        with timings.stage("select"):
            return finish(batch, rules, engine, fallback)

    def commit(index: int, batches: list[Future[pa.RecordBatch]]) -> None:
        results = [b.result() for b in batches]
        with timings.stage("write"):
            name = layout.part_name(index)
            manifest.record(name, write_part(directory, name, results))

    ahead = concurrency.read_threads
    reader = ThreadPoolExecutor(ahead, thread_name_prefix="candidates-read")
    selector = ThreadPoolExecutor(concurrency.select_threads, thread_name_prefix="candidates-select")
    # one writer: parts are committed in order, each once all of its batches are selected
    writer = ThreadPoolExecutor(1, thread_name_prefix="candidates-write")
    pools = (reader, selector, writer)
    upcoming = deque(reader.submit(read, index) for index in pending[:ahead])
    queued: deque[Future[Any]] = deque()  # selections and commits not yet seen to succeed
    try:
        for position in range(len(pending)):
            part = upcoming.popleft().result()
            if position + ahead < len(pending):
                upcoming.append(reader.submit(read, pending[position + ahead]))
            progress.part_read(part)
            batches = []
            for start in range(0, len(part.shopper_ids), concurrency.batch_size):
                stop = min(start + concurrency.batch_size, len(part.shopper_ids))
                batches.append(
                    selector.submit(select_batch, search(engine, part, start, stop, rules, timings))
                )
                queued.append(batches[-1])
                # bounds the searched batches held in memory; .result() raises a failed selection or write
                while queued and (
                    len(queued) > MAX_QUEUED_BATCHES * concurrency.select_threads or queued[0].done()
                ):
                    queued.popleft().result()
                progress.bar.update(stop - start)
            queued.append(writer.submit(commit, part.index, batches))
        while queued:
            queued.popleft().result()
    except BaseException:
        for pool in pools:
            pool.shutdown(cancel_futures=True)  # parts queued but not started are not written
        raise
    finally:
        for pool in pools:
            pool.shutdown()


def run(cfg: DictConfig) -> dict[str, Any]:
    """Generate this shard's candidates as configured by ``conf/candidates.yaml``; returns its manifest."""
    timings = Timings("partition", "read", "encode", "top_k", "select", "write", "total")
    with timings.stage("total"):
        manifest, layout, partitions = _run(cfg, timings)
    result = manifest.save(complete=True, seconds={k: round(v, 3) for k, v in timings.seconds.items()})
    if not cfg.keep_partitions and partitions.exists():
        shutil.rmtree(partitions)
        with contextlib.suppress(OSError):  # other shards may still be using theirs
            partitions.parent.rmdir()
    log.info(
        "%s: %d shoppers (%d fallback); stage seconds %s",
        layout.shard_name,
        result["rows"],
        result["fallback_rows"],
        result["seconds"],
    )
    combine_shards(Path(cfg.output), layout.num_shards, manifest.job)
    return result


def _run(cfg: DictConfig, timings: Timings) -> tuple[ShardManifest, Layout, Path]:
    """Check the settings, then partition and process whatever parts of the shard are not written yet."""
    if cfg.k < 1 or cfg.batch_size < 1 or cfg.rules.explore_slots < 0:
        raise CandidatesError(
            f"need k >= 1, batch_size >= 1 and rules.explore_slots >= 0; got {cfg.k}, {cfg.batch_size}, "
            f"{cfg.rules.explore_slots}"
        )
    min_score = None if cfg.rules.min_score is None else float(cfg.rules.min_score)
    unavailable_path = cfg.rules.unavailable
    unavailable = read_product_ids(unavailable_path) if unavailable_path else np.zeros(0, np.int64)
    engine = open_engine(cfg.bundle, cfg.checkpoint, cfg.device, cfg.threads, unavailable)
    repeat_aware = bool(cfg.rules.repeat_aware) and engine.repeat is not None
    rules = Rules(cfg.k, cfg.rules.exclude_purchased, min_score, cfg.rules.explore_slots, repeat_aware)
    concurrency = Concurrency(cfg.batch_size, max(1, cfg.read_threads), max(1, cfg.select_threads))
    output = Path(cfg.output)
    dataset = open_dataset(cfg.receipts)
    num_rows = dataset.count_rows()
    parts = cfg.parts or max(1, math.ceil(num_rows / cfg.num_shards / cfg.rows_per_part))
    try:
        layout = Layout(cfg.shard_index, cfg.num_shards, parts)
    except ValueError as error:
        raise CandidatesError(str(error)) from error
    foreign = sorted(
        p.name for p in output.glob("shard=*-of-*") if not p.name.endswith(f"-of-{layout.num_shards:05d}")
    )
    if foreign:
        raise CandidatesError(
            f"{output} holds shards of another num_shards ({foreign[0]}); use another output"
        )

    columns = OmegaConf.to_container(cfg.columns)
    receipts = {
        "source": str(Path(cfg.receipts).resolve()),
        "files": fingerprint(dataset.files),
        "columns": columns,
        "timezone": cfg.timezone,
        "drop_returns": cfg.drop_returns,
    }
    rules_description: dict[str, Any] = {
        "exclude_purchased": rules.exclude_purchased,
        "min_score": rules.min_score,
        "explore_slots": rules.explore_slots,
        "repeat_aware": rules.repeat_aware,
        "unavailable": None,
    }
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

    bar = tqdm(total=num_rows, unit="row", unit_scale=True, disable=not cfg.progress, desc="partition")
    with bar, timings.stage("partition"):
        batches = iter_receipts(cfg.receipts, columns, cfg.timezone, cfg.read_batch_rows, cfg.drop_returns)
        part_rows = partition(batches, layout, partitions, receipts, cfg.partition_buffer_rows, bar.update)
    if sum(part_rows) == 0:
        raise CandidatesError(
            f"shard {layout.shard_index} of {layout.num_shards} is empty: no shopper of {cfg.receipts} "
            "hashes to it (fewer shoppers than shards?)"
        )
    progress = _Progress(sum(part_rows[p] for p in pending), cfg.progress, layout.shard_name)
    with progress.bar:
        _process(
            engine, layout, pending, partitions, directory, manifest, rules, concurrency, progress, timings
        )
    return manifest, layout, partitions


@hydra.main(version_base="1.3", config_path="../conf", config_name="candidates")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
