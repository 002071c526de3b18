"""Histories of item rows for tests of the scorer, built directly (no vocabulary, no receipts)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recsys.data.sequences import MICROSECONDS_PER_DAY
from recsys.inputs import Histories


def histories_of(rows: Sequence[Sequence[int]], days: Sequence[Sequence[float]] | None = None) -> Histories:
    """Timed histories: ``rows[s]`` are shopper ``s``'s item rows oldest first, bought on ``days[s]``
    (default: one basket a day, 0, 1, 2, ...)."""
    days = [np.arange(len(r), dtype=np.float64) for r in rows] if days is None else days
    lengths = [len(r) for r in rows]
    flat = np.concatenate([np.asarray(r, np.int64) for r in rows]) if rows else np.zeros(0, np.int64)
    times = np.concatenate([np.asarray(d, np.float64) for d in days]) if rows else np.zeros(0)
    return Histories(
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        flat.astype(np.int64),
        np.round(times * MICROSECONDS_PER_DAY).astype(np.int64),
        np.ones(len(rows), dtype=bool),
        np.zeros(len(rows), dtype=np.int64),
    )
