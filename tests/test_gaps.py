"""Basket-aware inputs: purchase gaps from receipts, their buckets, every model built with ``time_gaps``
(causal, padding-invariant, gap-sensitive, ONNX parity), training through the real configs, and the
bundle served with timestamps."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from fastapi.testclient import TestClient
from torch import Tensor, nn

from export import index as indexes
from export.export import export_bundle
from export.onnx import PARITY_TOLERANCE, export_encoder, parity
from recsys.bundle import GAPS_KEY, GAPS_NAME, MANIFEST_FILE, BundleError, read_bundle
from recsys.data.schema import BASKET, PRODUCT, SHOPPER, TIMESTAMP
from recsys.data.sequences import FIRST_PURCHASE, build_sequences, product_histories, purchase_gaps
from recsys.data.split import parse_cutoff
from recsys.data.synthetic import BLOCK_SHOPPERS, generate_table
from recsys.data.vocabulary import PAD, Vocabulary
from recsys.evaluation import baselines
from recsys.evaluation.protocol import evaluate, evaluated_histories, prepare
from recsys.inputs import Histories
from recsys.models.bert4rec import BERT4RecConfig
from recsys.models.gaps import FIRST, LOG_START, NUM_BUCKETS, PADDING, SAME_BASKET, gap_buckets
from recsys.models.gru4rec import GRU4RecConfig
from recsys.models.sasrec import SASRecConfig
from recsys.models.two_tower import TwoTowerConfig
from recsys.rules import Rules
from serving.app import create_app
from serving.recommender import Recommender
from tests.contract import (
    Run,
    check_causal,
    check_finite_with_heavy_padding,
    check_prefix_states,
    network_ranking,
    random_items,
    small_run,
    train_run,
    training_losses,
)
from training import checkpoint as checkpoints
from training.datamodule import WindowBatches
from training.module import load_module, module_from_checkpoint, recommend

DAY = 86_400_000_000  # microseconds


# --- gaps from receipts ----------------------------------------------------------------------------------


def test_purchase_gaps_by_hand() -> None:
    # shopper A: a basket of two on day 0, one item on day 1.5, a basket of two on day 8.5; B: one item;
    # C: no rows (an empty history between two others)
    times = np.array([0, 0, 1.5, 8.5, 8.5, 3.0]) * DAY
    offsets = np.array([0, 5, 6, 6])
    gaps = purchase_gaps(times.astype(np.int64), offsets, DAY)
    assert gaps.dtype == np.float32
    assert gaps.tolist() == [FIRST_PURCHASE, 0.0, 1.5, 7.0, 0.0, FIRST_PURCHASE]
    assert purchase_gaps(np.zeros(0, np.int64), np.array([0, 0]), DAY).shape == (0,)


def test_sequences_carry_gaps_aligned_with_items() -> None:
    t0 = 1_500_000_000_000_000
    receipts = pa.table(
        {
            SHOPPER: pa.array([1, 1, 1, 2, 2], pa.int64()),
            BASKET: pa.array([10, 10, 11, 12, 13], pa.int64()),
            PRODUCT: pa.array([5, 6, 5, 7, 99], pa.int64()),  # 99: outside the vocabulary, dropped
            TIMESTAMP: pa.array([t0, t0, t0 + 2 * DAY, t0, t0 + DAY], pa.timestamp("us", tz="UTC")),
        }
    )
    vocab = Vocabulary(np.array([5, 6, 7]), np.array([2, 1, 1]))
    sequences = build_sequences(receipts, vocab)
    histories = Histories.from_sequences(sequences)
    items, gaps = histories.model_inputs(4)  # as wide as the longest history: 3
    assert items.tolist() == [[2, 3, 2], [PAD, PAD, 4]]
    # gaps of the known rows only: shopper 2's unknown product leaves no trace
    assert gaps.tolist() == [[FIRST_PURCHASE, 0.0, 2.0], [0.0, 0.0, FIRST_PURCHASE]]
    assert histories.model_inputs(2)[1].tolist() == [[0.0, 2.0], [0.0, FIRST_PURCHASE]]
    # the same shoppers as serving receives them: product ids and seconds, unknown products counted
    seconds = [[t0 / 1e6, t0 / 1e6, (t0 + 2 * DAY) / 1e6], [t0 / 1e6, (t0 + DAY) / 1e6]]
    requests = Histories.from_requests(vocab, [[5, 6, 5], [7, 99]], seconds)
    assert [a.tolist() for a in requests.model_inputs(4)] == [items.tolist(), gaps.tolist()]
    assert requests.unknown.tolist() == [0, 1] and histories.unknown.tolist() == [0, 0]


def test_gap_buckets() -> None:
    gaps = torch.tensor([[0.0, FIRST_PURCHASE, 0.0, 0.1, 0.25, 1.0, 7.0, 30.0, 5000.0]])
    items = torch.tensor([[PAD, 5, 5, 5, 5, 5, 5, 5, 5]])
    got = gap_buckets(items, gaps)[0].tolist()
    # floor(log2(1 + 4 * days)): 0.1 d -> 0, 0.25 d -> 1, 1 d -> 2, 7 d -> 4, 30 d -> 6, 5000 d -> capped
    assert got == [PADDING, FIRST, SAME_BASKET, LOG_START, LOG_START + 1, LOG_START + 2, LOG_START + 4,
                   LOG_START + 6, NUM_BUCKETS - 1]  # fmt: skip


def test_window_gaps_stay_with_positions_when_baskets_are_shuffled() -> None:
    t0 = 1_500_000_000_000_000
    n = 12  # one shopper: baskets of 5, 4 and 3 products, 3 and 10 days apart
    times = np.repeat([t0, t0 + 3 * DAY, t0 + 13 * DAY], [5, 4, 3])
    receipts = pa.table(
        {
            SHOPPER: pa.array(np.ones(n, np.int64)),
            BASKET: pa.array(np.repeat([1, 2, 3], [5, 4, 3]).astype(np.int64)),
            PRODUCT: pa.array(np.arange(n, dtype=np.int64) + 100),
            TIMESTAMP: pa.array(times, pa.timestamp("us", tz="UTC")),
        }
    )
    sequences = build_sequences(receipts, Vocabulary.build(receipts))
    collate = WindowBatches(sequences, max_len=n, shuffle_baskets=True, seed=0)
    tokens, gaps = collate([(0, n)])
    expected = [0.0, FIRST_PURCHASE, 0, 0, 0, 0, 3.0, 0, 0, 0, 10.0, 0, 0]  # left padding, then baskets
    assert gaps[0].tolist() == expected
    baskets = [tokens[0, 1:6], tokens[0, 6:10], tokens[0, 10:]]
    originals = [sequences.items[:5], sequences.items[5:9], sequences.items[9:]]
    for shuffled, original in zip(baskets, originals, strict=True):
        assert sorted(shuffled.tolist()) == sorted(original.tolist())  # the same products, in the basket


# --- models built with time_gaps -------------------------------------------------------------------------

V, L = 40, 8
CONFIGS = {
    "sasrec": SASRecConfig(num_items=V, max_len=L, dim=16, num_layers=2, num_heads=2, time_gaps=True),
    "gru4rec": GRU4RecConfig(num_items=V, max_len=L, dim=16, num_layers=2, time_gaps=True),
    "two_tower": TwoTowerConfig(num_items=V, max_len=L, dim=16, time_gaps=True),
    "bert4rec": BERT4RecConfig(num_items=V, max_len=L, dim=16, num_layers=2, num_heads=2, time_gaps=True),
}


def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return CONFIGS[name].build().eval()


def _inputs(batch: int, length: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random products and gaps: a first purchase, then half same-basket rows and half 0-20 days."""
    items = random_items(V, batch, length, seed)
    g = torch.Generator().manual_seed(seed + 1)
    gaps = torch.where(
        torch.rand(batch, length, generator=g) < 0.5, 0.0, 20 * torch.rand(batch, length, generator=g)
    )
    gaps[:, 0] = FIRST_PURCHASE
    return items, gaps


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_without_gaps_the_model_says_what_it_needs(name: str) -> None:
    items, _ = _inputs(2, 4)
    with pytest.raises(ValueError, match="time_gaps=True: pass gaps"):
        _model(name).encode(items)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gaps_change_the_shopper_and_left_padding_does_not(name: str) -> None:
    model = _model(name)
    items, gaps = _inputs(3, 6)
    with torch.no_grad():
        base = model.encode(items, gaps)
        later = gaps.clone()
        later[:, 1:] = torch.where(later[:, 1:] > 0, later[:, 1:] + 30.0, 30.0)  # every row a month apart
        assert (model.encode(items, later) - base).abs().max() > 1e-3
        padded = torch.cat([torch.full((3, 2), PAD), items], dim=1)
        padded_gaps = torch.cat([torch.full((3, 2), 123.0), gaps], dim=1)  # padding's gaps are never read
        torch.testing.assert_close(model.encode(padded, padded_gaps), base, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["sasrec", "gru4rec", "two_tower"])
def test_causal_models_stay_causal_with_gaps(name: str) -> None:
    model = _model(name)
    items, gaps = _inputs(2, 6)
    if name == "sasrec":  # positions: a prefix is not a shorter history
        check_causal(model, items, V, gaps=gaps)
    else:
        check_prefix_states(model, items, V, gaps=gaps)
    check_finite_with_heavy_padding(model.train(), items, gaps=gaps)


def test_bert4rec_never_reads_a_masks_gap() -> None:
    model = _model("bert4rec")
    items, gaps = _inputs(2, 6)
    masked = items.clone()
    masked[:, 3] = model.mask_token
    other = gaps.clone()
    other[:, 3] = 99.0
    with torch.no_grad():
        torch.testing.assert_close(model(masked, gaps), model(masked, other), rtol=0, atol=0)
        assert not torch.allclose(model(items, gaps), model(items, other))  # an item's gap is read


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_takes_gaps_with_parity(name: str) -> None:
    model = _model(name)
    onnx_bytes = export_encoder(model)
    assert parity(model, onnx_bytes, (1, 7, 64), (1, 3, L)) <= PARITY_TOLERANCE


# --- trained through the real configs, exported, served --------------------------------------------------

SMALL = small_run("sasrec", 1e-2, "model.net.time_gaps=true", "model.net.num_layers=1")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return train_run(tmp_path_factory.mktemp("gaps_run"), SMALL)


@pytest.fixture(scope="module")
def held_out(run: Run) -> Any:
    """The run's synthetic world, one block of shoppers larger: the second block was never trained on."""
    config = hydra.utils.instantiate(run.cfg.data.receipts.config)
    world = generate_table(dataclasses.replace(config, num_shoppers=2 * BLOCK_SHOPPERS))
    ids = world.column(SHOPPER)
    unseen = world.filter(pc.greater_equal(ids, pc.min(ids).as_py() + BLOCK_SHOPPERS))
    return prepare(unseen, parse_cutoff(run.cfg.data.cutoff, run.cfg.data.timezone), min_baskets=1)


def test_basket_aware_training_learns_and_beats_popularity(run: Run, held_out: Any) -> None:
    losses = training_losses(run)
    assert len(losses) >= 4 and np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.5, losses
    module = load_module(str(run.metrics["best_checkpoint"]))
    assert module.hparams["net"]["time_gaps"] and module.model.gap_emb is not None
    shoppers = held_out.targets.shopper_ids
    model = evaluate(network_ranking(module, held_out.train, shoppers, 10), held_out, ks=(10,))
    popular = evaluate(
        module.vocab.decode(baselines.popularity(module.vocab, len(shoppers), 10)), held_out, (10,)
    )
    assert model["recall@10"] > 1.5 * popular["recall@10"], (model, popular)


@pytest.fixture(scope="module")
def bundle(run: Run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(
        run.metrics["best_checkpoint"], tmp_path_factory.mktemp("gaps") / "bundle", indexes.flat
    )


def test_served_with_timestamps_equals_torch(run: Run, held_out: Any, bundle: Path, tmp_path: Path) -> None:
    assert read_bundle(bundle).manifest[GAPS_KEY] == GAPS_NAME
    recommender = Recommender.load(bundle)
    assert recommender.needs_timestamps
    checkpoint = run.metrics["best_checkpoint"]
    state = checkpoints.read(checkpoint)
    module, scorer = module_from_checkpoint(state), checkpoints.scorer(state)
    assert scorer is not None
    shoppers = held_out.targets.shopper_ids
    products, seconds = product_histories(held_out.train, shoppers)

    # repeat-aware: serving (gaps from request timestamps) = training's ranking (gaps from receipts)
    served = recommender.recommend_batch(products, Rules(k=10), timestamps=seconds)
    expected = recommend(module, evaluated_histories(held_out, module.vocab), Rules(k=10), scorer)
    assert all(r.repeat_aware for r in served)
    assert [r.product_ids for r in served] == [row[row >= 0].tolist() for row in expected]

    # the network alone: a bundle of the same weights without the scorer
    state["caddie"] = {**state["caddie"], "expects_scorer": False}
    del state["caddie"][checkpoints.SCORER_KEY]
    torch.save(state, tmp_path / "plain.ckpt")
    plain = Recommender.load(export_bundle(tmp_path / "plain.ckpt", tmp_path / "plain", indexes.flat))
    served = plain.recommend_batch(products, Rules(k=10), timestamps=seconds)
    assert [r.product_ids for r in served] == network_ranking(module, held_out.train, shoppers, 10).tolist()


def test_serving_refuses_a_history_without_timestamps(bundle: Path) -> None:
    recommender = Recommender.load(bundle)
    product = int(recommender.items.column("product_id")[0].as_py())
    with pytest.raises(ValueError, match="basket-aware: history 0 needs timestamps"):
        recommender.recommend([product, product])
    with pytest.raises(ValueError, match="oldest first"):
        recommender.recommend([product, product], timestamps=[2.0, 1.0])
    assert recommender.recommend([], Rules(k=3)).fallback  # nothing to encode: the popularity fallback
    client = TestClient(create_app(bundle))
    answer = client.post("/recommend", json={"history": [product], "k": 3})
    assert answer.status_code == 422 and "needs timestamps" in answer.json()["detail"]
    answer = client.post("/recommend", json={"history": [product], "k": 3, "timestamps": [1.5e9]})
    assert answer.status_code == 200 and len(answer.json()["product_ids"]) == 3


def test_reader_refuses_an_unknown_gap_input(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    (copy / MANIFEST_FILE).write_text(json.dumps({**manifest, GAPS_KEY: "minutes"}))
    with pytest.raises(BundleError, match="gap input 'minutes'"):
        read_bundle(copy)
    del manifest[GAPS_KEY]  # a manifest that forgets the model's second input
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="has inputs"):
        Recommender.load(copy)
