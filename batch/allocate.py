"""The week's contact plan: which shoppers each campaign contacts, under contact caps (Hydra job).

    python -m batch.allocate probabilities=PATH output=PATH shopper_cap=2 \\
        'campaigns=[{campaign_id: 7, audience: 5000, min_probability: 0.05}, {campaign_id: 9, audience: 800}]'

Input: parquet files of calibrated probabilities (``probabilities=PATH`` or ``'probabilities=[A,B]'``,
e.g. each campaign's ``batch.audience`` output ``audience/probabilities.parquet``), one row per (shopper,
campaign) pair: ``shopper_id`` int64, ``campaign_id`` int64, ``probability`` float in [0, 1]. The
campaigns (``campaigns``) give each one's ``audience`` (contacts at most), ``min_probability`` (pairs
below it are never contacted: better no message than an irrelevant one) and ``value`` per conversion
(expected value = probability x value; 1 counts expected conversions).

Output directory, replaced as a whole in one atomic step (:func:`recsys.io.exchange_directory`):

- ``contacts.parquet``: shopper_id, campaign_id, probability, expected_value (by campaign, then best first);
- ``campaigns.parquet``: per campaign its audience, eligible shoppers, contacts, shortfall (audience not
  filled, e.g. too few shoppers above the threshold or taken by the cap), expected value;
- ``summary.json``: the job's identity (settings and an input fingerprint), totals, shoppers at the cap,
  the solver's bound and gap, seconds.

A run whose ``summary.json`` has the same identity is already done and is not repeated; a killed run left
nothing at ``output`` and runs again from the start (one solve is the unit of work).

Limits (clear errors): ``max_pairs`` input rows, ``max_cells`` = shoppers x campaigns (the solver holds a
dense float32 matrix: 1M shoppers x 40 campaigns is 160 MB).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from batch.allocation import Allocation, Problem, allocate, exact
from batch.campaign import CampaignSpec, SpecError, load_spec
from batch.lock import locked
from batch.partition import fingerprint
from recsys.io import atomic_path, staged_directory, write_json

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
ALLOCATION_KEYS = ("campaign_id", "audience", "min_probability", "value")  # what allocation reads of a spec
SOLVERS = ("lagrangian", "exact")
INPUT_COLUMNS = {"shopper_id": pa.int64(), "campaign_id": pa.int64(), "probability": pa.float64()}


class AllocationError(ValueError):
    """Invalid allocation input or settings; the message names the problem."""


def read_probabilities(paths: str | Path | list[str | Path], max_pairs: int) -> pa.Table:
    """The probabilities of one parquet file or several (e.g. each campaign's audience job's
    ``probabilities.parquet``), checked: the three columns with integer ids and finite probabilities in
    [0, 1], at most ``max_pairs`` rows in all, each (shopper, campaign) pair once."""
    files = [paths] if isinstance(paths, str | Path) else list(paths)
    if not files:
        raise AllocationError("probabilities names no file")
    rows = sum(pq.ParquetFile(path).metadata.num_rows for path in files)
    path = ", ".join(str(f) for f in files)
    if rows > max_pairs:
        raise AllocationError(f"{path} has {rows:,} rows, over max_pairs={max_pairs:,}")
    tables = [pq.read_table(f) for f in files]
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    missing = set(INPUT_COLUMNS) - set(table.column_names)
    if missing:
        raise AllocationError(f"{path} lacks column(s) {sorted(missing)}; needs {sorted(INPUT_COLUMNS)}")
    columns = {}
    for name, kind in INPUT_COLUMNS.items():
        column = table.column(name)
        if column.null_count:
            raise AllocationError(f"column {name} has {column.null_count} null(s)")
        integer = pa.types.is_integer(column.type)
        if (kind == pa.int64() and not integer) or (
            kind != pa.int64() and not (integer or pa.types.is_floating(column.type))
        ):
            raise AllocationError(f"column {name} is {column.type}; needs {kind}")
        columns[name] = column.cast(kind)
    table = pa.table(columns)
    probability = table.column("probability").to_numpy()
    if not (np.isfinite(probability) & (probability >= 0) & (probability <= 1)).all():
        raise AllocationError("probabilities must be finite and within [0, 1]")
    pairs = table.group_by(["shopper_id", "campaign_id"]).aggregate([])
    if pairs.num_rows != table.num_rows:
        raise AllocationError("a (shopper_id, campaign_id) pair appears more than once")
    return table


def problem_of(
    table: pa.Table,
    campaigns: list[CampaignSpec],
    shopper_cap: int,
    max_campaigns: int | None,
    max_cells: int,
) -> tuple[Problem, np.ndarray, np.ndarray]:
    """The allocation :class:`Problem` of a checked probabilities table, with its shopper ids [S] and
    the probabilities [S, C] it was built from (pairs under a campaign's threshold are not eligible)."""
    ids = np.array([c.campaign_id for c in campaigns], dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise AllocationError("a campaign_id is listed twice")
    campaign_ids = table.column("campaign_id").to_numpy()
    unknown = np.setdiff1d(campaign_ids, ids)
    if len(unknown):
        raise AllocationError(f"campaign_id {unknown[0]} has probabilities but is not among the campaigns")
    shoppers, shopper_index = np.unique(table.column("shopper_id").to_numpy(), return_inverse=True)
    if len(shoppers) * len(ids) > max_cells:
        raise AllocationError(
            f"{len(shoppers):,} shoppers x {len(ids)} campaigns is over max_cells={max_cells:,}"
        )
    order = np.argsort(ids)
    campaign_index = order[np.searchsorted(ids[order], campaign_ids)]
    probabilities = np.zeros((len(shoppers), len(ids)), dtype=np.float32)
    probabilities[shopper_index, campaign_index] = table.column("probability").to_numpy()
    threshold = np.array([c.min_probability for c in campaigns], dtype=np.float32)
    value = np.array([c.value for c in campaigns], dtype=np.float32)
    eligible = (probabilities >= threshold) & (probabilities > 0)
    values = np.where(eligible, probabilities * value, 0.0).astype(np.float32)
    audience = np.array([c.audience for c in campaigns], dtype=np.int64)
    return Problem(values, shopper_cap, audience, max_campaigns), shoppers, probabilities


def campaign_spec(entry: Any) -> CampaignSpec:
    """A campaign of the week: a spec file's path (``batch.campaign``), or its keys inline."""
    try:
        return load_spec(entry) if isinstance(entry, str) else CampaignSpec.parse(entry)
    except SpecError as error:
        raise AllocationError(f"campaign {entry!r}: {error}") from error


def solve(problem: Problem, solver: str) -> Allocation:
    if solver not in SOLVERS:
        raise AllocationError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    return exact(problem) if solver == "exact" else allocate(problem)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Allocate the week's contacts of ``cfg`` (conf/allocate.yaml) into ``cfg.output``; the summary."""
    campaigns = [campaign_spec(entry) for entry in OmegaConf.to_container(cfg.campaigns, resolve=True)]
    given = cfg.probabilities
    sources = [str(given)] if isinstance(given, str | Path) else [str(p) for p in given]
    if not campaigns:
        raise AllocationError("no campaigns given")
    if cfg.shopper_cap < 0 or (cfg.max_campaigns is not None and cfg.max_campaigns < 0):
        raise AllocationError("shopper_cap and max_campaigns must be >= 0")
    settings = {
        "campaigns": [{key: getattr(c, key) for key in ALLOCATION_KEYS} for c in campaigns],
        "shopper_cap": int(cfg.shopper_cap),
        "max_campaigns": cfg.max_campaigns,
        "solver": cfg.solver,
        "input": fingerprint([str(p) for p in sources]),
    }
    identity = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    output = Path(cfg.output)
    done = output / SUMMARY
    if done.exists() and json.loads(done.read_text()).get("identity") == identity:
        log.info("%s already holds this allocation (identity %s): nothing to do", output, identity)
        return json.loads(done.read_text())
    output.parent.mkdir(parents=True, exist_ok=True)
    with locked(output.with_name(f".{output.name}.lock")):
        start = time.perf_counter()
        table = read_probabilities(sources, int(cfg.max_pairs))
        problem, shoppers, probabilities = problem_of(
            table, campaigns, int(cfg.shopper_cap), cfg.max_campaigns, int(cfg.max_cells)
        )
        solved = time.perf_counter()
        allocation = solve(problem, cfg.solver)
        seconds = {"read": solved - start, "solve": time.perf_counter() - solved}
        job = {"identity": identity, "settings": settings, "seconds": seconds}
        summary = _write(output, campaigns, problem, shoppers, probabilities, allocation, job)
    log.info("allocation: %s", json.dumps({k: summary[k] for k in ("contacts", "expected_value", "gap")}))
    return summary


def _write(
    output: Path,
    campaigns: list[CampaignSpec],
    problem: Problem,
    shoppers: np.ndarray,
    probabilities: np.ndarray,
    allocation: Allocation,
    job: dict[str, Any],
) -> dict[str, Any]:
    """Write contacts, per-campaign tables and the summary (with ``job``) into a new directory, then swap
    it in for ``output``; the summary."""
    ids = np.array([c.campaign_id for c in campaigns], dtype=np.int64)
    contacts = allocation.contacts
    campaign_at, shopper_at = np.nonzero(contacts.T)  # by campaign, then shopper
    value = problem.values[shopper_at, campaign_at]
    order = np.lexsort((shoppers[shopper_at], -value, campaign_at))
    shopper_at, campaign_at, value = shopper_at[order], campaign_at[order], value[order]
    contact_table = pa.table({
        "shopper_id": pa.array(shoppers[shopper_at]),
        "campaign_id": pa.array(ids[campaign_at]),
        "probability": pa.array(probabilities[shopper_at, campaign_at].astype(np.float64)),
        "expected_value": pa.array(value.astype(np.float64)),
    })  # fmt: skip
    sent = contacts.sum(axis=0)
    campaign_table = pa.table({
        "campaign_id": pa.array(ids),
        "audience": pa.array(problem.audience),
        "eligible": pa.array((problem.values > 0).sum(axis=0)),
        "contacts": pa.array(sent),
        "shortfall": pa.array(problem.audience - sent),
        "expected_value": pa.array((problem.values * contacts).sum(axis=0).astype(np.float64)),
    })  # fmt: skip
    per_shopper = contacts.sum(axis=1)
    summary = {
        "shoppers": len(shoppers),
        "campaigns": len(ids),
        "contacts": int(sent.sum()),
        "expected_value": float(allocation.value),
        "bound": float(allocation.bound),
        "gap": float(allocation.gap),
        "shoppers_at_cap": int((per_shopper >= problem.shopper_cap).sum()),
        "shoppers_contacted": int((per_shopper > 0).sum()),
        "campaigns_short": int((problem.audience - sent > 0).sum()),
    } | job
    with staged_directory(output) as staging:
        for name, table in (("contacts.parquet", contact_table), ("campaigns.parquet", campaign_table)):
            with atomic_path(staging / name) as tmp:
                pq.write_table(table, tmp)
        write_json(staging / SUMMARY, summary)
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="allocate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
