"""Model inputs: the one front-end from shopper histories to what an encoder reads and a scorer scores.

Histories arrive in two shapes: receipts (training's metrics, the scorer's fit and the batch job, through
:func:`recsys.data.sequences.build_sequences`) and requests (serving: product ids and purchase times in
seconds since the epoch). Both become one :class:`Histories`: each shopper's known products as item rows
(``recsys.data.vocabulary``), oldest first, with purchase times in integer microseconds, the unit of
receipts. :func:`micros_from_seconds` is the one conversion of request times, so a bucket edge of the
purchase gaps is read alike everywhere. From there :meth:`Histories.model_inputs` gives the encoder's
``item_ids`` / ``gap_days`` at the model's ``max_len``, and the repeat-aware scorer reads the same object.
Products outside the catalogue are dropped and counted, never encoded. numpy only: serving imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from recsys.data.sequences import MICROSECONDS_PER_DAY, Sequences, concat_ranges, purchase_gaps
from recsys.data.vocabulary import PAD, Vocabulary, to_indices, to_rows

MICROSECONDS_PER_SECOND = 1_000_000


def micros_from_seconds(seconds: Sequence[float] | np.ndarray) -> np.ndarray:
    """Request times (seconds since the epoch) as int64 microseconds, the unit of receipts."""
    return np.round(np.asarray(seconds, dtype=np.float64) * MICROSECONDS_PER_SECOND).astype(np.int64)


def pair_keys(owner: np.ndarray, rows: np.ndarray, span: int) -> np.ndarray:
    """(``owner``, ``rows``) pairs (arrays broadcast together, ``rows`` in ``[0, span)``) packed into one
    int64 key each, ordered as the pairs are (owner first): ``owner * span + rows``. Always int64, since
    with int32 inputs the product overflows long before the catalogue or the shopper count is large."""
    return np.asarray(owner, dtype=np.int64) * span + np.asarray(rows, dtype=np.int64)


def split_pair_keys(keys: np.ndarray, span: int) -> tuple[np.ndarray, np.ndarray]:
    """The (owner, rows) pairs that :func:`pair_keys` packed with the same ``span``."""
    return keys // span, keys % span


def sorted_unique(keys: np.ndarray) -> np.ndarray:
    """The distinct values of int64 ``keys``, ascending: ``np.unique(keys)``, whose hash table costs several
    times a sort on the few thousand keys of a request (and no less on millions)."""
    ordered = np.sort(np.asarray(keys, dtype=np.int64).reshape(-1))
    distinct = np.ones(len(ordered), dtype=bool)
    distinct[1:] = ordered[1:] != ordered[:-1]
    return ordered[distinct]


def stable_order(keys: np.ndarray) -> np.ndarray:
    """``np.argsort(keys, kind="stable")`` of 1-D int64 ``keys``: each key is packed with its position into
    one int64 and sorted, several times cheaper, where that fits (the stable argsort otherwise)."""
    keys = np.asarray(keys, dtype=np.int64)
    n = len(keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    low = int(keys.min())
    if (int(keys.max()) - low + 1) * n > np.iinfo(np.int64).max:
        return np.argsort(keys, kind="stable")
    return np.sort((keys - low) * n + np.arange(n)) % n


def first_occurrences(keys: np.ndarray) -> np.ndarray:
    """Positions of the first occurrence of each distinct value of 1-D int64 ``keys``, in ascending order of
    the values: ``np.unique(keys, return_index=True)[1]``, at the cost of :func:`stable_order`."""
    order = stable_order(keys)
    value = np.asarray(keys, dtype=np.int64)[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = value[1:] != value[:-1]
    return order[first]


def pair_member(
    owner: np.ndarray, rows: np.ndarray, set_owner: np.ndarray, set_rows: np.ndarray
) -> np.ndarray:
    """Whether each (``owner``, ``rows``) pair (arrays broadcast together) is one of the pairs
    (``set_owner``, ``set_rows``); negative rows never are. One binary search over pairs packed into a
    single int64 key, shared by every "did this shopper buy that item" question (``np.isin`` sorts both
    sides together, several times dearer on a request's few hundred pairs, no cheaper on millions)."""
    owner, rows = np.broadcast_arrays(np.asarray(owner, np.int64), np.asarray(rows, np.int64))
    set_owner, set_rows = np.asarray(set_owner, np.int64), np.asarray(set_rows, np.int64)
    keep = set_rows >= 0
    set_owner, set_rows = set_owner[keep], set_rows[keep]
    if set_rows.size == 0 or rows.size == 0:
        return np.zeros(rows.shape, dtype=bool)
    span = max(int(rows.max()), int(set_rows.max())) + 1
    keys = np.sort(pair_keys(set_owner, set_rows, span))
    wanted = pair_keys(owner, rows, span)
    at = np.searchsorted(keys, wanted).clip(max=len(keys) - 1)
    return (keys[at] == wanted) & (rows >= 0)


@dataclass(frozen=True)
class Histories:
    """Known purchases of ``num_shoppers`` shoppers, flat: shopper ``s`` owns ``offsets[s]:offsets[s + 1]``.

    A basket is a distinct (shopper, time). Shoppers whose times are unknown (``timed`` False, e.g. a
    request without timestamps) have zeros in ``micros``: the repeat-aware scorer skips them and a
    basket-aware model must not be fed them.
    """

    offsets: np.ndarray  # [S + 1] int64
    rows: np.ndarray  # [N] int64 item rows (>= 0), each shopper's oldest first
    micros: np.ndarray  # [N] int64 purchase times, microseconds since the epoch
    timed: np.ndarray  # [S] bool: the shopper's purchase times are known
    unknown: np.ndarray  # [S] int64 history entries dropped because they are outside the catalogue

    def __post_init__(self) -> None:
        s = len(self.offsets) - 1
        if s < 0 or self.timed.shape != (s,) or self.unknown.shape != (s,):
            raise ValueError("offsets, timed and unknown must describe the same shoppers")
        if self.rows.shape != self.micros.shape or int(self.offsets[-1]) != len(self.rows):
            raise ValueError("rows and micros need one entry per purchase, as offsets count them")
        if len(self.rows) and self.rows.min() < 0:
            raise ValueError("history rows must be item rows (>= 0); unknown products are dropped")

    @classmethod
    def from_sequences(cls, sequences: Sequences) -> Histories:
        """The known products of ``sequences`` (vocabulary indices, times in microseconds); ``UNK``
        entries (``build_sequences(drop_unknown=False)``) are dropped and counted."""
        return cls._known(sequences.offsets, to_rows(sequences.items), sequences.timestamps, None)

    @classmethod
    def from_requests(
        cls,
        vocab: Vocabulary,
        product_ids: Sequence[Sequence[int] | np.ndarray],
        seconds: Sequence[Sequence[float] | np.ndarray | None] | None = None,
    ) -> Histories:
        """Histories as serving receives them: per shopper, product ids oldest first and optionally one
        purchase time (seconds since the epoch, oldest first, a basket's products sharing one) per entry.

        Raises ValueError naming the history whose times do not fit it.
        """
        count = len(product_ids)
        seconds = [None] * count if seconds is None else list(seconds)
        if len(seconds) != count:
            raise ValueError(f"timestamps has {len(seconds)} entries for {count} histories")
        lengths = np.fromiter((len(h) for h in product_ids), dtype=np.int64, count=count)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.concatenate([np.asarray(h, dtype=np.int64) for h in product_ids]) if count else lengths
        micros = np.zeros(len(flat), dtype=np.int64)
        timed = np.array([t is not None for t in seconds], dtype=bool)
        for i in np.flatnonzero(timed):
            times = np.asarray(seconds[i], dtype=np.float64)
            if times.shape != (lengths[i],) or not np.isfinite(times).all():
                raise ValueError(
                    f"history {i}: timestamps need one finite number per history entry ({lengths[i]})"
                )
            if np.any(np.diff(times) < 0):
                raise ValueError(f"history {i}: timestamps must be oldest first, as the history is")
            micros[offsets[i] : offsets[i + 1]] = micros_from_seconds(times)
        return cls._known(offsets, vocab.rows(flat), micros, timed)

    @classmethod
    def _known(
        cls, offsets: np.ndarray, rows: np.ndarray, micros: np.ndarray, timed: np.ndarray | None
    ) -> Histories:
        """Histories of the entries with a row (>= 0); the others are counted as unknown."""
        known = rows >= 0
        timed = np.ones(len(offsets) - 1, dtype=bool) if timed is None else timed
        if known.all():
            unknown = np.zeros(len(offsets) - 1, dtype=np.int64)
            offsets, micros = np.asarray(offsets, np.int64), np.asarray(micros, np.int64)
            return cls(offsets, rows.astype(np.int64), micros, timed, unknown)
        owner = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        kept = np.bincount(owner[known], minlength=len(offsets) - 1)
        return cls(
            np.concatenate([[0], np.cumsum(kept)]).astype(np.int64),
            rows[known].astype(np.int64),
            np.asarray(micros)[known].astype(np.int64),
            timed,
            (np.diff(offsets) - kept).astype(np.int64),
        )

    @property
    def num_shoppers(self) -> int:
        return len(self.offsets) - 1

    # derived arrays are computed once: serving asks for them several times per request
    @cached_property
    def lengths(self) -> np.ndarray:
        """[S] known products per shopper; 0 means the popularity fallback."""
        return np.diff(self.offsets)

    @cached_property
    def owner(self) -> np.ndarray:
        """[N] the shopper (0 .. S - 1) of each entry."""
        return np.repeat(np.arange(self.num_shoppers, dtype=np.int64), self.lengths)

    @property
    def days(self) -> np.ndarray:
        """[N] float64 purchase times in days since the epoch (the repeat-aware scorer's unit)."""
        return self.micros / MICROSECONDS_PER_DAY

    def take(self, positions: np.ndarray) -> Histories:
        """The histories of shoppers ``positions``, in that order."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) == self.num_shoppers and np.array_equal(positions, np.arange(self.num_shoppers)):
            return self
        lengths = self.lengths[positions]
        entries = concat_ranges(self.offsets[positions], lengths)
        return Histories(
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            self.rows[entries],
            self.micros[entries],
            self.timed[positions],
            self.unknown[positions],
        )

    def distinct(self) -> tuple[np.ndarray, np.ndarray]:
        """Distinct (owner [P], row [P]) pairs: what each shopper bought, sorted by shopper then row."""
        return self._distinct

    @cached_property
    def _distinct(self) -> tuple[np.ndarray, np.ndarray]:
        span = int(self.rows.max(initial=0)) + 1
        return split_pair_keys(sorted_unique(pair_keys(self.owner, self.rows, span)), span)

    def bought(self, rows: np.ndarray) -> np.ndarray:
        """[S, C] bool: whether shopper ``s`` bought ``rows[s, c]`` (negative rows never)."""
        return pair_member(np.arange(self.num_shoppers)[:, None], rows, self.owner, self.rows)

    def distinct_sizes(self) -> np.ndarray:
        """[S] distinct products per shopper."""
        return np.bincount(self.distinct()[0], minlength=self.num_shoppers)

    def model_inputs(self, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """What the encoder reads: ``item_ids`` [S, W] int64, each shopper's ``max_len`` most recent
        products as vocabulary indices, left-padded with ``PAD``, and their ``gap_days`` [S, W] float32
        (days since the previous purchase row over the whole history, ``purchase_gaps``).

        ``W = min(max_len, longest history)`` (at least 1): models are indifferent to extra left padding,
        and shorter batches cost less. A model's position table covers ``max_len`` rows, so nothing
        longer ever goes in.
        """
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        lengths = np.minimum(self.lengths, max_len)
        width = max(1, int(lengths.max(initial=0)))
        # cell (s, c) holds entry offsets[s + 1] - width + c, where that lies inside shopper s's history
        cols = np.arange(width)
        valid = cols[None, :] >= (width - lengths)[:, None]  # [S, W]
        entry = np.where(valid, self.offsets[1:, None] - width + cols[None, :], 0)  # [S, W]
        if not len(self.rows):
            return np.full(valid.shape, PAD, dtype=np.int64), np.zeros(valid.shape, dtype=np.float32)
        item_ids = np.where(valid, to_indices(self.rows[entry]), PAD)
        gaps = purchase_gaps(self.micros, self.offsets, MICROSECONDS_PER_DAY)
        return item_ids, np.where(valid, gaps[entry], np.float32(0)).astype(np.float32)
