"""Contact allocation (batch/allocation.py, batch/allocate.py): caps never exceeded, the exact solver
against brute force, the scalable one against the exact, and the Hydra job's input checks and outputs."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import DictConfig

from batch.allocate import AllocationError, run
from batch.allocation import Problem, allocate, check, exact


def random_problem(seed: int, shoppers: int, campaigns: int, max_campaigns: int | None = None) -> Problem:
    rng = np.random.default_rng(seed)
    values = rng.beta(0.5, 6, (shoppers, campaigns))
    values[rng.random(values.shape) < 0.3] = 0.0  # ineligible pairs
    audience = rng.integers(0, max(2, shoppers // 2), campaigns)
    return Problem(values, int(rng.integers(0, 4)), audience, max_campaigns)


def brute_force(problem: Problem) -> float:
    best = 0.0
    cells = list(zip(*np.nonzero(problem.values > 0), strict=True))
    for chosen in itertools.product((False, True), repeat=len(cells)):
        contacts = np.zeros(problem.shape, dtype=bool)
        for (i, j), on in zip(cells, chosen, strict=True):
            contacts[i, j] = on
        try:
            check(problem, contacts)
        except ValueError:
            continue
        best = max(best, float(problem.values[contacts].sum()))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_no_cap_or_threshold_is_ever_exceeded(seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    shoppers, campaigns = int(rng.integers(1, 300)), int(rng.integers(1, 12))
    limit = None if seed % 3 else int(rng.integers(0, campaigns + 1))
    problem = random_problem(seed, shoppers, campaigns, limit)
    found = allocate(problem)
    check(problem, found.contacts)  # raises on any violation
    assert found.value <= found.bound + 1e-6
    assert not (found.contacts & (problem.values <= 0)).any()


@pytest.mark.parametrize("seed", range(12))
def test_exact_equals_brute_force_on_tiny_instances(seed: int) -> None:
    problem = random_problem(seed, 4, 3, max_campaigns=None if seed % 2 else 2)
    solved = exact(problem)
    check(problem, solved.contacts)
    assert solved.value == pytest.approx(brute_force(problem), abs=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_the_scalable_method_is_within_its_gap_of_the_optimum(seed: int) -> None:
    problem = random_problem(seed, 400, 8)
    optimum = exact(problem).value
    found = allocate(problem)
    assert found.value >= 0.99 * optimum
    assert found.bound >= optimum - 1e-6  # the dual bound really bounds the optimum
    assert found.value == pytest.approx(float(problem.values[found.contacts].sum()), rel=1e-5)


def test_a_contact_cap_of_one_gives_every_shopper_its_best_campaign_when_audiences_are_large() -> None:
    values = np.array([[0.1, 0.5], [0.4, 0.2], [0.0, 0.3]])
    found = allocate(Problem(values, 1, np.array([10, 10])))
    assert found.contacts.tolist() == [[False, True], [True, False], [False, True]]
    assert found.gap == pytest.approx(0.0, abs=1e-6)


def test_bad_problems_are_refused() -> None:
    with pytest.raises(ValueError, match="finite and >= 0"):
        Problem(np.array([[np.nan]]), 1, np.array([1]))
    with pytest.raises(ValueError, match="audience"):
        Problem(np.ones((2, 2)), 1, np.array([1]))
    with pytest.raises(ValueError, match="over the cap"):
        check(Problem(np.ones((1, 2)), 1, np.array([1, 1])), np.ones((1, 2), dtype=bool))


def write_probabilities(path: Path, rows: list[tuple[int, int, float]]) -> Path:
    shoppers, campaigns, probabilities = zip(*rows, strict=True)
    columns = {
        "shopper_id": pa.array(shoppers, pa.int64()),
        "campaign_id": pa.array(campaigns, pa.int64()),
        "probability": pa.array(probabilities, pa.float64()),
    }
    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture
def job(tmp_path: Path, compose_config: Callable[..., DictConfig]) -> Callable[..., dict]:
    written: list[list[tuple[int, int, float]]] = []

    def _run(rows: list[tuple[int, int, float]], *overrides: str) -> dict:
        source = tmp_path / "p.parquet"
        if written[-1:] != [rows]:  # rewritten only when it changes: its fingerprint is the job's identity
            write_probabilities(source, rows)
            written.append(rows)
        cfg = compose_config(
            "allocate", [f"probabilities={source}", f"output={tmp_path / 'plan'}", *overrides]
        )
        return run(cfg)

    return _run


CAMPAIGNS = (
    "campaigns=[{campaign_id: 7, audience: 2, min_probability: 0.2},"
    " {campaign_id: 9, audience: 5, value: 2.0}]"
)


def test_the_job_writes_contacts_respecting_caps_thresholds_and_reports_shortfalls(
    job, tmp_path: Path
) -> None:
    rows = [(1, 7, 0.9), (1, 9, 0.5), (2, 7, 0.6), (2, 9, 0.1), (3, 7, 0.15), (3, 9, 0.05), (4, 7, 0.5)]
    summary = job(rows, CAMPAIGNS, "shopper_cap=1", "solver=exact")
    contacts = pq.read_table(tmp_path / "plan" / "contacts.parquet").to_pylist()
    pairs = {(row["shopper_id"], row["campaign_id"]) for row in contacts}
    assert max(sum(1 for s, _ in pairs if s == shopper) for shopper in (1, 2, 3, 4)) <= 1
    assert (3, 7) not in pairs  # 0.15 is under campaign 7's threshold of 0.2
    assert len([p for p in pairs if p[1] == 7]) <= 2
    # optimum: 1 -> 9 (1.0), 2 -> 7 (0.6), 4 -> 7 (0.5), 3 -> 9 (0.1)
    assert pairs == {(1, 9), (2, 7), (4, 7), (3, 9)} and summary["expected_value"] == pytest.approx(2.2)
    table = {
        row["campaign_id"]: row for row in pq.read_table(tmp_path / "plan" / "campaigns.parquet").to_pylist()
    }
    assert table[9]["shortfall"] == 3 and table[7]["shortfall"] == 0 and table[7]["eligible"] == 3
    assert summary["shoppers_at_cap"] == 4 and summary["campaigns_short"] == 1
    again = job(rows, CAMPAIGNS, "shopper_cap=1", "solver=exact")  # same identity: not redone
    assert again["identity"] == summary["identity"] and again["seconds"] == summary["seconds"]
    lagrangian = job(rows, CAMPAIGNS, "shopper_cap=1")
    assert lagrangian["identity"] != summary["identity"]
    assert lagrangian["expected_value"] == pytest.approx(2.2)
    assert json.loads((tmp_path / "plan" / "summary.json").read_text())["settings"]["solver"] == "lagrangian"


@pytest.mark.parametrize(
    ("rows", "overrides", "message"),
    [
        ([(1, 7, 1.5)], [], "within \\[0, 1\\]"),
        ([(1, 7, 0.5), (1, 7, 0.4)], [], "more than once"),
        ([(1, 8, 0.5)], [], "campaign_id 8 has probabilities but is not among the campaigns"),
        ([(1, 7, 0.5), (2, 7, 0.5)], ["max_pairs=1"], "over max_pairs=1"),
        ([(1, 7, 0.5), (2, 7, 0.5)], ["max_cells=3"], "over max_cells=3"),
        ([(1, 7, 0.5)], ["campaigns=[{campaign_id: 7}]"], "give audience"),
        ([(1, 7, 0.5)], ["campaigns=[{campaign_id: 7, audience: 1, colour: red}]"], "unknown key"),
        ([(1, 7, 0.5)], ["solver=magic"], "unknown solver"),
    ],
)
def test_the_job_refuses_bad_input_naming_the_problem(job, rows, overrides, message: str) -> None:
    with pytest.raises(AllocationError, match=message):
        job(rows, CAMPAIGNS, *overrides)


def test_a_probabilities_file_without_its_columns_is_refused(tmp_path: Path, compose_config) -> None:
    source = tmp_path / "p.parquet"
    pq.write_table(pa.table({"shopper_id": [1], "probability": [0.3]}), source)
    cfg = compose_config("allocate", [f"probabilities={source}", f"output={tmp_path / 'o'}", CAMPAIGNS])
    with pytest.raises(AllocationError, match="lacks column\\(s\\) \\['campaign_id'\\]"):
        run(cfg)


def test_a_run_killed_while_writing_leaves_the_previous_plan_and_runs_again(job, tmp_path: Path) -> None:
    rows = [(1, 7, 0.9), (2, 9, 0.5)]
    first = job(rows, CAMPAIGNS)
    killed = tmp_path / ".plan.tmp-999999999"  # what a run killed before its swap leaves beside the output
    killed.mkdir()
    (killed / "contacts.parquet").write_text("half")
    second = job([*rows, (3, 9, 0.7)], CAMPAIGNS)
    assert not killed.exists()
    assert second["contacts"] == first["contacts"] + 1
    assert pq.read_table(tmp_path / "plan" / "contacts.parquet").num_rows == 3
