"""Campaign-audience job time by stage on seeded synthetic shoppers (batch/audience.py's ``run``).

    .venv/bin/python -m benchmarks.audience_scale --shoppers 50000
    .venv/bin/python -m benchmarks.audience_scale --shoppers 1000000 --calibration-share 1.0 0.1

Run from the repository root.

Data: seeded synthetic receipts (``recsys.data.synthetic``: a year from 2017-01-01), written once under
``--workdir`` and reused by later runs of the same size (``benchmarks.batch_candidates.ensure_receipts``).

The bundle: the untrained SASRec of ``benchmarks.batch_candidates.ensure_checkpoint`` (2 blocks, 2 heads,
max_len 50, every synthetic product in its vocabulary) with a ranker fitted by ``training.rank.fit`` on
the receipts of the first ``--ranker-shoppers`` shoppers before ``as_of``, stored in a copy of the
checkpoint (``training.checkpoint.write_scorer``), then exported as a Flat bundle as the candidate
benchmark exports (its encoder as ``--quantize`` says, int8 by default). The ranker is
fitted through the checkpoint's network (``fit(module, ...)``, as ``fit_and_test`` does, less its test
metrics), not with ``fit_at``: ``fit_at`` builds its own vocabulary from the receipts, and a ranker's item
statistics are indexed by the rows of the vocabulary it was fitted on, so they would not line up with the
checkpoint's. Its network features (``net_score``, ``net_gap``, ``net_rank``) are then real features of the
ranker; the job computes them from the bundle's own encoder and index, so nothing else must be in the
bundle. The synthetic generator's random streams are keyed by blocks of shoppers, so the first shoppers
are the same in every dataset that covers their blocks: the ranker is fitted once, reused by every size.

The campaign: the ``--campaign-products`` most bought products of that sample, ``--horizon`` days, an
audience of ``--audience-share`` of the shoppers, ``--min-probability`` and ``--exploration``; ``as_of``
2017-12-01, so the horizon after it is in the receipts and the job also evaluates its probabilities. The
job is composed from ``conf/audience.yaml`` as its command line would be and run once per
``--calibration-share``, on a fresh output directory. Its stages are timed by wrapping the functions the
job calls, in their own modules' namespaces, for that run (nested stages are indented; a parent's
seconds include its children's):

- open bundle: ``OnnxEngine`` (the encoder's session, the index, the ranker);
- partition: ``partition``, the pass that splits the receipts into parts by shopper hash (a shard of one
  part skips it and streams its rows: ``gather``);
- read parts: ``read_part``; score parts: ``score_part`` (every part, both scoring dates), of which
  histories (``build_sequences`` of the part, then its shoppers), the history features (at the scoring
  date and one horizon earlier), encode and top-K (the ONNX encoder and the FAISS search), propensity
  (``raw_score``: the scored pairs, their features, the trees, the expected baskets);
- audience: ``write_audience`` (reading the scores back, the combination's fit, the selection, the
  evaluation, the reliability plot and the writes), of which reading the scores, the combination's fit
  (``fit_combination``), the selection
  (``select_audience``), the eligible shoppers (``eligibility``) and the reliability plot.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pyarrow.compute as pc
import yaml
from hydra import compose, initialize_config_dir

import batch.audience
import batch.audiences
import batch.engines
import batch.shards
import recsys.propensity
import recsys.ranker
from benchmarks.batch_candidates import CONF, MEASURED, MEASURED_HELP, ensure_checkpoint, ensure_receipts
from benchmarks.segments import Stopwatch, load, peak_rss
from export.export import export_bundle
from export.index import flat
from recsys.data.loader import open_dataset
from recsys.data.schema import PRODUCT, SHOPPER
from recsys.data.split import parse_cutoff, temporal_split
from recsys.data.synthetic import BLOCK_SHOPPERS, SHOPPER_ID_OFFSET, SyntheticConfig
from recsys.evaluation.protocol import prepare
from training import checkpoint as checkpoints
from training.module import module_from_checkpoint
from training.rank import RankerConfig, fit

# (stage, depth, module, attribute): what each stage wraps; depth indents the report
STAGES: tuple[tuple[str, int, Any, str], ...] = (
    ("open bundle", 0, batch.audience, "OnnxEngine"),
    ("partition", 0, batch.shards, "partition"),
    ("stream one part", 0, batch.shards, "gather"),
    ("read parts", 0, batch.shards, "read_part"),
    ("score parts", 0, batch.audience, "score_part"),
    ("histories", 1, batch.audiences, "_histories"),
    ("history features", 1, batch.audiences, "history_features"),
    ("encode", 1, batch.engines.OnnxEngine, "encode"),
    ("top-K", 1, batch.engines.OnnxEngine, "top"),
    ("propensity", 1, batch.audiences, "raw_score"),
    ("scored pairs", 2, recsys.propensity, "campaign_pairs"),
    ("pair features", 2, recsys.propensity, "pair_features"),
    ("trees", 2, recsys.ranker.Ranker, "probability"),
    ("expected baskets", 2, recsys.propensity, "expected_baskets"),
    ("audience", 0, batch.audience, "write_audience"),
    ("read scores", 1, batch.audience, "read_scores"),
    ("combination fit", 1, batch.audiences, "fit_combination"),
    ("selection", 1, batch.audiences, "select_audience"),
    ("eligible", 1, batch.audiences, "eligibility"),
    ("reliability plot", 1, batch.audience, "reliability_png"),
)


def ensure_ranked_bundle(
    workdir: Path, receipts: Path, args: argparse.Namespace, as_of: Any, quantize: str
) -> tuple[Path, dict[str, Any] | None]:
    """The bundle of the untrained SASRec with a ranker fitted on the first ``--ranker-shoppers``
    shoppers' receipts before ``as_of``; and the fit's report (None when the bundle was already there)."""
    name = f"{args.products}-d{args.dim}-b{args.mean_baskets:g}-r{args.ranker_shoppers}-s{args.seed}"
    bundle = workdir / f"bundle-{name}-ranker-{quantize}"
    if bundle.exists():
        return bundle, None
    plain = workdir / f"sasrec-{args.products}-d{args.dim}.ckpt"
    ensure_checkpoint(plain, args.products, args.dim, args.seed)
    state = checkpoints.read(plain)
    module = module_from_checkpoint(state)
    sample = open_dataset(receipts).to_table(
        filter=pc.field(SHOPPER) < SHOPPER_ID_OFFSET + args.ranker_shoppers
    )
    before, _ = temporal_split(sample, as_of)
    val = prepare(before, as_of - timedelta(days=args.val_days))
    config = RankerConfig(new_candidates=0, co_purchase_candidates=20, category_candidates=0, seed=args.seed)
    began = time.perf_counter()
    ranker, report = fit(module, val, before, None, config)
    print(f"ranker fitted on {args.ranker_shoppers:,} shoppers ({before.num_rows:,} receipt rows) in "
          f"{time.perf_counter() - began:.1f} s: {report['rows']:,} examples, {report['rounds']} rounds, "
          f"validation log-loss {report['val_logloss']:.4f}; features {list(ranker.features)}")  # fmt: skip
    ranked = workdir / f"sasrec-{name}-ranker.ckpt"
    checkpoints.write_scorer(ranked, ranker, state)
    export_bundle(ranked, bundle, flat, quantize=quantize)
    return bundle, report


def write_spec(path: Path, receipts: Path, args: argparse.Namespace, shoppers: int) -> dict[str, Any]:
    """The campaign: the sample's ``--campaign-products`` most bought products; its spec, also at ``path``."""
    sample = open_dataset(receipts).to_table(
        columns=[PRODUCT], filter=pc.field(SHOPPER) < SHOPPER_ID_OFFSET + args.ranker_shoppers
    )
    counts = sample.group_by([PRODUCT]).aggregate([(PRODUCT, "count")])
    order = np.lexsort((counts.column(PRODUCT).to_numpy(), -counts.column(f"{PRODUCT}_count").to_numpy()))
    products = counts.column(PRODUCT).to_numpy()[order[: args.campaign_products]]
    spec = {"campaign_id": 1, "products": sorted(int(p) for p in products),
            "horizon_days": args.horizon, "audience": int(args.audience_share * shoppers),
            "min_probability": args.min_probability, "exploration": args.exploration}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    return spec


def timed_run(cfg: Any) -> tuple[dict[str, Any], Stopwatch, float]:
    """``batch.audience.run(cfg)`` with its stages timed: (its result, the stages' stopwatch, wall)."""
    watch = Stopwatch()
    with contextlib.ExitStack() as stack:
        for stage, _, owner, name in STAGES:
            function: Callable[..., Any] = getattr(owner, name)
            stack.enter_context(mock.patch.object(owner, name, watch.timed(stage, function)))
        began = time.perf_counter()
        result = batch.audience.run(cfg)
        wall = time.perf_counter() - began
    return result, watch, wall


def report(result: dict[str, Any], watch: Stopwatch, wall: float, full: int) -> None:
    """The stages' Markdown table and the audience's counts; ``full``: the 1M-shopper projection's size."""
    summary = result["audience"]
    shoppers = summary["shoppers"]
    print("| stage | seconds | share of wall | shoppers/s | peak RSS after, GiB |\n|---|---|---|---|---|")
    for stage, depth, _, _ in STAGES:
        spent = watch.seconds[stage]
        rate = f"{shoppers / spent:,.0f}" if spent > 0 else ""
        peak = f"{watch.peaks[stage]:.1f}" if stage in watch.peaks else ""
        print(f"| {'&nbsp;' * 4 * depth}{stage} | {spent:.1f} | {spent / wall:.0%} | {rate} | {peak} |")
    top = sum(watch.seconds[stage] for stage, depth, _, _ in STAGES if depth == 0)
    print(f"| other | {wall - top:.1f} | {(wall - top) / wall:.0%} | | |")
    print(f"| **job wall** | **{wall:.1f}** | 100% | **{shoppers / wall:,.0f}** | {peak_rss():.1f} |")
    parts = len(result["shard"]["parts"])
    print(f"\n{shoppers:,} shoppers scored in {parts} parts; linear projection to {full:,} shoppers: "
          f"{wall * full / shoppers / 60:.1f} min")  # fmt: skip
    evaluation = summary["evaluation"] or {}
    print(f"audience {summary['audience']:,} (shortfall {summary['shortfall']:,}, explorers "
          f"{summary['explorers']:,}) of {summary['eligible']:,} eligible; calibration examples "
          f"{summary['calibration']['fit']['examples']:,}; AUC after as_of "
          f"{(evaluation.get('overall') or {}).get('auc')}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shoppers", type=int, default=1_000_000)
    parser.add_argument("--products", type=int, default=10_000)
    parser.add_argument("--mean-baskets", type=float, default=30.0, help="per shopper (receipt rows ~ 8x)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--ranker-shoppers", type=int, default=20_000, help="the ranker's sample")
    parser.add_argument("--val-days", type=float, default=28.0, help="the ranker's validation window")
    parser.add_argument("--campaign-products", type=int, default=20)
    parser.add_argument("--horizon", type=int, default=14)
    parser.add_argument("--audience-share", type=float, default=0.1)
    parser.add_argument("--min-probability", type=float, default=0.02)
    parser.add_argument("--exploration", type=float, default=0.1)
    parser.add_argument("--calibration-share", type=float, nargs="+", default=[1.0], help="one run each")
    parser.add_argument("--as-of", default="2017-12-01")
    parser.add_argument("--quantize", choices=MEASURED, default="int8", help=MEASURED_HELP)
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/bench/audience_scale"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # the first shoppers are the same in every size only when their last block is whole
    if args.shoppers < -(-args.ranker_shoppers // BLOCK_SHOPPERS) * BLOCK_SHOPPERS:
        parser.error(f"--shoppers must cover --ranker-shoppers rounded up to {BLOCK_SHOPPERS}")

    print(f"load average at the start {load()}")
    config = SyntheticConfig(
        num_shoppers=args.shoppers, num_products=args.products, mean_baskets=args.mean_baskets, seed=args.seed
    )
    receipts = args.workdir / f"receipts-{args.shoppers}x{args.products}-b{args.mean_baskets:g}"
    ensure_receipts(receipts, config)
    as_of = parse_cutoff(args.as_of, "UTC")
    quantize = args.quantize
    bundle, _ = ensure_ranked_bundle(args.workdir, receipts, args, as_of, quantize)
    spec_file = args.workdir / "campaign.yaml"
    spec = write_spec(spec_file, receipts, args, args.shoppers)
    rows = open_dataset(receipts).count_rows()
    print(f"{args.shoppers:,} shoppers generated, {rows:,} receipt rows, {args.products:,} products; "
          f"SASRec d={args.dim} (untrained) + ranker, encoder {quantize}; campaign of "
          f"{len(spec['products'])} products, horizon {args.horizon} d, audience {spec['audience']:,}, "
          f"min_probability {args.min_probability}, exploration {args.exploration}, as_of {args.as_of}; "
          f"load average {load()}\n")  # fmt: skip

    for share in args.calibration_share:
        output = args.workdir / "out"
        shutil.rmtree(output, ignore_errors=True)
        overrides = {"campaign": spec_file, "bundle": bundle, "receipts": receipts, "output": output,
                     "as_of": args.as_of, "calibration_share": share, "progress": "false"}  # fmt: skip
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("audience", overrides=[f"{key}={value}" for key, value in overrides.items()])
        print(f"calibration_share {share}; load average {load()}")
        result, watch, wall = timed_run(cfg)
        report(result, watch, wall, 1_000_000)
        print(f"load average at the end of the run {load()}\n")


if __name__ == "__main__":
    main()
