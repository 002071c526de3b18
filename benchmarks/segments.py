"""Segment job time by stage on seeded synthetic shoppers (batch/segment.py's ``run``).

    .venv/bin/python -m benchmarks.segments --shoppers 100000
    .venv/bin/python -m benchmarks.segments --shoppers 1000000 --mean-baskets 8

Run from the repository root.

Data: seeded synthetic receipts (``recsys.data.synthetic``: a year from 2017-01-01), written once under
``--workdir`` and reused by later runs of the same size (``benchmarks.batch_candidates.ensure_receipts``).
The model is an untrained SASRec (``benchmarks.batch_candidates.ensure_checkpoint``: 2 blocks, 2 heads,
max_len 50; the job's time does not depend on training) given the synthetic catalogue's categories as its
product metadata, so the report counts real category names, then exported as a Flat bundle (its encoder
as ``--quantize`` says, int8 by default).

The job is composed from ``conf/segment.yaml`` as its command line would be (``as_of`` 2017-12-01, so the
28 days after it are in the receipts and the churn model is evaluated) and run once. Its stages are timed
by wrapping the functions ``batch.segment`` calls, in its own namespace, for that run:

- read: ``read_receipts`` and the split at ``as_of``;
- profiles: the shoppers' profiles at ``as_of``;
- churn fit: ``fit_churn`` (the profiles at ``as_of - horizon`` and the logistic regression);
- embeddings: opening the bundle's encoder, building the histories and encoding them;
- k-means: ``cluster``; describe: the segments' medians, names and levers;
- evaluation: the churn labels after ``as_of`` and the AUCs;
- report: ``top_categories`` and the HTML with its plots;
- writing: the output directory (parquet, HTML file, summary, the atomic swap), less the report;
- other: the rest of the wall (scoring the churn model, building the output table).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import resource
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

from hydra import compose, initialize_config_dir

import batch.segment
from benchmarks.batch_candidates import CONF, MEASURED, MEASURED_HELP, ensure_checkpoint, ensure_receipts
from export.export import export_bundle
from export.index import flat
from recsys.data.features import product_metadata
from recsys.data.loader import open_dataset
from recsys.data.schema import PRODUCT
from recsys.data.synthetic import SyntheticConfig, products
from recsys.io import staged_directory
from training.module import load_module, save_module

STAGES = {
    "read": ("read_receipts", "temporal_split"),
    "profiles": ("profiles",),
    "churn fit": ("fit_churn",),
    "embeddings": ("OnnxEngine", "embeddings"),
    "k-means": ("cluster",),
    "describe": ("describe",),
    "evaluation": ("churned", "auc"),
    "report": ("top_categories", "render"),
}
CATEGORY = "category"  # the synthetic catalogue's column (its co-purchase cluster)


def ensure_bundle(workdir: Path, config: SyntheticConfig, dim: int, quantize: str) -> Path:
    """The untrained SASRec's bundle over ``config``'s catalogue, with its categories as metadata."""
    bundle = workdir / f"bundle-{config.num_products}-d{dim}-{quantize}"
    if bundle.exists():
        return bundle
    plain = workdir / f"sasrec-{config.num_products}-d{dim}.ckpt"
    ensure_checkpoint(plain, config.num_products, dim, config.seed)
    module = load_module(plain)
    module.products = product_metadata(products(config).select([PRODUCT, CATEGORY]), module.vocab.product_ids)
    described = plain.with_name(f"{plain.stem}-categories.ckpt")
    save_module(module, described)
    export_bundle(described, bundle, flat, quantize=quantize)
    return bundle


def peak_rss() -> float:
    """The process's peak resident memory so far, GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Stopwatch:
    """Seconds per stage, accumulated by wrapped functions, and the peak memory once each stage ended
    (the peak never falls, so the stage at which it rises is the one that set it)."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.peaks: dict[str, float] = {}

    def timed(self, stage: str, function: Callable[..., Any]) -> Callable[..., Any]:
        """``function``, adding the time of every call to ``stage``."""

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - began
                self.peaks[stage] = peak_rss()

        return wrapper

    @contextlib.contextmanager
    def staged(self, path: Path) -> Iterator[Path]:
        """``staged_directory``, its time (less the report's, which runs inside it) added to "writing"."""
        began, report = time.perf_counter(), self.seconds["report"]
        with staged_directory(path) as staging:
            yield staging
        self.seconds["writing"] += time.perf_counter() - began - (self.seconds["report"] - report)
        self.peaks["writing"] = peak_rss()


def timed_run(cfg: Any) -> tuple[dict[str, Any], Stopwatch, float]:
    """``batch.segment.run(cfg)`` with its stages timed: (summary, the stages' stopwatch, wall seconds);
    the stopwatch's "other" is the wall not in any stage."""
    watch = Stopwatch()
    with contextlib.ExitStack() as stack:
        for stage, names in STAGES.items():
            for name in names:
                function = getattr(batch.segment, name)
                stack.enter_context(mock.patch.object(batch.segment, name, watch.timed(stage, function)))
        stack.enter_context(mock.patch.object(batch.segment, "staged_directory", watch.staged))
        began = time.perf_counter()
        summary = batch.segment.run(cfg)
        wall = time.perf_counter() - began
    watch.seconds["other"] = wall - sum(watch.seconds[stage] for stage in (*STAGES, "writing"))
    return summary, watch, wall


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shoppers", type=int, default=100_000)
    parser.add_argument("--products", type=int, default=10_000)
    parser.add_argument("--mean-baskets", type=float, default=8.0, help="per shopper (receipt rows ~ 8x)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--as-of", default="2017-12-01")
    parser.add_argument("--quantize", choices=MEASURED, default="int8", help=MEASURED_HELP)
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/bench/segments"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"load average at the start {load()}")
    config = SyntheticConfig(
        num_shoppers=args.shoppers, num_products=args.products, mean_baskets=args.mean_baskets, seed=args.seed
    )
    receipts = args.workdir / f"receipts-{args.shoppers}x{args.products}-b{args.mean_baskets:g}"
    ensure_receipts(receipts, config)
    quantize = args.quantize
    bundle = ensure_bundle(args.workdir, config, args.dim, quantize)
    output = args.workdir / "out"
    shutil.rmtree(output, ignore_errors=True)
    overrides = {"bundle": bundle, "receipts": receipts, "output": output, "as_of": args.as_of, "k": args.k,
                 "category_column": CATEGORY, "seed": args.seed}  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("segment", overrides=[f"{key}={value}" for key, value in overrides.items()])
    rows = open_dataset(receipts).count_rows()
    print(f"{args.shoppers:,} shoppers generated, {rows:,} receipt rows, {args.products:,} products; "
          f"SASRec d={args.dim} (untrained), encoder {quantize}, k={args.k}, as_of {args.as_of}; "
          f"load average {load()}\n")  # fmt: skip

    summary, watch, wall = timed_run(cfg)
    shoppers = summary["shoppers"]
    print("| stage | seconds | share of wall | shoppers/s | peak RSS after, GiB |\n|---|---|---|---|---|")
    for stage in (*STAGES, "writing", "other"):
        spent = watch.seconds[stage]
        rate = f"{shoppers / spent:,.0f}" if spent > 0 else ""
        peak = f"{watch.peaks[stage]:.1f}" if stage in watch.peaks else ""
        print(f"| {stage} | {spent:.1f} | {spent / wall:.0%} | {rate} | {peak} |")
    print(f"| **job wall** | **{wall:.1f}** | 100% | **{shoppers / wall:,.0f}** | {peak_rss():.1f} |")
    auc = (summary["churn_evaluation"] or {}).get("auc", float("nan"))
    print(f"\n{shoppers:,} shoppers segmented (before as_of); churn AUC {auc:.3f}; "
          f"segment sizes {[s['size'] for s in summary['segments']]}")  # fmt: skip
    print(f"load average at the end {load()}")


if __name__ == "__main__":
    main()
