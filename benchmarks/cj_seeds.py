"""The two-stage bundle over seeds and cutoffs: each run's figures through serving, and mean ± std.

    R=artifacts/results/demo_seeds
    for cutoff in 2017-12-01 2017-11-01; do for seed in 0 1 2; do
      d=$R/${cutoff}_s$seed
      python -m training.train experiment=demo seed=$seed data.cutoff=$cutoff hydra.run.dir=$d/train
      c=$d/train/checkpoints/best.ckpt
      python -m export.export checkpoint=$c output=$d/bundle hydra.run.dir=$d/export
      python -m training.evaluate data.cutoff=$cutoff "bundles=[$d/bundle]" hydra.run.dir=$d/evaluate
    done; done
    python -m benchmarks.cj_seeds $R

Each ``<cutoff>_s<seed>`` directory holds a training run (``train/metrics.json``: the ranker's rounds and
fit seconds) and the evaluation of its bundle through the serving library (``evaluate/results.json``:
the protocol's metrics and the paired per-household difference to decayed frequency, 95% interval).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.cj_results import cell
from training.evaluate import paired_cell

BUNDLE = "bundle (bundle)"  # training.evaluate's name for the one bundle it was given
METRICS = ("recall@10", "ndcg@10", "hr@10", "recall@10_repeat", "recall@10_explore")
PAIRED = ("recall@10", "ndcg@10")


def collect(directory: Path) -> dict[str, list[tuple[str, dict, dict]]]:
    """Cutoff -> its runs as (seed, the bundle's evaluated figures, the training run's metrics)."""
    runs: dict[str, list[tuple[str, dict, dict]]] = {}
    for path in sorted(directory.glob("*_s*/evaluate/results.json")):
        run = path.parent.parent
        cutoff, seed = run.name.rsplit("_s", 1)
        bundle = json.loads(path.read_text())[BUNDLE]
        trained = json.loads((run / "train" / "metrics.json").read_text())
        runs.setdefault(cutoff, []).append((seed, bundle, trained))
    return runs


def table(runs: dict[str, list[tuple[str, dict, dict]]]) -> str:
    """One Markdown table: a row per run, then mean ± std (sample) per cutoff, latest cutoff first."""
    header = ["cutoff", "seed", "households", *METRICS, *(f"Δ{m} vs decay [95% CI]" for m in PAIRED)]
    header += ["ranker rounds", "ranker fit s"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for cutoff, found in sorted(runs.items(), reverse=True):
        for seed, bundle, trained in found:
            row = [cutoff, seed, f"{int(bundle['num_shoppers']):,}", *(f"{bundle[m]:.4f}" for m in METRICS)]
            row += [paired_cell(bundle, m) for m in PAIRED]
            row += [f"{trained['ranker/rounds']:.0f}", f"{trained['ranker/seconds']:.0f}"]
            lines.append("| " + " | ".join(row) + " |")
        figures = [bundle for _, bundle, _ in found]
        row = [cutoff, f"mean ± std ({len(found)})", "", *(cell(figures, m) for m in METRICS)]
        row += [cell(figures, f"vs_decay/{m}") for m in PAIRED] + ["", ""]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("directory", type=Path, help="the directory of <cutoff>_s<seed> runs")
    args = parser.parse_args()
    runs = collect(args.directory)
    if not runs:
        raise SystemExit(f"no <cutoff>_s<seed>/evaluate/results.json under {args.directory}")
    print(table(runs))


if __name__ == "__main__":
    main()
