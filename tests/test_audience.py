"""Campaign specs (batch/campaign.py) and audience selection (batch/audience.py): validation, the
threshold, exclusions and the exact exploration share, against a brute-force reading of the rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from batch.audience import SEGMENTS, select_audience
from batch.campaign import MAX_SPEC_BYTES, CampaignSpec, SpecError, load_spec

BASE = {"campaign_id": 3, "products": [11, 12], "audience": 10}


def spec(**changes: object) -> CampaignSpec:
    return CampaignSpec.parse(BASE | changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"colour": "red"}, "unknown key"),
        ({"campaign_id": "x"}, "campaign_id must be an integer"),
        ({"products": [1, "a"]}, "integer product ids"),
        ({"select": {"brand": "X"}}, "not both"),
        ({"min_probability": 1.5}, "min_probability=1.5 is out of range"),
        ({"exploration": -0.1}, "exploration=-0.1 is out of range"),
        ({"horizon_days": 0}, "horizon_days=0 is out of range"),
        ({"value": float("nan")}, "value must be a finite number"),
        ({"budget": 100.0, "cost_per_contact": 2.0}, "not both"),
        ({"exclude": {"opted_out": "x.txt"}}, "beside the spec file"),
        ({"exclude": {"since": 3}}, "exclude takes"),
    ],
)
def test_bad_specs_are_refused_naming_the_key(changes: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        spec(**changes)


def test_a_budget_gives_the_audience_and_metadata_selects_products() -> None:
    data = {k: v for k, v in BASE.items() if k not in ("audience", "products")}
    budgeted = CampaignSpec.parse(data | {"budget": 101.0, "cost_per_contact": 2.0, "select": {"brand": "B"}})
    assert budgeted.audience == 50
    products = pa.table({"product_id": [5, 6, 7], "brand": ["B", "C", "B"]})
    assert budgeted.product_ids(products).tolist() == [5, 7]
    with pytest.raises(SpecError, match="lacks"):
        CampaignSpec.parse(data | {"audience": 1, "select": {"colour": "B"}}).product_ids(products)
    with pytest.raises(SpecError, match="names no products"):
        CampaignSpec.parse({"campaign_id": 1, "audience": 1}).product_ids(products)


def test_spec_files_read_their_opt_out_list_only_from_beside_them(tmp_path: Path) -> None:
    (tmp_path / "out.txt").write_text("5\n7\n\n5\n")
    path = tmp_path / "c.yaml"
    path.write_text("campaign_id: 3\nproducts: [11]\naudience: 4\nexclude: {opted_out: out.txt}\n")
    assert load_spec(path).opted_out == (5, 7)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text(path.read_text().replace("out.txt", "../out.txt"))
    with pytest.raises(SpecError, match="inside the spec's directory"):
        load_spec(tmp_path / "sub" / "c.yaml")
    (tmp_path / "bad.yaml").write_text("campaign_id: !!python/object:os.system [x]\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")
    (tmp_path / "big.yaml").write_text("#" * (MAX_SPEC_BYTES + 1))
    with pytest.raises(SpecError, match="over the spec limit"):
        load_spec(tmp_path / "big.yaml")


def brute_force(p: np.ndarray, days: np.ndarray, ids: np.ndarray, s: CampaignSpec) -> set[int]:
    """The rules read literally: the best eligible new shoppers for the share, the best others for the rest,
    the largest size <= audience for which both pools suffice."""
    ok = [i for i in range(len(p)) if p[i] >= s.min_probability and ids[i] not in s.opted_out
          and not (s.bought_within_days is not None and days[i] <= s.bought_within_days)]  # fmt: skip
    best = sorted(ok, key=lambda i: (-p[i], i))
    if s.exploration == 0:
        return set(best[: s.audience])
    new = [i for i in best if np.isinf(days[i])]
    old = [i for i in best if not np.isinf(days[i])]
    for size in range(s.audience, -1, -1):
        explore = int(np.floor(s.exploration * size + 0.5))
        if explore <= len(new) and size - explore <= len(old):
            return set(new[:explore] + old[: size - explore])
    return set()


@pytest.mark.parametrize("seed", range(30))
def test_audience_equals_the_rules_read_literally(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 80))
    p = np.round(rng.random(n), 2)  # ties
    days = np.where(rng.random(n) < 0.4, np.inf, rng.uniform(0, 200, n))
    ids = np.arange(100, 100 + n)
    s = spec(
        audience=int(rng.integers(0, n + 5)),
        min_probability=float(rng.choice([0.0, 0.3, 0.6])),
        exploration=float(rng.choice([0.0, 0.1, 0.25, 0.5, 1.0])),
        exclude={"bought_within_days": 10} if seed % 3 == 0 else {},
    )
    s = CampaignSpec(**(s.__dict__ | {"opted_out": (100, 103) if seed % 4 == 0 else ()}))
    got = select_audience(s, ids, p, days)
    assert set(got.members.tolist()) == brute_force(p, days, ids, s)
    assert (p[got.members] >= s.min_probability).all()  # the threshold, always
    assert np.all(np.diff(p[got.members]) <= 0)  # best first
    size = len(got.members)
    assert got.shortfall == s.audience - size
    if s.exploration > 0:
        assert got.explorers == int(np.floor(s.exploration * size + 0.5))  # the exact share
    assert [SEGMENTS[k] == "new" for k in got.segment] == np.isinf(days[got.members]).tolist()
    assert got.exploration_cost >= -1e-12


def test_exploration_costs_conversions_and_reaches_new_shoppers() -> None:
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.1])
    days = np.array([1.0, 200.0, 5.0, 3.0, np.inf, np.inf])
    got = select_audience(spec(audience=4, exploration=0.5), np.arange(6), p, days)
    assert sorted(got.members.tolist()) == [0, 1, 4, 5]
    assert got.exploration_cost == pytest.approx((0.7 + 0.6) - (0.2 + 0.1))
    assert got.exploration_reach == 2 and [SEGMENTS[k] for k in got.segment] == [
        "repeat",
        "lapsed",
        "new",
        "new",
    ]
