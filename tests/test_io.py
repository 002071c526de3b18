"""Atomic writes: a reader sees the old file or the new one, and a failed write leaves no trace."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recsys.io import atomic_path, write_json
from recsys.scoring import popularity_order


def test_write_json_replaces_the_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "metrics.json"
    write_json(target, {"a": 1})
    write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "results.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_popularity_order_breaks_ties_by_smaller_product_id() -> None:
    rows = popularity_order(np.array([30, 10, 20, 40]), np.array([5, 9, 5, 1]))
    assert rows.tolist() == [1, 2, 0, 3]
