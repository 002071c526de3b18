"""Shopper encoders with exact top-K search over the catalogue, for batch candidate generation.

Both engines keep one contract: :meth:`Engine.encode` maps left-padded vocabulary indices [B, L] (and
their purchase gaps, which basket-aware models read) to shopper embeddings, :meth:`Engine.top` maps
those to each shopper's best ``wanted`` item rows (``recsys.data.vocabulary``: a bundle's rows) and
scores, never an unavailable product. Unavailable products are removed inside the engine, so they cost no
extra candidates downstream.

- :class:`OnnxEngine`: a bundle's ``model.onnx`` under ONNX Runtime (built from the very bytes the bundle
  reader verified, :func:`recsys.bundle.onnx_session`) and its FAISS index, on CPU: the numbers serving
  computes. Needs no torch.
- :class:`TorchEngine`: a training checkpoint. On CUDA the encoder runs under bf16 autocast; scores are
  fp32 matmuls against all products, chunked to bound memory, then ``torch.topk``. torch is imported
  only when this engine is built, so the ONNX path runs on a serving install.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from recsys.bundle import GRAPH_OPTIMIZATION, onnx_session, read_bundle, sha256_file
from recsys.data.vocabulary import PRODUCTS, Vocabulary
from recsys.ranker import Ranker

if TYPE_CHECKING:
    import torch

SCORE_CHUNK_ELEMENTS = 1 << 28  # scores materialised at once by the torch engine: 1 GiB of fp32
SEARCH_QUERIES = 1024  # shoppers per block of exact_search: their heaps stay in cache
SEARCH_ITEMS = 4096  # items per block: at most 16 MiB of fp32 scores at once
PARALLEL = ("rows", "ops")  # how OnnxEngine's cores share a batch


def exact_search(items_t: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best items of each query by inner product: scores [n, k] float32 and rows [n, k] int64,
    best first, as a flat FAISS index's ``search`` returns them (FAISS's own heaps, so the same order of
    ties), from ``items_t`` [d, N] (the item vectors, transposed).

    The scores are numpy's matrix products, block by block: faster than the BLAS that FAISS's wheel
    bundles (BENCHMARKS.md, "Batch candidates"), while the heaps keep FAISS's selection."""
    n, count = len(queries), items_t.shape[1]
    scores = np.empty((n, k), dtype=np.float32)
    rows = np.empty((n, k), dtype=np.int64)
    heaps = faiss.float_minheap_array_t()  # a min-heap of the k largest, per query
    heaps.nh, heaps.k, heaps.val, heaps.ids = n, k, faiss.swig_ptr(scores), faiss.swig_ptr(rows)
    heaps.heapify()
    block = np.empty(min(n, SEARCH_QUERIES) * min(count, SEARCH_ITEMS), dtype=np.float32)
    for first in range(0, n, SEARCH_QUERIES):
        last = min(first + SEARCH_QUERIES, n)
        for start in range(0, count, SEARCH_ITEMS):
            stop = min(start + SEARCH_ITEMS, count)
            found = block[: (last - first) * (stop - start)].reshape(last - first, stop - start)
            np.matmul(queries[first:last], items_t[:, start:stop], out=found)
            heaps.addn(stop - start, faiss.swig_ptr(found), start, first, last - first)
    heaps.reorder()  # best first
    return scores, rows


def onnx_settings(group: Mapping[str, Any]) -> dict[str, Any]:
    """A job config's ``onnx`` group as :class:`OnnxEngine`'s keyword arguments, checked: a ValueError
    names the first unknown key or bad value (``onnx.<key>``)."""
    settings = dict(group)
    unknown = sorted(set(settings) - {"encode_rows", "graph_optimization", "parallel"})
    if unknown:
        raise ValueError(f"unknown onnx settings {unknown}: encode_rows, graph_optimization, parallel")
    rows = settings.get("encode_rows")
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise ValueError(f"need onnx.encode_rows >= 1 (or null), got {rows!r}")
    level = settings.get("graph_optimization", "all")
    if level not in GRAPH_OPTIMIZATION:
        raise ValueError(
            f"onnx.graph_optimization must be one of {sorted(GRAPH_OPTIMIZATION)}, got {level!r}"
        )
    if settings.get("parallel", "rows") not in PARALLEL:
        raise ValueError(f"onnx.parallel must be one of {list(PARALLEL)}, got {settings['parallel']!r}")
    return settings


class Engine(ABC):
    """An encoder plus exact (or index) search over one catalogue, described by its vocabulary."""

    def __init__(
        self,
        vocab: Vocabulary,
        max_len: int,
        unavailable: np.ndarray | None = None,
        repeat: Ranker | None = None,
    ) -> None:
        self.vocab = vocab
        self.max_len = max_len
        self.repeat = repeat  # the model's repeat-aware scorer, if it has one
        rows = vocab.rows(np.asarray(unavailable if unavailable is not None else [], np.int64))
        self.blocked = np.zeros(vocab.num_products, dtype=bool)  # [N] rows never to return
        self.blocked[rows[rows >= 0]] = True

    @property
    def num_items(self) -> int:
        return self.vocab.num_products

    @property
    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What produced the scores (model files and their checksums, precision), for the manifest."""

    @abstractmethod
    def encode(self, item_ids: np.ndarray, gaps: np.ndarray) -> Any:
        """Shopper embeddings of ``item_ids`` [B, L] int64 (left-padded vocabulary indices, L <= max_len)
        with their ``gaps`` [B, L] float32 (``recsys.data.sequences.purchase_gaps``)."""

    @abstractmethod
    def top(self, shoppers: Any, wanted: int) -> tuple[np.ndarray, np.ndarray]:
        """Best ``wanted`` rows per shopper: rows [B, w] int64 (-1 for none) and scores [B, w] float32."""


class OnnxEngine(Engine):
    """A verified bundle: ONNX Runtime encodes on ``threads`` cores, FAISS searches on as many.

    Tuned for throughput: at most ``encode_rows`` shoppers per ONNX Runtime call, so a call's activations
    stay in cache, under ``graph_optimization`` (:data:`recsys.bundle.GRAPH_OPTIMIZATION`). ``parallel``
    says how the cores share a batch: ``"rows"``, each core runs its own single-threaded calls on the
    batch's chunks of ``encode_rows`` shoppers (None: one chunk per core); ``"ops"``, one call at a time
    (None: the whole batch), each operator split over the cores. ``conf/candidates.yaml`` sets them,
    ``benchmarks/batch_candidates.py --sweep`` measures them. Both give the same embeddings.
    """

    def __init__(
        self,
        path: str | Path,
        threads: int | None = None,
        unavailable: np.ndarray | None = None,
        encode_rows: int | None = None,
        graph_optimization: str = "all",
        parallel: str = "rows",
    ) -> None:
        onnx_settings(
            {"encode_rows": encode_rows, "graph_optimization": graph_optimization, "parallel": parallel}
        )
        bundle = read_bundle(path)
        popularity = bundle.items.column("popularity").to_numpy().astype(np.int64)
        super().__init__(
            Vocabulary(bundle.product_ids.astype(np.int64), popularity),
            bundle.max_len,
            unavailable,
            bundle.repeat,
        )
        self.threads = threads or os.cpu_count() or 1
        self.encode_rows, self.parallel = encode_rows, parallel
        # by rows, each call runs on the thread that makes it; by operators, on all the cores
        self._session = onnx_session(bundle, 1 if parallel == "rows" else self.threads, graph_optimization)
        self._input = bundle.manifest["input_name"]
        self._gaps = bundle.gaps_name
        self._output = bundle.manifest["output_name"]
        self._index = bundle.index
        flat = isinstance(self._index, faiss.IndexFlat)
        # a flat index is searched by exact_search, over its vectors; any other through FAISS
        self._items_t = (
            np.ascontiguousarray(self._index.reconstruct_n(0, self._index.ntotal).T)
            if flat and self._index.metric_type == faiss.METRIC_INNER_PRODUCT
            else None
        )
        self.items = bundle.items  # the bundle's product table: ids, popularity, training-data metadata
        self._identity = {
            "engine": "onnx",
            "bundle": str(bundle.path.resolve()),
            "model": bundle.manifest["model"],
            "index": bundle.manifest.get("index"),
            "bundle_id": bundle.bundle_id,  # the id serving reports: covers bundle.json and every file
        }

    @property
    def identity(self) -> dict[str, Any]:
        return self._identity

    def encode(self, item_ids: np.ndarray, gaps: np.ndarray) -> np.ndarray:
        by_rows = self.parallel == "rows"
        whole = -(-len(item_ids) // self.threads) if by_rows else len(item_ids)
        step = self.encode_rows or max(1, whole)
        # an empty batch still runs once, for its [0, d] result
        starts = range(0, len(item_ids), step) or range(1)

        def call(start: int) -> np.ndarray:
            rows = slice(start, start + step)
            feeds = {self._input: item_ids[rows]}
            if self._gaps is not None:
                feeds[self._gaps] = gaps[rows]
            return self._session.run([self._output], feeds)[0]

        if by_rows and self.threads > 1 and len(starts) > 1:
            # ONNX Runtime releases the GIL while it runs; map keeps the chunks in order
            with ThreadPoolExecutor(min(self.threads, len(starts)), thread_name_prefix="encode") as pool:
                chunks = list(pool.map(call, starts))
        else:
            chunks = [call(start) for start in starts]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    def top(self, shoppers: np.ndarray, wanted: int) -> tuple[np.ndarray, np.ndarray]:
        blocked = int(self.blocked.sum())
        # OpenMP's thread count is per calling thread: set it on the thread that searches
        faiss.omp_set_num_threads(self.threads)
        queries = np.ascontiguousarray(shoppers, dtype=np.float32)
        k = min(self.num_items, wanted + blocked)
        if self._items_t is not None and k > 0:
            scores, rows = exact_search(self._items_t, queries, k)
        else:
            scores, rows = self._index.search(queries, k)
        if blocked:
            rows = np.where(self.blocked[rows.clip(0)], -1, rows)
        return rows, scores


class TorchEngine(Engine):
    """A checkpoint's model on ``device``: bf16-autocast encoder on CUDA (fp32 on CPU), fp32 scores."""

    def __init__(
        self,
        checkpoint: str | Path,
        device: str = "cpu",
        unavailable: np.ndarray | None = None,
        threads: int | None = None,
    ) -> None:
        import torch

        from training import checkpoint as checkpoints
        from training.module import module_from_checkpoint

        path = Path(checkpoint)
        self._device = torch.device(device)
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device={device} but torch sees no CUDA device; use device=cpu")
        if self._device.type == "cpu" and threads:
            torch.set_num_threads(threads)
        state = checkpoints.read(path)
        module = module_from_checkpoint(state)
        super().__init__(
            module.vocab, int(module.model.config.max_len), unavailable, checkpoints.scorer(state)
        )
        self._model = module.model.to(self._device).eval()
        with torch.no_grad():
            self._items = self._model.item_embeddings()[PRODUCTS].float().contiguous()  # [N, d]
        self._blocked = torch.from_numpy(self.blocked).to(self._device) if self.blocked.any() else None
        self._autocast = self._device.type == "cuda"
        self._identity = {
            "engine": "torch",
            "checkpoint": str(path.resolve()),
            "sha256": sha256_file(path),
            "model": module.hparams["net"],
            "encoder_precision": "bf16-autocast" if self._autocast else "fp32",
            "device": self._device.type,
        }

    @property
    def identity(self) -> dict[str, Any]:
        return self._identity

    def encode(self, item_ids: np.ndarray, gaps: np.ndarray) -> torch.Tensor:
        import torch

        x = torch.from_numpy(item_ids).to(self._device)
        x_gaps = torch.from_numpy(gaps).to(self._device)
        with (
            torch.inference_mode(),
            torch.autocast(self._device.type, dtype=torch.bfloat16, enabled=self._autocast),
        ):
            shoppers = self._model.encode(x, x_gaps).float()
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)  # so stage timings measure the work, not its launch
        return shoppers

    def top(self, shoppers: torch.Tensor, wanted: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        wanted = min(wanted, self.num_items)
        chunk = max(1, SCORE_CHUNK_ELEMENTS // self.num_items)
        values, indices = [], []
        with torch.inference_mode():
            for start in range(0, len(shoppers), chunk):
                scores = shoppers[start : start + chunk] @ self._items.T  # [chunk, N] fp32
                if self._blocked is not None:
                    scores.masked_fill_(self._blocked, float("-inf"))
                # unsorted: the scorer orders candidates itself, and sorting costs on the GPU
                top = scores.topk(wanted, dim=1, sorted=False)
                values.append(top.values)
                indices.append(top.indices)
            scores = torch.cat(values).cpu().numpy()
            rows = torch.cat(indices).cpu().numpy()
        missing = np.isneginf(scores)  # a blocked row, picked only when too few others remain
        return np.where(missing, -1, rows), np.where(missing, np.float32(np.nan), scores)
