"""Product id <-> index vocabulary, saved with every model.

Index 0 is padding and 1 stands for any product outside the vocabulary; products start at index 2,
ordered by training popularity (distinct baskets, descending) then product id (ascending). That order
is the evaluation protocol's tie-break, so "smaller index wins a tie" ranks deterministically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.data.schema import BASKET, PRODUCT

PAD = 0
UNK = 1
NUM_RESERVED = 2


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
        return len(self.product_ids) + NUM_RESERVED

    @property
    def num_products(self) -> int:
        return len(self.product_ids)

    def encode(self, product_ids: np.ndarray | pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Product ids -> indices; products outside the vocabulary map to ``UNK``."""
        ids = pa.array(product_ids, type=pa.int64()) if isinstance(product_ids, np.ndarray) else product_ids
        position = pc.index_in(ids, value_set=pa.array(self.product_ids, type=pa.int64()))
        return (pc.fill_null(pc.add(position, NUM_RESERVED), UNK)).to_numpy().astype(np.int64)

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
