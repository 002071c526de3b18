"""The Lightning job end to end on synthetic receipts: it learns, checkpoints load with weights_only."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from recsys.data.schema import PRODUCT, SHOPPER, TIMESTAMP
from recsys.data.split import parse_cutoff
from recsys.data.synthetic import SyntheticConfig, generate_table
from recsys.data.vocabulary import to_indices
from recsys.evaluation import baselines
from recsys.evaluation.protocol import evaluate, prepare
from tests.contract import exact_loss_drop, network_ranking
from training import checkpoint as checkpoints
from training.datamodule import ReceiptsDataModule
from training.module import NextItemModule, load_module
from training.train import CUTOFF_CHECKPOINT, train

SMALL = ["data.receipts.config.num_shoppers=600", "data.receipts.config.num_products=300", "logger=csv"]


@pytest.fixture(scope="module")
def world() -> pa.Table:
    """Two blocks of synthetic shoppers: the first trains, the second is never seen in training."""
    return generate_table(SyntheticConfig(num_shoppers=2048, num_products=400, seed=3))


def test_sasrec_beats_popularity_on_held_out_shoppers(world: pa.Table) -> None:
    shoppers = world.column(SHOPPER)
    boundary = pc.min(shoppers).as_py() + 1024
    seen = world.filter(pc.less(shoppers, boundary))
    unseen = world.filter(pc.greater_equal(shoppers, boundary))
    pl.seed_everything(0)
    datamodule = ReceiptsDataModule(
        lambda: seen, cutoff="2017-12-01", timezone="UTC", val_days=28, batch_size=64
    )
    datamodule.setup("fit")
    net = {"name": "sasrec", "num_items": datamodule.vocab.size, "dim": 32,
           "num_layers": 1, "num_heads": 1, "dropout": 0.1, "max_len": 50}  # fmt: skip
    module = NextItemModule(net, datamodule.vocab.to_dict(), lr=3e-3, warmup_steps=20)
    trainer = pl.Trainer(max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=datamodule)

    # shoppers the model never saw: their pre-cutoff history in, their next basket out
    data = prepare(unseen, parse_cutoff("2017-12-01", "UTC"), min_baskets=1)
    shoppers = data.targets.shopper_ids
    model = evaluate(network_ranking(module.eval(), data.train, shoppers, 10), data, ks=(10,))
    popular = evaluate(
        datamodule.vocab.decode(baselines.popularity(datamodule.vocab, len(shoppers), 10)), data, (10,)
    )
    assert model["recall@10"] > 2 * popular["recall@10"], (model, popular)
    assert model["ndcg@10"] > 2 * popular["ndcg@10"]


def test_train_job_writes_a_self_describing_checkpoint(
    compose_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = compose_config("train", ["experiment=synthetic_sasrec", "trainer.max_epochs=2", *SMALL])
    score = train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert score == pytest.approx(metrics["val/ndcg@10"])
    assert 0 < metrics["test/recall@10"] <= 1
    assert {"test/recall@10_repeat", "test/recall@10_explore", "test/hr@10", "test/mrr@10"} <= set(metrics)
    # the ranker, fitted on internal cutoffs before validation and kept in the checkpoint, is tested
    # too; on these shoppers with planted repeat habits it ranks their staples far better than the
    # network alone
    assert metrics["test/repeat_aware/recall@10"] > 1.2 * metrics["test/recall@10"]
    # and better than the logistic scorer the ranker replaced did on this very run (docs/results.md)
    assert metrics["test/repeat_aware/recall@10"] > 0.76 and metrics["test/repeat_aware/ndcg@10"] > 0.78
    # the fit reports its lists on validation as ordered and by probability alone (the size factor's worth)
    for name in ("recall@10", "ndcg@10"):
        ordered, by_probability = metrics[f"ranker/val_{name}"], metrics[f"ranker/val_{name}_by_probability"]
        assert 0 < ordered <= 1 and 0 < by_probability <= 1

    path = tmp_path / "checkpoints" / "best.ckpt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # plain values only
    hparams = checkpoint["hyper_parameters"]
    assert hparams["net"]["name"] == "sasrec" and "vocab" not in hparams
    assert len(checkpoint["caddie"]["vocabulary"]["product_ids"]) + 2 == hparams["net"]["num_items"]
    assert hparams["data"]["cutoff"].startswith("2017-12-01")
    assert hparams["net"]["max_len"] == cfg.data.max_len  # injected from the data, its one source

    state = checkpoints.read(path)
    assert checkpoints.scorer(state) is not None and checkpoints.expects_scorer(state)
    assert (
        checkpoints.products(state).column("product_id").to_pylist()
        == state["caddie"]["vocabulary"]["product_ids"]
    )
    module = load_module(str(path))
    history = torch.tensor([[0, 0, 5, 6, 7]])
    reloaded = load_module(str(path))
    assert torch.equal(module.top_k(history, 10)[0], reloaded.top_k(history, 10)[0])
    # the logged hyperparameters stay small: the vocabulary is a checkpoint entry, not a hyperparameter
    (hparams_file,) = (tmp_path / "csv").glob("version_*/hparams.yaml")
    assert hparams_file.stat().st_size < 10_000 and "product_ids" not in hparams_file.read_text()


def test_the_cutoff_network_never_trains_on_a_later_purchase(world: pa.Table) -> None:
    """``ReceiptsDataModule.before``: the same vocabulary, no validation, and training windows of the
    receipts before the moment alone, so a product first bought after it is in none of them."""
    moment = parse_cutoff("2017-10-01", "UTC")
    later = world.filter(pc.greater_equal(world.column(TIMESTAMP), moment))
    planted = later.slice(0, 1).to_pylist()[0] | {PRODUCT: 10**9}
    receipts = pa.concat_tables([world, pa.Table.from_pylist([planted, planted], schema=world.schema)])
    datamodule = ReceiptsDataModule(lambda: receipts, cutoff="2017-12-01", timezone="UTC", min_baskets=1)
    earlier = datamodule.before(moment)
    assert earlier.vocab is datamodule.vocab and earlier.val_data is None
    row = datamodule.vocab.rows(np.array([10**9]))[0]
    assert row >= 0  # in the vocabulary, bought before the validation cutoff
    assert to_indices(row) in np.concatenate(
        [datamodule.train_sequences.items[a:b] for a, b in datamodule.windows]
    )
    assert to_indices(row) not in np.concatenate(
        [earlier.train_sequences.items[a:b] for a, b in earlier.windows]
    )
    assert datamodule.val_data is not None and len(datamodule.windows) > len(earlier.windows)
    with pytest.raises(ValueError, match="no training receipts before"):
        datamodule.before(parse_cutoff("2000-01-01", "UTC"))


def test_the_ranker_reads_its_cutoff_network_at_the_internal_cutoffs(
    compose_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = compose_config(
        "train", ["experiment=synthetic_sasrec", "trainer.max_epochs=1", "ranker.cutoff_network=true", *SMALL]
    )
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["cutoff_network/fit_seconds"] > 0 and metrics["test/repeat_aware/recall@10"] > 0.5
    best = load_module(tmp_path / "checkpoints" / "best.ckpt")
    cutoff = load_module(tmp_path / "checkpoints" / CUTOFF_CHECKPOINT)
    np.testing.assert_array_equal(cutoff.vocab.product_ids, best.vocab.product_ids)
    assert cutoff.hparams["net"] == best.hparams["net"]
    assert not torch.equal(cutoff.model.item_embeddings(), best.model.item_embeddings())


def test_unknown_loss_is_refused() -> None:
    net = {"name": "sasrec", "num_items": 10}
    vocab = {"product_ids": list(range(8)), "popularity": [1] * 8}
    with pytest.raises(ValueError, match="unknown loss 'bpr'"):
        NextItemModule(net, vocab, loss="bpr")


def test_sampled_softmax_trains(world: pa.Table) -> None:
    """The CPU demo's loss lowers the exact softmax loss too (it optimises the same objective)."""
    datamodule = ReceiptsDataModule(
        lambda: world, cutoff="2017-12-01", timezone="UTC", val_days=0, batch_size=64
    )
    datamodule.setup("fit")
    net = {"name": "sasrec", "num_items": datamodule.vocab.size, "dim": 32}
    module = NextItemModule(
        net, datamodule.vocab.to_dict(), loss="sampled_softmax", num_negatives=64, lr=3e-3
    )
    batch = next(iter(datamodule.train_dataloader()))
    before, after = exact_loss_drop(module, batch, steps=30, lr=3e-3)
    assert after < before - 0.5
    assert np.isfinite(before)


def test_horizon_targets_cover_every_basket_within_the_horizon(world: pa.Table) -> None:
    def targets(horizon_days: float | None) -> list[np.ndarray]:
        datamodule = ReceiptsDataModule(
            lambda: world, cutoff="2017-12-01", timezone="UTC", val_days=0, horizon_days=horizon_days
        )
        datamodule.setup()
        assert datamodule.test_data is not None
        assert datamodule.describe()["horizon_days"] == horizon_days
        return datamodule.test_data.targets.items

    first, fortnight = targets(None), targets(14)
    assert len(first) == len(fortnight)
    assert all(set(a) <= set(b) for a, b in zip(first, fortnight, strict=True))
    assert sum(map(len, fortnight)) > 1.3 * sum(map(len, first))


def test_a_sweep_runs_every_job_and_each_reports_its_metric(tmp_path: Path) -> None:
    import subprocess
    import sys

    command = [
        sys.executable, "-m", "training.train", "-m", "experiment=synthetic_sasrec", "model.lr=1e-3,3e-3",
        "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "test=false", *SMALL,
        f"hydra.sweep.dir={tmp_path}",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    results = [json.loads((tmp_path / str(job) / "metrics.json").read_text()) for job in (0, 1)]
    assert all(0 < r["val/ndcg@10"] <= 1 for r in results)
    assert (tmp_path / "multirun.yaml").exists()
