"""A campaign's audience from a bundle's ranking stage, over every shopper in a receipts dataset (Hydra job).

    python -m batch.audience campaign=spec.yaml bundle=PATH receipts=PATH output=PATH as_of=2017-12-01

Two steps (library: :mod:`batch.audiences`, :mod:`recsys.propensity`, :mod:`recsys.combination`):

1. **Scores**, sharded and resumable like the candidate job (the same partitioning, engine and manifests,
   :mod:`batch.shards`): every shopper with a purchase before ``as_of`` gets its raw within-horizon score
   of the campaign's products, and its own history of them (days since it last bought one, its baskets,
   its decayed baskets with them; with the spec's ``objective: redeem``, its baskets with a coupon
   discount, :mod:`recsys.coupons`). A ``calibration_share`` of the shoppers (chosen by a hash of the id,
   so every shard agrees) is also scored the same way at the start of each of ``calibration_windows``
   horizons back to back before ``as_of``, on the receipts before that start, with what it bought in
   that horizon: the calibration's examples, all before ``as_of``.
2. **Audience**, once every shard is complete (the shard that completes last writes it): the
   combination fitted on those examples (:mod:`recsys.combination`: monotone gradient-boosted trees over
   the raw score and the history, then isotonic calibration of their cross-fitted output; the raw score
   alone, calibrated, when the sample has too few buyers) maps every shopper to a probability of buying
   (``objective: redeem``: times its coupon rate, P(redeem) if the two are independent);
   :func:`select_audience`
   applies the spec's threshold, exclusions and exploration share. When the receipts go on past
   ``as_of + horizon``, the purchase probabilities are also judged against what happened (AUC, Brier, ECE,
   reliability; overall and for the low-activity third of shoppers by baskets), their AUC next to that
   of decayed frequency (baskets with the products, 120-day half-life) with a paired bootstrap interval.

Output::

    output/scores/shard=00000-of-00001/part-00000.parquet + _manifest.json    per-shopper raw scores
    output/audience/audience.parquet   shopper_id, probability, rank (1 = best), segment
    output/audience/probabilities.parquet   shopper_id, campaign_id, probability of every shopper the
                                       campaign may contact (threshold, exclusions): batch.allocate's input
    output/audience/audience.json      bundle id, spec and its hash, counts, shortfall, exploration's cost
                                       and reach, calibration fit and evaluation
    output/audience/calibration.json   the fitted combination: its trees (LightGBM text) and isotonic
                                       knots (recsys.combination.Combination.from_dict reads it)
    output/audience/reliability.png    the reliability curve (report=true; needs matplotlib)

``audience/`` is replaced in one atomic step (:func:`recsys.io.staged_directory`). Limits: those of the
spec (:mod:`batch.campaign`) and of the candidate job's parts (``rows_per_part``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from batch.audiences import SCORES, calibration_windows, campaign_rows, choose, score_part
from batch.campaign import CampaignSpec, load_spec
from batch.engines import OnnxEngine, onnx_settings
from batch.lock import LockError, locked
from batch.manifests import CandidatesError, ShardManifest, combine_shards, write_part
from batch.partition import COLUMNS, Layout
from batch.shards import PARTITIONS_DIR, Runs, layout, part_reader, receipts_identity, remove_partitions
from recsys.calibration import reliability_png
from recsys.data.loader import open_dataset
from recsys.data.schema import COUPON, SHOPPER, TIMESTAMP
from recsys.data.split import parse_cutoff
from recsys.io import atomic_path, staged_directory, write_json

log = logging.getLogger(__name__)

FORMAT = "caddie-audience-scores"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def run(cfg: DictConfig) -> dict[str, Any]:
    """Score this shard, then, if every shard is complete, write the audience; the shard's manifest and
    (when written) the audience summary."""
    start = time.perf_counter()
    spec = load_spec(cfg.campaign)
    as_of = parse_cutoff(str(cfg.as_of), cfg.timezone)
    if not 0.0 < cfg.calibration_share <= 1.0:
        raise CandidatesError(f"calibration_share must be in (0, 1], got {cfg.calibration_share}")
    try:
        calibration_windows(as_of, spec.horizon_days, cfg.calibration_windows)
        onnx = onnx_settings(OmegaConf.to_container(cfg.onnx))
    except ValueError as error:
        raise CandidatesError(str(error)) from error
    engine = OnnxEngine(cfg.bundle, cfg.threads, None, **onnx)
    products = spec.product_ids(engine.items)
    rows = campaign_rows(engine, products)
    output = Path(cfg.output)
    scores_dir = output / "scores"
    dataset = open_dataset(cfg.receipts)
    num_rows = dataset.count_rows()
    found, ordered = layout(cfg, num_rows, scores_dir)
    receipts = receipts_identity(cfg, dataset)
    # what the scores depend on; the audience's size, threshold and exclusions only change step 2
    job = {
        "model": engine.identity,
        "campaign_products": _digest(products.tolist()),
        "horizon_days": spec.horizon_days,
        "coupon_baskets": spec.objective == "redeem",  # counted only for that objective
        "as_of": as_of.isoformat(),
        "calibration_share": float(cfg.calibration_share),
        "calibration_windows": int(cfg.calibration_windows),
        "popular": int(cfg.popular),
        "scores": SCORES.names,  # parts written with other columns are another job's
        "receipts": receipts,
        "num_shards": found.num_shards,
        "parts": found.parts,
        "parts_by": "hash" if ordered is None else "row_groups",
    }
    try:
        with locked(scores_dir / f".{found.shard_name}.lock"):
            manifest = _score(cfg, engine, spec, products, as_of, found, ordered, receipts, job, num_rows)
    except LockError as error:
        raise CandidatesError(str(error)) from error
    result = {"shard": manifest.save(complete=True)}
    combined = combine_shards(scores_dir, found.num_shards, manifest.job, FORMAT)
    if combined is not None:
        summary_ = write_audience(
            output, spec, products, rows, as_of, engine.identity, combined, bool(cfg.report), start
        )
        result["audience"] = summary_
        log.info(
            "audience: %d of %d asked (shortfall %d), %d new to the products; expected conversions %.1f",
            summary_["audience"],
            spec.audience,
            summary_["shortfall"],
            summary_["explorers"],
            summary_["expected_conversions"],
        )
        for member in summary_["top"]:
            log.info(
                "  #%d household %d: probability %.3f (%s)",
                member["rank"], member[SHOPPER], member["probability"], member["segment"],
            )  # fmt: skip
    return result


def _score(
    cfg: DictConfig,
    engine: OnnxEngine,
    spec: CampaignSpec,
    products: np.ndarray,
    as_of: datetime,
    found: Layout,
    ordered: Runs | None,
    receipts: dict[str, Any],
    job: dict[str, Any],
    num_rows: int,
) -> ShardManifest:
    """Score the shard's parts not written yet (step 1)."""
    directory = Path(cfg.output) / "scores" / found.shard_name
    directory.mkdir(parents=True, exist_ok=True)
    shard = {"index": found.shard_index, "count": found.num_shards}
    manifest = ShardManifest(directory, job, shard, cfg.overwrite, FORMAT)
    pending = [p for p in range(found.parts) if found.part_name(p) not in manifest.parts]
    if not pending:
        return manifest
    partitions = Path(cfg.output) / PARTITIONS_DIR / found.shard_name
    columns = (*COLUMNS, COUPON) if spec.objective == "redeem" else COLUMNS  # coupons: recsys.coupons
    read, _ = part_reader(cfg, found, receipts, partitions, num_rows, pending, ordered, columns=columns)
    for index in pending:
        table = read(index)
        name = found.part_name(index)
        if table is None:
            batches = [pa.record_batch([pa.array([], f.type) for f in SCORES], schema=SCORES)]
        else:
            share = cfg.calibration_share
            windows = cfg.calibration_windows
            batches = [score_part(engine, table, spec, products, as_of, share, cfg.popular, windows)]
        entry = write_part(directory, name, batches, SCORES)
        # the latest receipt says whether what happened after as_of is known (the evaluation)
        latest = None if table is None else pc.max(table.column(TIMESTAMP)).as_py()
        manifest.record(name, entry | {"last_receipt": None if latest is None else latest.isoformat()})
    if not cfg.keep_partitions:
        remove_partitions(partitions)
    return manifest


def read_scores(scores_dir: Path, combined: dict[str, Any]) -> pa.Table:
    """Every shard's scores, in shopper order (the parts the combined manifest lists)."""
    tables = [
        pq.read_table(scores_dir / shard / name, schema=SCORES)
        for shard, entry in sorted(combined["shards"].items())
        for name in sorted(entry["parts"])
    ]
    table = pa.concat_tables(tables)
    return table.take(pc.sort_indices(table, [(SHOPPER, "ascending")]))


def write_audience(
    output: Path,
    spec: CampaignSpec,
    products: np.ndarray,
    rows: np.ndarray,
    as_of: datetime,
    model: dict[str, Any],
    combined: dict[str, Any],
    report: bool,
    started: float,
) -> dict[str, Any]:
    """Step 2: calibrate, select and write ``output/audience``; its summary."""
    latest = max(
        datetime.fromisoformat(entry["last_receipt"])
        for shard in combined["shards"].values()
        for entry in shard["parts"].values()
        if entry.get("last_receipt")
    )
    scores = read_scores(output / "scores", combined)
    chosen = choose(scores, spec, as_of, latest >= as_of + timedelta(days=spec.horizon_days))
    table, combination, summary_ = chosen.table, chosen.combination, chosen.summary
    summary_ = {
        "campaign_id": spec.campaign_id,
        "spec": asdict(spec) | {"opted_out": len(spec.opted_out)},
        "spec_sha256": _digest(asdict(spec)),
        "bundle_id": model.get("bundle_id"),
        "products": len(products),
        "products_in_bundle": len(rows),
    } | summary_
    target = output / "audience"
    with staged_directory(target) as staging:
        with atomic_path(staging / "audience.parquet") as tmp:
            pq.write_table(table, tmp)
        with atomic_path(staging / "probabilities.parquet") as tmp:
            pq.write_table(chosen.eligible, tmp)
        write_json(staging / "calibration.json", combination.to_dict())
        if report:
            judged = (
                summary_["evaluation"]["overall"]
                if summary_["evaluation"]
                else summary_["calibration"]["fit"]
            )
            when = "after the scoring date" if summary_["evaluation"] else "calibration window"
            with atomic_path(staging / "reliability.png") as tmp:
                tmp.write_bytes(
                    reliability_png(judged["reliability"], f"Campaign {spec.campaign_id}: {when}")
                )
        summary_["seconds"] = round(time.perf_counter() - started, 1)  # this shard's run, both steps
        write_json(staging / "audience.json", summary_)
    return summary_


@hydra.main(version_base="1.3", config_path="../conf", config_name="audience")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
