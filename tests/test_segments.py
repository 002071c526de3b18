"""Segments, churn and levers (batch/segments.py), the job and its report (batch/segment.py)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import DictConfig

from batch.segment import run, top_categories
from batch.segments import PROFILE_COLUMNS, ChurnModel, churned, cluster, fit_churn, lever, profiles
from tests.bundles import make_bundle
from tests.shoppers import AS_OF, receipts, world


def test_profiles_by_hand() -> None:
    table = receipts([
        (1, 10, 100, AS_OF - timedelta(days=100), 2.0),  # before the 90-day window
        (1, 11, 100, AS_OF - timedelta(days=10), 1.0),
        (1, 11, 200, AS_OF - timedelta(days=10), 4.0),
        (2, 12, 300, AS_OF - timedelta(days=1), 3.0),
        (2, 13, 300, AS_OF, 9.0),  # at as_of: not before it
    ])  # fmt: skip
    got = profiles(table, AS_OF)
    assert got.shopper_ids.tolist() == [1, 2]
    one = dict(zip(PROFILE_COLUMNS, got.values[0].tolist(), strict=True))
    assert one["recency_days"] == pytest.approx(10) and one["frequency"] == 1 and one["monetary"] == 5.0
    assert one["baskets"] == 2 and one["tenure_days"] == pytest.approx(100) and one["basket_size"] == 1.5
    assert one["breadth"] == 1.0 and one["recency_over_interval"] == pytest.approx(10 / 90)
    assert got.values[1, PROFILE_COLUMNS.index("monetary")] == 3.0


def test_the_churn_model_sees_nothing_on_or_after_as_of() -> None:
    table = world(np.arange(1, 30))
    fitted = fit_churn(table, AS_OF)
    future = receipts(
        [(1000 + s, 10**6 + s, 1, AS_OF + timedelta(days=d), 1.0) for s in range(80) for d in (0, 3)]
    )
    planted = fit_churn(pa.concat_tables([table, future]), AS_OF)
    assert np.array_equal(fitted.weights, planted.weights) and fitted.bias == planted.bias
    labels = churned(table, np.array([1000, 1003]), AS_OF, 28)
    assert labels.dtype == bool and labels.shape == (2,)


def test_the_churn_model_ranks_inactive_shoppers_higher() -> None:
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 1, (400, len(PROFILE_COLUMNS))) * 30
    labels = rng.random(400) < 1 / (1 + np.exp(-(values[:, 0] - 15) / 3))  # churn rises with recency
    model = ChurnModel.fit(values, labels, 28)
    p = model.probability(values)
    assert np.corrcoef(p, values[:, 0])[0, 1] > 0.8 and abs(p.mean() - labels.mean()) < 0.02


def test_segments_are_deterministic_for_a_seed() -> None:
    x = np.random.default_rng(1).standard_normal((300, 8)).astype(np.float32)
    assert np.array_equal(cluster(x, 5, seed=3), cluster(x, 5, seed=3))
    assert set(cluster(x, 5, seed=3).tolist()) <= set(range(5))
    with pytest.raises(ValueError, match="k="):
        cluster(x[:3], 5, seed=0)


def test_levers_follow_the_documented_rules() -> None:
    overall = {"frequency": 4, "monetary": 100, "basket_size": 10, "breadth": 0.5}

    def row(**changes: float) -> dict[str, float]:
        return overall | changes

    assert lever(row(), 0.4, overall, 0.2) == ("lapsing, high spend", "win-back")
    assert lever(row(basket_size=5), 0.1, overall, 0.2)[1] == "up-sell"
    assert lever(row(breadth=0.3), 0.1, overall, 0.2)[1] == "cross-sell"
    assert lever(row(), 0.1, overall, 0.2) == ("loyal, high spend", "repeat")
    assert lever(row(frequency=1, monetary=20), 0.1, overall, 0.2) == ("occasional, low spend", "cross-sell")


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.images: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")
        elif tag not in ("meta",):
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open.pop() == tag, f"</{tag}> closes nothing open"


def test_the_job_writes_segments_a_summary_and_a_report_that_renders(
    tmp_path: Path, compose_config: Callable[..., DictConfig]
) -> None:
    bundle = make_bundle(tmp_path / "bundle", num_items=30, max_len=6)
    table = world(bundle.product_ids)
    pq.write_table(table, tmp_path / "receipts.parquet")
    cfg = compose_config("segment", [f"bundle={bundle.path}", f"receipts={tmp_path / 'receipts.parquet'}",
                                     f"output={tmp_path / 'out'}", "as_of=2017-06-01", "k=4"])  # fmt: skip
    summary = run(cfg)
    segments = pq.read_table(tmp_path / "out" / "segments.parquet")
    ids = segments.column("shopper_id").to_numpy()
    assert len(np.unique(ids)) == len(ids) == summary["shoppers"]
    assert set(segments.column("lever").to_pylist()) <= {"repeat", "cross-sell", "up-sell", "win-back"}
    assert (
        summary["churn_evaluation"]["shoppers"] == len(ids) and 0 <= summary["churn_evaluation"]["auc"] <= 1
    )
    page = _Page()
    page.feed((tmp_path / "out" / "report.html").read_text())
    assert not page.open and {"html", "table", "img"} <= page.tags and len(page.images) == 3
    for src in page.images:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    again = run(cfg)  # deterministic for the seed
    assert pq.read_table(tmp_path / "out" / "segments.parquet").equals(segments)
    assert [s["name"] for s in again["segments"]] == [s["name"] for s in summary["segments"]]


def test_top_categories_count_missing_metadata_as_unknown() -> None:
    rows = [(1, 1, 10, AS_OF, 1.0), (1, 1, 11, AS_OF, 1.0), (2, 2, 12, AS_OF, 1.0), (2, 2, 10, AS_OF, 1.0)]
    shares = top_categories(receipts(rows), np.array([1, 2]), np.array([0, 1]), {10: "MILK", 11: None})
    assert shares == {0: [("MILK", 0.5), ("unknown", 0.5)], 1: [("MILK", 0.5), ("unknown", 0.5)]}
