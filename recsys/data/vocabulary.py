"""Product id <-> index <-> item row: the vocabulary saved with every model, and the only place that
knows the reserved indices.

Index 0 is padding and 1 stands for any product outside the vocabulary; products start at index 2,
ordered by training popularity (distinct baskets, descending) then product id (ascending). That order
is the evaluation protocol's tie-break, so "smaller index wins a tie" ranks deterministically.

An *item row* numbers the products alone: row ``r`` is index ``r + NUM_RESERVED``, the row of a bundle's
``items.parquet`` and FAISS index. Models read indices; searches, scorers and bundles speak rows;
:func:`to_rows` and :func:`to_indices` are the only conversions, and :data:`PRODUCTS` / :data:`RESERVED`
slice an index-aligned table (embeddings, logits) into its product and reserved parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.data.schema import BASKET, PRODUCT

PAD = 0
UNK = 1
NUM_RESERVED = 2
RESERVED = slice(0, NUM_RESERVED)  # the reserved part of an index-aligned table
PRODUCTS = slice(NUM_RESERVED, None)  # its product part: position r is item row r
HASHED_LOOKUP_MIN = 4096  # ids per call from which :meth:`Vocabulary.rows` may hash instead of search


def to_rows(indices: np.ndarray) -> np.ndarray:
    """Vocabulary indices -> item rows; reserved indices (and -1) map to -1."""
    indices = np.asarray(indices, dtype=np.int64)
    return np.where(indices >= NUM_RESERVED, indices - NUM_RESERVED, -1)


def to_indices(rows: np.ndarray) -> np.ndarray:
    """Item rows (>= 0) -> vocabulary indices."""
    return np.asarray(rows, dtype=np.int64) + NUM_RESERVED


def index_count(num_products: int) -> int:
    """Rows of an index-aligned table (embeddings, logits) that holds ``num_products`` products."""
    return num_products + NUM_RESERVED


def product_count(num_indices: int) -> int:
    """Products in an index-aligned table of ``num_indices`` rows."""
    return num_indices - NUM_RESERVED


@dataclass(frozen=True)
class Vocabulary:
    """Products kept for modelling, in index order (index = position + ``NUM_RESERVED``)."""

    product_ids: np.ndarray  # [V - NUM_RESERVED] int64
    popularity: np.ndarray  # [V - NUM_RESERVED] int64, distinct training baskets per product

    def __post_init__(self) -> None:
        if len(self.product_ids) != len(self.popularity):
            raise ValueError("product_ids and popularity must have the same length")
        if len(np.unique(self.product_ids)) != len(self.product_ids):
            raise ValueError("vocabulary product ids must be unique")

    @classmethod
    def build(cls, receipts: pa.Table, min_baskets: int = 1) -> Vocabulary:
        """Products present in at least ``min_baskets`` distinct baskets of ``receipts``."""
        pairs = (
            receipts.select([PRODUCT, BASKET]).group_by([PRODUCT, BASKET], use_threads=False).aggregate([])
        )
        counts = pairs.group_by(PRODUCT, use_threads=False).aggregate([([], "count_all")])
        product_ids = counts.column(PRODUCT).to_numpy()
        popularity = counts.column("count_all").to_numpy().astype(np.int64)
        keep = popularity >= min_baskets
        product_ids, popularity = product_ids[keep], popularity[keep]
        order = np.lexsort((product_ids, -popularity))
        return cls(product_ids=product_ids[order].astype(np.int64), popularity=popularity[order])

    @property
    def size(self) -> int:
        """Number of indices, reserved ones included (the embedding table's row count)."""
        return index_count(len(self.product_ids))

    @property
    def num_products(self) -> int:
        return len(self.product_ids)

    @cached_property
    def _sorted(self) -> tuple[np.ndarray, np.ndarray]:
        """Product ids in ascending order and their rows: a binary-search lookup built once."""
        order = np.argsort(self.product_ids, kind="stable")
        return self.product_ids[order], order.astype(np.int64)

    @cached_property
    def _value_set(self) -> pa.Array:
        """Product ids in row order, for Arrow's hash lookup (``pyarrow.compute.index_in``)."""
        return pa.array(self.product_ids, pa.int64())

    def encode(self, product_ids: np.ndarray | pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Product ids -> indices; products outside the vocabulary map to ``UNK``."""
        rows = self.rows(product_ids)
        return np.where(rows >= 0, to_indices(rows), UNK)

    def rows(self, product_ids: np.ndarray | pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Product ids -> item rows; products outside the vocabulary map to -1."""
        if isinstance(product_ids, pa.Array | pa.ChunkedArray):
            product_ids = product_ids.to_numpy()
        ids = np.asarray(product_ids, dtype=np.int64)
        ordered, rows = self._sorted
        if len(ordered) == 0:
            return np.full(ids.shape, -1, dtype=np.int64)
        if ids.size >= max(HASHED_LOOKUP_MIN, len(ordered)):
            # Arrow hashes the vocabulary once per call: dearer than a binary search for a request's few
            # ids, several times cheaper per id once a call has more ids than the vocabulary has products
            found = pc.index_in(ids.ravel(), value_set=self._value_set).fill_null(-1)
            return found.to_numpy().astype(np.int64).reshape(ids.shape)
        position = np.searchsorted(ordered, ids).clip(max=len(ordered) - 1)
        return np.where(ordered[position] == ids, rows[position], -1)

    def product_ids_of(self, rows: np.ndarray) -> np.ndarray:
        """Item rows -> product ids; -1 (no item) stays -1."""
        rows = np.asarray(rows, dtype=np.int64)
        return np.where(rows >= 0, self.product_ids[rows.clip(0)], -1)

    def decode(self, indices: np.ndarray) -> np.ndarray:
        """Indices -> product ids; reserved or out-of-range indices map to -1."""
        indices = np.asarray(indices)
        valid = (indices >= NUM_RESERVED) & (indices < self.size)
        out = np.full(indices.shape, -1, dtype=np.int64)
        out[valid] = self.product_ids[indices[valid] - NUM_RESERVED]
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, so checkpoints holding a vocabulary load with ``weights_only=True``."""
        return {"product_ids": self.product_ids.tolist(), "popularity": self.popularity.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocabulary:
        return cls(
            product_ids=np.asarray(data["product_ids"], dtype=np.int64),
            popularity=np.asarray(data["popularity"], dtype=np.int64),
        )
