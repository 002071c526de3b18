"""What a bundle serves when callers cut histories to their most recent entries (a history limit).

The ranker's features read a shopper's whole history (counts, decays up to a year, first purchases), so
a caller held to ``--max-history`` below a shopper's length is served other lists than training measured.
For each ``--last`` N, on docs/evaluation.md's test split of Complete Journey: how many evaluated
households have more than N entries, how many of their lists change, and their Recall@10 / NDCG@10 with
whole and cut histories (paired per household, 95% interval).

    python -m benchmarks.history_cut --bundle artifacts/demo/bundle [--last 1000 2000]

The test split is the one at the bundle's own training cutoff (``--cutoff`` may name a later one).
"""

from __future__ import annotations

import argparse

import numpy as np

from recsys.data.completejourney import load_complete_journey
from recsys.data.sequences import product_histories
from recsys.data.split import parse_cutoff
from recsys.evaluation.metrics import paired_difference, shopper_metrics
from recsys.evaluation.protocol import prepare
from training.evaluate import bundle_protocol, bundle_rankings, refuse_later_training

K = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--cutoff", default=None, help="default: the bundle's training cutoff")
    parser.add_argument("--last", type=int, nargs="+", default=[1000, 2000])
    args = parser.parse_args()

    trained = bundle_protocol(args.bundle)
    cutoff = args.cutoff or (trained or {}).get("cutoff")
    if cutoff is None:
        parser.error(f"bundle {args.bundle} does not say its training cutoff: pass --cutoff")
    data = prepare(load_complete_journey(), parse_cutoff(cutoff, "America/New_York"), min_baskets=5)
    refuse_later_training(trained, data, f"bundle {args.bundle}")
    lengths = np.array([len(p) for p in product_histories(data.train, data.targets.shopper_ids)[0]])
    whole = bundle_rankings(args.bundle, data, K)
    ours = shopper_metrics(whole, data.targets.items, K)
    print(f"{len(lengths):,} households at {data.cutoff.date()}; entries per history: median", end=" ")
    print(f"{np.median(lengths):.0f}, longest {lengths.max():,}")
    print("| last entries sent | households longer | their lists changed | metric | whole | cut |", end=" ")
    print("cut − whole [95% CI] |\n|---|---|---|---|---|---|---|")
    for last in args.last:
        longer = lengths > last
        if longer.sum() < 2:
            print(f"| {last:,} | {longer.sum()} | | | | | too few households to compare |")
            continue
        cut = bundle_rankings(args.bundle, data, K, last=last)
        theirs = shopper_metrics(cut, data.targets.items, K)
        changed = (cut[longer] != whole[longer]).any(axis=1).mean()
        for metric in (f"recall@{K}", f"ndcg@{K}"):
            a, b = ours[metric][longer], theirs[metric][longer]
            mean, low, high = paired_difference(b, a)
            row = (
                f"| {last:,} | {longer.sum():,} | {changed:.0%} | {metric} | {a.mean():.4f} | {b.mean():.4f}"
            )
            print(f"{row} | {mean:+.4f} [{low:+.4f}, {high:+.4f}] |")


if __name__ == "__main__":
    main()
