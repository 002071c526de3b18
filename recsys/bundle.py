"""The bundle: a trained model as one self-describing directory, and the only code that reads or writes it.

    bundle/
      model.onnx      shopper encoder: item_ids int64 [batch, seq] -> shopper_embedding float32 [batch, d]
      items.faiss     product embeddings, inner-product metric; FAISS id i = row i of items.parquet
      items.parquet   row-aligned products: product_id, popularity, [the ranker's ranker_* item statistics,]
                      then metadata columns
      ranker.txt      the ranker's LightGBM text model, when the model has a ranker (``recsys.ranker``)
      bundle.json     format version, model, sizes, metrics, library versions, sha256 of every file, and
                      the ranker's settings (version, features, candidate sources) when it has one

The encoder's inputs are vocabulary indices of items.parquet's rows (``recsys.data.vocabulary``). A
bundle is written to a temporary directory and swapped into place in one atomic exchange, so readers see
the old bundle or the new one at every instant, never half of one or none. Reading verifies the format
version, every checksum and every manifest value (types, ranges, finite numbers; errors name the key);
:func:`bundle_id` hashes ``bundle.json`` itself, which lists every file's sha256, so the id covers every
byte. The model runs only from the verified bytes (:func:`onnx_session`), as one self-contained file:
ONNX external data is refused. No torch here: production reads bundles with numpy, pyarrow, faiss and
onnxruntime only.

Size limits: ``bundle.json`` at most :data:`MAX_MANIFEST_BYTES`; each data file at most its declared size
and all of them at most ``max_bytes`` (:data:`MAX_BUNDLE_BYTES` by default), ``ranker.txt`` at most
:data:`MAX_RANKER_BYTES`, checked before reading.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.io import exchange_directory, remove_stale_temporaries
from recsys.ranker import Ranker
from recsys.runtime import session_options

FORMAT = "caddie-bundle"
FORMAT_VERSION = 3  # 3: the LightGBM ranker replaces the logistic-regression scorer
MAX_MANIFEST_BYTES = 16 << 20
MAX_BUNDLE_BYTES = 32 << 30
# ranker.txt is parsed line by line into Python numbers, several times its size in memory: the cap keeps a
# forged file from exhausting a server before a single tree is checked (a fitted ranker is a few MiB)
MAX_RANKER_BYTES = 256 << 20
MAX_LEN_LIMIT = 4096  # longest history a bundle may declare (a model's position table)
MODEL_FILE = "model.onnx"
INDEX_FILE = "items.faiss"
ITEMS_FILE = "items.parquet"
MANIFEST_FILE = "bundle.json"
FILES = (MODEL_FILE, INDEX_FILE, ITEMS_FILE)
RANKER_FILE = "ranker.txt"  # present exactly when the manifest holds a ranker
INPUT_NAME = "item_ids"
GAPS_NAME = "gap_days"  # the second input of basket-aware models (recsys.data.sequences.purchase_gaps)
OUTPUT_NAME = "shopper_embedding"
REQUIRED_ITEM_COLUMNS = ("product_id", "popularity")
REPEAT_KEY = "ranker"
GAPS_KEY = "gaps_name"
GRAPH_OPTIMIZATION = {  # ONNX Runtime's graph optimisation levels, by the names configs give them
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
RANKER_COLUMN_PREFIX = "ranker_"  # items.parquet columns of the ranker's item statistics


class BundleError(ValueError):
    """A bundle that cannot be written or trusted; the message names the file and the problem."""


@dataclass(frozen=True)
class Bundle:
    """A verified bundle in memory."""

    path: Path
    manifest: dict[str, Any]
    items: pa.Table
    index: faiss.Index
    model_bytes: bytes  # the verified model.onnx: the only bytes a session is built from (onnx_session)
    repeat: Ranker | None = None  # the ranker, if the model was exported with one

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

    @property
    def bundle_id(self) -> str:
        return bundle_id(self.manifest)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundle_id(manifest: dict[str, Any]) -> str:
    """Short content id of a bundle: a hash of its whole manifest, which holds every file's sha256, so a
    change to any file or any manifest value (``max_len``, the scorer's weights, ...) changes it."""
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def onnx_session(
    bundle: Bundle, intra_op_threads: int = 1, graph_optimization: str = "all"
) -> ort.InferenceSession:
    """An ONNX Runtime session (CPU) over the bundle's verified model bytes, never re-read from disk.

    ``intra_op_threads`` is 1 for serving's single requests and the core count for batch throughput;
    ``graph_optimization`` is a key of :data:`GRAPH_OPTIMIZATION` (ONNX Runtime's own default: all).
    External data is refused: the lookup folder is an empty directory that lives only while the
    session is built, so a model naming external data fails instead of reading files beside the server.
    Raises :class:`BundleError` naming the problem.
    """
    if graph_optimization not in GRAPH_OPTIMIZATION:
        raise ValueError(
            f"graph_optimization must be one of {sorted(GRAPH_OPTIMIZATION)}, got {graph_optimization!r}"
        )
    options = session_options(intra_op_threads)
    options.graph_optimization_level = GRAPH_OPTIMIZATION[graph_optimization]
    with tempfile.TemporaryDirectory(prefix="caddie-no-external-data-") as empty:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", empty)
        try:
            return ort.InferenceSession(
                bundle.model_bytes, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime raises several unrelated pybind exception types
            raise BundleError(
                f"{MODEL_FILE} cannot be loaded by onnxruntime (a bundle's model must be one "
                f"self-contained file, without external data): {error}"
            ) from error


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
    repeat: Ranker | None = None,
    time_gaps: bool = False,
) -> Path:
    """Write a bundle atomically and return its path.

    ``manifest`` must hold at least ``model`` (name and config), ``max_len`` and ``embedding_dim``;
    format, sizes, versions, creation time and checksums are added here. ``repeat`` (a ranker over the
    same item rows) adds its settings, its model as ``ranker.txt`` and ``ranker_*`` item columns.
    ``time_gaps`` says the model takes purchase gaps as its second input (``GAPS_NAME``). With
    ``overwrite`` an existing bundle at ``path`` is replaced by a rename swap; otherwise it is an error.
    """
    path = Path(path)
    if time_gaps:
        manifest = {**manifest, GAPS_KEY: GAPS_NAME}
    files = FILES
    if repeat is not None:
        if repeat.num_items != items.num_rows:
            raise BundleError(f"the ranker does not describe the rows of {ITEMS_FILE}")
        for i, (name, values) in enumerate(repeat.item_columns().items()):
            items = items.add_column(2 + i, RANKER_COLUMN_PREFIX + name, pa.array(values))
        manifest = {**manifest, REPEAT_KEY: repeat.to_dict()}
        files = (*FILES, RANKER_FILE)
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
    if os.path.islink(path):
        raise BundleError(f"{path} is a symbolic link; write the bundle to a real directory")
    if index.d != manifest["embedding_dim"]:
        raise BundleError(f"{INDEX_FILE} has dimension {index.d}, manifest says {manifest['embedding_dim']}")
    if path.exists() and not overwrite:
        raise BundleError(f"{path} already exists; pass overwrite=True to replace it")

    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)  # left by exports killed mid-write
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        (tmp / MODEL_FILE).write_bytes(model_onnx)
        faiss.write_index(index, str(tmp / INDEX_FILE))
        pq.write_table(items, tmp / ITEMS_FILE)
        if repeat is not None:
            (tmp / RANKER_FILE).write_text(repeat.model)
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
                for name in files
            },
        }
        text = json.dumps(full, indent=2, sort_keys=True, default=str, allow_nan=False)
        (tmp / MANIFEST_FILE).write_text(text)
        _check_manifest(json.loads(text))  # what a reader will refuse is refused before it lands
        if path.exists():
            exchange_directory(tmp, path)  # tmp now holds the old bundle, removed below
        else:
            os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def _reject_constant(name: str) -> float:
    raise BundleError(f"{MANIFEST_FILE} holds {name}: every number must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # e.g. 1e999, which json reads as inf without a word
        raise BundleError(f"{MANIFEST_FILE} holds {text}: every number must be finite")
    return value


def _positive_int(manifest: dict[str, Any], key: str, limit: int | None = None) -> int:
    value = manifest.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BundleError(f"{MANIFEST_FILE}: {key!r} must be a positive integer, got {value!r}")
    if limit is not None and value > limit:
        raise BundleError(f"{MANIFEST_FILE}: {key!r} is {value}, above this reader's limit of {limit}")
    return value


def _check_manifest(manifest: Any) -> dict[str, Any]:
    """The manifest's format, version and the values readers rely on; errors name the key."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{MANIFEST_FILE} does not describe a {FORMAT}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{MANIFEST_FILE} has format_version {manifest.get('format_version')!r}; "
            f"this reader supports {FORMAT_VERSION} (re-export the checkpoint)"
        )
    _positive_int(manifest, "max_len", MAX_LEN_LIMIT)
    _positive_int(manifest, "embedding_dim")
    _positive_int(manifest, "num_items")
    for key, expected in (("input_name", INPUT_NAME), ("output_name", OUTPUT_NAME)):
        if manifest.get(key) != expected:
            raise BundleError(
                f"{MANIFEST_FILE}: {key!r} is {manifest.get(key)!r}; this reader knows {expected!r}"
            )
    if manifest.get(GAPS_KEY, GAPS_NAME) != GAPS_NAME:
        raise BundleError(
            f"{MANIFEST_FILE} names gap input {manifest[GAPS_KEY]!r}; this reader knows {GAPS_NAME!r}"
        )
    model = manifest.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise BundleError(f"{MANIFEST_FILE}: 'model' must be a mapping with a 'name'")
    files = manifest.get("files")
    expected = [*FILES, RANKER_FILE] if REPEAT_KEY in manifest else list(FILES)
    if not isinstance(files, dict) or sorted(files) != sorted(expected):
        raise BundleError(f"{MANIFEST_FILE}: 'files' must list exactly {expected}")
    for name, entry in files.items():
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        size = entry.get("bytes") if isinstance(entry, dict) else None
        if (
            not isinstance(digest, str)
            or len(digest) != 64
            or any(c not in "0123456789abcdef" for c in digest)
        ):
            raise BundleError(f"{MANIFEST_FILE}: files.{name}.sha256 must be a hex sha256")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BundleError(f"{MANIFEST_FILE}: files.{name}.bytes must be a byte count")
    if RANKER_FILE in files and files[RANKER_FILE]["bytes"] > MAX_RANKER_BYTES:
        raise BundleError(
            f"{MANIFEST_FILE}: {RANKER_FILE} declares {files[RANKER_FILE]['bytes']} bytes, above this "
            f"reader's limit of {MAX_RANKER_BYTES}"
        )
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    """``bundle.json`` of the bundle at ``path``, with its format and values checked (not the other files)."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path} is not a bundle directory")
    manifest_path = path / MANIFEST_FILE
    if manifest_path.is_symlink() or not manifest_path.is_file():
        raise BundleError(f"{MANIFEST_FILE} is missing from {path} (or is not a regular file)")
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{MANIFEST_FILE} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(
            manifest_path.read_text(), parse_constant=_reject_constant, parse_float=_finite_float
        )
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{MANIFEST_FILE} is not valid JSON: {error}") from error
    return _check_manifest(manifest)


def read_bundle(path: str | Path, verify: bool = True, max_bytes: int = MAX_BUNDLE_BYTES) -> Bundle:
    """Load a bundle; with ``verify`` (the default) every file's sha256 must match the manifest.

    Each file is read once and the bytes that were hashed are the bytes that are loaded, so a bundle
    replaced while it is being read cannot mix versions unnoticed. Files must be regular files (no
    symbolic links out of the bundle) of their declared size, ``max_bytes`` at most together.
    """
    path = Path(path)
    manifest = read_manifest(path)
    declared = {name: entry["bytes"] for name, entry in manifest["files"].items()}
    if sum(declared.values()) > max_bytes:
        raise BundleError(f"{path} declares {sum(declared.values())} bytes, above the limit of {max_bytes}")
    contents = {}
    for name in declared:
        file = path / name
        if file.is_symlink() or not file.is_file():
            raise BundleError(f"{name} is missing from {path} (or is not a regular file)")
        if file.stat().st_size != declared[name]:
            raise BundleError(
                f"{name} is {file.stat().st_size} bytes, {MANIFEST_FILE} says {declared[name]}: corrupt"
            )
        contents[name] = file.read_bytes()
        if verify and hashlib.sha256(contents[name]).hexdigest() != manifest["files"][name]["sha256"]:
            raise BundleError(f"{name} is corrupt: its sha256 does not match {MANIFEST_FILE}")
    try:
        index = faiss.deserialize_index(np.frombuffer(contents[INDEX_FILE], dtype=np.uint8))
    except RuntimeError as error:
        raise BundleError(f"{INDEX_FILE} cannot be read: {error}") from error
    try:
        items = pq.read_table(pa.BufferReader(contents[ITEMS_FILE]))
    except (pa.ArrowInvalid, OSError) as error:
        raise BundleError(f"{ITEMS_FILE} cannot be read: {error}") from error
    missing = [c for c in REQUIRED_ITEM_COLUMNS if c not in items.column_names]
    if missing:
        raise BundleError(f"{ITEMS_FILE}: missing column(s) {missing}")
    if index.ntotal != items.num_rows or index.ntotal != manifest["num_items"]:
        raise BundleError(
            f"{INDEX_FILE} ({index.ntotal}), {ITEMS_FILE} ({items.num_rows}) and {MANIFEST_FILE} "
            f"({manifest['num_items']}) disagree on the number of items"
        )
    if index.d != manifest["embedding_dim"]:
        raise BundleError(
            f"{INDEX_FILE} has dimension {index.d}, {MANIFEST_FILE} says {manifest['embedding_dim']}"
        )
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise BundleError(f"{INDEX_FILE} does not search by inner product")
    ids = items.column("product_id")
    if ids.null_count or not pa.types.is_integer(ids.type) or len(np.unique(ids.to_numpy())) != len(ids):
        raise BundleError(f"{ITEMS_FILE}: product_id must be unique non-null integers")
    popularity = items.column("popularity")
    if popularity.null_count or not pa.types.is_integer(popularity.type) or pc.min(popularity).as_py() < 0:
        raise BundleError(f"{ITEMS_FILE}: popularity must be non-negative integers")
    return Bundle(path, manifest, items, index, contents[MODEL_FILE], _ranker(manifest, items, contents))


def _ranker(manifest: dict[str, Any], items: pa.Table, contents: dict[str, bytes]) -> Ranker | None:
    if REPEAT_KEY not in manifest:
        return None
    columns = {
        name.removeprefix(RANKER_COLUMN_PREFIX): items.column(name).to_numpy(zero_copy_only=False)
        for name in items.column_names
        if name.startswith(RANKER_COLUMN_PREFIX)
    }
    try:
        model = contents[RANKER_FILE].decode("utf-8")
        return Ranker.from_parts(manifest[REPEAT_KEY], model, columns)
    except (ValueError, KeyError, TypeError) as error:  # UnicodeDecodeError is a ValueError
        raise BundleError(f"{MANIFEST_FILE}: invalid {REPEAT_KEY}: {error}") from error
