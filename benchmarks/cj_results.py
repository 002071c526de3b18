"""Collect training runs into the results table: mean ± std over seeds, model alone and repeat-aware.

    python -m training.train -m experiment=cj_sasrec,cj_gru4rec seed=0,1,2 hydra.sweep.dir=multirun/cj
    python -m benchmarks.cj_results multirun/cj

Runs are grouped by their Hydra overrides minus ``seed``; each row reports the test metrics that
``training.train`` wrote to ``metrics.json`` (``test/...`` for the network's own ranking,
``test/repeat_aware/...`` with the repeat-aware scorer), fit time and device.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

METRICS = ("recall@10", "recall@20", "ndcg@10", "hr@10", "recall@10_repeat", "recall@10_explore")


def collect(directories: list[Path]) -> dict[str, list[dict]]:
    """Group name -> the metrics of its runs (one per seed). A group is named by its overrides, less
    ``seed`` and the overrides every run shares (print those once, with the table)."""
    runs = []
    for directory in directories:
        for path in sorted(directory.rglob("metrics.json")):
            overrides = yaml.safe_load((path.parent / ".hydra" / "overrides.yaml").read_text())
            kept = [o for o in overrides if not o.startswith(("seed=", "hydra."))]
            runs.append((kept, json.loads(path.read_text())))
    shared = set.intersection(*(set(kept) for kept, _ in runs)) if runs else set()
    groups: dict[str, list[dict]] = defaultdict(list)
    for kept, metrics in runs:
        groups[" ".join(o for o in kept if o not in shared) or "(shared settings)"].append(metrics)
    if shared:
        print("settings of every run:", " ".join(o for o in runs[0][0] if o in shared), "\n")
    return groups


def cell(runs: list[dict], key: str) -> str:
    values = np.array([run[key] for run in runs if key in run], dtype=np.float64)
    if len(values) == 0:
        return ""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{values.mean():.4f} ± {values.std(ddof=1):.4f}"


def table(groups: dict[str, list[dict]]) -> str:
    """One Markdown table: a row per group and scoring (network alone, repeat-aware)."""
    header = ["run", "scoring", "seeds", *METRICS, "fit s", "device"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name, runs in groups.items():
        seconds = np.mean([run.get("fit_seconds", np.nan) for run in runs])
        device = ", ".join(sorted({str(run.get("device", "?")) for run in runs}))
        for scoring, prefix in (("network", "test/"), ("repeat-aware", "test/repeat_aware/")):
            cells = [cell(runs, prefix + metric) for metric in METRICS]
            row = [name, scoring, str(len(runs)), *cells, f"{seconds:.0f}", device]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("directories", nargs="+", type=Path, help="Hydra run or multirun directories")
    args = parser.parse_args()
    groups = collect(args.directories)
    if not groups:
        raise SystemExit(f"no metrics.json under {[str(d) for d in args.directories]}")
    print(table(groups))


if __name__ == "__main__":
    main()
