"""Export cost of each FAISS index per catalogue size: build time, bundle size, recall@10, query latency.

    python -m benchmarks.export_index                                # 30k and 1M items, d=64
    python -m benchmarks.export_index --sizes 30000 --indexes flat hnsw

Item vectors are a seeded Gaussian mixture (one cluster per 100 items, d=64), a stand-in for trained
embeddings; queries are random item vectors. The encoder is an untrained SASRec (d=64, 2 layers, max_len 50)
with one input embedding row per item, so model.onnx has the size a real export of that catalogue has.
Each bundle is written with ``write_bundle`` to a temporary directory (checksums included), then removed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

from export import index as indexes
from export.onnx import export_encoder
from recsys.bundle import FILES, INDEX_FILE, write_bundle
from recsys.data.vocabulary import index_count
from recsys.models.sasrec import SASRecConfig

BUILDERS = {"flat": indexes.flat, "hnsw": indexes.hnsw, "ivfpq": indexes.ivfpq}
MB = 1 << 20


def item_vectors(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """[n, dim] float32 Gaussian-mixture vectors, one cluster per 100 items."""
    centres = rng.normal(size=(max(1, n // 100), dim)).astype(np.float32)
    vectors = centres[rng.integers(0, len(centres), n)]
    vectors += 0.7 * rng.standard_normal((n, dim), dtype=np.float32)
    return vectors


def latency_ms(index: faiss.Index, queries: np.ndarray, k: int) -> float:
    """Mean milliseconds per single-query search on one thread, as a serving worker calls the index.

    One thread: on busy cores each OpenMP barrier of a multi-threaded search can wait a whole time slice.
    """
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index.search(queries[:5], k)  # warm-up
        start = time.perf_counter()
        for query in queries:
            index.search(query[None], k)
        return (time.perf_counter() - start) / len(queries) * 1000
    finally:
        faiss.omp_set_num_threads(threads)


def row(*cells: str) -> None:
    """One Markdown table row, printed as soon as it is measured."""
    print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[30_000, 1_000_000])
    parser.add_argument("--indexes", nargs="+", choices=list(BUILDERS), default=list(BUILDERS))
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=1000, help="for recall@10")
    parser.add_argument("--latency-queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, d={args.dim}")
    row("items", "index", "params", "build s", "write s", "index MB", "bundle MB", "recall@10", "ms/query")
    row(*["---"] * 9)
    for n in args.sizes:
        rng = np.random.default_rng(args.seed)
        vectors = item_vectors(n, args.dim, rng)
        queries = vectors[rng.choice(n, args.queries, replace=False)]
        config = SASRecConfig(num_items=index_count(n), dim=args.dim)
        start = time.perf_counter()
        onnx_bytes = export_encoder(config.build())
        export_s = time.perf_counter() - start
        row(f"{n:,}", "(encoder)", f"SASRec, {index_count(n):,} rows", f"{export_s:.1f} (ONNX export)",
            "", "", f"{len(onnx_bytes) / MB:.1f} (model.onnx)", "", "")  # fmt: skip
        items = pa.table(
            {"product_id": pa.array(np.arange(n), pa.int64()), "popularity": pa.array(np.ones(n), pa.int64())}
        )
        for name in args.indexes:
            start = time.perf_counter()
            index = BUILDERS[name](vectors)
            build_s = time.perf_counter() - start
            described = indexes.describe_index(index)
            recall = indexes.index_recall(index, vectors, queries, 10)
            latency = latency_ms(index, queries[: args.latency_queries], 10)
            manifest = {"model": {"name": "SASRec"}, "max_len": config.max_len, "embedding_dim": args.dim}
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                path = write_bundle(Path(tmp) / "bundle", onnx_bytes, items, index, manifest)
                write_s = time.perf_counter() - start
                index_mb = (path / INDEX_FILE).stat().st_size / MB
                bundle_mb = sum((path / file).stat().st_size for file in FILES) / MB
            params = ", ".join(f"{k}={v}" for k, v in described["params"].items()) or "exact"
            row(f"{n:,}", described["type"], params, f"{build_s:.1f}", f"{write_s:.1f}", f"{index_mb:.1f}",
                f"{bundle_mb:.1f}", f"{recall:.3f}", f"{latency:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
