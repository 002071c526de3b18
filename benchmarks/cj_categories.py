"""Category propensity on Complete Journey: who buys a category in the next 28 days, ranked by the ranking
stage's calibrated propensity against recency-weighted past frequency.

At each cutoff, for the 50 largest categories (``product_category``, by baskets before the cutoff), every
household with a receipt before the cutoff is ranked by

- the ranking stage, as the audience job scores it: the raw propensity of buying one of the category's
  products in the 28 days from the cutoff (``recsys.propensity``), from a ranker fitted on the receipts
  before the cutoff alone (``benchmarks.cj_rankers``: no network), combined with the household's own
  history of the category and calibrated (``recsys.combination``, ``batch.audiences.features``), fitted
  on the job's default calibration windows: the three 28-day windows before the cutoff, each scored
  from the receipts before its start, and ranked as the audience job ranks (by probability, ties of the
  calibration broken by the combined score: the order of that score); and the raw score alone;
- recency-weighted frequency: the household's baskets with the category, each weighing
  ``0.5 ** (age / half-life)`` (30 and 120 days; 120 is the project's decayed-frequency baseline);

against whether it bought the category in the 28 days from the cutoff. Per category: AUC, and precision
and recall among the top 10% of households (ties at the boundary in proportion); overall, for the
households that never bought the category before the cutoff (new to it, where frequency is 0 for all and
cannot rank), and for the low-activity third (by baskets). Means over categories with 95% bootstrap
intervals over categories, paired differences; the calibration's Brier score, ECE and reliability on the
28 days after the cutoff, pooled over (household, category), with a PNG per cutoff.

    python -m benchmarks.cj_categories [--cutoffs 2017-12-01 2017-11-01] [--plots docs/images]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from benchmarks.cj_rankers import (
    bought,
    fitted_combination,
    histories_of,
    history_rows,
    ranker_before,
    raw_scores,
    windows_before,
)
from recsys.calibration import reliability_png, summary
from recsys.data.completejourney import load_complete_journey, load_products
from recsys.data.schema import BASKET, PRODUCT, SHOPPER, TIMESTAMP
from recsys.data.sequences import SECONDS_PER_DAY, epoch_days
from recsys.data.split import parse_cutoff, temporal_split
from recsys.evaluation.campaigns import auc, summarise, top_lift

HORIZON_DAYS = 28.0
CATEGORIES = 50
TOP_SHARE = 0.1
HALF_LIVES = (30.0, 120.0)
CATEGORY = "product_category"


def _lines(
    table: pa.Table, categories: dict[int, str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per receipt row: shopper, basket, category name (None without one) and time in days."""
    names = np.array([categories.get(p) for p in table.column(PRODUCT).to_numpy().tolist()], dtype=object)
    days = pc.cast(table.column(TIMESTAMP), pa.int64()).to_numpy() / 1e6 / SECONDS_PER_DAY
    return table.column(SHOPPER).to_numpy(), table.column(BASKET).to_numpy(), names, days


def decayed_frequency(
    lines: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    households: np.ndarray,
    category: str,
    now: float,
    half: float,
) -> np.ndarray:
    """[H] each household's baskets with ``category`` before ``now`` (days), each 0.5 ** (age / half);
    ``lines``: the receipts' :func:`_lines`."""
    shoppers, baskets, names, days = lines
    mine = names == category
    keys, first = np.unique(np.stack([shoppers[mine], baskets[mine]]), axis=1, return_index=True)
    weight = 0.5 ** ((now - days[mine][first]) / half)
    out = np.zeros(len(households))
    np.add.at(out, np.searchsorted(households, keys[0]), weight)
    return out


def precision_recall(scores: np.ndarray, outcome: np.ndarray) -> tuple[float, float]:
    """Precision and recall among the top ``TOP_SHARE`` of households (ties in proportion)."""
    size = int(np.ceil(TOP_SHARE * len(scores)))
    precision = top_lift(scores, outcome, TOP_SHARE) * outcome.mean()
    return float(precision), float(precision * size / outcome.sum())


def evaluate_cutoff(
    receipts: pa.Table, products: pa.Table, cutoff: datetime, plots: Path | None
) -> dict[str, object]:
    """Every figure of the module docstring at one cutoff."""
    ranker, vocab = ranker_before(receipts, products, cutoff)
    horizon = timedelta(days=HORIZON_DAYS)
    before, after = temporal_split(receipts, cutoff)
    after, _ = temporal_split(after, cutoff + horizon)
    households = np.unique(before.column(SHOPPER).to_numpy())
    now = histories_of(before, vocab, households)
    windows = windows_before(before, vocab, cutoff, HORIZON_DAYS)
    ids = products.column("product_id").to_numpy()
    names = products.column(CATEGORY).to_pylist()
    categories = {int(p): n for p, n in zip(ids.tolist(), names, strict=True) if n is not None}
    lines = _lines(before, categories)  # every receipt row's category, looked up once
    shoppers, baskets, line_names, _ = lines
    distinct = {(c, int(b)) for c, b in zip(line_names.tolist(), baskets.tolist(), strict=True) if c}
    counts = Counter(c for c, _ in distinct)  # baskets holding the category
    largest = sorted(counts, key=lambda c: (-counts[c], c))[:CATEGORIES]
    household_baskets = np.zeros(len(households))
    keys = np.unique(np.stack([shoppers, baskets]), axis=1)
    np.add.at(household_baskets, np.searchsorted(households, keys[0]), 1)
    low = household_baskets <= np.quantile(household_baskets, 1 / 3)
    cutoff_days = epoch_days(cutoff)
    rows_of: dict[str, list] = {}
    pooled_p, pooled_y = [], []
    for category in largest:
        members = np.array([p for p, n in categories.items() if n == category], dtype=np.int64)
        # a household without a known product has no raw score; here it scores as the lowest one (0)
        raw = np.nan_to_num(raw_scores(ranker, vocab, now, members, cutoff, HORIZON_DAYS), nan=0.0)
        combination = fitted_combination(ranker, vocab, windows, members, HORIZON_DAYS)
        rows = history_rows(before, members, households, cutoff, raw)
        # households rank by the combined score (the probabilities' order, the calibration's ties broken)
        ranking = combination.score(rows)
        probability = combination.calibration(ranking)
        outcome = bought(after, members, households)
        ever = bought(before, members, households)
        frequency = {h: decayed_frequency(lines, households, category, cutoff_days, h) for h in HALF_LIVES}
        row = {"positives": int(outcome.sum()), "new_positives": int(outcome[~ever].sum())}
        row["combined"] = int(combination.model is not None)
        for name, values in {
            "model": ranking,
            "raw": raw,
            **{f"frequency_{h:g}d": f for h, f in frequency.items()},
        }.items():
            row[f"{name}/auc"] = auc(values, outcome)
            row[f"{name}/precision"], row[f"{name}/recall"] = precision_recall(values, outcome)
            new = ~ever
            row[f"{name}/new_auc"] = (
                auc(values[new], outcome[new]) if 0 < outcome[new].sum() < new.sum() else np.nan
            )
            both = 0 < outcome[low].sum() < low.sum()
            row[f"{name}/low_auc"] = auc(values[low], outcome[low]) if both else np.nan
        for key, value in row.items():
            rows_of.setdefault(key, []).append(value)
        pooled_p.append(probability)
        pooled_y.append(outcome)
    table = {key: np.array(values, dtype=np.float64) for key, values in rows_of.items()}
    judged = summary(np.concatenate(pooled_p), np.concatenate(pooled_y))
    if plots is not None:
        plots.mkdir(parents=True, exist_ok=True)
        png = reliability_png(judged["reliability"], f"50 categories, 28 days from {cutoff.date()}")
        (plots / f"category_reliability_{cutoff.date()}.png").write_bytes(png)
    return {
        "households": len(households),
        "categories": len(largest),
        "figures": table,
        "calibration": judged,
    }


def _interval(values: np.ndarray, weights: np.ndarray) -> str:
    keep = ~np.isnan(values)
    s = summarise(values[keep], weights[keep])
    return f"{s.mean:.3f} [{s.mean_ci[0]:.3f}, {s.mean_ci[1]:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cutoffs", nargs="+", default=["2017-12-01", "2017-11-01"])
    parser.add_argument("--timezone", default="America/New_York")
    parser.add_argument("--plots", type=Path, default=None, help="write the reliability PNGs here")
    args = parser.parse_args()
    started = time.perf_counter()
    receipts = load_complete_journey(timezone=args.timezone)
    products = load_products()
    for text in args.cutoffs:
        cutoff = parse_cutoff(text, args.timezone)
        result = evaluate_cutoff(receipts, products, cutoff, args.plots)
        f = result["figures"]
        weights = f["positives"]
        print(f"\n### {cutoff.date()}: {result['households']:,} households, {result['categories']} "
              "categories, 28 days; mean over categories [95% bootstrap CI]\n")  # fmt: skip
        print("| scorer | AUC | precision@10% | recall@10% | AUC new to category | AUC low-activity |")
        print("|---|---|---|---|---|---|")
        print(f"(the combination fitted trees for {int(f['combined'].sum())} of {len(f['combined'])} "
              "categories, the rest fell back to the raw score alone)\n")  # fmt: skip
        for name in ("model", "raw", *(f"frequency_{h:g}d" for h in HALF_LIVES)):
            metrics = ("auc", "precision", "recall", "new_auc", "low_auc")
            cells = [_interval(f[f"{name}/{m}"], weights) for m in metrics]
            print(f"| {name} | " + " | ".join(cells) + " |")
        for base in ("raw", *(f"frequency_{h:g}d" for h in HALF_LIVES)):
            metrics = ("auc", "precision", "new_auc", "low_auc")
            cells = [_interval(f[f"model/{m}"] - f[f"{base}/{m}"], weights) for m in metrics]
            print(f"| model - {base} (paired) | {cells[0]} | {cells[1]} | | {cells[2]} | {cells[3]} |")
        c = result["calibration"]
        print(f"\ncalibration on the 28 days after the cutoff, {c['examples']:,} (household, category) "
              "pairs: "
              f"Brier {c['brier']:.4f}, ECE {c['ece']:.4f}, rate {c['rate']:.4f}, mean probability "
              f"{c['mean_probability']:.4f}")  # fmt: skip
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
