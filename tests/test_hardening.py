"""Attacks and careless operations on checkpoints, bundles and batch outputs, each reproduced with the
smallest input: a checkpoint naming code, a model reading files beside the server, an edited manifest,
a rewrite of the receipts, a kill mid-save, an unfinished run, a second instance, an overwrite."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import DictConfig
from onnx import TensorProto, helper

from batch import pipeline
from batch.candidates import CandidatesError
from batch.candidates import run as run_candidates
from batch.engines import TorchEngine
from batch.lock import LockError, locked
from export import index as indexes
from export.export import export_bundle
from export.onnx import ExportError
from recsys.bundle import (
    INPUT_NAME,
    MANIFEST_FILE,
    MODEL_FILE,
    OUTPUT_NAME,
    BundleError,
    bundle_id,
    read_bundle,
    write_bundle,
)
from recsys.data.synthetic import SyntheticConfig, generate_table
from recsys.data.vocabulary import Vocabulary
from recsys.io import exchange_directory
from serving.recommender import Recommender
from tests.bundles import make_bundle
from tests.rankers import random_ranker
from training import checkpoint as checkpoints
from training.module import NextItemModule, load_module, save_module

ROOT = Path(__file__).resolve().parents[1]
MAX_LEN = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Receipts, an untrained SASRec checkpoint over them (with a scorer) and its bundle."""
    root = tmp_path_factory.mktemp("hardening")
    receipts = generate_table(SyntheticConfig(num_shoppers=200, num_products=120, mean_baskets=5, seed=9))
    pq.write_table(receipts, root / "receipts.parquet")
    vocab = Vocabulary.build(receipts)
    net = {"name": "sasrec", "num_items": vocab.size, "max_len": MAX_LEN, "dim": 16, "num_layers": 1,
           "num_heads": 2, "dropout": 0.0}  # fmt: skip
    torch.manual_seed(0)
    module = NextItemModule(net, vocab)
    module.expects_scorer = True
    checkpoint = root / "model.ckpt"
    save_module(module, checkpoint)
    checkpoints.write_scorer(checkpoint, random_ranker(vocab.num_products), checkpoints.read(checkpoint))
    bundle = export_bundle(checkpoint, root / "bundle", indexes.flat)
    return {"root": root, "receipts": root / "receipts.parquet", "checkpoint": checkpoint, "bundle": bundle}


def _copy(path: Path, to: Path) -> Path:
    shutil.copytree(path, to)
    return to


def _edit_manifest(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    edit(manifest)
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


# --- 1: a checkpoint of plain values that names code ------------------------------------------------------
@pytest.mark.parametrize(
    ("net", "message"),
    [
        ({"_target_": "subprocess.Popen", "args": ["touch", "{marker}"]}, r"net names 'subprocess\.Popen'"),
        ({"name": "subprocess.Popen", "args": ["touch", "{marker}"]}, r"unknown model .* are \['bert4rec'"),
    ],
    ids=["target", "name"],
)
def test_a_checkpoint_naming_code_is_refused_everywhere(
    world: dict[str, Any], tmp_path: Path, net: dict[str, Any], message: str
) -> None:
    marker = tmp_path / "pwned"
    state = checkpoints.read(world["checkpoint"])
    crafted = {**net, "args": [a.format(marker=marker) for a in net["args"]]}
    state["hyper_parameters"] = {**state["hyper_parameters"], "net": crafted}
    path = tmp_path / "crafted.ckpt"
    torch.save(state, path)
    torch.load(path, weights_only=True)  # plain values: the unpickler lets it through
    for load in (
        lambda: load_module(path),
        lambda: export_bundle(path, tmp_path / "bundle", indexes.flat),
        lambda: TorchEngine(path),
    ):
        with pytest.raises(checkpoints.CheckpointError, match=message):
            load()
    assert not marker.exists()


@pytest.mark.parametrize(
    ("key", "target"), [("optimizer", "os.system"), ("scheduler", "torch.optim.lr_scheduler.os.system")]
)
def test_a_checkpoint_may_name_only_the_optimizer_and_schedule(
    world: dict[str, Any], tmp_path: Path, key: str, target: str
) -> None:
    state = checkpoints.read(world["checkpoint"])
    state["hyper_parameters"] = {**state["hyper_parameters"], key: {"_target_": target, "command": "id"}}
    torch.save(state, tmp_path / "crafted.ckpt")
    with pytest.raises(checkpoints.CheckpointError, match=rf"hyper_parameters\.{key} names"):
        checkpoints.read(tmp_path / "crafted.ckpt")
    allowed = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}
    state["hyper_parameters"][key] = allowed
    torch.save(state, tmp_path / "sgd.ckpt")
    checkpoints.read(tmp_path / "sgd.ckpt")  # a torch.optim optimizer is fine


def test_a_checkpoint_of_another_format_is_refused(world: dict[str, Any], tmp_path: Path) -> None:
    state = checkpoints.read(world["checkpoint"])
    del state[checkpoints.KEY]  # as Lightning alone, or an older Caddie, writes them
    torch.save(state, tmp_path / "old.ckpt")
    with pytest.raises(checkpoints.CheckpointError, match="not a Caddie checkpoint of format 1"):
        load_module(tmp_path / "old.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"\x80\x04junk")
    with pytest.raises(checkpoints.CheckpointError, match="not a readable checkpoint"):
        load_module(tmp_path / "junk.ckpt")


# --- 2: a model that reads a file beside the server -----------------------------------------------------
def _external_data_model(location: str) -> bytes:
    """A valid ONNX encoder whose item table is "external data" at ``location``, resolved by onnxruntime
    against wherever it thinks the model lives."""
    table = TensorProto(name="table", data_type=TensorProto.FLOAT, dims=[4, 4])
    table.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "64")):
        entry = table.external_data.add()
        entry.key, entry.value = key, value
    nodes = [
        helper.make_node("Gather", ["table", INPUT_NAME], ["rows"]),
        helper.make_node("ReduceMean", ["rows"], [OUTPUT_NAME], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "leak",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 4])],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def test_a_model_with_external_data_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(16, dtype=np.float32).tobytes())  # 64 bytes "next to the server"
    monkeypatch.chdir(tmp_path)
    import faiss

    index = faiss.IndexFlatIP(4)
    index.add(np.eye(4, dtype=np.float32)[:2])
    items = pa.table({"product_id": pa.array([1, 2], pa.int64()), "popularity": pa.array([5, 3], pa.int64())})
    manifest = {"model": {"name": "leak", "config": {}}, "max_len": 4, "embedding_dim": 4}
    path = write_bundle(tmp_path / "bundle", _external_data_model("secret.bin"), items, index, manifest)
    with pytest.raises(BundleError, match="self-contained file, without external data"):
        Recommender.load(path)
    from batch.engines import OnnxEngine

    with pytest.raises(BundleError, match="without external data"):
        OnnxEngine(path)


# --- 4: the manifest is part of the integrity check -----------------------------------------------------
def test_bundle_id_covers_the_manifest(world: dict[str, Any], tmp_path: Path) -> None:
    copy = _copy(world["bundle"], tmp_path / "b")
    before = read_bundle(copy).bundle_id
    _edit_manifest(copy, lambda m: m["training"].update(note="edited"))
    assert read_bundle(copy).bundle_id != before
    assert bundle_id(read_bundle(world["bundle"]).manifest) == before


def test_an_edited_max_len_is_refused_at_load(world: dict[str, Any], tmp_path: Path) -> None:
    copy = _copy(world["bundle"], tmp_path / "b")
    _edit_manifest(copy, lambda m: m.update(max_len=200))
    read_bundle(copy)  # a plausible value: only running the model shows it does not fit
    with pytest.raises(BundleError, match="failed a probe of a 200-product history"):
        Recommender.load(copy)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["ranker"].update(new_candidates=float("nan")), "every number must be finite"),
        (lambda m: m["ranker"].update(new_candidates="1e999"), "'new_candidates' must be an integer"),
        (lambda m: m["ranker"].update(version=None), "ranker version None"),
        (lambda m: m.update(num_items=-1), "'num_items' must be a positive integer"),
        (lambda m: m["files"]["items.faiss"].update(sha256="x"), r"files\.items\.faiss\.sha256"),
    ],
    ids=["nan", "string", "null-bias", "negative", "digest"],
)
def test_bad_manifest_values_are_refused_naming_the_key(
    world: dict[str, Any], tmp_path: Path, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    copy = _copy(world["bundle"], tmp_path / "b")
    _edit_manifest(copy, edit)
    with pytest.raises(BundleError, match=message):
        read_bundle(copy)


def test_an_overflowing_number_is_refused(world: dict[str, Any], tmp_path: Path) -> None:
    copy = _copy(world["bundle"], tmp_path / "b")
    text = (copy / MANIFEST_FILE).read_text().replace('"max_len": ', '"extra": 1e999, "max_len": ', 1)
    (copy / MANIFEST_FILE).write_text(text)
    with pytest.raises(BundleError, match="1e999: every number must be finite"):
        read_bundle(copy)


def _job(compose_config: Callable[..., DictConfig], world: dict[str, Any], output: Path, **extra: Any) -> Any:
    settings = {"receipts": world["receipts"], "output": output, "bundle": world["bundle"], "k": 5}
    settings |= {"progress": "false", "parts": 3, **extra}
    return run_candidates(compose_config("candidates", [f"{k}={v}" for k, v in settings.items()]))


def test_a_resumed_job_never_mixes_two_bundles(
    compose_config: Callable[..., DictConfig], world: dict[str, Any], tmp_path: Path
) -> None:
    bundle = _copy(world["bundle"], tmp_path / "bundle")
    _job(compose_config, world, tmp_path / "out", bundle=bundle)
    _edit_manifest(bundle, lambda m: m["training"].update(note="edited"))  # a new bundle, same files
    with pytest.raises(CandidatesError, match=r"holds the output of another job \(changed: model\)"):
        _job(compose_config, world, tmp_path / "out", bundle=bundle)


# --- 8: the batch job's resume key reads content ----------------------------------------------------------
def test_receipts_rewritten_at_the_same_size_are_recomputed(
    compose_config: Callable[..., DictConfig], world: dict[str, Any], tmp_path: Path
) -> None:
    receipts = tmp_path / "receipts.parquet"
    table = pq.read_table(world["receipts"])
    plain = {"compression": "none", "use_dictionary": False}  # fixed-width values: edits keep the size
    pq.write_table(table, receipts, **plain)
    job = {**world, "receipts": receipts}
    first = _job(compose_config, job, tmp_path / "out")

    def rewrite(shift: int, keep_mtime: bool) -> None:
        products = table.column("product_id").to_numpy().copy()
        products[len(products) // 2] += shift  # one line now names another product
        stat = receipts.stat()
        column = table.schema.get_field_index("product_id")
        edited = table.set_column(column, table.schema.field(column), pa.array(products))
        pq.write_table(edited, receipts, **plain)
        if keep_mtime:
            os.utime(receipts, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert receipts.stat().st_size == stat.st_size

    rewrite(1, keep_mtime=False)  # an ordinary rewrite
    with pytest.raises(CandidatesError, match="changed: receipts"):
        _job(compose_config, job, tmp_path / "out")
    second = _job(compose_config, job, tmp_path / "second")
    # an edit that moves the column's statistics is seen in the footer even with a forged mtime
    rewrite(10**9, keep_mtime=True)
    with pytest.raises(CandidatesError, match="changed: receipts"):
        _job(compose_config, job, tmp_path / "second")
    assert second["job"]["receipts"]["files"] != first["job"]["receipts"]["files"]


# --- 9: a kill mid-save keeps the previous checkpoint ---------------------------------------------------
def test_a_kill_mid_save_keeps_the_previous_checkpoint(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "best.ckpt"
    shutil.copy(world["checkpoint"], path)
    good = path.read_bytes()
    state = checkpoints.read(path)
    seen: list[Path] = []

    def killed(obj: Any, target: Path) -> None:
        seen.append(Path(target))
        Path(target).write_bytes(good[: len(good) // 2])  # half the bytes, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.AtomicCheckpointIO().save_checkpoint(state, path)
    assert path.read_bytes() == good  # the previous file, whole
    assert seen[0].parent == path.parent  # the temporary was beside the target: no cross-device copy
    assert not seen[0].exists()


# --- 10: a run killed before its scorer was fitted ----------------------------------------------------
def test_export_refuses_an_unfinished_checkpoint(
    world: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = checkpoints.read(world["checkpoint"])
    del state[checkpoints.KEY][checkpoints.SCORER_KEY]  # expects_scorer stays true
    torch.save(state, tmp_path / "unfinished.ckpt")
    with pytest.raises(
        ExportError, match=r"stopped before fitting its repeat-aware scorer.*allow_unfinished"
    ):
        export_bundle(tmp_path / "unfinished.ckpt", tmp_path / "bundle", indexes.flat)
    assert not (tmp_path / "bundle").exists()
    with caplog.at_level("WARNING"):
        path = export_bundle(
            tmp_path / "unfinished.ckpt", tmp_path / "b", indexes.flat, allow_unfinished=True
        )
    assert read_bundle(path).repeat is None and "allow_unfinished=true" in caplog.text


# --- 11: one writer per output, a bundle at the path at every instant ---------------------------------
def test_a_second_instance_refuses_to_start(
    compose_config: Callable[..., DictConfig], world: dict[str, Any], tmp_path: Path
) -> None:
    output = tmp_path / "out"
    # a live run of this shard (this process) holds the lock
    with (
        locked(output / ".shard=00000-of-00001.lock"),
        pytest.raises(CandidatesError, match="held by another"),
    ):
        _job(compose_config, world, output)
    assert _job(compose_config, world, output)["complete"]  # once it is gone, the job runs


def test_a_stale_lock_is_taken_over(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout), "started": "then"}))
    with locked(lock):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()
    lock.write_text(json.dumps({"host": "another-host", "pid": 1, "started": "then"}))
    with pytest.raises(LockError, match="another-host"), locked(lock):
        pass


def test_a_killed_run_resumes_after_its_lock_is_left_behind(
    compose_config: Callable[..., DictConfig],
    world: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    output = tmp_path / "out"
    process = pipeline.process

    def dies(*args: Any) -> None:
        raise KeyboardInterrupt  # a kill: the lock of a dead process stays behind

    monkeypatch.setattr("batch.candidates.process", dies)
    with pytest.raises(KeyboardInterrupt):
        _job(compose_config, world, output)
    monkeypatch.setattr("batch.candidates.process", process)
    assert _job(compose_config, world, output)["complete"]


def test_an_overwriting_export_keeps_a_bundle_at_the_path(world: dict[str, Any], tmp_path: Path) -> None:
    path = _copy(world["bundle"], tmp_path / "bundle")
    missing: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if not (path / MANIFEST_FILE).exists():
                missing.append(1)
            # a non-atomic replace leaves the path empty for milliseconds; a loop that never sleeps would
            # hold the GIL against the exports it watches
            time.sleep(1e-4)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(3):
            export_bundle(world["checkpoint"], path, indexes.flat, overwrite=True)
    finally:
        stop.set()
        watcher.join()
    assert not missing
    read_bundle(path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left behind


def test_exchange_swaps_two_directories(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("new")
    (tmp_path / "b" / "x").write_text("old")
    exchange_directory(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b" / "x").read_text() == "new" and (tmp_path / "a" / "x").read_text() == "old"


def test_temporaries_of_killed_exports_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    killed = tmp_path / f".bundle.tmp-{int(dead.stdout)}-abc"
    running = tmp_path / f".bundle.tmp-{os.getpid()}-def"  # a live writer's: kept
    for directory in (killed, running):
        directory.mkdir()
        (directory / MODEL_FILE).write_bytes(b"half")
    make_bundle(tmp_path / "bundle")
    assert not killed.exists() and running.exists()


def test_a_bundle_file_that_is_a_symbolic_link_is_refused(world: dict[str, Any], tmp_path: Path) -> None:
    copy = _copy(world["bundle"], tmp_path / "b")
    outside = tmp_path / "outside.onnx"
    shutil.move(copy / MODEL_FILE, outside)
    (copy / MODEL_FILE).symlink_to(outside)
    with pytest.raises(BundleError, match="not a regular file"):
        read_bundle(copy)
    assert onnx.load_from_string(outside.read_bytes())  # the file itself is fine: the link is refused
