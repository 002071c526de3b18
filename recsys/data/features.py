"""Product features as integer codes aligned with a vocabulary, for models with an item tower.

Every feature maps its values to codes ``1 .. n``; code 0 (``MISSING``) means the product has no value,
has a value the mapping does not know, or is a reserved vocabulary row (PAD, UNK). Categorical features
are columns of a products table (values compared as strings); the optional price band is the product's
median unit ``price`` in receipts, cut at quantiles. The mappings are plain lists, so a checkpoint carries
them and encodes products outside its training vocabulary (cold-start products) exactly as in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.data.schema import PRICE, PRODUCT
from recsys.data.vocabulary import PRODUCTS, Vocabulary

MISSING = 0
PRICE_BAND = "price_band"


def median_prices(receipts: pa.Table) -> pa.Table | None:
    """``product_id`` and median unit ``price`` per product; ``None`` when receipts carry no prices.

    Exact medians (not pyarrow's approximate one), so the same receipts in any row order give the same
    price bands.
    """
    if PRICE not in receipts.column_names:
        return None
    rows = receipts.select([PRODUCT, PRICE]).filter(pc.is_finite(receipts.column(PRICE)))
    if rows.num_rows == 0:
        return None
    ids, price = rows.column(PRODUCT).to_numpy(), rows.column(PRICE).to_numpy()
    order = np.lexsort((price, ids))
    ids, price = ids[order], price[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    counts = np.diff(np.r_[starts, len(ids)])
    median = (price[starts + (counts - 1) // 2] + price[starts + counts // 2]) / 2
    return pa.table({PRODUCT: pa.array(ids[starts], pa.int64()), PRICE: pa.array(median, pa.float64())})


def _rows_of(table: pa.Table, product_ids: np.ndarray) -> pa.Array:
    """Row of each product id in ``table`` (null where absent)."""
    return pc.index_in(pa.array(product_ids, pa.int64()), value_set=table.column(PRODUCT).cast(pa.int64()))


def product_metadata(products: pa.Table, product_ids: np.ndarray) -> pa.Table:
    """The rows of ``products`` for ``product_ids``, in that order: ``product_id``, then every other column
    of ``products`` (nulls for a product without a row). What checkpoints keep and bundles show."""
    products = _check_products(products, [c for c in products.column_names if c != PRODUCT])
    metadata = products.drop_columns([PRODUCT]).take(_rows_of(products, product_ids))
    return metadata.add_column(0, PRODUCT, pa.array(product_ids, pa.int64()))


@dataclass(frozen=True)
class ProductFeatures:
    """How product attributes become codes: plain data (``to_dict``) that checkpoints carry."""

    values: dict[str, list[str]]  # categorical feature -> its known values; code = position + 1
    price_edges: list[float] | None = None  # ascending cuts between price bands; None: no price band

    @property
    def names(self) -> list[str]:
        """Feature names in code-column order (categorical features, then the price band if any)."""
        return [*self.values, *([PRICE_BAND] if self.price_edges is not None else [])]

    @property
    def cardinalities(self) -> list[int]:
        """Codes per feature, ``MISSING`` included (embedding table sizes)."""
        sizes = [len(known) + 1 for known in self.values.values()]
        return sizes + ([len(self.price_edges) + 2] if self.price_edges is not None else [])

    @classmethod
    def fit(
        cls,
        products: pa.Table,
        product_ids: np.ndarray,
        columns: Sequence[str],
        receipts: pa.Table | None = None,
        price_bands: int = 0,
    ) -> ProductFeatures:
        """Mappings from the values of ``product_ids`` (e.g. a training vocabulary's products).

        ``columns`` of ``products`` become categorical features; with ``price_bands`` > 1 and prices in
        ``receipts``, the median unit price becomes a band feature cut at that many quantiles (fewer when
        prices tie). Values of other products are left unknown: they would have untrained embeddings.
        """
        table = _check_products(products, columns)
        rows = table.take(_rows_of(table, product_ids))  # [N] rows, null where a product has no metadata
        values = {}
        for name in columns:
            known = pc.drop_null(pc.unique(rows.column(name).cast(pa.string())))
            values[name] = sorted(known.to_pylist())
        prices = median_prices(receipts) if receipts is not None and price_bands > 1 else None
        if prices is None:
            return cls(values)
        vocab_prices = prices.column(PRICE).take(_rows_of(prices, product_ids)).drop_null().to_numpy()
        if len(vocab_prices) == 0:
            return cls(values)
        quantiles = np.quantile(vocab_prices, np.linspace(0, 1, price_bands + 1)[1:-1])
        return cls(values, np.unique(quantiles).tolist())

    def encode(
        self, products: pa.Table, product_ids: np.ndarray, receipts: pa.Table | None = None
    ) -> np.ndarray:
        """[N, F] int64 codes of ``product_ids`` (any products, in or outside a vocabulary).

        Products without a row in ``products`` get ``MISSING`` in every categorical feature, products
        without a price in ``receipts`` (or with no ``receipts``) get ``MISSING`` as price band.
        """
        table = _check_products(products, list(self.values))
        rows = table.take(_rows_of(table, product_ids))
        codes = np.zeros((len(product_ids), len(self.names)), dtype=np.int64)
        for f, (name, known) in enumerate(self.values.items()):
            text = rows.column(name).cast(pa.string())
            position = pc.index_in(text, value_set=pa.array(known, pa.string()))
            codes[:, f] = pc.fill_null(pc.add(position, 1), MISSING).to_numpy()
        prices = median_prices(receipts) if receipts is not None else None
        if self.price_edges is not None and prices is not None:
            price = prices.column(PRICE).take(_rows_of(prices, product_ids)).to_numpy(zero_copy_only=False)
            band = 1 + np.searchsorted(np.asarray(self.price_edges), price, side="right")
            codes[:, -1] = np.where(np.isnan(price), MISSING, band)  # a missing price is a null -> NaN
        return codes

    def vocabulary_codes(
        self, vocab: Vocabulary, products: pa.Table, receipts: pa.Table | None = None
    ) -> np.ndarray:
        """[V, F] int64 codes of every vocabulary index; the reserved rows (PAD, UNK) are ``MISSING``."""
        codes = np.full((vocab.size, len(self.names)), MISSING, dtype=np.int64)
        codes[PRODUCTS] = self.encode(products, vocab.product_ids, receipts)
        return codes

    def to_dict(self) -> dict[str, Any]:
        """Plain values only, so a checkpoint holding them loads with ``weights_only=True``."""
        values = {name: list(known) for name, known in self.values.items()}
        return {"values": values, "price_edges": self.price_edges}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProductFeatures:
        edges = data.get("price_edges")
        values = {name: list(known) for name, known in data["values"].items()}
        return cls(values, None if edges is None else [float(edge) for edge in edges])


def _check_products(products: pa.Table, columns: Sequence[str]) -> pa.Table:
    """``products`` reduced to ``product_id`` + ``columns``, with clear errors for what is missing."""
    if PRODUCT not in products.column_names:
        raise ValueError(f"products table has no '{PRODUCT}' column (it has {products.column_names})")
    absent = [name for name in columns if name not in products.column_names]
    if absent:
        raise ValueError(f"products table has no column(s) {absent} (it has {products.column_names})")
    ids = products.column(PRODUCT)
    if pc.count_distinct(ids).as_py() != len(ids):
        raise ValueError(f"products table: '{PRODUCT}' must be unique (one row per product)")
    return products.select([PRODUCT, *columns])
