"""Product features: codes aligned with a vocabulary, missing/unseen values, price bands, plain mappings."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch

from recsys.data.features import MISSING, PRICE_BAND, ProductFeatures, median_prices
from recsys.data.synthetic import SyntheticConfig, generate_table, products
from recsys.data.vocabulary import NUM_RESERVED, Vocabulary
from training.datamodule import ReceiptsDataModule

VOCAB = Vocabulary(np.array([30, 10, 20, 40], dtype=np.int64), np.array([9, 7, 5, 3], dtype=np.int64))
PRODUCTS = pa.table(
    {
        "product_id": [10, 20, 30, 40, 50, 60],
        "department": ["dairy", "dairy", "bakery", None, "dairy", "toys"],  # 60's value: no vocab product
        "size": [1, 2, 1, 1, 3, 2],  # integers compare as text
    }
)
RECEIPTS = pa.table(
    {
        "product_id": [10, 10, 10, 20, 20, 30, 40, 50],
        "price": [1.0, 3.0, 2.0, 4.0, 6.0, 9.0, None, 5.0],  # medians: 10 -> 2, 20 -> 5, 30 -> 9
    }
)


def _fit(price_bands: int = 0) -> ProductFeatures:
    return ProductFeatures.fit(PRODUCTS, VOCAB.product_ids, ["department", "size"], RECEIPTS, price_bands)


def test_codes_follow_the_vocabulary_and_reserved_rows_are_missing() -> None:
    features = _fit()
    assert features.values == {"department": ["bakery", "dairy"], "size": ["1", "2"]}
    assert features.names == ["department", "size"]
    assert features.cardinalities == [3, 3]
    codes = features.vocabulary_codes(VOCAB, PRODUCTS)
    assert codes.dtype == np.int64
    # rows: PAD, UNK, then products 30, 10, 20, 40 (vocabulary order); 40 has no department
    assert codes.tolist() == [[0, 0], [0, 0], [1, 1], [2, 1], [2, 2], [MISSING, 1]]


def test_products_outside_the_vocabulary_encode_the_same_way() -> None:
    features = _fit()
    codes = features.encode(PRODUCTS, np.array([50, 60, 70, 10]))
    # 50: known department, size 3 unseen in the vocabulary -> missing; 60: unseen department;
    # 70: no metadata at all; 10: exactly its vocabulary codes
    assert codes.tolist() == [[2, MISSING], [MISSING, 2], [MISSING, MISSING], [2, 1]]


def test_price_bands_cut_median_unit_prices_at_quantiles() -> None:
    prices = median_prices(RECEIPTS)
    assert prices is not None
    assert dict(zip(*prices.to_pydict().values(), strict=True)) == {10: 2.0, 20: 5.0, 30: 9.0, 50: 5.0}
    features = _fit(price_bands=3)
    assert features.names[-1] == PRICE_BAND
    assert features.price_edges is not None and len(features.price_edges) == 2  # vocab medians 2, 5, 9
    codes = features.encode(PRODUCTS, np.array([10, 20, 30, 40, 50, 70]), RECEIPTS)[:, -1]
    assert codes.tolist() == [1, 2, 3, MISSING, 2, MISSING]  # 40: null price only, 70: no receipts
    assert features.cardinalities[-1] == len(features.price_edges) + 2
    shuffled = RECEIPTS.take(np.random.default_rng(0).permutation(RECEIPTS.num_rows))
    assert _fit(price_bands=3) == ProductFeatures.fit(
        PRODUCTS, VOCAB.product_ids, ["department", "size"], shuffled, 3
    )  # exact medians: row order does not matter


def test_no_price_band_without_prices() -> None:
    for receipts in (None, RECEIPTS.drop_columns(["price"])):
        features = ProductFeatures.fit(PRODUCTS, VOCAB.product_ids, ["department"], receipts, price_bands=4)
        assert features.price_edges is None and features.names == ["department"]
        assert features.encode(PRODUCTS, np.array([10]), receipts).shape == (1, 1)


def test_mappings_survive_a_weights_only_round_trip() -> None:
    features = _fit(price_bands=3)
    buffer = io.BytesIO()
    torch.save({"features": features.to_dict()}, buffer)
    buffer.seek(0)
    restored = ProductFeatures.from_dict(torch.load(buffer, weights_only=True)["features"])
    assert restored == features
    ids = np.array([10, 20, 30, 40, 50, 60, 70])
    assert np.array_equal(restored.encode(PRODUCTS, ids, RECEIPTS), features.encode(PRODUCTS, ids, RECEIPTS))


@pytest.mark.parametrize(
    ("table", "columns", "message"),
    [
        (PRODUCTS.drop_columns(["product_id"]), ["department"], "no 'product_id' column"),
        (PRODUCTS, ["department", "brand"], r"no column\(s\) \['brand'\]"),
        (pa.concat_tables([PRODUCTS, PRODUCTS.slice(0, 1)]), ["department"], "must be unique"),
    ],
)
def test_bad_products_tables_are_refused(table: pa.Table, columns: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProductFeatures.fit(table, VOCAB.product_ids, columns)


def test_encoding_needs_the_fitted_columns() -> None:
    with pytest.raises(ValueError, match=r"no column\(s\) \['size'\]"):
        _fit().encode(PRODUCTS.drop_columns(["size"]), np.array([10]))


def test_datamodule_gives_codes_aligned_with_its_vocabulary() -> None:
    config = SyntheticConfig(num_shoppers=300, num_products=120, seed=5)
    catalogue = products(config)
    datamodule = ReceiptsDataModule(
        lambda: generate_table(config),
        cutoff="2017-12-01",
        timezone="UTC",
        products=lambda: catalogue,
        product_features=["department", "category"],
        price_bands=4,
    )
    datamodule.setup()
    result = datamodule.item_features()
    assert result is not None
    features, codes = result
    vocab = datamodule.vocab
    assert features.names == ["department", "category", PRICE_BAND]
    assert codes.shape == (vocab.size, 3)
    assert (codes[:NUM_RESERVED] == MISSING).all() and (codes[NUM_RESERVED:] > MISSING).all()
    assert (codes < np.array(features.cardinalities)).all()
    # decoding the category codes gives back each vocabulary product's category
    rows = np.searchsorted(catalogue.column("product_id").to_numpy(), vocab.product_ids)
    categories = np.array(features.values["category"])[codes[NUM_RESERVED:, 1] - 1]
    assert categories.tolist() == catalogue.column("category").to_numpy()[rows].tolist()

    no_products = ReceiptsDataModule(lambda: generate_table(config), cutoff="2017-12-01", timezone="UTC")
    no_products.setup()
    assert no_products.item_features() is None
