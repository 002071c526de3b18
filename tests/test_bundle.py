"""The bundle format: round trip, checksums, format version, missing files, atomic and refused overwrites."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnx
import pyarrow as pa
import pytest
from onnx import TensorProto, helper, numpy_helper

from recsys import bundle as bundle_module
from recsys.bundle import (
    FILES,
    FORMAT_VERSION,
    INDEX_FILE,
    INPUT_NAME,
    ITEMS_FILE,
    MANIFEST_FILE,
    OUTPUT_NAME,
    BundleError,
    onnx_session,
    read_bundle,
    read_manifest,
    write_bundle,
)

NUM_ITEMS, DIM, MAX_LEN = 20, 8, 5


def tiny_encoder(table: np.ndarray) -> bytes:
    """ONNX bytes of a mean-of-item-embeddings encoder: item_ids [batch, seq] -> [batch, d]."""
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", INPUT_NAME], ["embedded"]),
            helper.make_node("ReduceMean", ["embedded"], [OUTPUT_NAME], axes=[1], keepdims=0),
        ],
        "tiny_encoder",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", table.shape[1]])],
        initializer=[numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime the project supports
    onnx.checker.check_model(model)
    return model.SerializeToString()


def parts(num_items: int = NUM_ITEMS) -> dict[str, Any]:
    """Everything ``write_bundle`` takes, for a random catalogue of ``num_items`` products."""
    rng = np.random.default_rng(num_items)
    table = rng.normal(size=(num_items + 2, DIM)).astype(np.float32)
    index = faiss.IndexFlatIP(DIM)
    index.add(table[2:])
    items = pa.table(
        {
            "product_id": pa.array(rng.permutation(1000)[:num_items] + 1, pa.int64()),
            "popularity": pa.array(np.arange(num_items, 0, -1), pa.int64()),
            "department": pa.array([f"dept{i % 3}" for i in range(num_items)]),
        }
    )
    manifest = {"model": {"name": "Tiny", "config": {"dim": DIM}}, "max_len": MAX_LEN, "embedding_dim": DIM}
    return {"model_onnx": tiny_encoder(table), "items": items, "index": index, "manifest": manifest}


@pytest.fixture
def written(tmp_path: Path) -> Path:
    return write_bundle(tmp_path / "bundle", **parts())


def test_round_trip(written: Path) -> None:
    original = parts()
    loaded = read_bundle(written)
    assert sorted(p.name for p in written.parent.iterdir()) == ["bundle"]  # no temporary directories left
    assert loaded.items.equals(original["items"])
    assert loaded.product_ids.tolist() == original["items"].column("product_id").to_pylist()
    assert (loaded.max_len, loaded.dim) == (MAX_LEN, DIM)
    manifest = loaded.manifest
    assert manifest["model"] == original["manifest"]["model"]
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["num_items"] == NUM_ITEMS
    assert set(manifest["files"]) == set(FILES)

    # the stored encoder runs, and searching the stored index gives the original's results
    session = onnx_session(loaded)
    histories = np.array([[0, 0, 2, 3, 4], [5, 6, 7, 8, 9], [0, 0, 0, 0, 11]], dtype=np.int64)
    shoppers = session.run([OUTPUT_NAME], {INPUT_NAME: histories})[0]
    assert shoppers.shape == (3, DIM)
    assert np.array_equal(loaded.index.search(shoppers, 5)[1], original["index"].search(shoppers, 5)[1])


@pytest.mark.parametrize("name", FILES)
def test_corrupted_file_is_named(written: Path, name: str) -> None:
    data = bytearray((written / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (written / name).write_bytes(bytes(data))
    read_manifest(written)  # the manifest alone is still fine
    with pytest.raises(BundleError, match=rf"{name} is corrupt"):
        read_bundle(written)


def test_wrong_format_version_is_named(written: Path) -> None:
    manifest = json.loads((written / MANIFEST_FILE).read_text())
    (written / MANIFEST_FILE).write_text(json.dumps(manifest | {"format_version": FORMAT_VERSION + 1}))
    with pytest.raises(BundleError, match=rf"{MANIFEST_FILE} has format_version {FORMAT_VERSION + 1}"):
        read_bundle(written)


@pytest.mark.parametrize("name", [*FILES, MANIFEST_FILE])
def test_missing_file_is_named(written: Path, name: str) -> None:
    (written / name).unlink()
    with pytest.raises(BundleError, match=rf"{name} is missing"):
        read_bundle(written)


def test_overwrite_needs_consent_and_swaps_atomically(written: Path) -> None:
    with pytest.raises(BundleError, match="already exists; pass overwrite=True"):
        write_bundle(written, **parts(NUM_ITEMS + 5))
    assert read_bundle(written).manifest["num_items"] == NUM_ITEMS  # untouched

    write_bundle(written, **parts(NUM_ITEMS + 5), overwrite=True)
    assert read_bundle(written).manifest["num_items"] == NUM_ITEMS + 5
    assert sorted(p.name for p in written.parent.iterdir()) == ["bundle"]  # old copy and temp dir gone


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(bundle_module.faiss, "write_index", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_bundle(tmp_path / "bundle", **parts())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p | {"items": p["items"].drop_columns(["popularity"])}, rf"{ITEMS_FILE}: missing column"),
        (lambda p: p | {"items": p["items"].slice(1)}, rf"{INDEX_FILE} has {NUM_ITEMS} vectors"),
        (lambda p: p | {"manifest": {"model": {}, "max_len": MAX_LEN}}, "manifest needs 'embedding_dim'"),
        (
            lambda p: p | {"manifest": p["manifest"] | {"embedding_dim": DIM + 1}},
            rf"{INDEX_FILE} has dimension {DIM}",
        ),
    ],
)
def test_inconsistent_parts_are_refused(tmp_path: Path, change: Any, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        write_bundle(tmp_path / "bundle", **change(parts()))
    assert list(tmp_path.iterdir()) == []
