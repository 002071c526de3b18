"""The batch job's pipeline over one shard's parts: read, encode, search and apply the rules, write.

Part by part: ``read_threads`` threads read the next parts' receipts, cut each into pieces of
``batch_size`` shoppers (:func:`pieces`) and group every piece into :class:`recsys.inputs.Histories`
(each shopper's known products with purchase times; unknown products are dropped, as serving drops
them) and their model inputs, so encoding starts once a part's first piece is grouped, not the whole
part. The main thread encodes and searches a piece at a time; ``select_threads`` threads apply the
rules with :func:`recsys.scoring.recommend`, serving's own scorer; one thread writes each finished part.
So the output equals serving's ``Recommender.recommend_batch`` for the same histories and rules. numpy,
pyarrow and ONNX Runtime release the GIL in the heavy work.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from batch.engines import Engine
from batch.manifests import SCHEMA, ShardManifest, write_part
from batch.partition import Layout
from recsys.data.schema import SHOPPER
from recsys.data.sequences import build_sequences, ordered_runs
from recsys.inputs import Histories
from recsys.rules import Rules
from recsys.scoring import popularity_order, recommend, search_size

MAX_QUEUED_BATCHES = 4  # batches searched but not yet selected: bounds memory when selection lags


@dataclass(frozen=True)
class Part:
    """One part's shoppers, ready to encode: everything a batch needs is a slice of these."""

    index: int
    shopper_ids: np.ndarray  # [S] int64, ascending
    histories: Histories  # [S] known products with purchase times (empty for all-unknown shoppers)
    item_ids: np.ndarray  # [S, W] model inputs (Histories.model_inputs), W <= max_len
    gap_days: np.ndarray  # [S, W]
    receipts: int  # receipt rows read


@dataclass(frozen=True)
class Batch:
    """A batch's shoppers and the searched candidates of those with a known product."""

    shopper_ids: np.ndarray  # [B]
    histories: Histories  # [B]
    rows: np.ndarray  # [B, C] candidate rows (-1 for none, and for shoppers without a known product)
    scores: np.ndarray  # [B, C]


def to_part(table: pa.Table | None, index: int, engine: Engine) -> Part:
    """Receipts (of part ``index``, or of a piece of it; None for none) grouped into model inputs, every
    shopper with all of its rows; shoppers without a known product keep their row, with an empty history."""
    if table is None:
        shopper_ids = np.zeros(0, dtype=np.int64)
        histories = Histories.from_requests(engine.vocab, [])
    else:
        ids = table.column(SHOPPER).to_numpy()
        firsts = ordered_runs((ids,))  # each shopper's first row, if in shopper order
        shopper_ids = np.unique(ids) if firsts is None else ids[firsts]
        known = build_sequences(table, engine.vocab, drop_unknown=True).select(shopper_ids)
        histories = Histories.from_sequences(known)
    item_ids, gap_days = histories.model_inputs(engine.max_len)
    return Part(index, shopper_ids, histories, item_ids, gap_days, 0 if table is None else table.num_rows)


Rows = slice | np.ndarray  # a piece's rows of its part: a run of them, or their row numbers


def pieces(table: pa.Table | None, shoppers: int) -> list[Rows]:
    """A part's receipts cut into runs of ``shoppers`` consecutive shoppers (by id): each run's rows, every
    row of its shoppers in their order in ``table``; the part's batches, each taken (:func:`rows_of`) and
    grouped (:func:`to_part`) on its own, so the first is encoded before the others are taken.

    A part in shopper order (written shopper by shopper) is cut into slices, which copy nothing."""
    if table is None or table.num_rows == 0:
        return []
    ids = table.column(SHOPPER).to_numpy()
    firsts = ordered_runs((ids,))
    if firsts is not None:
        bounds = np.append(np.flatnonzero(firsts)[::shoppers], len(ids))
        return [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
    firsts = np.unique(ids)[shoppers::shoppers]  # the first shopper of every run after the first
    run = np.searchsorted(firsts, ids, side="right").astype(np.min_scalar_type(len(firsts)))
    # a stable sort of small integers (a radix sort): each run's rows keep their order
    order = np.argsort(run, kind="stable")
    cuts = np.cumsum(np.bincount(run, minlength=len(firsts) + 1))[:-1]
    return np.split(order, cuts)


def rows_of(table: pa.Table, rows: Rows) -> pa.Table:
    """The piece ``rows`` (:func:`pieces`) of ``table``."""
    if isinstance(rows, slice):
        return table.slice(rows.start, rows.stop - rows.start)
    return table.take(rows)


def search(engine: Engine, part: Part, start: int, stop: int, rules: Rules, timings: Timings) -> Batch:
    """Encode and search shoppers ``start:stop`` of ``part``, with as many candidates as the rules need."""
    histories = part.histories.take(np.arange(start, stop))
    encoded = np.flatnonzero(histories.lengths > 0)
    wanted = search_size(histories.take(encoded), rules, engine.repeat, engine.num_items)
    found_rows = np.zeros((0, wanted), dtype=np.int64)
    found_scores = np.zeros((0, wanted), dtype=np.float32)
    if len(encoded):
        # padded to the longest history of the batch, as serving pads: less work than max_len for short ones
        width = int(histories.lengths.max().clip(max=engine.max_len))
        item_ids = np.ascontiguousarray(part.item_ids[start:stop][encoded, -width:])
        gap_days = np.ascontiguousarray(part.gap_days[start:stop][encoded, -width:])
        with timings.stage("encode"):
            shoppers = engine.encode(item_ids, gap_days)
        with timings.stage("top_k"):
            found_rows, found_scores = engine.top(shoppers, wanted)
    # shoppers without a known product get the fallback: their candidates stay empty
    rows = np.full((stop - start, found_rows.shape[1]), -1, dtype=np.int64)
    scores = np.full(rows.shape, np.nan, dtype=np.float32)
    rows[encoded], scores[encoded] = found_rows, found_scores
    return Batch(part.shopper_ids[start:stop], histories, rows, scores)


def fallback_rows(engine: Engine) -> np.ndarray:
    """Item rows in fallback order (most popular first, ties to the smaller product id), unavailable
    products removed: what a shopper without a known product gets, as serving answers."""
    available = popularity_order(engine.vocab.product_ids, engine.vocab.popularity)
    return available[~engine.blocked[available]]


def finish(batch: Batch, rules: Rules, engine: Engine, fallback: np.ndarray) -> pa.RecordBatch:
    """Apply the rules to a searched batch and build its output rows."""
    ranked = recommend(
        batch.histories, batch.rows, batch.scores, rules, engine.repeat, fallback, engine.vocab.popularity
    )
    valid = ranked.rows >= 0  # the scorer puts what it keeps first: each shopper's entries are a prefix
    offsets = pa.array(np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int32))
    return pa.record_batch(
        [
            pa.array(batch.shopper_ids, pa.int64()),
            pa.ListArray.from_arrays(
                offsets, pa.array(engine.vocab.product_ids[ranked.rows[valid]], pa.int64())
            ),
            pa.ListArray.from_arrays(offsets, pa.array(ranked.scores[valid], pa.float32())),
            pa.array(ranked.fallback),
        ],
        schema=SCHEMA,
    )


class Progress:
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


def process(
    engine: Engine,
    layout: Layout,
    pending: list[int],
    receipts: Callable[[int], pa.Table | None],
    directory: Path,
    manifest: ShardManifest,
    rules: Rules,
    concurrency: Concurrency,
    progress: Progress,
    timings: Timings,
) -> None:
    """Encode and search ``pending`` parts on this thread while the next pieces are read and grouped,
    searched batches selected and finished parts written on others.

    ``receipts`` gives a part's receipts by index, None for a part without rows
    (:func:`batch.shards.part_reader`: partition files read back, or a single part streamed).
    """
    fallback = fallback_rows(engine)

    def read(index: int) -> list[Future[Part]]:
        with timings.stage("read"):
            table = receipts(index)
            cut = pieces(table, concurrency.batch_size)
        # grouped on the reader threads in order, each queued before the next part's read
        return [reader.submit(group, table, rows, index) for rows in cut]

    def group(table: pa.Table, rows: Rows, index: int) -> Part:
        with timings.stage("read"):
            return to_part(rows_of(table, rows), index, engine)

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
        for position, index in enumerate(pending):
            grouped = upcoming.popleft().result()
            if position + ahead < len(pending):
                upcoming.append(reader.submit(read, pending[position + ahead]))
            batches = []
            for future in grouped:
                piece = future.result()
                progress.part_read(piece)
                # top-K stays on this thread: on the selector threads FAISS and ONNX Runtime contend for the
                # same cores, and encoding slowed by more than the search it hid (BENCHMARKS.md)
                searched = search(engine, piece, 0, len(piece.shopper_ids), rules, timings)
                batches.append(selector.submit(select_batch, searched))
                queued.append(batches[-1])
                # bounds the searched batches held in memory; .result() raises a failed selection or write
                while queued and (
                    len(queued) > MAX_QUEUED_BATCHES * concurrency.select_threads or queued[0].done()
                ):
                    queued.popleft().result()
                progress.bar.update(len(piece.shopper_ids))
            queued.append(writer.submit(commit, index, batches))
        while queued:
            queued.popleft().result()
    except BaseException:
        for pool in pools:
            pool.shutdown(cancel_futures=True)  # parts queued but not started are not written
        raise
    finally:
        for pool in pools:
            pool.shutdown()
