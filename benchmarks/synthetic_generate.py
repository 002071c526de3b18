"""Throughput of the synthetic receipt generator: generate() alone, then generate + write_parquet.

Example::

    .venv/bin/python -m benchmarks.synthetic_generate --rows-target 20000000
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as ds

from recsys.data.synthetic import SyntheticConfig, generate, write_parquet


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--rows-target", type=int, default=20_000_000, help="about this many rows (default)")
    size.add_argument("--shoppers", type=int, help="exactly this many shoppers")
    parser.add_argument("--out", type=Path, help="directory for the parquet files (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shoppers-per-chunk", type=int, default=SyntheticConfig.shoppers_per_chunk)
    return parser.parse_args()


def report(name: str, rows: int, seconds: float) -> None:
    print(f"{name:<18} rows={rows:>12,}  seconds={seconds:8.2f}  rows/s={rows / seconds:>14,.0f}")


def main() -> None:
    args = parse_args()
    config = SyntheticConfig(seed=args.seed, shoppers_per_chunk=args.shoppers_per_chunk)
    # Expected rows per shopper: baskets times lines per basket (a little more: no basket is empty).
    shoppers = args.shoppers or math.ceil(args.rows_target / (config.mean_baskets * config.mean_basket_size))
    config = dataclasses.replace(config, num_shoppers=shoppers)
    print(f"shoppers={shoppers:,}  products={config.num_products:,}  per chunk={config.shoppers_per_chunk:,}")

    started = time.perf_counter()
    rows = sum(table.num_rows for table in generate(config))
    report("generate", rows, time.perf_counter() - started)

    out = args.out or Path(tempfile.mkdtemp(prefix="synthetic-"))
    try:
        stats = write_parquet(config, out)
        report("generate+write", int(stats["rows"]), stats["seconds"])
        size = sum(f.stat().st_size for f in out.glob("*.parquet"))
        print(
            f"files={int(stats['files'])}  bytes={size:,}  ({size / stats['rows']:.1f} bytes/row)  in {out}"
        )
        assert ds.dataset(out).count_rows() == stats["rows"]
    finally:
        if args.out is None:
            shutil.rmtree(out)


if __name__ == "__main__":
    main()
