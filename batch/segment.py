"""Behavioural segments of every shopper from a bundle's encoder and the receipts (Hydra job).

    python -m batch.segment bundle=PATH receipts=PATH output=PATH as_of=2017-12-01 k=8 \\
        timezone=America/New_York

Receipts strictly before ``as_of`` make each shopper's profile, churn risk and embedding
(:mod:`batch.segments`); shoppers are clustered on their embeddings (spherical k-means, FAISS, ``seed``)
and every segment named and given its lever. When the receipts go on past ``as_of + horizon_days``, what
happened is known, and the churn model's AUC, Brier score and reliability are reported (the evaluation).

Output directory, replaced in one atomic step (:func:`recsys.io.staged_directory`):

- ``segments.parquet``: shopper_id, segment, name, lever, churn_probability, and the profile columns;
- ``summary.json``: settings, each segment's profile, churn evaluation when known, seconds;
- ``report.html``: one page with the plots (:mod:`batch.segment_report`; ``report=false`` skips it).

Limits: ``max_shoppers`` shoppers (the embeddings are held in memory: 4 * dim bytes each).
"""

from __future__ import annotations

import json
import logging
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from omegaconf import DictConfig

from batch.engines import OnnxEngine
from batch.segment_report import render
from batch.segments import PROFILE_COLUMNS, churned, cluster, describe, fit_churn, profiles
from recsys.calibration import brier
from recsys.data.loader import read_receipts
from recsys.data.schema import PRODUCT, SHOPPER, TIMESTAMP
from recsys.data.sequences import build_sequences
from recsys.data.split import parse_cutoff, temporal_split
from recsys.evaluation.campaigns import auc
from recsys.inputs import Histories
from recsys.io import atomic_path, staged_directory, write_json

log = logging.getLogger(__name__)


def embeddings(engine: OnnxEngine, receipts: pa.Table, shopper_ids: np.ndarray) -> np.ndarray:
    """The bundle encoder's embedding [S, d] of each shopper's history in ``receipts`` (the engine calls
    ONNX Runtime on ``encode_rows`` shoppers at a time)."""
    sequences = build_sequences(receipts, engine.vocab).select(shopper_ids)
    return engine.encode(*Histories.from_sequences(sequences).model_inputs(engine.max_len))


def top_categories(
    receipts: pa.Table,
    shopper_ids: np.ndarray,
    assigned: np.ndarray,
    categories: dict[int, str],
    count: int = 3,
) -> dict[int, list[tuple[str, float]]]:
    """Per segment, its ``count`` categories with the largest share of its members' purchase lines (a tie
    goes to the name first in sorting order); lines of shoppers outside ``shopper_ids`` are left out."""
    # hash lookups (pc.index_in): a binary search per line is the slowest part at millions of shoppers
    position = pc.index_in(receipts.column(SHOPPER), value_set=pa.array(shopper_ids, pa.int64()))
    position = position.fill_null(-1).to_numpy()
    mine = position >= 0  # a line of a shopper outside shopper_ids is in no segment: it is not counted
    receipts, position = receipts.filter(pa.array(mine)), position[mine]
    segments = np.unique(assigned)
    segment = np.searchsorted(segments, assigned)[position]
    # products without metadata, or with a null category, count as "unknown" (the last label); names are
    # coded in sorted order, so a stable sort by count breaks ties by name
    labels = [name or "unknown" for name in categories.values()] + ["unknown"]
    names, codes = np.unique(np.array(labels, dtype=object), return_inverse=True)
    known = pa.array(list(categories), pa.int64())
    line = pc.index_in(receipts.column(PRODUCT), value_set=known).fill_null(len(categories)).to_numpy()
    counts = np.bincount(segment * len(names) + codes[line], minlength=len(segments) * len(names))
    result = {}
    for s, row in zip(segments.tolist(), counts.reshape(len(segments), len(names)), strict=True):
        present = np.flatnonzero(row)
        top = present[np.argsort(-row[present], kind="stable")[:count]]
        result[s] = [(str(names[i]), float(row[i] / row.sum())) for i in top]
    return result


def run(cfg: DictConfig) -> dict[str, Any]:
    """Segment the shoppers of ``cfg`` (conf/segment.yaml) into ``cfg.output``; the summary."""
    start = time.perf_counter()
    as_of = parse_cutoff(str(cfg.as_of), cfg.timezone)
    receipts = read_receipts(cfg.receipts, timezone=cfg.timezone)
    before, after = temporal_split(receipts, as_of)
    del receipts  # its two halves hold every row: keeping the whole too would hold each row twice
    if before.num_rows == 0:
        raise ValueError(f"no receipts before as_of={as_of.isoformat()}")
    profile = profiles(before, as_of, cfg.window_days)
    if len(profile.shopper_ids) > cfg.max_shoppers:
        raise ValueError(f"{len(profile.shopper_ids):,} shoppers, over max_shoppers={cfg.max_shoppers:,}")
    model = fit_churn(before, as_of, cfg.horizon_days, cfg.window_days)
    churn = model.probability(profile.values)
    engine = OnnxEngine(cfg.bundle, threads=cfg.threads, encode_rows=cfg.batch_size)
    assigned = cluster(embeddings(engine, before, profile.shopper_ids), cfg.k, cfg.seed)
    segments = describe(assigned, profile.values, churn)
    by_id = {s.segment: s for s in segments}
    evaluation, outcome = None, None
    last = pc.max(after.column(TIMESTAMP)).as_py() if after.num_rows else None
    # what happened after as_of is in the receipts
    if last is not None and last >= as_of + timedelta(days=cfg.horizon_days):
        outcome = churned(after, profile.shopper_ids, as_of, cfg.horizon_days)
        evaluation = {
            "shoppers": len(outcome),
            "churn_rate": float(outcome.mean()),
            "auc": auc(churn, outcome),
            "auc_recency_alone": auc(profile.column("recency_days"), outcome),
            "brier": brier(churn, outcome),
            "mean_probability": float(churn.mean()),
        }
    table = pa.table(
        {
            "shopper_id": pa.array(profile.shopper_ids),
            "segment": pa.array(assigned),
            "name": pa.array([by_id[s].name for s in assigned.tolist()]),
            "lever": pa.array([by_id[s].lever for s in assigned.tolist()]),
            "churn_probability": pa.array(churn),
        }
        | {name: pa.array(profile.column(name)) for name in PROFILE_COLUMNS}
    )
    summary = {
        "as_of": as_of.isoformat(),
        "bundle_id": engine.identity["bundle_id"],
        "shoppers": len(profile.shopper_ids),
        "k": int(cfg.k),
        "seed": int(cfg.seed),
        "segments": [s.__dict__ for s in segments],
        "churn_evaluation": evaluation,
        "seconds": time.perf_counter() - start,
    }
    with staged_directory(Path(cfg.output)) as staging:
        with atomic_path(staging / "segments.parquet") as tmp:
            pq.write_table(table, tmp)
        if cfg.report:
            items = engine.items  # read and verified once, by the engine
            categories = {}
            if cfg.category_column in items.column_names:
                products = items.column("product_id").to_pylist()
                categories = dict(zip(products, items.column(cfg.category_column).to_pylist(), strict=True))
            shares = top_categories(before, profile.shopper_ids, assigned, categories)
            page = render(
                segments, shares, churn, outcome, f"Segments at {as_of.date()} ({len(assigned):,} shoppers)"
            )
            with atomic_path(staging / "report.html") as tmp:
                tmp.write_text(page)
        write_json(staging / "summary.json", summary)
    log.info("segments: %s", json.dumps({f"{s.segment}: {s.name}": s.size for s in segments}))
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="segment")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
