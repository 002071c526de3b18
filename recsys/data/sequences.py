"""Per-shopper purchase sequences: items in time order with basket boundaries kept.

Sequences are stored flat (CSR-like): shopper ``i`` owns ``items[offsets[i]:offsets[i + 1]]``. Baskets
are ordered by timestamp then basket id; inside a basket, items are ordered by product id, an order
that carries no information, which is why training shuffles within baskets (see ``basket``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.data.schema import BASKET, PRODUCT, SHOPPER, TIMESTAMP
from recsys.data.vocabulary import UNK, Vocabulary

FIRST_PURCHASE = -1.0  # the gap of a shopper's first purchase row: there is no previous one
MICROSECONDS_PER_DAY = 86_400_000_000
SECONDS_PER_DAY = 86_400.0


def epoch_days(moment: datetime) -> float:
    """A tz-aware ``moment`` in days since the Unix epoch: the clock of ``Histories.days``."""
    return moment.timestamp() / SECONDS_PER_DAY


@dataclass(frozen=True)
class Sequences:
    """Time-ordered purchase histories of many shoppers."""

    shopper_ids: np.ndarray  # [S] int64, ascending
    offsets: np.ndarray  # [S + 1] int64
    items: np.ndarray  # [N] int64 vocabulary indices
    basket: np.ndarray  # [N] int64 basket ordinal within the shopper's history (0, 1, ...)
    timestamps: np.ndarray  # [N] int64 microseconds since the epoch (UTC)

    def __len__(self) -> int:
        return len(self.shopper_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def select(self, shopper_ids: np.ndarray) -> Sequences:
        """The sequences of ``shopper_ids`` in that order; shoppers without history get empty rows."""
        shopper_ids = np.asarray(shopper_ids, dtype=np.int64)
        if np.array_equal(shopper_ids, self.shopper_ids):  # a job's grouping asks for every shopper
            return self
        pos = np.searchsorted(self.shopper_ids, shopper_ids)
        pos_c = np.minimum(pos, len(self.shopper_ids) - 1) if len(self.shopper_ids) else pos
        found = (
            (pos < len(self.shopper_ids)) & (self.shopper_ids[pos_c] == shopper_ids) if len(self) else pos < 0
        )
        starts = np.where(found, self.offsets[pos_c] if len(self) else 0, 0)
        lengths = np.where(found, self.lengths[pos_c] if len(self) else 0, 0)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        take = concat_ranges(starts, lengths)
        return Sequences(shopper_ids, offsets, self.items[take], self.basket[take], self.timestamps[take])

    def gaps(self) -> np.ndarray:
        """[N] float32 days since the shopper's previous purchase row (:func:`purchase_gaps`)."""
        return purchase_gaps(self.timestamps, self.offsets, MICROSECONDS_PER_DAY)


def purchase_gaps(times: np.ndarray, offsets: np.ndarray, per_day: float) -> np.ndarray:
    """[N] float32 days between each purchase row and the previous row of the same history.

    ``times`` [N] are purchase times in units of which ``per_day`` make a day, histories are
    ``times[offsets[i]:offsets[i + 1]]`` oldest first. Rows of one basket share a time, so a basket's
    first row carries the gap to the previous basket and the others 0; a history's first row gets
    ``FIRST_PURCHASE``. This is the basket-aware input of the sequence models (``recsys.models.gaps``),
    computed here for training windows and, through ``recsys.inputs``, for every model input.
    """
    times = np.asarray(times)
    gaps = np.empty(len(times), dtype=np.float32)
    gaps[1:] = np.diff(times) / per_day  # differences first: float32 cannot hold epoch times exactly
    starts = np.asarray(offsets[:-1])
    gaps[starts[starts < len(times)]] = FIRST_PURCHASE
    return gaps


def positions(sorted_ids: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each of ``keys``' position in the ascending ``sorted_ids`` (clipped into range), and whether it is
    there at all: a lookup of per-shopper values by id."""
    sorted_ids, keys = np.asarray(sorted_ids), np.asarray(keys)
    at = np.minimum(np.searchsorted(sorted_ids, keys), max(len(sorted_ids) - 1, 0))
    return at, (sorted_ids[at] == keys if len(sorted_ids) else np.zeros(len(keys), dtype=bool))


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for every (s, n), without a Python loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    step = np.ones(total, dtype=np.int64)
    step[0] = starts[lengths > 0][0] if len(starts) else 0
    nonempty = np.flatnonzero(lengths > 0)
    # at each range's first element jump from the previous range's end to this range's start
    jumps = ends[nonempty[:-1]]
    step[jumps] = np.asarray(starts)[nonempty[1:]] - (
        np.asarray(starts)[nonempty[:-1]] + lengths[nonempty[:-1]] - 1
    )
    return np.cumsum(step)


def build_sequences(receipts: pa.Table, vocab: Vocabulary, drop_unknown: bool = True) -> Sequences:
    """Sequences of every shopper in ``receipts``.

    Products outside the vocabulary are dropped by default, as the serving library drops them, so a
    model never trains on inputs it will not see in production; ``drop_unknown=False`` keeps them as
    ``UNK``.
    """
    table = time_ordered(receipts)
    items = vocab.encode(table.column(PRODUCT))
    if drop_unknown and (unknown := items == UNK).any():
        table = table.filter(pa.array(~unknown))
        items = items[~unknown]
    shoppers = table.column(SHOPPER).to_numpy()
    baskets = table.column(BASKET).to_numpy()
    timestamps = pc.cast(table.column(TIMESTAMP), pa.int64()).to_numpy()
    n = len(shoppers)
    new_shopper = np.ones(n, dtype=bool)
    new_shopper[1:] = shoppers[1:] != shoppers[:-1]
    new_basket = new_shopper.copy()
    new_basket[1:] |= baskets[1:] != baskets[:-1]
    starts = np.flatnonzero(new_shopper)
    offsets = np.append(starts, n).astype(np.int64)
    # basket ordinal = baskets opened so far, minus those opened before this shopper's first row
    opened = np.cumsum(new_basket) - 1
    basket = opened - np.repeat(opened[starts], np.diff(offsets))
    return Sequences(shoppers[starts].astype(np.int64), offsets, items, basket.astype(np.int64), timestamps)


HISTORY_ORDER = (SHOPPER, TIMESTAMP, BASKET, PRODUCT)  # the order of every history's rows
SORT_KEY_LIMIT = 2**62  # a combined (basket, product) sort key must stay below this


def time_ordered(receipts: pa.Table) -> pa.Table:
    """The key columns sorted by shopper, then time, basket and product id (the order of every history).

    Receipts written shopper by shopper, basket by basket (as the synthetic generator and a partition
    pass over such input write them, and as a till writes a basket) need at most each basket's products
    ordered: one integer key sorted almost in order, instead of a sort on four columns."""
    table = receipts.select(list(HISTORY_ORDER))
    everything = [(name, "ascending") for name in HISTORY_ORDER]
    opens = ordered_runs(
        tuple(pc.cast(table.column(name), pa.int64()).to_numpy() for name in HISTORY_ORDER[:3])
    )
    if opens is None:
        return table.sort_by(everything)
    products = table.column(PRODUCT).to_numpy()
    if not np.any(~opens[1:] & (products[1:] < products[:-1])):
        return table
    low, high = int(products.min()), int(products.max())
    baskets = np.cumsum(opens) - 1  # [N] the basket ordinal of every row
    if int(baskets[-1] + 1) * (high - low + 1) >= SORT_KEY_LIMIT:  # the key would overflow int64
        return table.sort_by(everything)
    key = baskets * (high - low + 1) + (products - low)
    return table.take(np.argsort(key, kind="stable"))


def ordered_runs(keys: tuple[np.ndarray, ...]) -> np.ndarray | None:
    """[N] bool: whether each row opens a run of equal ``keys`` (arrays of one length, compared in that
    order), if the rows are non-decreasing in them (ties allowed); None if they are not. Receipts in
    shopper order give their shoppers' first rows with ``(shopper_ids,)``, and in shopper, time and basket
    order their baskets' with those three columns."""
    count = len(keys[0])
    opens = np.ones(count, dtype=bool)
    undecided = np.ones(max(count - 1, 0), dtype=bool)  # neighbours equal in the keys so far
    for values in keys:
        earlier, later = values[:-1], values[1:]
        if np.any(undecided & (later < earlier)):
            return None
        undecided &= later == earlier
    opens[1:] = ~undecided
    return opens


def product_histories(
    receipts: pa.Table, shopper_ids: np.ndarray
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """What serving takes: each shopper's product ids, oldest first (the order of :func:`build_sequences`),
    and their purchase times in seconds since the epoch; empty arrays for shoppers without receipts."""
    table = time_ordered(receipts)
    shoppers = table.column(SHOPPER).to_numpy()
    products = table.column(PRODUCT).to_numpy()
    seconds = pc.cast(table.column(TIMESTAMP), pa.int64()).to_numpy() / 1e6  # microseconds -> seconds
    starts = np.searchsorted(shoppers, shopper_ids, "left")
    ends = np.searchsorted(shoppers, shopper_ids, "right")
    spans = list(zip(starts, ends, strict=True))
    return [products[a:b] for a, b in spans], [seconds[a:b] for a, b in spans]


def training_windows(
    sequences: Sequences, max_len: int, min_length: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) of every window of at most ``max_len + 1`` items (inputs + next-item targets).

    Windows tile each history from its most recent item backwards with stride ``max_len``, so every
    item is a target once and the whole history is used (not only its last window). Windows shorter
    than ``min_length`` (nothing to predict) are skipped.
    """
    lengths = sequences.lengths
    count = np.maximum(0, -(-(lengths - 1) // max_len))  # ceil((n - 1) / max_len) windows per shopper
    shopper = np.repeat(np.arange(len(sequences)), count)
    k = concat_ranges(np.zeros_like(count), count)  # window number counted from the end
    ends = sequences.offsets[shopper + 1] - k * max_len
    starts = np.maximum(sequences.offsets[shopper], ends - max_len - 1)
    keep = ends - starts >= min_length
    return starts[keep], ends[keep]
