"""The bundle: a trained model as one self-describing directory, and the only code that reads or writes it.

    bundle/
      model.onnx      shopper encoder: item_ids int64 [batch, seq] -> shopper_embedding float32 [batch, d]
      items.faiss     product embeddings, inner-product metric; FAISS id i = row i of items.parquet
      items.parquet   row-aligned products: product_id, popularity, [repeat_rate,] then metadata columns
      bundle.json     format version, model, sizes, metrics, library versions, sha256 of every file, and
                      the repeat-aware scorer's parameters when the model has one (``recsys.repeat``)

The encoder's inputs are vocabulary indices: product at items.parquet row ``i`` has index
``i + NUM_RESERVED`` (0 is padding, 1 unknown). A bundle is written to a temporary directory and renamed
into place, so readers never see half of one; reading verifies the format version and every checksum.
No torch here: production installs read bundles with numpy, pyarrow and faiss only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.repeat import RepeatScorer

FORMAT = "caddie-bundle"
FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
INDEX_FILE = "items.faiss"
ITEMS_FILE = "items.parquet"
MANIFEST_FILE = "bundle.json"
FILES = (MODEL_FILE, INDEX_FILE, ITEMS_FILE)
INPUT_NAME = "item_ids"
GAPS_NAME = "gap_days"  # the second input of basket-aware models (recsys.data.sequences.purchase_gaps)
OUTPUT_NAME = "shopper_embedding"
REQUIRED_ITEM_COLUMNS = ("product_id", "popularity")
REPEAT_KEY = "repeat_scorer"
GAPS_KEY = "gaps_name"
REPEAT_RATE_COLUMN = "repeat_rate"


class BundleError(ValueError):
    """A bundle that cannot be written or trusted; the message names the file and the problem."""


@dataclass(frozen=True)
class Bundle:
    """A verified bundle in memory."""

    path: Path
    manifest: dict[str, Any]
    items: pa.Table
    index: faiss.Index
    model_bytes: bytes  # the verified model.onnx, for onnxruntime.InferenceSession(model_bytes)
    repeat: RepeatScorer | None = None  # the repeat-aware scorer, if the model was exported with one

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def product_ids(self) -> np.ndarray:
        """[N] int64 product ids, row-aligned with the index."""
        return self.items.column("product_id").to_numpy()

    @property
    def max_len(self) -> int:
        return int(self.manifest["max_len"])

    @property
    def dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    @property
    def gaps_name(self) -> str | None:
        """The model's purchase-gap input (basket-aware models), or None for a model of item ids only."""
        return self.manifest.get(GAPS_KEY)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundle_id(manifest: dict[str, Any]) -> str:
    """Short content id of a bundle: equal files share it, any new file changes it."""
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    """Versions of the libraries a bundle's reader depends on, recorded for debugging mismatches."""
    found = {}
    for name in ("caddie", "numpy", "pyarrow", "faiss-cpu", "onnx", "onnxruntime", "torch"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def write_bundle(
    path: str | Path,
    model_onnx: bytes,
    items: pa.Table,
    index: faiss.Index,
    manifest: dict[str, Any],
    overwrite: bool = False,
    repeat: RepeatScorer | None = None,
    time_gaps: bool = False,
) -> Path:
    """Write a bundle atomically and return its path.

    ``manifest`` must hold at least ``model`` (name and config), ``max_len`` and ``embedding_dim``;
    format, sizes, versions, creation time and checksums are added here. ``repeat`` (a scorer over the
    same item rows, with ``items``' popularity) adds its parameters and a ``repeat_rate`` column.
    ``time_gaps`` says the model takes purchase gaps as its second input (``GAPS_NAME``). With
    ``overwrite`` an existing bundle at ``path`` is replaced by a rename swap; otherwise it is an error.
    """
    path = Path(path)
    if time_gaps:
        manifest = {**manifest, GAPS_KEY: GAPS_NAME}
    if repeat is not None:
        popularity = items.column("popularity").to_numpy().astype(np.float64)
        if repeat.num_items != items.num_rows or not np.array_equal(repeat.popularity, popularity):
            raise BundleError(f"the repeat scorer does not describe the rows of {ITEMS_FILE}")
        items = items.add_column(2, REPEAT_RATE_COLUMN, pa.array(repeat.repeat_rate, pa.float64()))
        manifest = {**manifest, REPEAT_KEY: repeat.to_dict()}
    missing = [c for c in REQUIRED_ITEM_COLUMNS if c not in items.column_names]
    if missing:
        raise BundleError(f"{ITEMS_FILE}: missing column(s) {missing}")
    if index.ntotal != items.num_rows:
        raise BundleError(
            f"{INDEX_FILE} has {index.ntotal} vectors but {ITEMS_FILE} has {items.num_rows} rows"
        )
    for key in ("model", "max_len", "embedding_dim"):
        if key not in manifest:
            raise BundleError(f"{MANIFEST_FILE}: manifest needs {key!r}")
    if index.d != manifest["embedding_dim"]:
        raise BundleError(f"{INDEX_FILE} has dimension {index.d}, manifest says {manifest['embedding_dim']}")
    if path.exists() and not overwrite:
        raise BundleError(f"{path} already exists; pass overwrite=True to replace it")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        (tmp / MODEL_FILE).write_bytes(model_onnx)
        faiss.write_index(index, str(tmp / INDEX_FILE))
        pq.write_table(items, tmp / ITEMS_FILE)
        full = {
            **manifest,
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "num_items": items.num_rows,
            "input_name": INPUT_NAME,
            "output_name": OUTPUT_NAME,
            "metric": "inner_product",
            "libraries": library_versions(),
            "created_at": datetime.now(timezone.utc).isoformat(),
            "files": {
                name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                for name in FILES
            },
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(full, indent=2, sort_keys=True, default=str))
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """``bundle.json`` of the bundle at ``path``, with its format checked (not the other files)."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path} is not a bundle directory")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.exists():
        raise BundleError(f"{MANIFEST_FILE} is missing from {path}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{MANIFEST_FILE} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{MANIFEST_FILE} does not describe a {FORMAT}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{MANIFEST_FILE} has format_version {manifest.get('format_version')!r}; "
            f"this reader supports {FORMAT_VERSION}"
        )
    return manifest


def read_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Load a bundle; with ``verify`` (the default) every file's sha256 must match the manifest.

    Each file is read once and the bytes that were hashed are the bytes that are loaded, so a bundle
    replaced while it is being read cannot mix versions unnoticed.
    """
    path = Path(path)
    manifest = read_manifest(path)
    contents = {}
    for name in FILES:
        file = path / name
        if not file.exists():
            raise BundleError(f"{name} is missing from {path}")
        contents[name] = file.read_bytes()
        expected = manifest.get("files", {}).get(name, {}).get("sha256")
        if verify and hashlib.sha256(contents[name]).hexdigest() != expected:
            raise BundleError(f"{name} is corrupt: its sha256 does not match {MANIFEST_FILE}")
    try:
        index = faiss.deserialize_index(np.frombuffer(contents[INDEX_FILE], dtype=np.uint8))
    except RuntimeError as error:
        raise BundleError(f"{INDEX_FILE} cannot be read: {error}") from error
    try:
        items = pq.read_table(pa.BufferReader(contents[ITEMS_FILE]))
    except (pa.ArrowInvalid, OSError) as error:
        raise BundleError(f"{ITEMS_FILE} cannot be read: {error}") from error
    if index.ntotal != items.num_rows or index.ntotal != manifest.get("num_items"):
        raise BundleError(
            f"{INDEX_FILE} ({index.ntotal}), {ITEMS_FILE} ({items.num_rows}) and {MANIFEST_FILE} "
            f"({manifest.get('num_items')}) disagree on the number of items"
        )
    if index.d != manifest.get("embedding_dim"):
        raise BundleError(
            f"{INDEX_FILE} has dimension {index.d}, {MANIFEST_FILE} says {manifest.get('embedding_dim')}"
        )
    if manifest.get(GAPS_KEY, GAPS_NAME) != GAPS_NAME:
        raise BundleError(
            f"{MANIFEST_FILE} names gap input {manifest[GAPS_KEY]!r}; this reader knows {GAPS_NAME!r}"
        )
    return Bundle(path, manifest, items, index, contents[MODEL_FILE], _repeat_scorer(manifest, items))


def _repeat_scorer(manifest: dict[str, Any], items: pa.Table) -> RepeatScorer | None:
    if REPEAT_KEY not in manifest:
        return None
    if REPEAT_RATE_COLUMN not in items.column_names:
        raise BundleError(
            f"{MANIFEST_FILE} has a repeat scorer but {ITEMS_FILE} has no {REPEAT_RATE_COLUMN!r}"
        )
    try:
        return RepeatScorer.from_dict(
            manifest[REPEAT_KEY],
            items.column(REPEAT_RATE_COLUMN).to_numpy(zero_copy_only=False),
            items.column("popularity").to_numpy(zero_copy_only=False),
        )
    except (ValueError, KeyError, TypeError) as error:
        raise BundleError(f"{MANIFEST_FILE}: invalid {REPEAT_KEY}: {error}") from error
