"""The segment job's split at ``as_of`` (batch/segment.py, batch/segments.py): the library gives the same
profiles and churn model whether it is handed the whole receipts or the rows before ``as_of`` (which it
then reads without copying), and the job evaluates churn only when the receipts cover the horizon."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from omegaconf import DictConfig

from batch.segment import run
from batch.segments import fit_churn, profiles
from recsys.data.split import temporal_split
from tests.bundles import make_bundle
from tests.shoppers import AS_OF, world


def test_profiles_and_churn_are_the_same_from_the_whole_receipts_or_those_before_as_of() -> None:
    table = world(np.arange(1, 30))
    before, after = temporal_split(table, AS_OF)
    assert after.num_rows > 0
    whole, split = profiles(table, AS_OF), profiles(before, AS_OF)
    assert np.array_equal(whole.shopper_ids, split.shopper_ids) and np.array_equal(whole.values, split.values)
    fitted, again = fit_churn(table, AS_OF), fit_churn(before, AS_OF)
    assert np.array_equal(fitted.weights, again.weights) and fitted.bias == again.bias


@pytest.mark.parametrize("days_after", [40, 60])  # receipts ending within the horizon, or before as_of
def test_the_job_evaluates_churn_only_when_the_receipts_cover_the_horizon(
    days_after: int, tmp_path: Path, compose_config: Callable[..., DictConfig]
) -> None:
    bundle = make_bundle(tmp_path / "bundle", num_items=30, max_len=6)
    receipts = tmp_path / "receipts.parquet"
    pq.write_table(world(bundle.product_ids), receipts)  # up to AS_OF + 50 days
    as_of = (AS_OF + timedelta(days=days_after)).date()
    overrides = [
        f"bundle={bundle.path}",
        f"receipts={receipts}",
        f"output={tmp_path / 'out'}",
        f"as_of={as_of}",
    ]
    cfg = compose_config("segment", [*overrides, "k=3", "report=false"])
    summary = run(cfg)
    assert summary["churn_evaluation"] is None
    assert pq.read_table(tmp_path / "out" / "segments.parquet").num_rows == summary["shoppers"] > 0
