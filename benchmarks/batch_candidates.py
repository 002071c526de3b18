"""Batch candidate generation throughput: the sharded, resumable job against a plain loop, in one run.

    .venv/bin/python -m benchmarks.batch_candidates --shoppers 50000 --products 10000 --dim 128    # CPU
    python -m benchmarks.batch_candidates --device cuda --shoppers 18500000 --products 100000 \\
        --mean-baskets 8 --reference-shoppers 1000000 --workdir /scratch/bench                    # H100

Run from the repository root.

At 18.5M shoppers, ``--mean-baskets 8`` keeps the receipts to ~1.2B rows (~10 GB, and as much again for
the job's partition files); run once with ``--generate-only`` to write the data and checkpoint first.

Data: seeded synthetic receipts (``recsys.data.synthetic``), written once under ``--workdir`` and reused
by later runs of the same size. The model is an untrained SASRec (2 blocks, 2 heads, max_len 50; the
throughput does not depend on training) saved as a checkpoint; with ``--device cpu`` it is also exported
as a Flat bundle (its encoder as ``--quantize`` says, int8 by default), so both engines
run: ONNX Runtime + FAISS, and torch. ``--device cuda`` runs the torch engine with its bf16-autocast
encoder.

Each job run reports end-to-end shoppers/s (partition pass included; a shard of one part has none, its
rows are streamed into memory and counted in read) and seconds per stage. The stages overlap on their
own threads (read and grouping, encode + top-K, select, write), so they add up to more than the wall.
The reference is the plain loop: the whole table in memory, its histories as the model reads them
(``recsys.inputs.Histories.model_inputs``), then per batch encode -> scores -> topk -> pandas DataFrame ->
``to_parquet``; no rules, fallback, sharding or resume. It runs on the first
``--reference-shoppers`` shoppers only (the whole table must fit in memory), on the same device.
``--reference full`` encodes as the plain loop of the issue did (the full forward over every position,
then the last one), ``trimmed`` with the model's ``encode`` (the last position's work only), ``both``
runs the two, ``none`` neither.

On CPU the run starts with the encoder on its own (``OnnxEngine.encode`` over full-width histories of
``max_len`` items): its achieved GFLOP/s (the FLOPs of the trimmed encoder's matrix products, counted
from their shapes) against a roofline measured on the same box, the numpy and torch GEMM rates of
exactly those shapes in the same order; the fraction is the ratio of the two (the GEMM rates of the
weight products alone, without attention's small batched ones, are printed beside). An int8 encoder's
FLOPs are counted as the fp32 ones it replaces, against the fp32 GEMMs, so it can pass 100%. ``--sweep`` first
measures the encoder's shoppers/s over ``onnx.encode_rows``, ``onnx.parallel`` (cores on their own calls,
or each call's operators over all cores) and ONNX Runtime's graph optimisation levels (the choice in
``conf/candidates.yaml``). ``--repeats N`` runs the jobs and the reference N
times, interleaved, and prints each repeat's job / reference ratio and their median: on a shared box whose
speed drifts, a ratio of two runs taken one after the other is what is comparable.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import torch
from hydra import compose, initialize_config_dir

from batch.candidates import run
from batch.engines import PARALLEL, OnnxEngine
from export.export import export_bundle
from export.index import flat
from recsys.data.loader import open_dataset
from recsys.data.schema import BASKET, PRODUCT, SHOPPER, TIMESTAMP
from recsys.data.sequences import build_sequences
from recsys.data.synthetic import PRODUCT_ID_OFFSET, SHOPPER_ID_OFFSET, SyntheticConfig, write_parquet
from recsys.data.vocabulary import PRODUCTS, Vocabulary
from recsys.inputs import Histories
from training.module import NextItemModule, load_module, save_module

CONF = Path(__file__).resolve().parents[1] / "conf"
# the encoder of the benchmarks' untrained model: conf/export.yaml's quantize=auto judges int8 on real data
MEASURED = ("none", "int8")
MEASURED_HELP = "the untrained model's encoder (export's default, auto, needs real data to judge int8)"
STAGES = ("partition", "read", "encode", "top_k", "select", "write")


def ensure_receipts(path: Path, config: SyntheticConfig) -> None:
    """Synthetic receipts of ``config`` under ``path``, regenerated only when the config changed."""
    stamp = path / "_config.json"
    wanted = json.dumps(vars(config), sort_keys=True)
    if stamp.exists() and stamp.read_text() == wanted:
        return
    shutil.rmtree(path, ignore_errors=True)
    stats = write_parquet(config, path)
    print(f"generated {stats['rows']:,} receipt rows in {stats['seconds']:.1f} s")
    stamp.write_text(wanted)


def ensure_checkpoint(path: Path, num_products: int, dim: int, seed: int) -> None:
    """An untrained SASRec over the synthetic catalogue, saved as ``load_module`` reads checkpoints."""
    if path.exists():
        return
    ids = PRODUCT_ID_OFFSET + np.arange(num_products, dtype=np.int64)
    vocab = Vocabulary(ids, np.arange(num_products, 0, -1, dtype=np.int64))  # popularity: fallback only
    net = {"name": "sasrec", "num_items": vocab.size, "max_len": 50,
           "dim": dim, "num_layers": 2, "num_heads": 2, "dropout": 0.0}  # fmt: skip
    torch.manual_seed(seed)
    module = NextItemModule(net, vocab)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_module(module, path)


def job(receipts: Path, output: Path, args: argparse.Namespace, **model: str) -> dict[str, Any]:
    """One run of the candidate job (Hydra config composed as the command line would)."""
    shutil.rmtree(output, ignore_errors=True)
    settings = {"receipts": receipts, "output": output, "k": args.k, "batch_size": args.batch_size}
    settings |= {"read_threads": args.read_threads, "select_threads": args.select_threads}
    settings |= {"device": args.device, "progress": str(args.progress).lower(), **model}
    if args.rows_per_part is not None:
        settings["rows_per_part"] = args.rows_per_part
    if args.encode_rows is not None:
        settings["onnx.encode_rows"] = args.encode_rows
    if args.graph_optimization is not None:
        settings["onnx.graph_optimization"] = args.graph_optimization
    if args.parallel is not None:
        settings["onnx.parallel"] = args.parallel
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("candidates", overrides=[f"{key}={value}" for key, value in settings.items()])
    return run(cfg)


def reference(
    receipts: Path, output: Path, checkpoint: Path, args: argparse.Namespace, full: bool
) -> dict[str, Any]:
    """The plain loop over the first ``--reference-shoppers`` shoppers; returns rows and stage seconds.

    ``full``: encode with the full forward over every position, then keep the last (the loop as the issue
    measured it); otherwise with the model's ``encode``.
    """
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    device = torch.device(args.device)
    module = load_module(checkpoint)
    model, vocab = module.model.to(device).eval(), module.vocab
    items = model.item_embeddings()[PRODUCTS].detach().float()
    seconds = dict.fromkeys(("read", "encode", "top_k", "write"), 0.0)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    began = time.perf_counter()
    limit = pc.field(SHOPPER) < SHOPPER_ID_OFFSET + args.reference_shoppers
    table = open_dataset(receipts).to_table(columns=[SHOPPER, BASKET, PRODUCT, TIMESTAMP], filter=limit)
    sequences = build_sequences(table, vocab, drop_unknown=True)
    item_ids, gap_days = Histories.from_sequences(sequences).model_inputs(model.config.max_len)
    seconds["read"] = time.perf_counter() - began

    for number, start in enumerate(range(0, len(item_ids), args.batch_size)):
        stop = min(start + args.batch_size, len(item_ids))
        began = time.perf_counter()
        x = torch.from_numpy(item_ids[start:stop]).to(device)
        gaps = torch.from_numpy(gap_days[start:stop]).to(device)
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
        ):
            shoppers = (model(x, gaps)[:, -1] if full else model.encode(x, gaps)).float()
        sync()
        encoded = time.perf_counter()
        with torch.inference_mode():
            top = (shoppers @ items.T).topk(args.k, dim=1)
            scores, rows = top.values.cpu().numpy(), top.indices.cpu().numpy()
        searched = time.perf_counter()
        frame = pd.DataFrame(
            {
                SHOPPER: sequences.shopper_ids[start:stop],
                "product_ids": list(vocab.product_ids[rows]),
                "scores": list(scores),
            }
        )
        frame.to_parquet(output / f"part-{number:05d}.parquet")
        seconds["encode"] += encoded - began
        seconds["top_k"] += searched - encoded
        seconds["write"] += time.perf_counter() - searched
    return {"rows": len(item_ids), "seconds": seconds}


def report(name: str, rows: int, seconds: dict[str, float], wall: float) -> None:
    """One Markdown table row."""
    stages = [f"{seconds[s]:.1f}" if s in seconds else "" for s in STAGES]
    print(f"| {name} | {rows:,} | {wall:.1f} | {rows / wall:,.0f} | " + " | ".join(stages) + " |", flush=True)


def products(batch: int, length: int, net: dict[str, Any]) -> list[tuple[int, int, int, int]]:
    """The trimmed SASRec encoder's matrix products on ``batch`` histories of ``length`` items, in the
    order it runs them, as (count, m, k, n): ``count`` independent [m, k] @ [k, n] products (attention
    scores and weighted values: one per shopper and head). Every block but the last runs on all positions;
    the last computes keys and values there and the rest at the last position (``recsys.models.sasrec``)."""
    d, heads, layers = net["dim"], net["num_heads"], net["num_layers"]
    rows, per_head = batch * length, d // heads
    shapes = []
    for layer in range(layers):
        last = layer == layers - 1
        queries, width = (batch, 1) if last else (rows, length)  # query rows in all, per shopper
        shapes += [(1, rows, d, 2 * d), (1, batch, d, d)] if last else [(1, rows, d, 3 * d)]
        shapes += [(batch * heads, width, per_head, length), (batch * heads, width, length, per_head)]
        shapes += [(1, queries, d, d), (1, queries, d, 4 * d), (1, queries, 4 * d, d)]
    return shapes


def flops(shapes: list[tuple[int, int, int, int]]) -> int:
    """Floating-point operations of the products (a multiply-add counts 2)."""
    return sum(2 * count * m * k * n for count, m, k, n in shapes)


def rate(call: Any, work: float, seconds: float, rounds: int = 3) -> float:
    """Median over ``rounds`` of ``work`` units per second of ``call()``, each round at least ``seconds``."""
    call()  # warm-up: allocations, thread pools, ONNX Runtime's first-run planning
    rates = []
    for _ in range(rounds):
        began, done = time.perf_counter(), 0
        while time.perf_counter() - began < seconds:
            call()
            done += 1
        rates.append(done * work / (time.perf_counter() - began))
    return statistics.median(rates)


def gemm_rates(shapes: list[tuple[int, int, int, int]], seconds: float) -> dict[str, float]:
    """GFLOP/s of numpy and of torch running exactly ``shapes``' products in order (the roofline)."""
    rng = np.random.default_rng(0)
    operands = [
        (
            rng.standard_normal((count, m, k) if count > 1 else (m, k), dtype=np.float32),
            rng.standard_normal((count, k, n) if count > 1 else (k, n), dtype=np.float32),
        )
        for count, m, k, n in shapes
    ]
    tensors = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in operands]
    work = flops(shapes) / 1e9

    def with_numpy() -> None:
        for a, b in operands:
            np.matmul(a, b)

    def with_torch() -> None:
        with torch.inference_mode():
            for a, b in tensors:
                torch.matmul(a, b)

    return {"numpy": rate(with_numpy, work, seconds), "torch": rate(with_torch, work, seconds)}


def encoder_histories(engine: OnnxEngine, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` full-width histories (``max_len`` random products, none padding) and their gaps."""
    rng = np.random.default_rng(seed)
    items = rng.integers(2, engine.vocab.size, (count, engine.max_len)).astype(np.int64)
    return items, np.ones(items.shape, np.float32)


def sweep(bundle: Path, args: argparse.Namespace) -> None:
    """Encoder shoppers/s by ``onnx.parallel``, graph optimisation level and ``onnx.encode_rows``, over
    batches of 1,024 full-width histories, interleaved in rounds."""
    settings = [(parallel, level) for parallel in PARALLEL for level in ("basic", "extended", "all")]
    engines = {
        (parallel, level): OnnxEngine(bundle, args.threads, graph_optimization=level, parallel=parallel)
        for parallel, level in settings
    }
    sizes = (32, 64, 128, 256, 512)
    items, gaps = encoder_histories(engines[settings[0]], 1024, args.seed)
    found: dict[tuple[int, tuple[str, str]], list[float]] = {(r, s): [] for r in sizes for s in settings}
    for _ in range(args.sweep_rounds):
        for rows in sizes:
            for setting in settings:
                engines[setting].encode_rows = rows
                call = functools.partial(engines[setting].encode, items, gaps)
                found[rows, setting].append(rate(call, len(items), 1.0, 1))
    print(f"encoder alone, shoppers/s (median of {args.sweep_rounds} interleaved rounds of >= 1 s, "
          f"batches of {len(items):,}, max_len {engines[settings[0]].max_len}), by encode_rows, "
          "parallel and graph optimisation:\n")  # fmt: skip
    print("| encode_rows | " + " | ".join(f"{parallel}, {level}" for parallel, level in settings) + " |")
    print("|---" * (len(settings) + 1) + "|")
    for rows in sizes:
        cells = [f"{statistics.median(found[rows, setting]):,.0f}" for setting in settings]
        print(f"| {rows} | " + " | ".join(cells) + " |")
    print(flush=True)


def roofline(bundle: Path, net: dict[str, Any], args: argparse.Namespace, onnx: dict[str, Any]) -> None:
    """The encoder alone (the job's settings) in GFLOP/s, against numpy/torch GEMMs of its shapes."""
    engine = OnnxEngine(bundle, args.threads, **onnx)
    rows = onnx["encode_rows"]
    items, gaps = encoder_histories(engine, 8 * rows, args.seed)
    shapes = products(rows, engine.max_len, net)
    per_shopper = flops(shapes) / rows
    shoppers = rate(lambda: engine.encode(items, gaps), len(items), args.roofline_seconds)
    achieved = shoppers * per_shopper / 1e9
    limits = gemm_rates(shapes, args.roofline_seconds)
    best = max(limits, key=limits.get)
    dense = gemm_rates([shape for shape in shapes if shape[0] == 1], args.roofline_seconds)
    print(f"encoder alone: {shoppers:,.0f} shoppers/s at {per_shopper / 1e6:.1f} MFLOP per shopper "
          f"(encode_rows {rows}, parallel {onnx['parallel']}, max_len {engine.max_len}, graph optimisation "
          f"{onnx['graph_optimization']}) = {achieved:.1f} GFLOP/s; the same products as GEMMs: numpy "
          f"{limits['numpy']:.1f}, torch {limits['torch']:.1f} GFLOP/s; encoder at "
          f"{achieved / limits[best]:.0%} of the faster ({best}); the weight products alone (no "
          f"attention) as GEMMs: numpy {dense['numpy']:.1f}, torch {dense['torch']:.1f} GFLOP/s\n",
          flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shoppers", type=int, default=50_000)
    parser.add_argument("--products", type=int, default=10_000)
    parser.add_argument("--mean-baskets", type=float, default=30.0, help="per shopper (receipt rows ~ 8x)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default 4096 on cpu, 16384 on cuda")
    parser.add_argument("--read-threads", type=int, default=None, help="default 1 on cpu, 8 on cuda")
    parser.add_argument("--select-threads", type=int, default=None, help="default 1 on cpu, 4 on cuda")
    parser.add_argument("--reference-shoppers", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/bench/batch_candidates"))
    parser.add_argument("--progress", action="store_true", help="show the job's progress bars")
    parser.add_argument(
        "--generate-only", action="store_true", help="write the data and checkpoint, then stop"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quantize", choices=MEASURED, default="int8", help=MEASURED_HELP)
    parser.add_argument("--rows-per-part", type=int, default=None, help="default: conf/candidates.yaml's")
    parser.add_argument("--encode-rows", type=int, default=None, help="default: conf/candidates.yaml's")
    parser.add_argument("--graph-optimization", default=None, help="default: conf/candidates.yaml's")
    parser.add_argument("--parallel", choices=PARALLEL, default=None, help="default: conf/candidates.yaml's")
    parser.add_argument("--threads", type=int, default=None, help="encoder alone; default all cores")
    parser.add_argument(
        "--sweep", action="store_true", help="first, the encoder by encode_rows, parallel and level"
    )
    parser.add_argument("--sweep-rounds", type=int, default=3)
    parser.add_argument("--roofline-seconds", type=float, default=2.0, help="per measured round")
    parser.add_argument(
        "--reference",
        choices=("full", "trimmed", "both", "none"),
        default="both",
        help="encoders of the plain loop",
    )
    parser.add_argument("--skip-torch-job", action="store_true", help="the ONNX job and the reference only")
    parser.add_argument(
        "--repeats", type=int, default=1, help="job and reference runs, interleaved; ratios per repeat"
    )
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.batch_size = args.batch_size or (16_384 if gpu else 4096)
    args.read_threads = args.read_threads or (8 if gpu else 1)
    args.select_threads = args.select_threads or (4 if gpu else 1)

    size = f"{args.shoppers}x{args.products}"
    receipts = args.workdir / f"receipts-{size}-b{args.mean_baskets:g}"
    config = SyntheticConfig(
        num_shoppers=args.shoppers, num_products=args.products, mean_baskets=args.mean_baskets, seed=args.seed
    )
    ensure_receipts(receipts, config)
    checkpoint = args.workdir / f"sasrec-{args.products}-d{args.dim}.ckpt"
    ensure_checkpoint(checkpoint, args.products, args.dim, args.seed)
    if args.generate_only:
        return
    rows = open_dataset(receipts).count_rows()
    device = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    )
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        onnx: dict[str, Any] = dict(compose("candidates", overrides=["receipts=-", "output=-"]).onnx)
    onnx["encode_rows"] = args.encode_rows or onnx["encode_rows"]
    onnx["graph_optimization"] = args.graph_optimization or onnx["graph_optimization"]
    onnx["parallel"] = args.parallel or onnx["parallel"]
    print(
        f"{args.shoppers:,} shoppers, {rows:,} receipt rows, {args.products:,} products; load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    print(f"SASRec d={args.dim}, k={args.k}, batch {args.batch_size}, read/select threads "
          f"{args.read_threads}/{args.select_threads}; {device}; onnx {onnx}\n")  # fmt: skip

    runs: dict[str, dict[str, str]] = {}
    if args.device == "cpu":
        quantize = args.quantize
        bundle = args.workdir / f"bundle-{args.products}-d{args.dim}-{quantize}"
        if not bundle.exists():
            export_bundle(checkpoint, bundle, flat, quantize=quantize)
        print(f"bundle {bundle.name}: encoder quantization {quantize}\n")
        runs["job, onnx + faiss"] = {"bundle": str(bundle)}
        net = dict(load_module(checkpoint).hparams["net"])
        if args.sweep:
            sweep(bundle, args)
        roofline(bundle, net, args, onnx)
    if not args.skip_torch_job or args.device != "cpu":
        runs["job, torch"] = {"checkpoint": str(checkpoint)}

    print("| run | shoppers | wall s | shoppers/s | " + " | ".join(STAGES) + " |")
    print("|---" * (len(STAGES) + 4) + "|")
    encoders = {"full": [True], "trimmed": [False], "both": [True, False], "none": []}[args.reference]
    rates: dict[str, list[float]] = {}  # shoppers/s of each run, per repeat
    for _ in range(args.repeats):  # interleaved: a box that slows down slows both sides of a ratio
        for name, model in runs.items():
            began = time.perf_counter()
            manifest = job(receipts, args.workdir / "out", args, **model)
            wall = time.perf_counter() - began
            report(name, manifest["rows"], manifest["seconds"], wall)
            rates.setdefault(name, []).append(manifest["rows"] / wall)
        for full in encoders:
            began = time.perf_counter()
            result = reference(receipts, args.workdir / "out-reference", checkpoint, args, full)
            name = f"reference loop (torch, {'full forward' if full else 'trimmed encode'})"
            wall = time.perf_counter() - began
            report(name, result["rows"], result["seconds"], wall)
            rates.setdefault(name, []).append(result["rows"] / wall)
    if encoders and args.repeats > 1:
        base = next(name for name in rates if name.startswith("reference"))
        print(f"\njob / {base}, each repeat (the runs one after the other):")
        for name in runs:
            ratios = [a / b for a, b in zip(rates[name], rates[base], strict=True)]
            shown = ", ".join(f"{r:.2f}x" for r in ratios)
            print(f"  {name}: {shown}; median {statistics.median(ratios):.2f}x")
    print(f"\nload average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
