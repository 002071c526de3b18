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
as a Flat bundle, so both engines run: ONNX Runtime + FAISS, and torch. ``--device cuda`` runs the torch
engine with its bf16-autocast encoder.

Each job run reports end-to-end shoppers/s (partition pass included) and seconds per stage. The stages
overlap on their own threads (read, encode + top-K, select, write), so they add up to more than the wall.
The reference is the plain loop: the whole table in memory, its histories as the model reads them
(``recsys.inputs.Histories.model_inputs``), then per batch encode -> scores -> topk -> pandas DataFrame ->
``to_parquet``; no rules, fallback, sharding or resume. It runs on the first
``--reference-shoppers`` shoppers only (the whole table must fit in memory), on the same device.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import torch
from hydra import compose, initialize_config_dir

from batch.candidates import run
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
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("candidates", overrides=[f"{key}={value}" for key, value in settings.items()])
    return run(cfg)


def reference(receipts: Path, output: Path, checkpoint: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The plain loop over the first ``--reference-shoppers`` shoppers; returns rows and stage seconds."""
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
            shoppers = model.encode(x, gaps).float()
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
    print(f"{args.shoppers:,} shoppers, {rows:,} receipt rows, {args.products:,} products")
    print(f"SASRec d={args.dim}, k={args.k}, batch {args.batch_size}, read/select threads "
          f"{args.read_threads}/{args.select_threads}; {device}\n")  # fmt: skip
    print("| run | shoppers | wall s | shoppers/s | " + " | ".join(STAGES) + " |")
    print("|---" * (len(STAGES) + 4) + "|")

    runs: dict[str, dict[str, str]] = {"job, torch": {"checkpoint": str(checkpoint)}}
    if args.device == "cpu":
        bundle = args.workdir / f"bundle-{args.products}-d{args.dim}"
        if not bundle.exists():
            export_bundle(checkpoint, bundle, flat)
        runs = {"job, onnx + faiss": {"bundle": str(bundle)}, **runs}
    for name, model in runs.items():
        began = time.perf_counter()
        manifest = job(receipts, args.workdir / "out", args, **model)
        report(name, manifest["rows"], manifest["seconds"], time.perf_counter() - began)

    began = time.perf_counter()
    result = reference(receipts, args.workdir / "out-reference", checkpoint, args)
    report("reference loop (torch)", result["rows"], result["seconds"], time.perf_counter() - began)


if __name__ == "__main__":
    main()
