"""benchmarks.cj_seeds: each run's row and the per-cutoff mean ± std read from the runs' files."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.cj_seeds import BUNDLE, collect, table


def _run(root: Path, cutoff: str, seed: int, recall: float) -> None:
    run = root / f"{cutoff}_s{seed}"
    (run / "evaluate").mkdir(parents=True)
    (run / "train").mkdir()
    figures = {"num_shoppers": 1991.0, "recall@10": recall, "ndcg@10": 0.2, "hr@10": 0.6}
    figures |= {"recall@10_repeat": 0.3, "recall@10_explore": 0.001}
    for metric in ("recall@10", "ndcg@10"):
        figures |= {f"vs_decay/{metric}": 0.004, f"vs_decay/{metric}_low": -0.001}
        figures[f"vs_decay/{metric}_high"] = 0.009
    (run / "evaluate" / "results.json").write_text(json.dumps({BUNDLE: figures, "popularity": {}}))
    (run / "train" / "metrics.json").write_text(json.dumps({"ranker/rounds": 120, "ranker/seconds": 95.4}))


def test_rows_per_run_then_mean_and_sample_std_latest_cutoff_first(tmp_path: Path) -> None:
    _run(tmp_path, "2017-11-01", 0, 0.17)
    _run(tmp_path, "2017-12-01", 0, 0.16)
    _run(tmp_path, "2017-12-01", 1, 0.18)
    lines = table(collect(tmp_path)).splitlines()
    assert len(lines) == 2 + 3 + 2
    assert lines[2].startswith("| 2017-12-01 | 0 | 1,991 | 0.1600 | 0.2000 |")
    assert "+0.0040 [-0.0010, +0.0090]" in lines[2] and lines[2].endswith("| 120 | 95 |")
    assert lines[4].startswith("| 2017-12-01 | mean ± std (2) |  | 0.1700 ± 0.0141 |")
    assert lines[5].startswith("| 2017-11-01 | 0 |") and "mean ± std (1)" in lines[6]
