"""Checkpoint -> bundle: ONNX parity, top-10 from the bundle = torch, index builders, the Hydra config."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import hydra
import numpy as np
import onnx
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, TensorDataset

from export import export as export_module
from export import index as indexes
from export.export import check_top_k, export_bundle, item_vectors, validation_data
from export.onnx import PARITY_TOLERANCE, ExportError, onnx_encoder, parity, random_gaps, random_histories
from recsys.bundle import (
    INPUT_NAME,
    MODEL_FILE,
    OUTPUT_NAME,
    BundleError,
    onnx_session,
    read_bundle,
    sha256_file,
)
from recsys.data.features import product_metadata
from recsys.data.schema import PRODUCT, TIMESTAMP
from recsys.data.sequences import product_histories
from recsys.data.split import parse_cutoff
from recsys.data.synthetic import PRODUCT_ID_OFFSET, SyntheticConfig, generate_table
from recsys.data.vocabulary import NUM_RESERVED, PAD, Vocabulary
from recsys.evaluation.metrics import EMPTY
from recsys.evaluation.protocol import EvaluationData, evaluate, new_product_targets, prepare
from recsys.rules import Rules
from serving.recommender import Recommender
from training.evaluate import _name as evaluate_name
from training.evaluate import bundle_protocol, bundle_rankings, refuse_later_training
from training.module import NextItemModule, load_module

NUM_PRODUCTS, MAX_LEN, DIM = 300, 8, 16
NET = {"name": "sasrec", "num_items": NUM_PRODUCTS + NUM_RESERVED,
       "max_len": MAX_LEN, "dim": DIM, "num_layers": 1, "num_heads": 2, "dropout": 0.1}  # fmt: skip
METRICS = {"val/ndcg@10": 0.125, "test/recall@10": 0.25}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Lightning checkpoint of a tiny SASRec after two steps, in a run dir with its metrics.json."""
    run = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    vocab = Vocabulary(
        product_ids=(rng.permutation(10_000)[:NUM_PRODUCTS] + 1).astype(np.int64),
        popularity=np.sort(rng.integers(1, 100, NUM_PRODUCTS))[::-1].astype(np.int64),
    )
    module = NextItemModule(
        NET, vocab.to_dict(), data={"cutoff": "2017-12-01", "max_len": MAX_LEN}, warmup_steps=1
    )
    # the training data's metadata for every other vocabulary product, shuffled, plus a product outside
    ids = np.random.default_rng(1).permutation(vocab.product_ids[::2])
    departments = [f"d{i}" for i in [*ids, 99_999]]
    module.products = product_metadata(
        pa.table({"product_id": [*ids.tolist(), 99_999], "department": departments}), vocab.product_ids
    )
    tokens = random_histories(rng, 64, MAX_LEN + 1, vocab.size)
    windows = TensorDataset(torch.from_numpy(tokens), torch.from_numpy(random_gaps(rng, tokens)))
    trainer = pl.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(windows, batch_size=32))
    path = run / "checkpoints" / "best.ckpt"
    trainer.save_checkpoint(path)
    (run / "metrics.json").write_text(json.dumps(METRICS))
    return path


@pytest.fixture(scope="module")
def module(checkpoint: Path) -> NextItemModule:
    return load_module(str(checkpoint))


@pytest.fixture(scope="module")
def bundle_path(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(checkpoint, tmp_path_factory.mktemp("out") / "bundle", indexes.flat)


def test_onnx_matches_torch_across_batches_and_lengths(bundle_path: Path, module: NextItemModule) -> None:
    onnx_bytes = (bundle_path / MODEL_FILE).read_bytes()
    inputs = onnx.load_from_string(onnx_bytes).graph.input
    assert [dim.dim_param for dim in inputs[0].type.tensor_type.shape.dim] == ["batch", "seq"]
    assert parity(module.model, onnx_bytes, (1, 7, 64), (1, 3, MAX_LEN), seed=1) <= PARITY_TOLERANCE
    assert read_bundle(bundle_path).manifest["parity"]["max_abs_diff"] <= PARITY_TOLERANCE


def test_parity_detects_a_different_model(bundle_path: Path, module: NextItemModule) -> None:
    other = copy.deepcopy(module.model)
    with torch.no_grad():
        other.ln_final.bias += 1e-3
    assert parity(other, (bundle_path / MODEL_FILE).read_bytes(), (7,), (MAX_LEN,)) > PARITY_TOLERANCE


def test_flat_top10_from_bundle_equals_torch(bundle_path: Path, module: NextItemModule) -> None:
    bundle = read_bundle(bundle_path)
    histories = random_histories(np.random.default_rng(2), 64, MAX_LEN, module.vocab.size)
    histories[0] = PAD
    session = onnx_session(bundle)
    shoppers = session.run([OUTPUT_NAME], {INPUT_NAME: histories})[0]
    _, rows = bundle.index.search(shoppers, 10)
    expected = module.vocab.product_ids_of(module.top_k(torch.from_numpy(histories), 10)[0].numpy())
    assert np.array_equal(bundle.product_ids[rows], expected)
    assert bundle.manifest["index"] == {"type": "Flat", "params": {}, "recall_at_10": 1.0}


@pytest.fixture(scope="module")
def encode(bundle_path: Path) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    return onnx_encoder((bundle_path / MODEL_FILE).read_bytes())


def test_top_k_check_catches_a_misaligned_index(
    module: NextItemModule, encode: Callable[[np.ndarray, np.ndarray], np.ndarray]
) -> None:
    vectors = item_vectors(module)
    shifted = indexes.flat(np.roll(vectors, 1, axis=0))  # row i holds item i - 1: an off-by-one mapping
    histories = random_histories(np.random.default_rng(3), 8, MAX_LEN, module.vocab.size)
    gaps = np.zeros(histories.shape, np.float32)  # a model without time_gaps ignores them
    shoppers = encode(histories, gaps)
    check_top_k(module, indexes.flat(vectors), histories, gaps, shoppers)
    with pytest.raises(ExportError, match="top-10 of the index differs from torch"):
        check_top_k(module, shifted, histories, gaps, shoppers)


def test_items_and_manifest(bundle_path: Path, module: NextItemModule, checkpoint: Path) -> None:
    bundle = read_bundle(bundle_path)
    vocab = module.vocab
    assert bundle.items.column_names == ["product_id", "popularity", "department"]
    assert bundle.product_ids.tolist() == vocab.product_ids.tolist()
    assert bundle.items.column("popularity").to_pylist() == vocab.popularity.tolist()
    departments = bundle.items.column("department").to_pylist()
    assert departments[::2] == [f"d{i}" for i in vocab.product_ids[::2]]  # left join, vocabulary order
    assert departments[1::2] == [None] * len(departments[1::2])
    manifest = bundle.manifest
    assert manifest["model"] == {"name": "SASRec", "config": NET}
    assert (manifest["max_len"], manifest["embedding_dim"], manifest["vocab_size"]) == (
        MAX_LEN,
        DIM,
        vocab.size,
    )
    assert manifest["training"] == {"metrics": METRICS, "data": {"cutoff": "2017-12-01", "max_len": MAX_LEN}}
    # the checkpoint's name and digest, never a path of the machine that exported it
    assert manifest["source"] == {"checkpoint": checkpoint.name, "sha256": sha256_file(checkpoint)}
    assert str(checkpoint.parent) not in json.dumps(manifest)


def test_existing_output_is_refused_before_any_work(bundle_path: Path, checkpoint: Path) -> None:
    def never(vectors: np.ndarray) -> None:
        raise AssertionError("the index was built")

    with pytest.raises(BundleError, match="already exists; pass overwrite=True"):
        export_bundle(checkpoint, bundle_path, never)


@pytest.mark.parametrize(("builder", "floor"), [(indexes.hnsw, 0.9), (indexes.ivfpq, 0.2)])
def test_approximate_indexes_report_recall(
    module: NextItemModule,
    encode: Callable[[np.ndarray, np.ndarray], np.ndarray],
    builder: Callable[..., object],
    floor: float,
) -> None:
    vectors = item_vectors(module)
    index = builder(vectors)
    histories = random_histories(np.random.default_rng(4), 200, MAX_LEN, module.vocab.size)
    recall = indexes.index_recall(
        index, vectors, encode(histories, np.zeros(histories.shape, np.float32)), 10
    )
    assert floor <= recall <= 1.0
    assert indexes.describe_index(index)["type"] == {indexes.hnsw: "HNSW", indexes.ivfpq: "IVF-PQ"}[builder]


def test_hnsw_bundle_records_its_index(checkpoint: Path, tmp_path: Path) -> None:
    bundle = read_bundle(export_bundle(checkpoint, tmp_path / "bundle", lambda v: indexes.hnsw(v, M=8)))
    assert bundle.manifest["index"]["type"] == "HNSW"
    assert bundle.manifest["index"]["params"] == {"M": 8, "ef_construction": 100, "ef_search": 128}
    assert 0.9 <= bundle.manifest["index"]["recall_at_10"] <= 1.0
    assert bundle.manifest["training"]["metrics"] == METRICS


def test_ivfpq_refuses_a_catalogue_too_small() -> None:
    vectors = np.random.default_rng(5).normal(size=(100, DIM)).astype(np.float32)
    with pytest.raises(ValueError, match="IVF-PQ cannot train on 100 items"):
        indexes.ivfpq(vectors)


@pytest.mark.parametrize(("option", "kind"), [("flat", "Flat"), ("hnsw", "HNSW"), ("ivfpq", "IVF-PQ")])
def test_export_config_composes(compose_config: Callable[..., DictConfig], option: str, kind: str) -> None:
    cfg = compose_config("export", [f"index={option}", "checkpoint=run/checkpoints/best.ckpt"])
    builder = hydra.utils.instantiate(cfg.index)
    vectors = np.random.default_rng(6).normal(size=(400, DIM)).astype(np.float32)
    assert indexes.describe_index(builder(vectors))["type"] == kind
    assert cfg.output.endswith("/bundle") and cfg.allow_unfinished is False
    # the command's int8 choice is measured on Complete Journey's validation window
    assert cfg.quantize == "auto" and cfg.evaluation_data._target_ == "training.datamodule.ReceiptsDataModule"


def evaluation_data(vocab: Vocabulary) -> EvaluationData:
    """Synthetic next-basket data over the checkpoint's products, split at 2017-12-01."""
    receipts = generate_table(SyntheticConfig(num_shoppers=120, num_products=NUM_PRODUCTS, seed=4))
    rows = receipts.column(PRODUCT).to_numpy() - PRODUCT_ID_OFFSET
    receipts = receipts.set_column(
        receipts.schema.get_field_index(PRODUCT), PRODUCT, pa.array(vocab.product_ids[rows])
    )
    return prepare(receipts, parse_cutoff("2017-12-01", "UTC"), min_baskets=1)


def test_auto_quantization_keeps_int8_only_under_the_ndcg_bar(
    checkpoint: Path, module: NextItemModule, tmp_path: Path
) -> None:
    """quantize=auto measures both encoders through serving and keeps int8 only under ``max_ndcg_cost``;
    the figures in the manifest are those of the bundles it could write."""
    data = evaluation_data(module.vocab)
    kept = read_bundle(export_bundle(checkpoint, tmp_path / "kept", indexes.flat, quantize="auto",
                                     evaluation=data, max_ndcg_cost=1.0))  # fmt: skip
    refused = read_bundle(export_bundle(checkpoint, tmp_path / "refused", indexes.flat, quantize="auto",
                                        evaluation=data, max_ndcg_cost=-1.0))  # fmt: skip
    ops = [
        {node.op_type for node in onnx.load_from_string(b.model_bytes).graph.node} for b in (kept, refused)
    ]
    assert "MatMulInteger" in ops[0] or "DynamicQuantizeMatMul" in ops[0]
    assert not ({"MatMulInteger", "DynamicQuantizeMatMul"} & ops[1])  # the fp32 encoder
    assert kept.manifest["quantization"]["kept"] and not refused.manifest["quantization"]["kept"]
    figures = refused.manifest["quantization"]["evaluation"]
    assert figures == {**kept.manifest["quantization"]["evaluation"], "max_relative_ndcg_cost": -1.0}
    assert figures["shoppers"] == len(data.targets.shopper_ids) and figures["cutoff"].startswith("2017-12-01")
    fp32 = evaluate(bundle_rankings(str(tmp_path / "refused"), data, 10), data, (10,))
    assert figures["fp32"] == {"recall@10": fp32["recall@10"], "ndcg@10": fp32["ndcg@10"]}
    int8 = evaluate(bundle_rankings(str(tmp_path / "kept"), data, 10), data, (10,))
    assert figures["int8"] == {"recall@10": int8["recall@10"], "ndcg@10": int8["ndcg@10"]}
    difference = figures["ndcg@10_difference"]
    assert difference["low"] <= difference["mean"] <= difference["high"]
    assert difference["mean"] == pytest.approx(int8["ndcg@10"] - fp32["ndcg@10"], abs=1e-9)
    assert figures["relative_ndcg_cost"] == pytest.approx(1 - int8["ndcg@10"] / fp32["ndcg@10"])
    with pytest.raises(ValueError, match="quantize=auto needs evaluation data"):
        export_bundle(checkpoint, tmp_path / "none", indexes.flat, quantize="auto")


def test_auto_quantization_measures_on_the_checkpoints_validation_window(
    compose_config: Callable[..., DictConfig], checkpoint: Path
) -> None:
    """The command's evaluation data is split at the checkpoint's own cutoff (here 2017-12-01, against
    the config's 2017-10-01): its validation window, the val_days before that cutoff, never after it."""
    overrides = [
        "data@evaluation_data=synthetic",
        "evaluation_data.cutoff=2017-10-01",
        f"checkpoint={checkpoint}",
    ]
    overrides += ["evaluation_data.receipts.config.num_shoppers=200", "evaluation_data.val_days=14"]
    cfg = compose_config("export", overrides)
    data = validation_data(cfg.evaluation_data, checkpoint)
    assert data.cutoff == parse_cutoff("2017-12-01", "UTC") - timedelta(days=14)
    assert pc.max(data.train.column(TIMESTAMP)).as_py() < data.cutoff
    assert len(data.targets.shopper_ids) > 0


def test_the_validation_window_keeps_the_training_zones_wall_clock(
    compose_config: Callable[..., DictConfig], checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint records its cutoff with a fixed offset (-05:00 in December); 28 days earlier is across
    the change to daylight saving time, where training's own window starts at midnight EDT (-04:00)."""
    read = export_module.checkpoints.read

    def recorded(path: str | Path) -> dict:
        state = read(path)
        data = {"cutoff": "2017-12-01T00:00:00-05:00", "timezone": "America/New_York", "val_days": 28}
        return state | {"hyper_parameters": {**state["hyper_parameters"], "data": data}}

    monkeypatch.setattr(export_module.checkpoints, "read", recorded)
    overrides = ["data@evaluation_data=synthetic", "evaluation_data.receipts.config.num_shoppers=200"]
    cfg = compose_config("export", [*overrides, f"checkpoint={checkpoint}"])
    data = validation_data(cfg.evaluation_data, checkpoint)
    assert data.cutoff.isoformat() == "2017-11-03T00:00:00-04:00"


@pytest.mark.parametrize(
    ("data", "refused"),
    [
        ({"cutoff": {"_target_": "os.system", "command": "echo owned"}}, "'cutoff' is not a plain value"),
        ({"val_days": [28]}, "'val_days' is not a plain value"),
        ({"cutoff": "2017-12-01T00:00:00-05:00", "timezone": "../../../etc/passwd"}, "unreadable"),
        (["cutoff"], "not a mapping"),
    ],
)
def test_a_checkpoints_training_split_cannot_name_code_or_files(
    compose_config: Callable[..., DictConfig],
    checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    data: object,
    refused: str,
) -> None:
    """What the checkpoint records of its training split reaches the data config's instantiation: only
    plain values pass, so a `_target_` or a zone key that is a path is refused before anything runs."""
    read = export_module.checkpoints.read
    ran: list[str] = []
    monkeypatch.setattr("os.system", lambda command: ran.append(command) or 0)

    def recorded(path: str | Path) -> dict:
        state = read(path)
        return state | {"hyper_parameters": {**state["hyper_parameters"], "data": data}}

    monkeypatch.setattr(export_module.checkpoints, "read", recorded)
    cfg = compose_config("export", ["data@evaluation_data=synthetic", f"checkpoint={checkpoint}"])
    with pytest.raises(ExportError, match=refused):
        validation_data(cfg.evaluation_data, checkpoint)
    assert ran == []


def test_int8_export_records_its_parity(checkpoint: Path, bundle_path: Path, tmp_path: Path) -> None:
    assert "quantization" not in read_bundle(bundle_path).manifest  # off by default
    bundle = read_bundle(export_bundle(checkpoint, tmp_path / "int8", indexes.flat, quantize="int8"))
    quantization = bundle.manifest["quantization"]
    assert quantization["method"] == "int8-dynamic"
    # int8 weights move the embeddings (unlike the fp32 graph's 1e-6) but keep most of the ranking
    assert PARITY_TOLERANCE < quantization["max_abs_diff"] < 0.5
    assert 0.5 <= quantization["top_10_agreement"] <= 1.0
    ops = {node.op_type for node in onnx.load_from_string(bundle.model_bytes).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    with pytest.raises(ValueError, match="quantize must be one of"):
        export_bundle(checkpoint, tmp_path / "fp16", indexes.flat, quantize="fp16")


def test_evaluated_inputs_of_the_same_name_are_told_apart() -> None:
    """Two bundles both called ``bundle`` (``training.evaluate bundles=[a/bundle,b/bundle]``) get two rows."""
    taken: dict[str, object] = {}
    for path in ("a/bundle", "b/bundle"):
        taken[evaluate_name("bundle", Path(path).name, path, taken)] = path
    assert taken == {"bundle (bundle)": "a/bundle", "bundle (b/bundle)": "b/bundle"}
    with pytest.raises(ValueError, match="given twice"):
        evaluate_name("bundle", "bundle", "b/bundle", taken)


def test_a_model_trained_past_the_test_splits_cutoff_is_refused(
    bundle_path: Path, module: NextItemModule
) -> None:
    """training.evaluate scores a bundle or checkpoint only at or after its own training cutoff: earlier, its
    test targets are purchases it learned from. A cutoff without an offset is read in the stored timezone,
    else in the split's; one that cannot be read is an error."""
    trained = bundle_protocol(bundle_path)
    assert trained == module.hparams["data"] and trained["cutoff"] == "2017-12-01"  # no offset, no zone
    data = evaluation_data(module.vocab)
    at = datetime.fromisoformat(trained["cutoff"]).replace(tzinfo=data.cutoff.tzinfo)
    for later in (at, at + timedelta(days=30)):
        refuse_later_training(trained, replace(data, cutoff=later), "bundle b")
    with pytest.raises(
        ValueError, match=r"bundle b was trained on receipts up to .* after this test split's"
    ):
        refuse_later_training(trained, replace(data, cutoff=at - timedelta(seconds=1)), "bundle b")
    aware = {"cutoff": "2017-12-01T00:00:00-05:00"}  # 05:00 UTC: after a split at midnight UTC
    with pytest.raises(ValueError, match="after this test split's"):
        refuse_later_training(aware, replace(data, cutoff=at), "bundle b")
    with pytest.raises(ValueError, match="after this test split's"):  # a zone west of the split's
        refuse_later_training({**trained, "timezone": "America/New_York"}, replace(data, cutoff=at), "b")
    for stored in (
        {"cutoff": "the day before"},
        {**trained, "timezone": "../../../etc/passwd"},
        {**trained, "timezone": "/etc/localtime"},
    ):
        with pytest.raises(ValueError, match="unreadable training cutoff or timezone"):
            refuse_later_training(stored, data, "bundle b")
    refuse_later_training(None, data, "bundle b")  # nothing to check: a warning, as for parquet data


def test_bundle_rankings_send_each_historys_latest_entries(bundle_path: Path, module: NextItemModule) -> None:
    """``last`` sends what a caller held to a history limit would: each history's most recent entries."""
    data = evaluation_data(module.vocab)
    products, seconds = product_histories(data.train, data.targets.shopper_ids)
    whole = bundle_rankings(str(bundle_path), data, 10)
    longest = max(len(p) for p in products)
    np.testing.assert_array_equal(bundle_rankings(str(bundle_path), data, 10, last=longest), whole)
    latest = bundle_rankings(str(bundle_path), data, 10, last=2)
    served = Recommender.load(bundle_path).recommend_batch(
        [p[-2:] for p in products[:20]], Rules(k=10), [s[-2:] for s in seconds[:20]]
    )
    for row, result in zip(latest[:20], served, strict=True):
        assert row[row != EMPTY].tolist() == result.product_ids
    assert (latest != whole).any()
    with pytest.raises(ValueError, match="last must be >= 1"):
        bundle_rankings(str(bundle_path), data, 10, last=0)


def test_new_to_you_rankings_are_what_serving_excludes(bundle_path: Path, module: NextItemModule) -> None:
    """``bundle_rankings(exclude_purchased=True)`` over :func:`new_product_targets`: serving's
    ``exclude_purchased`` lists, none holding a product of the household's history, and the recall on
    those targets is the explore recall."""
    data = new_product_targets(evaluation_data(module.vocab))
    assert len(data.targets.shopper_ids) > 0
    ranked = bundle_rankings(str(bundle_path), data, 10, exclude_purchased=True)
    products, seconds = product_histories(data.train, data.targets.shopper_ids)
    served = Recommender.load(bundle_path).recommend_batch(
        products, Rules(k=10, exclude_purchased=True), seconds
    )
    for row, result, bought in zip(ranked, served, data.targets.history, strict=True):
        assert row[row != EMPTY].tolist() == result.product_ids
        assert not set(result.product_ids) & set(bought.tolist())
    metrics = evaluate(ranked, data, (10,))
    assert metrics["recall@10"] == pytest.approx(metrics["recall@10_explore"])
