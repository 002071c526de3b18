"""Campaign specs (batch/campaign.py), audience selection (batch/audiences.py) and the audience job
(batch/audience.py): validation, the threshold, exclusions and the exact exploration share against a
brute-force reading of the rules; the job against a brute-force scoring, resumed, sharded, leak-free."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from omegaconf import DictConfig

from batch import allocate as allocate_job
from batch import audience as audience_job
from batch.audiences import (
    CALIBRATION,
    SEGMENTS,
    audience,
    calibration_sample,
    calibration_windows,
    campaign_rows,
    features,
    history_features,
    raw_scores,
    score_part,
    select_audience,
)
from batch.campaign import MAX_SPEC_BYTES, CampaignSpec, SpecError, load_spec
from batch.engines import OnnxEngine
from recsys import combination as combination_module
from recsys.combination import Combination
from recsys.coupons import PRIOR_BASKETS
from recsys.data.schema import BASKET, COUPON, PRODUCT, SHOPPER, TIMESTAMP
from recsys.data.split import temporal_split
from recsys.inputs import Histories
from tests.bundles import make_bundle
from tests.rankers import random_ranker
from tests.shoppers import AS_OF, receipts, world

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
        ({"objective": "click"}, "objective must be one of"),
        ({"objective": {"_target_": "os.system", "command": "touch pwned"}}, "objective must be one of"),
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
    (tmp_path / "sub" / "link.txt").symlink_to(tmp_path / "out.txt")  # a link out of the directory
    (tmp_path / "sub" / "d.yaml").write_text(path.read_text().replace("out.txt", "link.txt"))
    with pytest.raises(SpecError, match="inside the spec's directory"):
        load_spec(tmp_path / "sub" / "d.yaml")
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


def test_ties_in_probability_go_to_the_higher_score() -> None:
    """An isotonic map is flat over stretches of the score it calibrates: among equal probabilities the
    higher score ranks first, in the plain top and among the explorers, whatever the positions."""
    p = np.array([0.5, 0.5, 0.5, 0.5, 0.2, 0.2, 0.9])
    score = np.array([0.1, 0.4, 0.3, 0.2, 0.05, 0.07, 0.95])
    days = np.array([1.0, 2.0, 3.0, 4.0, np.inf, np.inf, 5.0])
    got = select_audience(spec(audience=3), np.arange(7), p, days, score=score)
    assert got.members.tolist() == [6, 1, 2]
    assert select_audience(spec(audience=3), np.arange(7), p, days).members.tolist() == [6, 0, 1]
    explored = select_audience(spec(audience=4, exploration=0.25), np.arange(7), p, days, score=score)
    assert explored.members.tolist() == [6, 1, 2, 5]
    with pytest.raises(ValueError, match="one score"):
        select_audience(spec(audience=3), np.arange(7), p, days, score=score[:3])


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


# --- the job: python -m batch.audience -------------------------------------------------------------

HORIZON = 14


@pytest.fixture(autouse=True)
def small_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test world's 90 shoppers are enough for trees once their size limits are scaled down to it, so
    that the jobs below fit and apply a real combination, not its fallback."""
    monkeypatch.setattr(combination_module, "MIN_OUTCOMES", 5)
    monkeypatch.setattr(
        combination_module, "PARAMETERS", combination_module.PARAMETERS | {"min_data_in_leaf": 5}
    )


@pytest.fixture(scope="module")
def campaign_world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A bundle with a ranker, seeded receipts reaching past the scoring date, and a campaign file."""
    root = tmp_path_factory.mktemp("audience")
    bundle = make_bundle(root / "bundle", num_items=40, max_len=6, repeat=random_ranker(40))
    table = world(bundle.product_ids, shoppers=90)
    pq.write_table(table, root / "receipts.parquet")
    products = sorted(int(p) for p in bundle.product_ids[:6])
    spec_file = root / "spec.yaml"
    spec = {"campaign_id": 7, "products": products, "horizon_days": HORIZON, "audience": 30,
            "min_probability": 0.05, "exploration": 0.2}  # fmt: skip
    spec_file.write_text(yaml.safe_dump(spec))
    return {"root": root, "bundle": bundle, "table": table, "products": np.array(products), "spec": spec_file}


def _job(compose_config: Callable[..., DictConfig], w: dict, output: Path, *extra: str) -> DictConfig:
    return compose_config("audience", [
        f"campaign={w['spec']}", f"bundle={w['bundle'].path}", f"receipts={w['root'] / 'receipts.parquet'}",
        f"output={output}", f"as_of={AS_OF.date()}", "progress=false", *extra,
    ])  # fmt: skip


def test_calibration_windows_are_back_to_back_horizons_before_the_scoring_date() -> None:
    found = calibration_windows(AS_OF, HORIZON, 3)
    assert found[0][1] == AS_OF and all(a[0] == b[1] for a, b in itertools.pairwise(found))
    assert all(end - start == timedelta(days=HORIZON) for start, end in found)
    for bad in (0, 13, True, 2.5):
        with pytest.raises(ValueError, match="calibration_windows"):
            calibration_windows(AS_OF, HORIZON, bad)


def test_the_job_writes_a_calibrated_thresholded_audience(
    tmp_path: Path, compose_config: Callable[..., DictConfig], campaign_world: dict
) -> None:
    summary = audience_job.run(_job(compose_config, campaign_world, tmp_path / "out"))["audience"]
    folder = tmp_path / "out" / "audience"
    table = pq.read_table(folder / "audience.parquet")
    p = table.column("probability").to_numpy()
    assert table.num_rows == summary["audience"] and len(set(table.column("shopper_id").to_pylist())) == len(
        p
    )
    assert (p >= 0.05).all() and np.all(np.diff(p) <= 0)  # the threshold; best first
    assert table.column("rank").to_pylist() == list(range(1, len(p) + 1))
    assert summary["audience"] + summary["shortfall"] == 30
    new = table.column("segment").to_numpy(zero_copy_only=False) == "new"
    assert new.sum() == summary["explorers"] == int(np.floor(0.2 * len(p) + 0.5))  # the exact share
    combination = Combination.from_dict(json.loads((folder / "calibration.json").read_text()))
    assert combination.model is not None and summary["calibration"]["method"] == "combination"
    knots = combination.calibration  # monotone, stored
    assert np.all(np.diff(knots.probability) >= 0) and knots.examples > 0
    assert (folder / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every sampled shopper once per window with receipts before the window's start
    assert (
        len(summary["calibration"]["windows"]) == 3 and summary["calibration"]["examples"] > summary["scored"]
    )
    judged = summary["evaluation"]["overall"]  # the receipts go on past as_of + horizon
    assert judged["examples"] == summary["scored"] and 0 <= judged["ece"] <= 1
    paired = judged["against_decayed_frequency"]  # the reference, on the same shoppers
    assert paired["auc"] == judged["auc"] and paired["ci"][0] <= paired["difference"] <= paired["ci"][1]
    assert json.loads(json.dumps(summary)) == json.loads((folder / "audience.json").read_text())


def test_the_audience_equals_a_brute_force_scoring_of_each_shopper(
    tmp_path: Path, compose_config: Callable[..., DictConfig], campaign_world: dict
) -> None:
    """Each shopper scored alone, as serving would see it (its own history from the receipts), through
    the stored combination, then the rules: the same audience and probabilities as the job's."""
    audience_job.run(_job(compose_config, campaign_world, tmp_path / "out"))
    folder = tmp_path / "out" / "audience"
    combination = Combination.from_dict(json.loads((folder / "calibration.json").read_text()))
    engine = OnnxEngine(campaign_world["bundle"].path, threads=1)
    rows = campaign_rows(engine, campaign_world["products"])
    before, _ = temporal_split(campaign_world["table"], AS_OF)
    ids = np.unique(before.column(SHOPPER).to_numpy())
    probability, score, since = np.zeros(len(ids)), np.zeros(len(ids)), np.zeros(len(ids))
    for i, shopper in enumerate(ids):
        mine = before.filter(pc.equal(before.column(SHOPPER), shopper))
        mine = mine.take(pc.sort_indices(mine, [(TIMESTAMP, "ascending")]))
        seconds = pc.cast(mine.column(TIMESTAMP), pa.int64()).to_numpy() / 1e6
        one = Histories.from_requests(engine.vocab, [mine.column(PRODUCT).to_numpy()], [seconds])
        raw = raw_scores(engine, one, rows, AS_OF, HORIZON)
        history = history_features(mine, campaign_world["products"], np.array([shopper]), AS_OF)
        row = features(raw, history[2], history[0], history[1])
        probability[i], score[i] = combination(row)[0], combination.score(row)[0]
        bought = np.isin(mine.column(PRODUCT).to_numpy(), campaign_world["products"])
        since[i] = (AS_OF.timestamp() - seconds[bought].max()) / 86400 if bought.any() else np.inf
    expected = select_audience(load_spec(campaign_world["spec"]), ids, probability, since, score=score)
    table = pq.read_table(folder / "audience.parquet")
    assert table.column("shopper_id").to_pylist() == ids[expected.members].tolist()
    np.testing.assert_allclose(table.column("probability").to_numpy(), probability[expected.members], 1e-9)


def test_a_killed_job_resumes_with_one_row_per_shopper(
    tmp_path: Path,
    compose_config: Callable[..., DictConfig],
    campaign_world: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = _job(compose_config, campaign_world, tmp_path / "out", "parts=3")
    calls = []
    real = audience_job.score_part

    def dies_on_the_second_part(*args: object, **kwargs: object) -> pa.RecordBatch:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill would stop it
        return real(*args, **kwargs)

    monkeypatch.setattr(audience_job, "score_part", dies_on_the_second_part)
    with pytest.raises(KeyboardInterrupt):
        audience_job.run(cfg)
    assert not (tmp_path / "out" / "audience").exists()
    monkeypatch.setattr(audience_job, "score_part", real)
    resumed = audience_job.run(cfg)
    assert len(resumed["shard"]["parts"]) == 3
    scores = pq.read_table(tmp_path / "out" / "scores")
    ids = scores.column("shopper_id").to_numpy()
    before, _ = temporal_split(campaign_world["table"], AS_OF)
    assert sorted(ids.tolist()) == np.unique(before.column(SHOPPER).to_numpy()).tolist()  # once each
    single = audience_job.run(_job(compose_config, campaign_world, tmp_path / "one"))
    assert resumed["audience"]["expected_conversions"] == pytest.approx(
        single["audience"]["expected_conversions"]
    )


def test_two_shards_and_the_library_function_give_the_audience_of_one(
    tmp_path: Path, compose_config: Callable[..., DictConfig], campaign_world: dict
) -> None:
    first = audience_job.run(_job(compose_config, campaign_world, tmp_path / "two", "num_shards=2"))
    assert "audience" not in first  # written by the shard that completes last
    audience_job.run(_job(compose_config, campaign_world, tmp_path / "two", "num_shards=2", "shard_index=1"))
    audience_job.run(_job(compose_config, campaign_world, tmp_path / "one"))
    two, one = (pq.read_table(tmp_path / d / "audience" / "audience.parquet") for d in ("two", "one"))
    assert two.equals(one)
    engine = OnnxEngine(campaign_world["bundle"].path, threads=1)
    in_memory = audience(engine, campaign_world["table"], load_spec(campaign_world["spec"]), AS_OF)
    assert in_memory.table.equals(one)  # the library function, without files


def test_receipts_in_shopper_order_give_the_audience_of_one_part(
    tmp_path: Path, compose_config: Callable[..., DictConfig], campaign_world: dict
) -> None:
    """Receipts in shopper order, in small row groups, are scored in runs of row groups with no partition
    pass (batch.shards): the same scores and audience as one part."""
    table = campaign_world["table"]
    ordered = table.take(pc.sort_indices(table, [(SHOPPER, "ascending")]))
    pq.write_table(ordered, tmp_path / "ordered.parquet", row_group_size=64)
    receipts = f"receipts={tmp_path / 'ordered.parquet'}"
    rows = f"rows_per_part={table.num_rows // 3}"
    runs = audience_job.run(_job(compose_config, campaign_world, tmp_path / "runs", receipts, rows))
    assert runs["shard"]["job"]["parts_by"] == "row_groups" and runs["shard"]["job"]["parts"] >= 2
    audience_job.run(_job(compose_config, campaign_world, tmp_path / "one"))
    found, one = (pq.read_table(tmp_path / d / "audience" / "audience.parquet") for d in ("runs", "one"))
    assert found.equals(one)


def test_nothing_on_or_after_the_scoring_date_reaches_the_scores_or_the_calibration(
    campaign_world: dict,
) -> None:
    """Planted purchases of the campaign's products on and after as_of change only the outcome; planted
    ones in the calibration window change its outcome, never its features (read one horizon earlier)."""
    engine = OnnxEngine(campaign_world["bundle"].path, threads=1)
    table, products = campaign_world["table"], campaign_world["products"]
    spec_ = load_spec(campaign_world["spec"])
    ids = np.unique(table.column(SHOPPER).to_numpy())
    everyone = 1.0  # every shopper in the calibration sample

    def planted(start: datetime, days: int) -> pa.Table:
        rows = [
            (
                int(s),
                10**9 + i,
                int(products[i % len(products)]),
                start + timedelta(days=i % days, hours=1),
                1.0,
            )
            for i, s in enumerate(ids)
        ]
        return pa.concat_tables([table, receipts(rows)])

    clean = score_part(engine, table, spec_, products, AS_OF, everyone)
    future = score_part(engine, planted(AS_OF, 30), spec_, products, AS_OF, everyone)
    for column in (
        "shopper_id",
        "raw",
        "days_since_bought",
        "baskets",
        "frequency",
        "calibration_raw",
        "calibration_days_since_bought",
        "calibration_baskets",
        "calibration_frequency",
        "calibration_bought",
    ):
        assert future.column(column).equals(clean.column(column)), column
    assert not future.column("bought_after").equals(clean.column("bought_after"))
    window = score_part(
        engine, planted(AS_OF - timedelta(days=HORIZON), HORIZON), spec_, products, AS_OF, everyone
    )
    for column in ("calibration_raw", "calibration_days_since_bought", "calibration_baskets",
                   "calibration_frequency"):  # fmt: skip
        assert window.column(column).equals(clean.column(column)), column
    assert not window.column("calibration_bought").equals(clean.column("calibration_bought"))


def test_a_calibration_share_scores_its_sample_as_the_whole_would(campaign_world: dict) -> None:
    """At a share below 1 only the sample's receipts are grouped for the calibration windows: the sampled
    shoppers' examples are those of a run sampling everyone, the others are no examples."""
    engine = OnnxEngine(campaign_world["bundle"].path, threads=1)
    table, products = campaign_world["table"], campaign_world["products"]
    spec_ = load_spec(campaign_world["spec"])
    whole = score_part(engine, table, spec_, products, AS_OF, 1.0)
    half = score_part(engine, table, spec_, products, AS_OF, 0.5)
    sample = calibration_sample(whole.column("shopper_id").to_numpy(), 0.5)
    assert 0 < sample.sum() < len(sample)
    for name in ("shopper_id", "raw", "days_since_bought", "baskets", "frequency", "bought_after"):
        assert half.column(name).equals(whole.column(name)), name
    for name in (*CALIBRATION, "calibration_bought"):
        got, want = np.array(half.column(name).to_pylist()), np.array(whole.column(name).to_pylist())
        np.testing.assert_allclose(got[sample], want[sample], rtol=1e-6, err_msg=name)
    assert np.isnan(np.array(half.column("calibration_raw").to_pylist())[~sample]).all()


def _with_coupons(table: pa.Table) -> pa.Table:
    """Receipts with a coupon discount on every third basket's lines, unknown (null) on every seventh's."""
    baskets = table.column(BASKET).to_numpy()
    return table.append_column(COUPON, pa.array(np.where(baskets % 3 == 0, 0.4, 0.0), mask=baskets % 7 == 0))


def test_a_redeem_objective_is_p_buy_times_the_coupon_rate_and_its_threshold_holds(
    campaign_world: dict,
) -> None:
    """objective redeem: each shopper's probability is its P(buy) (the same fit as objective buy) times
    its coupon rate, counted here by hand from the receipts before the scoring date; min_probability
    applies to that product; receipts without the coupon column are refused, naming it."""
    engine = OnnxEngine(campaign_world["bundle"].path, threads=1)
    table = _with_coupons(campaign_world["table"])
    everyone = dataclasses.replace(
        load_spec(campaign_world["spec"]), audience=1000, min_probability=0.0, exploration=0.0
    )
    buy = audience(engine, table, everyone, AS_OF)
    redeem = audience(engine, table, dataclasses.replace(everyone, objective="redeem"), AS_OF)
    baskets: dict[int, set] = {}
    coupons: dict[int, set] = {}
    for line in temporal_split(table, AS_OF)[0].to_pylist():
        baskets.setdefault(line[SHOPPER], set()).add(line[BASKET])
        if line[COUPON] not in (None, 0.0):
            coupons.setdefault(line[SHOPPER], set()).add(line[BASKET])
    share = sum(map(len, coupons.values())) / sum(map(len, baskets.values()))
    assert 0 < share < 1
    p_buy = dict(
        zip(buy.table.column(SHOPPER).to_pylist(), buy.table.column("probability").to_pylist(), strict=True)
    )
    rows = redeem.table.to_pylist()
    assert len(rows) == len(p_buy) and redeem.summary["objective"] == "redeem"
    for row in rows:
        s = row[SHOPPER]
        rate = (len(coupons.get(s, ())) + share * PRIOR_BASKETS) / (len(baskets[s]) + PRIOR_BASKETS)
        assert row["probability"] == pytest.approx(p_buy[s] * rate, rel=1e-12)
    p = redeem.table.column("probability").to_numpy()
    floor = float(np.median(p))
    kept = audience(
        engine, table, dataclasses.replace(everyone, objective="redeem", min_probability=floor), AS_OF
    )
    assert (
        kept.table.num_rows == int((p >= floor).sum())
        and (kept.table.column("probability").to_numpy() >= floor).all()
    )
    with pytest.raises(ValueError, match=COUPON):
        audience(engine, campaign_world["table"], dataclasses.replace(everyone, objective="redeem"), AS_OF)


def test_coupon_baskets_count_only_receipts_before_the_scoring_date(campaign_world: dict) -> None:
    """The world's receipts go on past as_of, coupons included: scoring them whole or cut at as_of gives
    the same coupon counts, so no later coupon reaches P(redeem)."""
    engine = OnnxEngine(campaign_world["bundle"].path, threads=1)
    table = _with_coupons(campaign_world["table"])
    before, after = temporal_split(table, AS_OF)
    assert pc.sum(pc.fill_null(pc.not_equal(after.column(COUPON), 0.0), False)).as_py() > 0
    redeem = dataclasses.replace(load_spec(campaign_world["spec"]), objective="redeem")
    products = campaign_world["products"]
    whole, cut = (score_part(engine, t, redeem, products, AS_OF, 1.0) for t in (table, before))
    assert whole.column("coupon_baskets").equals(cut.column("coupon_baskets"))
    assert pc.sum(whole.column("coupon_baskets")).as_py() > 0


def test_a_redeem_job_reads_the_coupon_column_however_its_parts_are_read(
    tmp_path: Path, compose_config: Callable[..., DictConfig], campaign_world: dict
) -> None:
    """objective redeem through the job: one part streamed, two parts written by the partition pass and
    row-group runs of receipts in shopper order all carry the coupon column to the scores, and give the
    library function's audience; receipts without the column are refused, naming it."""
    table = _with_coupons(campaign_world["table"])
    pq.write_table(table, tmp_path / "coupons.parquet")
    ordered = table.take(pc.sort_indices(table, [(SHOPPER, "ascending")]))
    pq.write_table(ordered, tmp_path / "ordered.parquet", row_group_size=64)
    spec_file = tmp_path / "redeem.yaml"
    spec_file.write_text(
        yaml.safe_dump(yaml.safe_load(campaign_world["spec"].read_text()) | {"objective": "redeem"})
    )

    def job(name: str, receipts: Path, *extra: str) -> dict:
        return audience_job.run(compose_config("audience", [
            f"campaign={spec_file}", f"bundle={campaign_world['bundle'].path}", f"receipts={receipts}",
            f"output={tmp_path / name}", f"as_of={AS_OF.date()}", "progress=false", *extra,
        ]))  # fmt: skip

    job("one", tmp_path / "coupons.parquet")
    job("parts", tmp_path / "coupons.parquet", "parts=2")
    runs = job("runs", tmp_path / "ordered.parquet", f"rows_per_part={table.num_rows // 3}")
    assert runs["shard"]["job"]["parts_by"] == "row_groups"
    one, parts, by_runs = (
        pq.read_table(tmp_path / d / "audience" / "audience.parquet") for d in ("one", "parts", "runs")
    )
    engine = OnnxEngine(campaign_world["bundle"].path, threads=1)
    in_memory = audience(engine, table, load_spec(spec_file), AS_OF)
    assert one.equals(parts) and one.equals(by_runs) and one.equals(in_memory.table) and one.num_rows
    with pytest.raises(ValueError, match=COUPON):
        job("none", campaign_world["root"] / "receipts.parquet", "parts=2")


def test_audiences_feed_the_allocation_of_a_week(
    tmp_path: Path, compose_config: Callable[..., DictConfig], campaign_world: dict
) -> None:
    """Two campaigns' audience jobs, then one allocation over both under a cap of one contact each:
    every contact is a shopper its campaign may contact, at the audience job's probability."""
    products = campaign_world["products"]
    files = []
    for campaign_id, chosen in ((7, products[:3]), (8, products[3:])):
        spec_file = tmp_path / f"spec_{campaign_id}.yaml"
        spec_file.write_text(yaml.safe_dump({"campaign_id": campaign_id, "products": chosen.tolist(),
                                             "horizon_days": HORIZON, "audience": 25}))  # fmt: skip
        out = tmp_path / f"audience_{campaign_id}"
        audience_job.run(_job(compose_config, campaign_world | {"spec": spec_file}, out))
        files.append(out / "audience" / "probabilities.parquet")
    plan = tmp_path / "plan"
    campaigns = "[{campaign_id: 7, audience: 20}, {campaign_id: 8, audience: 20}]"
    allocate_job.run(compose_config("allocate", [f"probabilities=[{files[0]},{files[1]}]", f"output={plan}",
                                                 "shopper_cap=1", f"campaigns={campaigns}"]))  # fmt: skip
    contacts = pq.read_table(plan / "contacts.parquet").to_pylist()
    eligible = {
        (r["shopper_id"], r["campaign_id"]): r["probability"]
        for f in files
        for r in pq.read_table(f).to_pylist()
    }
    shoppers = [c["shopper_id"] for c in contacts]
    assert contacts and len(shoppers) == len(set(shoppers))  # the cap of one
    for contact in contacts:
        assert contact["probability"] == pytest.approx(
            eligible[(contact["shopper_id"], contact["campaign_id"])]
        )


def test_the_campaign_jobs_never_import_torch() -> None:
    """A production box installs caddie[serve] without torch: the audience, allocation and segment jobs
    and their libraries must run there."""
    code = (
        "import sys\n"
        "import batch.audience, batch.audiences, batch.allocate, batch.segment, recsys.propensity\n"
        "heavy = ('torch', 'lightning', 'pytorch_lightning')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "assert not bad, bad\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
