"""In-process serving latency and throughput of ``serving.recommender.Recommender`` on CPU.

    .venv/bin/python -m benchmarks.serve_latency                     # SASRec d=64, L=50, 30k items, Flat
    .venv/bin/python -m benchmarks.serve_latency --requests 5000 --batches 50 --threads 2
    .venv/bin/python -m benchmarks.serve_latency --bundle artifacts/demo/bundle \
        --real artifacts/demo/receipts.parquet                      # real histories, repeat-aware

The bundle is a real SASRec (2 blocks, 2 heads, random weights: latency does not depend on training)
exported by ``export.onnx.export_encoder`` (parity-checked against torch), its item table in a flat
inner-product FAISS index. It is built once under ``--bundle`` by a child process, so torch never loads
in the measuring process, as in production. Histories: log-normal lengths (median 20, some above
max_len, so truncated), Zipf-distributed products. Reports single-request p50/p90/p99 (end to end, then
the ONNX encode and the FAISS search alone) and batched requests/s.

With ``--real RECEIPTS`` the bundle at ``--bundle`` is used as it is (e.g. the demo's), and the single
requests are real shoppers' whole histories from the receipts (canonical columns, e.g. the demo's
Complete Journey ``receipts.parquet``), with their purchase times, under repeat-aware rules: every
request as a production caller would send it. They are also reported by history length, which sets
their cost, and, for a bundle with a ranker, stage by stage (parsing, encoding, search, the ranker's
features, its trees, the final selection), each staged request checked against the recommender's list,
then the trees as served (ONNX Runtime) against LightGBM's own predictor on the same rows, where
lightgbm is installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import faiss
import numpy as np
import pyarrow.parquet as pq

from recsys.bundle import Bundle, onnx_session, read_bundle
from recsys.data.schema import PRODUCT, SHOPPER, TIMESTAMP
from recsys.data.vocabulary import PRODUCTS, Vocabulary, index_count
from recsys.inputs import Histories
from recsys.ranker import Ranker, per_shopper
from recsys.rules import Rules
from recsys.scoring import search_size, select
from serving.recommender import Recommender

T = TypeVar("T")


def build_bundle(path: Path, num_items: int, dim: int, max_len: int, seed: int) -> None:
    """Export a random SASRec with the project's exporter and write it as a bundle (needs torch)."""
    import pyarrow as pa
    import torch

    from export.index import flat
    from export.onnx import PARITY_TOLERANCE, export_encoder, parity
    from recsys.bundle import write_bundle
    from recsys.models.sasrec import SASRecConfig

    torch.manual_seed(seed)
    config = SASRecConfig(num_items=index_count(num_items), dim=dim, max_len=max_len)
    model = config.build().eval()
    model_onnx = export_encoder(model)
    error = parity(model, model_onnx, batch_sizes=(1, 8))
    print(f"exported SASRec: onnx vs torch max abs diff {error:.2e} (tolerance {PARITY_TOLERANCE:.0e})")
    with torch.no_grad():
        vectors = model.item_embeddings()[PRODUCTS].numpy()

    rng = np.random.default_rng(seed)
    items = pa.table(
        {
            "product_id": rng.choice(10**9, size=num_items, replace=False).astype(np.int64),
            "popularity": (1e5 / np.arange(1, num_items + 1)).astype(np.int64),  # Zipf, in row order
        }
    )
    manifest = {
        "model": {"name": "sasrec", "config": dataclasses.asdict(config)},
        "max_len": max_len,
        "embedding_dim": dim,
    }
    write_bundle(path, model_onnx, items, flat(np.ascontiguousarray(vectors)), manifest, overwrite=True)


def ensure_bundle(args: argparse.Namespace) -> None:
    """Build the bundle in a child process unless one of the requested shape is already there."""
    if args.bundle.exists() and not args.rebuild:
        manifest = read_bundle(args.bundle, verify=False).manifest
        if (manifest["num_items"], manifest["embedding_dim"], manifest["max_len"]) == (
            args.items,
            args.dim,
            args.max_len,
        ):
            return
    command = [sys.executable, "-m", "benchmarks.serve_latency", "--build-only", "--bundle", str(args.bundle)]
    command += ["--items", str(args.items), "--dim", str(args.dim), "--max-len", str(args.max_len)]
    subprocess.run(command, check=True)


def sample_histories(product_ids: np.ndarray, count: int, seed: int) -> list[list[int]]:
    """Log-normal lengths (median 20, capped at 200), Zipf-popular products (rows are by popularity)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(20), 0.9, size=count).astype(int), 1, 200)
    rows = (rng.zipf(1.2, size=int(lengths.sum())) - 1) % len(product_ids)
    return [h.tolist() for h in np.split(product_ids[rows], np.cumsum(lengths)[:-1])]


def real_histories(receipts: Path, count: int, seed: int) -> list[tuple[list[int], list[float]]]:
    """Up to ``count`` shoppers' whole histories from ``receipts``: product ids and purchase times
    (seconds since the epoch), oldest first, shoppers in a seeded random order (repeated when fewer)."""
    table = pq.read_table(receipts, columns=[SHOPPER, PRODUCT, TIMESTAMP])
    shoppers = table.column(SHOPPER).to_numpy()
    products = table.column(PRODUCT).to_numpy()
    seconds = table.column(TIMESTAMP).to_numpy().astype("datetime64[ns]").astype(np.int64) / 1e9
    order = np.lexsort((seconds, shoppers))
    starts = np.flatnonzero(np.r_[True, shoppers[order][1:] != shoppers[order][:-1]])
    histories = [(products[rows].tolist(), seconds[rows].tolist()) for rows in np.split(order, starts[1:])]
    picks = np.random.default_rng(seed).permutation(np.resize(np.arange(len(histories)), count))
    return [histories[i] for i in picks]


def report(name: str, seconds: list[float], note: str = "") -> None:
    """One line: percentiles of ``seconds`` in milliseconds."""
    ms = np.array(seconds) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    print(
        f"{name:<32} p50 {p50:7.3f} ms  p90 {p90:7.3f} ms  p99 {p99:7.3f} ms  mean {ms.mean():7.3f} ms{note}"
    )


def timed(call: Callable[[T], object], inputs: list[T]) -> list[float]:
    """Seconds per ``call(item)``."""
    out = []
    for item in inputs:
        start = time.perf_counter()
        call(item)
        out.append(time.perf_counter() - start)
    return out


STAGES = ("parse", "encode", "search", "features", "trees", "select")


def stage_report(
    recommender: Recommender, bundle: Bundle, requests: list[tuple[list[int], list[float]]], rules: Rules
) -> None:
    """Where a ranked single request's time goes: the steps of ``Recommender.recommend`` run one at a time
    through the library's public pieces, each request's list checked against the recommender's own, so
    the breakdown cannot drift from what serving does. Reported for all requests and for the slowest 5%,
    the ones that set the p99."""
    vocab = Vocabulary(bundle.product_ids, bundle.items.column("popularity").to_numpy())
    session = onnx_session(bundle, 1)
    ranker = bundle.repeat
    faiss.omp_set_num_threads(1)
    spent, feature_rows = [], []
    for history, stamps in requests:
        clock = [time.perf_counter()]
        shoppers = Histories.from_requests(vocab, [history], [stamps])
        if not shoppers.lengths[0]:
            continue  # the popularity fallback: no ranked stage to time
        clock.append(time.perf_counter())
        item_ids, gap_days = shoppers.model_inputs(recommender.max_len)
        feed = {bundle.manifest["input_name"]: item_ids}
        if bundle.gaps_name is not None:  # a basket-aware model reads the gaps too
            feed[bundle.gaps_name] = gap_days
        (embedding,) = session.run(None, feed)
        clock.append(time.perf_counter())
        scores, rows = bundle.index.search(
            embedding, search_size(shoppers, rules, ranker, recommender.num_items)
        )
        clock.append(time.perf_counter())
        found = ranker.candidates(shoppers, rows, scores)
        feature_rows.append(found.x)
        clock.append(time.perf_counter())
        probability = ranker.probability(found.x)
        clock.append(time.perf_counter())
        blended = per_shopper(found.owner, found.rows, probability, found.size_factor, 1)
        ranked, _ = select(blended[0], blended[1], rules.k, order=blended[2])
        clock.append(time.perf_counter())
        served = recommender.recommend(history, rules, timestamps=stamps).product_ids
        if vocab.product_ids[ranked[0][ranked[0] >= 0]].tolist() != served:
            raise AssertionError("the staged request does not give the recommender's list")
        spent.append(np.diff(clock))
    ms = np.array(spent) * 1e3  # [requests, stages]
    slowest = ms.sum(axis=1) >= np.percentile(ms.sum(axis=1), 95)
    print(f"  stages of a ranked request, mean ms: all {len(ms)} / the slowest 5% ({slowest.sum()})")
    for j, stage in enumerate(STAGES):
        print(f"    {stage:<10} {ms[:, j].mean():7.3f} / {ms[slowest, j].mean():7.3f}")
    trees_report(ranker, feature_rows)


def trees_report(ranker: Ranker, feature_rows: list[np.ndarray]) -> None:
    """The ranker's trees as serving runs them (``recsys.trees``: ONNX Runtime) against LightGBM's own
    predictor on the same rows: per request's rows, then all of them in one call on 1 and 2 threads,
    every probability checked to be LightGBM's to within two units in the last place. Skipped where
    lightgbm is not installed (a serve box)."""
    try:
        import lightgbm
    except ImportError:
        print("  trees: lightgbm is not installed, no reference to time against")
        return
    booster = lightgbm.Booster(model_str=ranker.model)
    columns = [x[:, ranker.columns] for x in feature_rows]

    def by_lightgbm(x: np.ndarray, threads: int = 1) -> np.ndarray:
        return booster.predict(x, num_threads=threads)

    for x in columns:  # to two units in the last place: NumPy's exp is not the C library's (recsys/trees.py)
        np.testing.assert_array_max_ulp(ranker.trees.probability(x), by_lightgbm(x), maxulp=2)
    rows = np.array([len(x) for x in columns])
    size = f"{np.median(rows):.0f} rows (median) of {len(ranker.features)} features"
    print(f"  trees, {len(columns)} requests of {size}:")
    report("    onnxruntime (served)", timed(ranker.trees.probability, columns))
    report("    lightgbm predict", timed(by_lightgbm, columns))
    every = np.concatenate(columns)
    for threads in (1, 2):
        seconds = {}
        for name, call in (("onnxruntime", ranker.trees.probability), ("lightgbm", by_lightgbm)):
            start = time.perf_counter()
            call(every, threads)
            seconds[name] = time.perf_counter() - start
        took = ", ".join(f"{name} {value:.3f} s" for name, value in seconds.items())
        print(f"    all {len(every):,} rows in one call, {threads} thread(s): {took}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=Path("artifacts/bench/serve_sasrec_30k"))
    parser.add_argument("--items", type=int, default=30_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--rebuild", action="store_true", help="rebuild the bundle even if it exists")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=2000, help="timed single requests")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=20, help="timed batches")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--faiss-threads", type=int, default=1, help="FAISS OpenMP threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", type=Path, default=None, help="receipts: single requests of real shoppers")
    args = parser.parse_args()
    if args.build_only:
        build_bundle(args.bundle, args.items, args.dim, args.max_len, args.seed)
        return

    if args.real is None:
        ensure_bundle(args)
    faiss.omp_set_num_threads(args.faiss_threads)  # for the search-alone timing; the recommender sets its own
    threads = {"intra_op_threads": args.threads, "search_threads": args.faiss_threads}
    recommender = Recommender.load(args.bundle, **threads)
    assert "torch" not in sys.modules
    bundle = read_bundle(args.bundle, verify=False)
    histories = sample_histories(bundle.product_ids, args.requests + args.batch * args.batches, args.seed)
    singles, batched = histories[: args.requests], histories[args.requests :]
    lengths = np.array([len(h) for h in singles])
    print(f"bundle {args.bundle}: {recommender.num_items:,} items, d={recommender.dim}, ", end="")
    print(f"max_len={recommender.max_len}, {type(bundle.index).__name__}")
    print(f"threads: onnxruntime intra-op {args.threads}, faiss {args.faiss_threads}; ", end="")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; history length ", end="")
    print(f"median {np.median(lengths):.0f}, {np.mean(lengths > recommender.max_len):.0%} above max_len")

    rules, excluding_rules = Rules(k=args.k), Rules(k=args.k, exclude_purchased=True)
    if args.real is not None:
        real = real_histories(args.real, args.requests, args.seed)
        aware = Rules(k=args.k, repeat_aware=True)
        for history, stamps in real[:100]:  # warm-up
            recommender.recommend(history, aware, timestamps=stamps)
        seconds = timed(lambda request: recommender.recommend(request[0], aware, timestamps=request[1]), real)
        lengths = np.array([len(h) for h, _ in real])
        note = f"  (median history {np.median(lengths):.0f} products)"
        report(f"single k={args.k} real, repeat-aware", seconds, note)
        # the ranker's features read the whole history, so the longest histories set the tail
        edges = [0, 100, 300, 600, 1200, int(lengths.max(initial=0)) + 1]
        for low, high in itertools.pairwise(edges):
            inside = (lengths >= low) & (lengths < high)
            if inside.any():
                report(f"  history {low}-{high - 1} ({inside.sum()})", list(np.asarray(seconds)[inside]))
        if bundle.repeat is not None:
            stage_report(recommender, bundle, real, aware)
    for history in singles[:100]:  # warm-up: allocator, caches, thread pools
        recommender.recommend(history, rules)
    report(f"single k={args.k}", timed(lambda h: recommender.recommend(h, rules), singles))
    excluding = timed(lambda h: recommender.recommend(h, excluding_rules), singles)
    report(f"single k={args.k} exclude_purchased", excluding)

    # Components alone, on the same histories (most recent max_len, unpadded), through the same front-end.
    session = onnx_session(bundle, args.threads)
    name = bundle.manifest["input_name"]
    vocab = Vocabulary(bundle.product_ids, bundle.items.column("popularity").to_numpy())
    encoded = [Histories.from_requests(vocab, [h]).model_inputs(recommender.max_len)[0] for h in singles]
    report("  onnx encode alone", timed(lambda x: session.run(None, {name: x}), encoded))
    queries = [session.run(None, {name: x})[0] for x in encoded[:500]]
    report(f"  faiss search alone k={args.k}", timed(lambda q: bundle.index.search(q, args.k), queries))

    chunks = [batched[i : i + args.batch] for i in range(0, len(batched), args.batch)]
    recommender.recommend_batch(chunks[0], rules)
    times = timed(lambda chunk: recommender.recommend_batch(chunk, rules), chunks)
    rate = args.batch * len(chunks) / sum(times)
    report(f"batch {args.batch} k={args.k}", times, f"  -> {rate:,.0f} requests/s")


if __name__ == "__main__":
    main()
