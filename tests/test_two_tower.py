"""Two-tower model: shapes, padding, causal prefixes, training via the real configs, checkpoints, ONNX and
serving from a bundle, and cold-start products embedded from their features alone."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import pytorch_lightning as pl
import torch

from export import index as indexes
from export.export import export_bundle
from export.onnx import PARITY_TOLERANCE, export_encoder, parity
from recsys.bundle import read_bundle
from recsys.data.features import ProductFeatures
from recsys.data.schema import PRODUCT, SHOPPER
from recsys.data.sequences import build_sequences
from recsys.data.split import parse_cutoff
from recsys.data.synthetic import SyntheticConfig, generate_table, products
from recsys.data.vocabulary import NUM_RESERVED, PAD
from recsys.evaluation import baselines
from recsys.evaluation.protocol import EvaluationData, evaluate, prepare
from recsys.inputs import Histories
from recsys.models.two_tower import TwoTower, TwoTowerConfig
from recsys.rules import Rules
from serving.recommender import Recommender
from tests.contract import (
    Run,
    check_finite_with_heavy_padding,
    check_prefix_states,
    check_shapes,
    network_ranking,
    random_items,
    small_run,
    stage_metrics,
    train_run,
    training_losses,
)
from training.datamodule import ReceiptsDataModule
from training.module import NextItemModule, load_module, save_module

CFG = TwoTowerConfig(num_items=50, max_len=8, dim=16, feature_cardinalities=[4, 6], num_decays=2)


def _model(seed: int = 0, **overrides: float) -> TwoTower:
    torch.manual_seed(seed)
    model = dataclasses.replace(CFG, **overrides).build()
    codes = torch.stack([torch.arange(CFG.num_items) % 4, torch.arange(CFG.num_items) % 6], dim=1)  # [V, 2]
    codes[:NUM_RESERVED] = 0
    model.set_item_codes(codes)
    return model


_items = partial(random_items, CFG.num_items)  # (batch, length, seed=0) -> [batch, length] products


def test_shapes_and_padding_row() -> None:
    model = _model().eval()
    check_shapes(model, CFG.num_items, CFG.dim, CFG.max_len)
    assert model.embed_features(model.item_codes[:5]).shape == (5, CFG.dim)


def test_extra_left_padding_changes_nothing() -> None:
    model = _model().eval()
    x = _items(4, 5)
    x[1, :2] = PAD
    padded = torch.cat([torch.full((4, 3), PAD), x], dim=1)  # [4, 8]
    with torch.no_grad():
        torch.testing.assert_close(model.encode(padded), model.encode(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(model(padded)[:, 3:], model(x), rtol=0, atol=1e-6)


def test_state_t_is_the_encoding_of_the_prefix_up_to_t() -> None:
    x = _items(3, CFG.max_len)
    x[0, :2] = PAD
    check_prefix_states(_model().eval(), x, CFG.num_items)


def test_repeats_and_recency_weigh_in() -> None:
    model = _model().eval()
    a, b = 7, 9
    with torch.no_grad():
        direction = model.item_embeddings()[a] - model.item_embeddings()[b]  # [d]
        scores = model.encode(torch.tensor([[0, a, b], [a, a, b], [0, b, a]])) @ direction  # [3]
    # one more purchase of a moves the shopper towards a; so does buying a last rather than first
    assert scores[1] > scores[0] and scores[2] > scores[0]


@pytest.mark.parametrize("train_mode", [True, False])
def test_finite_outputs_and_gradients_with_all_padding_rows(train_mode: bool) -> None:
    # in eval mode no id is dropped, so only the unknown-id vector gets no gradient
    skip = frozenset() if train_mode else frozenset({"unknown_id_emb"})
    check_finite_with_heavy_padding(_model().train(train_mode), _items(3, CFG.max_len), skip)


def test_id_dropout_replaces_ids_by_the_unknown_vector_in_training_only() -> None:
    model = _model(id_dropout=0.5)
    model.item_mlp.dropout.p = 0.0  # isolate id dropout from the item MLP's dropout
    with torch.no_grad():
        features_only = model.eval().embed_features(model.item_codes)[NUM_RESERVED:]  # [N, d]
        with_ids = model.item_embeddings()[NUM_RESERVED:]
        assert torch.equal(model.item_embeddings()[NUM_RESERVED:], with_ids)  # eval: deterministic
        training = model.train().item_embeddings()[NUM_RESERVED:]
    as_unknown = torch.isclose(training, features_only, rtol=0, atol=1e-6).all(dim=1)  # [N]
    as_known = torch.isclose(training, with_ids, rtol=0, atol=1e-6).all(dim=1)
    assert torch.equal(as_unknown, ~as_known)  # every item is embedded one way or the other
    assert 0.3 < as_unknown.float().mean() < 0.7  # about half of the ids were dropped


def test_bad_codes_and_configs_are_refused() -> None:
    model = _model()
    with pytest.raises(ValueError, match="shape"):
        model.set_item_codes(torch.zeros(CFG.num_items, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="out of range"):
        model.set_item_codes(torch.full((CFG.num_items, 2), 4))
    features = ProductFeatures({"department": ["a", "b"]}).to_dict()
    with pytest.raises(ValueError, match=r"do not match the feature mappings' \[3\]"):
        TwoTowerConfig(num_items=10, feature_cardinalities=[4], features=features)


def test_onnx_export_matches_torch() -> None:
    model = _model().eval()
    onnx_bytes = export_encoder(model)
    assert parity(model, onnx_bytes, (1, 7, 64), (1, 3, CFG.max_len)) <= PARITY_TOLERANCE


# --- trained through the real Hydra configs ------------------------------------------------------------

SMALL = small_run("two_tower", 3e-3)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return train_run(tmp_path_factory.mktemp("two_tower_run"), SMALL)


def test_train_job_learns_and_its_checkpoint_reproduces_the_test_scores(run: Run) -> None:
    metrics = run.metrics
    losses = training_losses(run)
    assert len(losses) >= 4 and np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.5, losses

    checkpoint = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)
    net = checkpoint["hyper_parameters"]["net"]
    assert net["name"] == "two_tower"
    mappings = ProductFeatures.from_dict(net["features"])
    assert mappings.names == ["department", "category", "brand", "price_band"]
    assert net["feature_cardinalities"] == mappings.cardinalities

    # the codes and weights in the checkpoint alone give the test metrics the job reported
    datamodule: ReceiptsDataModule = hydra.utils.instantiate(run.cfg.data)
    datamodule.setup()
    features = datamodule.item_features()
    assert features is not None
    module = load_module(metrics["best_checkpoint"])
    assert torch.equal(module.model.item_codes, torch.from_numpy(features[1]))
    recomputed = stage_metrics(module, datamodule)
    assert recomputed["recall@10"] == pytest.approx(metrics["test/recall@10"], abs=1e-6)
    assert recomputed["ndcg@10"] > 0.1


def test_bundle_from_the_checkpoint_serves_the_torch_rankings(run: Run, tmp_path: Path) -> None:
    metrics = run.metrics
    path = export_bundle(metrics["best_checkpoint"], tmp_path / "bundle", indexes.flat)
    assert read_bundle(path).manifest["parity"]["max_abs_diff"] <= PARITY_TOLERANCE
    recommender = Recommender.load(path)
    module = load_module(metrics["best_checkpoint"])
    vocab = module.vocab
    rng = np.random.default_rng(0)
    for length in (1, 4, 12):
        history = vocab.product_ids[rng.integers(0, vocab.num_products, length)]
        result = recommender.recommend(history.tolist(), Rules(k=10))
        expected = vocab.product_ids_of(
            module.top_k(torch.from_numpy(vocab.encode(history))[None], 10)[0].numpy()
        )[0]
        assert result.product_ids == expected.tolist()
        assert not result.fallback


# --- held-out shoppers and cold-start products -----------------------------------------------------------

WORLD = SyntheticConfig(num_shoppers=2048, num_products=400, seed=3)
CATEGORIES_HELD_OUT = 6


@dataclass(frozen=True)
class ColdStart:
    module: NextItemModule
    datamodule: ReceiptsDataModule
    catalogue: pa.Table
    held_out: np.ndarray  # product ids removed from the training receipts
    unseen: pa.Table  # receipts of shoppers never seen in training (they do buy the held-out products)


@pytest.fixture(scope="module")
def cold() -> ColdStart:
    """Trained on the first block of shoppers, without one mid-popular product in each of 6 categories."""
    world, catalogue = generate_table(WORLD), products(WORLD)
    sold = world.group_by(PRODUCT).aggregate([([], "count_all")])
    counts = dict(zip(sold.column(PRODUCT).to_pylist(), sold.column("count_all").to_pylist(), strict=True))
    categories = catalogue.column("category").to_numpy(zero_copy_only=False)
    ids = catalogue.column(PRODUCT).to_numpy()
    held_out = []
    for category in sorted(set(categories))[:CATEGORIES_HELD_OUT]:
        members = sorted(ids[categories == category], key=lambda p: -counts.get(p, 0))
        held_out.append(members[2])  # the third most bought: popular enough to have buyers among the unseen
    held_out = np.array(held_out)

    shoppers = world.column(SHOPPER)
    boundary = pc.min(shoppers).as_py() + 1024
    seen = world.filter(pc.less(shoppers, boundary))
    seen = seen.filter(pc.invert(pc.is_in(seen.column(PRODUCT), pa.array(held_out))))
    pl.seed_everything(0)
    datamodule = ReceiptsDataModule(
        lambda: seen,
        cutoff="2017-12-01",
        timezone="UTC",
        batch_size=64,
        products=lambda: catalogue,
        product_features=["department", "category", "brand"],
        price_bands=4,
    )
    datamodule.setup("fit")
    features = datamodule.item_features()
    assert features is not None
    mappings, codes = features
    net = {"name": "two_tower", "num_items": datamodule.vocab.size,
           "max_len": 50, "dim": 32, "feature_cardinalities": mappings.cardinalities,
           "features": mappings.to_dict()}  # fmt: skip
    module = NextItemModule(net, datamodule.vocab.to_dict(), lr=3e-3, warmup_steps=20)
    module.model.set_item_codes(torch.from_numpy(codes))
    trainer = pl.Trainer(max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=datamodule)
    unseen = world.filter(pc.greater_equal(shoppers, boundary))
    return ColdStart(module.eval(), datamodule, catalogue, held_out, unseen)


def _unseen_data(cold: ColdStart) -> EvaluationData:
    return prepare(cold.unseen, parse_cutoff("2017-12-01", "UTC"), min_baskets=1)


def test_beats_popularity_on_held_out_shoppers(cold: ColdStart) -> None:
    data = _unseen_data(cold)
    shoppers = data.targets.shopper_ids
    model = evaluate(network_ranking(cold.module, data.train, shoppers, 10), data, ks=(10,))
    vocab = cold.datamodule.vocab
    popular = evaluate(vocab.decode(baselines.popularity(vocab, len(shoppers), 10)), data, (10,))
    assert model["recall@10"] > 2 * popular["recall@10"], (model, popular)
    assert model["ndcg@10"] > 2 * popular["ndcg@10"]


def test_weights_only_checkpoint_gives_identical_scores(cold: ColdStart, tmp_path: Path) -> None:
    path = tmp_path / "two_tower.ckpt"
    save_module(cold.module, path)
    torch.manual_seed(1)  # a different init: only the loaded weights and codes can make the scores match
    loaded = load_module(str(path))
    histories = torch.from_numpy(cold.datamodule.histories("test").model_inputs(50)[0][:64])
    with torch.no_grad():
        expected = cold.module.model.encode(histories) @ cold.module.model.item_embeddings().T
        got = loaded.model.encode(histories) @ loaded.model.item_embeddings().T
    assert torch.equal(got, expected)
    assert torch.equal(loaded.model.item_codes, cold.module.model.item_codes)


def test_cold_start_products_land_among_their_category(cold: ColdStart) -> None:
    model, vocab = cold.module.model, cold.datamodule.vocab
    assert not np.isin(cold.held_out, vocab.product_ids).any()  # truly unseen in training
    # the checkpoint's own mappings encode the new products; prices from their first sales
    mappings = ProductFeatures.from_dict(cold.module.hparams["net"]["features"])
    codes = torch.from_numpy(mappings.encode(cold.catalogue, cold.held_out, cold.unseen))
    # department and category are shared with training products; a brand may be the product's own (0)
    assert (codes[:, :2] > 0).all()
    category_of = dict(
        zip(
            cold.catalogue.column(PRODUCT).to_pylist(),
            cold.catalogue.column("category").to_pylist(),
            strict=True,
        )
    )
    vocab_categories = np.array([category_of[p] for p in vocab.product_ids])
    with torch.no_grad():
        new = torch.nn.functional.normalize(model.embed_features(codes), dim=1)  # [H, d]
        known = torch.nn.functional.normalize(model.item_embeddings()[NUM_RESERVED:], dim=1)  # [N, d]
        neighbours = (new @ known.T).topk(5, dim=1).indices.numpy()  # [H, 5]
    same = vocab_categories[neighbours] == np.array([category_of[p] for p in cold.held_out])[:, None]
    assert same.mean() >= 0.8, same

    # unseen shoppers whose most bought category is the new product's rank it above most products
    data = _unseen_data(cold)
    sequences = Histories.from_sequences(build_sequences(data.train, vocab).select(data.targets.shopper_ids))
    histories = torch.from_numpy(sequences.model_inputs(50)[0])
    owned = np.split(sequences.rows, sequences.offsets[1:-1])
    favourite = np.array([_most_common(vocab_categories[rows]) for rows in owned])
    with torch.no_grad():
        shoppers = model.encode(histories)  # [S, d]
        known_scores = shoppers @ model.item_embeddings()[NUM_RESERVED:].T  # [S, N]
        new_scores = shoppers @ model.embed_features(codes).T  # [S, H]
    margins = []
    for h, product in enumerate(cold.held_out):
        fans = favourite == category_of[product]
        assert fans.sum() >= 5, product
        # share of the catalogue each shopper scores below the new product: 0.5 for a random product
        above = (known_scores < new_scores[:, h : h + 1]).float().mean(dim=1)  # [S]
        assert above[fans].mean() > 0.9, (product, above[fans].mean())
        margins.append(float(above[fans].mean() - above[~fans].mean()))
    # the category's shoppers rank it higher than the others do (who may still like a popular product)
    assert min(margins) > 0 and np.mean(margins) > 0.15, margins


def _most_common(values: np.ndarray) -> str:
    names, counts = np.unique(values, return_counts=True)
    return str(names[np.argmax(counts)])
