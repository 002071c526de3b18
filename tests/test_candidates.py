"""Batch candidates: equal to serving, both engines agree, rules, sharding, kill-and-resume, bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import DictConfig

from batch import engines, pipeline, shards
from batch.candidates import MANIFEST_FILE, CandidatesError, run
from batch.partition import Layout, Run, gather, partition, read_part, runs
from export import index as indexes
from export.export import export_bundle
from recsys.bundle import BundleError, read_bundle
from recsys.data.loader import RowGroup
from recsys.data.schema import PRODUCT, SHOPPER, ReceiptsError
from recsys.data.sequences import product_histories
from recsys.data.synthetic import SyntheticConfig, generate_table
from recsys.data.vocabulary import Vocabulary
from recsys.rules import Rules
from serving.recommender import Recommender
from tests.rankers import random_ranker
from training import checkpoint as checkpoints
from training.module import NextItemModule, save_module

ROOT = Path(__file__).resolve().parents[1]
K = 10
UNKNOWN_ONLY = 42  # a shopper whose every product is outside the catalogue: the popularity fallback
Job = Callable[..., dict[str, Any]]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Receipts in two files, a tiny SASRec checkpoint whose vocabulary lacks some of their products, and
    its Flat bundle."""
    root = tmp_path_factory.mktemp("candidates")
    receipts = generate_table(SyntheticConfig(num_shoppers=300, num_products=150, mean_baskets=6, seed=5))
    full = Vocabulary.build(receipts)
    stray = receipts.slice(0, 3).to_pydict() | {SHOPPER: [UNKNOWN_ONLY] * 3, PRODUCT: [7, 8, 9]}
    receipts = pa.concat_tables([receipts, pa.table(stray, schema=receipts.schema)])
    (root / "receipts").mkdir()
    half = receipts.num_rows // 2
    pq.write_table(receipts.slice(0, half), root / "receipts" / "a.parquet")
    pq.write_table(receipts.slice(half), root / "receipts" / "b.parquet")

    keep = np.arange(full.num_products) % 10 != 3  # a tenth of the products are unknown to the model
    vocab = Vocabulary(full.product_ids[keep], full.popularity[keep])
    net = {"name": "sasrec", "num_items": vocab.size, "max_len": 8, "dim": 16,
           "num_layers": 1, "num_heads": 2, "dropout": 0.0}  # fmt: skip
    torch.manual_seed(0)
    module = NextItemModule(net, vocab.to_dict())
    with torch.no_grad():
        module.model.item_emb.weight.mul_(30)  # spread the scores: no near-ties between engines
    checkpoint = root / "model.ckpt"
    save_module(module, checkpoint)
    bundle = export_bundle(checkpoint, root / "bundle", indexes.flat)
    return {"receipts": receipts, "dir": root / "receipts", "checkpoint": checkpoint, "bundle": bundle}


@pytest.fixture
def job(compose_config: Callable[..., DictConfig], data: dict[str, Any], tmp_path: Path) -> Job:
    """Run the job from the real config; ``output`` is relative to ``tmp_path``."""

    def _run(output: str = "out", engine: str = "bundle", **overrides: Any) -> dict[str, Any]:
        settings = {"receipts": data["dir"], "output": tmp_path / output, engine: data[engine], "k": K}
        settings |= {"progress": False, **overrides}
        return run(compose_config("candidates", [f"{key}={value}" for key, value in settings.items()]))

    return _run


def read_output(path: Path) -> pa.Table:
    return ds.dataset(path, format="parquet", partitioning="hive").to_table().sort_by(SHOPPER)


def assert_same_candidates(found: pa.Table, expected: pa.Table) -> None:
    """Two outputs of one job: the same shoppers, lists and fallbacks, the scores equal to float32 rounding.

    Scores are bitwise equal only where the shoppers were searched in the same batches: batched otherwise
    (by shard, part or piece), the BLAS of the exact search may sum a product in another order (seen with
    OpenBLAS's Haswell kernels, not with its AVX-512 ones).
    """
    assert found.drop_columns(["scores"]).equals(expected.drop_columns(["scores"]))
    flat = [pc.list_flatten(table.column("scores")).to_numpy() for table in (found, expected)]
    np.testing.assert_allclose(*flat, rtol=1e-6, atol=1e-6)


def histories(receipts: pa.Table, with_seconds: bool = False) -> dict[int, Any]:
    """Product ids per shopper, oldest first (the job's order), and with ``with_seconds`` their purchase
    times in seconds since the epoch: ``(ids, seconds)``."""
    shoppers = np.unique(receipts.column(SHOPPER).to_numpy())
    products, seconds = product_histories(receipts, shoppers)
    groups = zip(shoppers.tolist(), products, seconds, strict=True)
    return {s: (h.tolist(), t.tolist()) if with_seconds else h.tolist() for s, h, t in groups}


def assert_equal_to_serving(
    output: pa.Table, recommender: Recommender, receipts: pa.Table, **rules: Any
) -> None:
    history = histories(receipts)
    assert output.column(SHOPPER).to_pylist() == sorted(history)  # one row per shopper, no gaps
    expected = recommender.recommend_batch([history[s] for s in sorted(history)], Rules(k=K, **rules))
    for row, want in zip(output.to_pylist(), expected, strict=True):
        assert row["product_ids"] == want.product_ids, row[SHOPPER]
        np.testing.assert_allclose(row["scores"], want.scores, rtol=1e-5, atol=1e-5)
        assert row["fallback"] == want.fallback


def test_cpu_path_equals_serving(job: Job, data: dict[str, Any], tmp_path: Path) -> None:
    recommender = Recommender.load(data["bundle"])
    # ONNX Runtime called on chunks of 5 shoppers (the last one short): the same numbers as serving's
    manifest = job(parts=3, batch_size=64, **{"onnx.encode_rows": 5})
    output = read_output(tmp_path / "out")
    assert_equal_to_serving(output, recommender, data["receipts"])
    fallback = output.filter(pc.field("fallback")).column(SHOPPER).to_pylist()
    assert UNKNOWN_ONLY in fallback
    assert manifest["complete"] and (manifest["rows"], manifest["fallback_rows"]) == (
        output.num_rows,
        len(fallback),
    )

    # a floor some shoppers' 10th item misses, with purchased products excluded
    floor = float(np.median([scores[-1] for scores in output.column("scores").to_pylist()]))
    job("strict", parts=2, **{"rules.exclude_purchased": "true", "rules.min_score": floor})
    strict = read_output(tmp_path / "strict")
    assert_equal_to_serving(strict, recommender, data["receipts"], exclude_purchased=True, min_score=floor)
    assert min(pc.list_value_length(strict.column("product_ids")).to_pylist()) < K


def test_torch_cpu_path_agrees_with_cpu_path(job: Job, tmp_path: Path) -> None:
    job("onnx", parts=2)
    manifest = job("torch", engine="checkpoint", parts=3, batch_size=50)
    assert manifest["job"]["model"]["engine"] == "torch"
    onnx, torch_ = read_output(tmp_path / "onnx"), read_output(tmp_path / "torch")
    assert onnx.column(SHOPPER).equals(torch_.column(SHOPPER))
    assert onnx.column("fallback").equals(torch_.column("fallback"))
    for a, b in zip(onnx.to_pylist(), torch_.to_pylist(), strict=True):
        np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-5)
        differ = np.array(a["product_ids"]) != np.array(b["product_ids"])
        # only near-ties may come in either order
        assert (np.abs(np.array(a["scores"]) - np.array(b["scores"]))[differ] <= 1e-5).all()
        assert not differ.any() or set(a["product_ids"]) == set(b["product_ids"])


def test_rules_are_respected(job: Job, data: dict[str, Any], tmp_path: Path) -> None:
    job("plain")
    plain = read_output(tmp_path / "plain").filter(~pc.field("fallback"))
    items = read_bundle(data["bundle"]).items
    ids, popularity = items.column(PRODUCT).to_numpy(), items.column("popularity").to_numpy()
    popular = ids[np.lexsort((ids, -popularity))].tolist()  # serving's fallback order
    top = [ids[0] for ids in plain.column("product_ids").to_pylist()]
    unavailable = sorted({popular[0], *top[:20]})  # the fallback's first product among them
    (tmp_path / "gone.txt").write_text("# delisted\n" + "\n".join(map(str, unavailable)) + "\n123456789\n")
    pq.write_table(pa.table({PRODUCT: unavailable}), tmp_path / "gone.parquet")
    floor = float(np.quantile(pc.list_flatten(plain.column("scores")).to_numpy(), 0.2))
    rules = {"rules.exclude_purchased": "true", "rules.explore_slots": 3, "rules.min_score": floor}
    manifest = job("ruled", **rules, **{"rules.unavailable": tmp_path / "gone.txt"})
    assert manifest["job"]["rules"]["unavailable"]["in_catalogue"] == len(unavailable)
    ruled = read_output(tmp_path / "ruled")
    history = histories(data["receipts"])
    for row in ruled.to_pylist():
        assert not set(row["product_ids"]) & set(unavailable)
        if row["fallback"]:
            assert row["product_ids"] == [p for p in popular if p not in unavailable][:K]
            continue
        assert not set(row["product_ids"]) & set(history[row[SHOPPER]])
        assert min(row["scores"], default=floor) >= floor
        assert row["scores"] == sorted(row["scores"], reverse=True)

    # explore slots alone: at least 3 never-bought products for every shopper, as serving reserves them
    job("explore", **{"rules.explore_slots": 3})
    explore = read_output(tmp_path / "explore")
    for row in explore.to_pylist():
        assert len(set(row["product_ids"]) - set(history[row[SHOPPER]])) >= 3
    assert_equal_to_serving(explore, Recommender.load(data["bundle"]), data["receipts"], explore_slots=3)
    # the same list as parquet gives the same output
    job("ruled_parquet", **rules, **{"rules.unavailable": tmp_path / "gone.parquet"})
    assert read_output(tmp_path / "ruled_parquet").equals(ruled)


def test_shards_cover_every_shopper_exactly_once(job: Job, data: dict[str, Any], tmp_path: Path) -> None:
    job("single", parts=2)
    manifests = [job("sharded", shard_index=i, num_shards=3, parts=2) for i in range(3)]
    sharded = read_output(tmp_path / "sharded")
    assert_same_candidates(
        sharded.drop_columns(["shard"]), read_output(tmp_path / "single").drop_columns(["shard"])
    )
    shard_of, _ = Layout(0, 3, 1).assign(sharded.column(SHOPPER).to_numpy())
    assert [f"{s:05d}-of-00003" for s in shard_of] == sharded.column("shard").to_pylist()
    combined = json.loads((tmp_path / "sharded" / MANIFEST_FILE).read_text())
    assert combined["rows"] == sum(m["rows"] for m in manifests) == len(histories(data["receipts"]))
    assert sorted(combined["shards"]) == [f"shard={i:05d}-of-00003" for i in range(3)]
    assert not (tmp_path / "sharded" / "_partitions").exists()  # removed once the shard completed


def test_killed_job_resumes_without_duplicates_or_gaps(
    job: Job, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    write_part = pipeline.write_part
    written: list[str] = []

    def dies_on_the_third_part(directory: Path, name: str, batches: list[pa.RecordBatch]) -> dict[str, Any]:
        if len(written) == 2:
            (directory / f".{name}.tmp-99999").write_bytes(b"half a parquet file")  # as a kill leaves it
            raise RuntimeError("killed")
        written.append(name)
        return write_part(directory, name, batches)

    monkeypatch.setattr(pipeline, "write_part", dies_on_the_third_part)
    with pytest.raises(RuntimeError, match="killed"):
        job(parts=5, batch_size=32)
    shard = tmp_path / "out" / "shard=00000-of-00001"
    manifest = json.loads((shard / MANIFEST_FILE).read_text())
    assert not manifest["complete"] and sorted(manifest["parts"]) == sorted(written)
    finished = {name: (shard / name).stat() for name in written}

    monkeypatch.setattr(pipeline, "write_part", write_part)
    manifest = job(parts=5, batch_size=32)
    assert manifest["complete"] and len(manifest["parts"]) == 5
    for name, before in finished.items():  # finished parts are kept, not rewritten
        after = (shard / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not list(shard.glob(".*"))  # no temporary file left behind
    resumed = read_output(tmp_path / "out")
    job("clean", parts=5)
    assert_same_candidates(resumed, read_output(tmp_path / "clean"))
    assert len(set(resumed.column(SHOPPER).to_pylist())) == resumed.num_rows

    # a finished part that no longer matches its checksum is recomputed
    (shard / written[0]).write_bytes(b"corrupt")
    job(parts=5, batch_size=32)
    assert read_output(tmp_path / "out").equals(resumed)


def test_single_part_is_streamed_without_partition_files(
    job: Job, data: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A shard of one part skips the partition pass: the same output and manifest as when the part goes
    through partition files (``keep_partitions`` asks for them), and a killed run resumes."""
    kept = job("kept", batch_size=64, keep_partitions="true")
    assert kept["job"]["parts"] == 1
    assert (tmp_path / "kept" / "_partitions" / "shard=00000-of-00001" / "part-00000.parquet").is_file()

    def no_partition_pass(*args: Any, **kwargs: Any) -> list[int]:
        raise AssertionError("a shard of one part needs no partition pass")

    monkeypatch.setattr(shards, "partition", no_partition_pass)
    write_part = pipeline.write_part

    def killed(directory: Path, name: str, batches: list[pa.RecordBatch]) -> dict[str, Any]:
        raise RuntimeError("killed")

    monkeypatch.setattr(pipeline, "write_part", killed)
    with pytest.raises(RuntimeError, match="killed"):
        job("streamed", batch_size=64)
    assert not list((tmp_path / "streamed" / "shard=00000-of-00001").glob("*"))  # nothing recorded
    monkeypatch.setattr(pipeline, "write_part", write_part)
    streamed = job("streamed", batch_size=64)
    assert not (tmp_path / "streamed" / "_partitions").exists()
    assert streamed["job"] == kept["job"] and streamed["parts"] == kept["parts"]  # the same bytes, too
    output = read_output(tmp_path / "streamed")
    assert output.equals(read_output(tmp_path / "kept"))
    assert_equal_to_serving(output, Recommender.load(data["bundle"]), data["receipts"])

    # one part in each of two shards, streamed with the other shard's rows left out
    for index in range(2):
        assert job("sharded", shard_index=index, num_shards=2)["job"]["parts"] == 1
    sharded = read_output(tmp_path / "sharded").drop_columns(["shard"]).sort_by(SHOPPER)
    assert_same_candidates(sharded, output.drop_columns(["shard"]))

    # finished: a re-run reads nothing
    monkeypatch.setattr(shards, "gather", no_partition_pass)
    assert job("streamed", batch_size=64)["parts"] == kept["parts"]


def test_gather_equals_the_partition_files(data: dict[str, Any], tmp_path: Path) -> None:
    """What a shard of one part streams into memory is the table its partition file holds."""
    receipts: pa.Table = data["receipts"]
    for layout in (Layout(0, 1, 1), Layout(1, 3, 1)):
        batches = receipts.to_batches(max_chunksize=500)
        directory = tmp_path / layout.shard_name
        partition(map(pa.Table.from_batches, [[b] for b in batches]), layout, directory, {})
        streamed = gather((pa.Table.from_batches([b]) for b in batches), layout)
        assert streamed is not None and streamed.equals(read_part(directory, layout, 0))
    assert gather(iter([receipts.slice(0, 0)]), Layout(0, 1, 1)) is None
    with pytest.raises(ValueError, match="one part"):
        gather(iter([receipts]), Layout(0, 1, 2))


@pytest.mark.parametrize("blocks", [(1024, 4096), (7, 5)])
def test_exact_search_is_the_flat_index_search(
    blocks: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU engine's search of a flat index (numpy's products, FAISS's heaps) returns what the index's
    own search does, in blocks of any size, also when fewer items than ``k`` are there."""
    monkeypatch.setattr(engines, "SEARCH_QUERIES", blocks[0])
    monkeypatch.setattr(engines, "SEARCH_ITEMS", blocks[1])
    rng = np.random.default_rng(3)
    items = rng.normal(size=(40, 8)).astype(np.float32)
    queries = rng.normal(size=(23, 8)).astype(np.float32)
    index = faiss.IndexFlatIP(8)
    index.add(items)
    items_t = np.ascontiguousarray(items.T)
    for k in (1, 10, 40, 45):
        scores, rows = engines.exact_search(items_t, queries, k)
        want_scores, want_rows = index.search(queries, k)
        assert np.array_equal(rows, want_rows)  # -1 where fewer than k items
        np.testing.assert_allclose(scores[rows >= 0], want_scores[want_rows >= 0], rtol=1e-5, atol=1e-5)
    empty = engines.exact_search(items_t, queries[:0], 5)
    assert empty[0].shape == empty[1].shape == (0, 5)


def test_cores_on_their_own_calls_encode_as_one_call_does(data: dict[str, Any]) -> None:
    """``parallel="rows"`` (each core its own single-threaded calls on chunks of the batch) gives the
    embeddings, in order, of ``parallel="ops"`` (one call at a time over all cores): chunks of any size,
    a short last one, a whole batch per core, and an empty batch."""
    rng = np.random.default_rng(5)
    item_ids = rng.integers(0, 30, size=(23, 6)).astype(np.int64)
    item_ids[:5, :3] = 0  # left padding
    gaps = np.zeros(item_ids.shape, np.float32)
    whole = engines.OnnxEngine(data["bundle"], threads=2, parallel="ops").encode(item_ids, gaps)
    for rows in (1, 4, 7, 23, 40, None):
        for threads in (1, 2, 3):
            engine = engines.OnnxEngine(data["bundle"], threads, encode_rows=rows, parallel="rows")
            np.testing.assert_allclose(engine.encode(item_ids, gaps), whole, rtol=1e-6, atol=1e-6)
            assert engine.encode(item_ids[:0], gaps[:0]).shape == (0, whole.shape[1])


def test_onnx_settings_are_checked() -> None:
    """A job's ``onnx`` group: each bad key or value named; good ones passed on as they are."""
    good = {"encode_rows": 64, "graph_optimization": "all", "parallel": "rows"}
    assert engines.onnx_settings(good) == good
    assert engines.onnx_settings({"encode_rows": None}) == {"encode_rows": None}
    for bad, message in (
        ({"encode_rows": 0}, r"onnx\.encode_rows >= 1"),
        ({"encode_rows": "64"}, r"onnx\.encode_rows >= 1 \(or null\), got '64'"),
        ({"encode_rows": True}, r"onnx\.encode_rows"),
        ({"graph_optimization": "fast"}, r"onnx\.graph_optimization must be one of"),
        ({"parallel": "threads"}, r"onnx\.parallel must be one of \['rows', 'ops'\], got 'threads'"),
        ({"threads": 2}, r"unknown onnx settings \['threads'\]"),
    ):
        with pytest.raises(ValueError, match=message):
            engines.onnx_settings(bad)
    with pytest.raises(ValueError, match="parallel must be one of"):
        engines.OnnxEngine("unused", parallel="both")


def test_runs_cut_between_shoppers() -> None:
    """Parts of consecutive shoppers: a part ends before the next row group's lowest shopper id, and a
    group whose shoppers straddle the cut is read by both parts, each owning its own ids of it."""

    def group(index: int, rows: int, shoppers: tuple[int, int] | None) -> RowGroup:
        return RowGroup("f.parquet", index, rows, 0, shoppers)

    groups = [group(0, 5, (1, 3)), group(1, 5, (3, 3)), group(2, 5, (3, 6)), group(3, 0, None)]
    groups += [group(4, 5, (7, 9)), group(5, 5, (9, 10))]

    def described(parts: list[Run] | None) -> list[tuple[list[int], int | None, int | None]]:
        assert parts is not None
        return [([g.index for g in part.groups], part.low, part.high) for part in parts]

    # shopper 3 is in groups 0-2, so the cut before it leaves group 0 to both parts, and no cut can fall
    # inside it; shopper 9 straddles groups 4 and 5; the empty group 3 is left out
    assert described(runs(groups, 5)) == [([0], None, 3), ([0, 1, 2], 3, 7), ([4], 7, 9), ([4, 5], 9, None)]
    assert described(runs(groups, 10)) == [([0, 1], None, 3), ([0, 1, 2, 4], 3, 9), ([4, 5], 9, None)]
    assert described(runs(groups, 100)) == [([0, 1, 2, 4, 5], None, None)]
    assert runs(groups, 4) is None  # groups larger than a part: read by hash, in bounded memory
    one_shopper = runs([group(0, 5, (4, 4)), group(1, 5, (4, 4))], 5)
    assert one_shopper is not None and len(one_shopper) == 1  # a shopper is never cut
    assert runs([group(0, 5, (1, 5)), group(1, 5, (4, 8))], 5) is None  # overlapping: not in order
    assert runs([group(0, 5, (1, 5)), group(1, 5, None)], 5) is None  # no statistics
    assert runs([group(0, 0, None)], 5) is None


@pytest.fixture(scope="module")
def ordered_dir(data: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The receipts in shopper order (a shopper's rows in their order), in two files of row groups of
    100 rows: a shopper may span two groups, and the two files."""
    receipts: pa.Table = data["receipts"]
    ordered = receipts.take(pc.sort_indices(receipts, [(SHOPPER, "ascending")]))
    root = tmp_path_factory.mktemp("ordered")
    half = ordered.num_rows // 2
    pq.write_table(ordered.slice(0, half), root / "a.parquet", row_group_size=100)
    pq.write_table(ordered.slice(half), root / "b.parquet", row_group_size=100)
    return root


def test_receipts_in_shopper_order_need_no_partition_pass(
    job: Job, data: dict[str, Any], ordered_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Receipts in shopper order are cut into parts of whole row groups, read straight from the input:
    the same candidates as through the partition pass, in one or in several shards, and a killed run
    resumes with one row per shopper."""
    rows = {"rows_per_part": data["receipts"].num_rows // 4, "batch_size": 32}
    hashed = job("hashed", parts=4, batch_size=32)
    assert hashed["job"]["parts_by"] == "hash"

    def no_partition_pass(*args: Any, **kwargs: Any) -> list[int]:
        raise AssertionError("receipts in shopper order need no partition pass")

    monkeypatch.setattr(shards, "partition", no_partition_pass)
    ordered = job("ordered", receipts=ordered_dir, **rows)
    assert ordered["job"]["parts_by"] == "row_groups" and 3 <= ordered["job"]["parts"] <= 5
    output = read_output(tmp_path / "ordered").drop_columns(["shard"])
    assert_same_candidates(output, read_output(tmp_path / "hashed").drop_columns(["shard"]))
    assert_equal_to_serving(output, Recommender.load(data["bundle"]), data["receipts"])

    for index in range(2):
        job("sharded", receipts=ordered_dir, shard_index=index, num_shards=2, **rows)
    sharded = read_output(tmp_path / "sharded").drop_columns(["shard"]).sort_by(SHOPPER)
    assert_same_candidates(sharded, output)

    write_part = pipeline.write_part
    written: list[str] = []

    def dies_on_the_second_part(directory: Path, name: str, batches: list[pa.RecordBatch]) -> dict[str, Any]:
        if written:
            raise RuntimeError("killed")
        written.append(name)
        return write_part(directory, name, batches)

    monkeypatch.setattr(pipeline, "write_part", dies_on_the_second_part)
    with pytest.raises(RuntimeError, match="killed"):
        job("resumed", receipts=ordered_dir, **rows)
    monkeypatch.setattr(pipeline, "write_part", write_part)
    resumed = job("resumed", receipts=ordered_dir, **rows)
    assert resumed["parts"][written[0]] == ordered["parts"][written[0]]  # kept, not recomputed
    assert read_output(tmp_path / "resumed").drop_columns(["shard"]).equals(output)


def test_wrong_footer_statistics_are_refused(
    job: Job, ordered_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts are cut by the footers' shopper ranges: rows outside them would put a shopper in two parts."""
    row_groups = shards.row_groups

    def narrowed(*args: Any) -> list[RowGroup]:
        groups = row_groups(*args)
        low, high = groups[0].shoppers  # the first shopper's rows are then outside the recorded range
        return [dataclasses.replace(groups[0], shoppers=(low + 1, high)), *groups[1:]]

    monkeypatch.setattr(shards, "row_groups", narrowed)
    wrong = r"row group 0: shopper ids 42\.\.\d+ outside the range 43\.\.\d+ its footer's"
    with pytest.raises(CandidatesError, match=wrong):
        job(receipts=ordered_dir, rows_per_part=500, batch_size=32)


@pytest.mark.parametrize("order", ["shuffled", "by shopper"])
def test_pieces_hold_whole_shoppers_in_order(data: dict[str, Any], order: str) -> None:
    """A part is grouped piece by piece: consecutive runs of ``batch_size`` shoppers, each with all of its
    shoppers' rows, so the batches are those of the whole part; in shopper order, runs of rows."""
    receipts: pa.Table = data["receipts"]
    shuffled = receipts.take(np.random.default_rng(0).permutation(receipts.num_rows))
    receipts = shuffled if order == "shuffled" else shuffled.sort_by(SHOPPER)
    cut = pipeline.pieces(receipts, 64)
    assert all(isinstance(rows, slice) for rows in cut) == (order == "by shopper")
    cut = [pipeline.rows_of(receipts, rows) for rows in cut]
    shoppers = [np.unique(piece.column(SHOPPER).to_numpy()) for piece in cut]
    assert [len(ids) for ids in shoppers[:-1]] == [64] * (len(cut) - 1) and 0 < len(shoppers[-1]) <= 64
    assert np.array_equal(np.concatenate(shoppers), np.unique(receipts.column(SHOPPER).to_numpy()))
    assert sum(piece.num_rows for piece in cut) == receipts.num_rows
    for piece in cut:  # a shopper's rows keep their order: ties in time are grouped as in the whole part
        ids = receipts.column(SHOPPER).to_numpy()
        rows = np.flatnonzero(np.isin(ids, piece.column(SHOPPER).to_numpy()))
        assert piece.equals(receipts.take(rows))
    assert pipeline.pieces(None, 64) == []


def test_bad_input_is_refused_with_a_clear_error(job: Job, data: dict[str, Any], tmp_path: Path) -> None:
    receipts: pa.Table = data["receipts"]
    pq.write_table(receipts.drop_columns([PRODUCT]), tmp_path / "no_product.parquet")
    with pytest.raises(ReceiptsError, match=r"missing required column.*product_id"):
        job(receipts=tmp_path / "no_product.parquet")
    with pytest.raises(ReceiptsError, match="does not exist"):
        job(receipts=tmp_path / "nowhere")
    with pytest.raises(BundleError, match="not a bundle directory"):
        job(bundle=tmp_path / "no_bundle")
    with pytest.raises(FileNotFoundError, match=r"checkpoint .* does not exist"):
        job(engine="checkpoint", checkpoint=tmp_path / "no.ckpt")
    with pytest.raises(CandidatesError, match="exactly one of bundle"):
        job(checkpoint=data["checkpoint"])
    with pytest.raises(CandidatesError, match="needs checkpoint"):
        job(device="cuda")
    with pytest.raises(CandidatesError, match=r"rules\.unavailable"):
        job(**{"rules.unavailable": tmp_path / "missing.txt"})
    with pytest.raises(CandidatesError, match=r"onnx\.encode_rows >= 1 \(or null\), got 0"):
        job(**{"onnx.encode_rows": 0})
    with pytest.raises(CandidatesError, match=r"onnx\.graph_optimization must be one of .*'fast'"):
        job(**{"onnx.graph_optimization": "fast"})
    with pytest.raises(CandidatesError, match=r"onnx\.parallel must be one of .*'cores'"):
        job(**{"onnx.parallel": "cores"})

    one = receipts.filter(pc.equal(receipts.column(SHOPPER), receipts.column(SHOPPER)[0]))
    pq.write_table(one, tmp_path / "one.parquet")
    own, _ = Layout(0, 2, 1).assign(one.column(SHOPPER).to_numpy()[:1])
    with pytest.raises(CandidatesError, match=f"shard {1 - own[0]} of 2 is empty"):
        job("empty", receipts=tmp_path / "one.parquet", num_shards=2, shard_index=1 - own[0])

    job("taken", receipts=tmp_path / "one.parquet")
    with pytest.raises(CandidatesError, match=r"another job \(changed: k\)"):
        job("taken", receipts=tmp_path / "one.parquet", k=5)
    assert job("taken", receipts=tmp_path / "one.parquet", k=5, overwrite="true")["job"]["k"] == 5


def test_command_line(data: dict[str, Any], tmp_path: Path) -> None:
    """The Hydra entry point, in a fresh process: the ONNX path never imports torch."""
    code = (
        "import runpy, sys\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_module('batch.candidates', run_name='__main__')\n"
        "assert 'torch' not in sys.modules"
    )
    args = [f"receipts={data['dir']}", f"output={tmp_path / 'out'}", f"bundle={data['bundle']}", "k=5"]
    args += [f"hydra.run.dir={tmp_path / 'hydra'}", "progress=false"]
    done = subprocess.run(
        [sys.executable, "-c", code, "candidates", *args], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())
    assert manifest["rows"] == len(histories(data["receipts"])) and manifest["job"]["k"] == 5


def test_shards_as_an_array_through_the_local_launcher(data: dict[str, Any], tmp_path: Path) -> None:
    """``-m shard_index='range(2)' num_shards=2 hydra/launcher=local``: each shard runs as its own submitit
    job, as one SLURM array task per shard would, and together they write the combined manifest."""
    args = [f"receipts={data['dir']}", f"output={tmp_path / 'out'}", f"bundle={data['bundle']}", "k=5"]
    array = ["-m", "shard_index=range(2)", "num_shards=2", "hydra/launcher=local"]
    command = [sys.executable, "-m", "batch.candidates", *array, *args, "progress=false",
               f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((tmp_path / "sweep" / ".submitit").glob("*/*_result.pkl"))) == 2
    manifest = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())
    assert sorted(manifest["shards"]) == [f"shard={i:05d}-of-00002" for i in range(2)]
    assert manifest["rows"] == len(histories(data["receipts"]))


@pytest.mark.gpu
def test_cuda_path_agrees_with_cpu(job: Job, tmp_path: Path) -> None:
    """bf16 autocast changes embeddings slightly: top-K mostly agrees, scores stay close."""
    job("cpu", engine="checkpoint")
    job("cuda", engine="checkpoint", device="cuda")
    cpu, cuda = read_output(tmp_path / "cpu"), read_output(tmp_path / "cuda")
    assert cpu.column(SHOPPER).equals(cuda.column(SHOPPER))
    overlap = [
        len(set(a) & set(b)) / K
        for a, b in zip(
            cpu.column("product_ids").to_pylist(), cuda.column("product_ids").to_pylist(), strict=True
        )
    ]
    assert np.mean(overlap) > 0.9


def test_repeat_aware_job_equals_serving(job: Job, data: dict[str, Any], tmp_path: Path) -> None:
    """With a repeat-aware scorer in the checkpoint, both engines and serving give the same answers."""
    checkpoint = tmp_path / "repeat.ckpt"
    shutil.copy(data["checkpoint"], checkpoint)
    state = checkpoints.read(checkpoint)
    vocab = checkpoints.vocabulary(state)
    checkpoints.write_scorer(checkpoint, random_ranker(vocab.num_products), state)
    bundle = export_bundle(checkpoint, tmp_path / "repeat-bundle", indexes.flat)
    manifest = job("aware", bundle=bundle, parts=2, batch_size=40, **{"rules.exclude_purchased": "true"})
    assert manifest["job"]["rules"]["repeat_aware"]
    output = read_output(tmp_path / "aware")
    timed = histories(data["receipts"], with_seconds=True)
    shoppers = sorted(timed)
    expected = Recommender.load(bundle).recommend_batch(
        [timed[s][0] for s in shoppers],
        Rules(k=K, exclude_purchased=True),
        timestamps=[timed[s][1] for s in shoppers],
    )
    assert output.column(SHOPPER).to_pylist() == shoppers
    for row, want in zip(output.to_pylist(), expected, strict=True):
        assert row["product_ids"] == want.product_ids, row[SHOPPER]
        np.testing.assert_allclose(row["scores"], want.scores, rtol=1e-5)
        assert want.repeat_aware or want.fallback
    job("aware-torch", engine="checkpoint", checkpoint=checkpoint, **{"rules.exclude_purchased": "true"})
    torch_output = read_output(tmp_path / "aware-torch")
    for a, b in zip(output.to_pylist(), torch_output.to_pylist(), strict=True):
        np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-5)


def test_basket_aware_job_equals_serving(job: Job, data: dict[str, Any], tmp_path: Path) -> None:
    """A model reading purchase gaps: both engines compute them from the receipts, serving from the
    request's timestamps, and all three agree."""
    state = checkpoints.read(data["checkpoint"])
    torch.manual_seed(1)
    net = state["hyper_parameters"]["net"] | {"time_gaps": True}
    module = NextItemModule(net, checkpoints.vocabulary(state))
    with torch.no_grad():
        module.model.item_emb.weight.mul_(30)
        module.model.gap_emb.table.weight.mul_(30)  # gaps move the rankings visibly
    checkpoint = tmp_path / "gaps.ckpt"
    save_module(module, checkpoint)
    bundle = export_bundle(checkpoint, tmp_path / "gaps-bundle", indexes.flat)
    job("gaps", bundle=bundle, parts=2, batch_size=40)
    output = read_output(tmp_path / "gaps")
    timed = histories(data["receipts"], with_seconds=True)
    shoppers = sorted(timed)
    expected = Recommender.load(bundle).recommend_batch(
        [timed[s][0] for s in shoppers], Rules(k=K), timestamps=[timed[s][1] for s in shoppers]
    )
    assert output.column(SHOPPER).to_pylist() == shoppers
    for row, want in zip(output.to_pylist(), expected, strict=True):
        assert row["product_ids"] == want.product_ids, row[SHOPPER]
        np.testing.assert_allclose(row["scores"], want.scores, rtol=1e-5, atol=1e-5)
    # the same histories as if each product were bought on its own trip, 3 days apart, score
    # differently: the gaps were read
    trips = Recommender.load(bundle).recommend_batch(
        [timed[s][0] for s in shoppers],
        Rules(k=K),
        timestamps=[(3 * 86_400 * np.arange(len(timed[s][0]))).tolist() for s in shoppers],
    )
    pairs = [(a, b) for a, b in zip(expected, trips, strict=True) if not a.fallback]
    changed = sum(abs(a.scores[0] - b.scores[0]) > 1e-3 for a, b in pairs)
    assert changed > 0.9 * len(pairs)
    job("gaps-torch", engine="checkpoint", checkpoint=checkpoint, batch_size=50)
    for a, b in zip(output.to_pylist(), read_output(tmp_path / "gaps-torch").to_pylist(), strict=True):
        np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-4)
