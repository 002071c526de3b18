"""The HTTP API: validation (4xx with reasons, never 5xx), happy paths, probes, hot reload, fuzzing."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serving.app import create_app
from serving.recommender import Recommender
from tests.bundles import SyntheticBundle, make_bundle

LIMITS = {"max_history": 50, "max_k": 100, "max_batch": 16}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticBundle, SyntheticBundle]:
    root = tmp_path_factory.mktemp("http")
    return make_bundle(root / "a", seed=0), make_bundle(root / "b", num_items=60, seed=1)


@pytest.fixture
def app(bundles: tuple[SyntheticBundle, SyntheticBundle]) -> FastAPI:
    return create_app(bundles[0].path, **LIMITS)


@pytest.fixture
def client(app: FastAPI) -> TestClient:
    return TestClient(app)


def _history(bundle: SyntheticBundle, rows: list[int]) -> list[int]:
    return bundle.product_ids[rows].tolist()


def test_recommend(client: TestClient, bundles: tuple[SyntheticBundle, SyntheticBundle]) -> None:
    history = [*_history(bundles[0], [3, 7, 1]), 42]
    response = client.post("/recommend", json={"history": history, "k": 4, "exclude_purchased": True})
    assert response.status_code == 200
    body = response.json()
    expected = Recommender.load(bundles[0].path).recommend(
        history, k=4, exclude_purchased=True, explore_slots=2
    )
    assert body["product_ids"] == expected.product_ids
    np.testing.assert_allclose(body["scores"], expected.scores, rtol=1e-6)
    assert (body["fallback"], body["unknown"], body["truncated"]) == (False, 1, False)
    assert body["bundle_id"] == client.get("/metadata").json()["bundle_id"]
    # explore slots reach the recommender: new products replace some of the shopper's own
    explore = client.post("/recommend", json={"history": history, "k": 4, "explore_slots": 3}).json()
    plain = client.post("/recommend", json={"history": history, "k": 4}).json()
    expected = Recommender.load(bundles[0].path).recommend(history, k=4, explore_slots=3)
    assert explore["product_ids"] == expected.product_ids != plain["product_ids"]


def test_recommend_defaults_and_fallback(
    client: TestClient, bundles: tuple[SyntheticBundle, SyntheticBundle]
) -> None:
    body = client.post("/recommend", json={"history": []}).json()
    assert body["fallback"] and body["product_ids"] == bundles[0].popular_product_ids()[:10].tolist()
    body = client.post("/recommend", json={"history": _history(bundles[0], [1]), "min_score": 1e9}).json()
    assert body["product_ids"] == [] and not body["fallback"]


def test_batch(client: TestClient, bundles: tuple[SyntheticBundle, SyntheticBundle]) -> None:
    requests = [
        {"history": _history(bundles[0], [3, 7])},
        {"history": [], "k": 2},
        {"history": _history(bundles[0], [5]), "k": 3, "exclude_purchased": True, "min_score": 0.0},
    ]
    response = client.post("/recommend/batch", json={"requests": requests})
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["product_ids"] for r in results] == [
        client.post("/recommend", json=r).json()["product_ids"] for r in requests
    ]
    assert client.post("/recommend/batch", json={"requests": []}).json() == {"results": []}


def test_probes_and_docs(client: TestClient, bundles: tuple[SyntheticBundle, SyntheticBundle]) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"]
    metadata = client.get("/metadata").json()
    assert metadata["manifest"] == json.loads((bundles[0].path / "bundle.json").read_text())
    assert metadata["bundle_id"] == ready.json()["bundle_id"]
    assert client.get("/docs").status_code == 200
    assert "/recommend/batch" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize(
    ("body", "loc", "reason"),
    [
        ({"k": 3}, ["body", "history"], "Field required"),
        ({"history": "123"}, ["body", "history"], "valid list"),
        ({"history": [1, "2"]}, ["body", "history", 1], "valid integer"),
        ({"history": [1.5]}, ["body", "history", 0], "valid integer"),
        ({"history": [True]}, ["body", "history", 0], "valid integer"),
        ({"history": [1], "k": "3"}, ["body", "k"], "valid integer"),
        ({"history": [1], "k": 0}, ["body", "k"], "greater than or equal to 1"),
        ({"history": [1], "k": 101}, ["body", "k"], "less than or equal to 100"),
        ({"history": list(range(51))}, ["body", "history"], "at most 50"),
        ({"history": [2**63]}, ["body", "history", 0], "less than or equal to 9223372036854775807"),
        ({"history": [-(2**63) - 1]}, ["body", "history", 0], "greater than or equal to"),
        ({"history": [1], "exclude_purchased": "yes"}, ["body", "exclude_purchased"], "valid boolean"),
        ({"history": [1], "min_score": "high"}, ["body", "min_score"], "valid number"),
        ({"history": [1], "explore_slots": -1}, ["body", "explore_slots"], "greater than or equal to 0"),
        ({"history": [1], "explore_slots": 101}, ["body", "explore_slots"], "less than or equal to 100"),
        ({"history": [1], "top_k": 5}, ["body", "top_k"], "Extra inputs are not permitted"),
        ([1, 2], ["body"], "valid dictionary"),
    ],
)
def test_bad_recommend_input_is_422_with_reason(
    client: TestClient, body: Any, loc: list[Any], reason: str
) -> None:
    response = client.post("/recommend", json=body)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert any(d["loc"] == loc and reason in d["msg"] for d in detail), detail


def test_bad_batch_input_is_422_with_reason(client: TestClient) -> None:
    response = client.post("/recommend/batch", json={"requests": [{"history": [1]}] * 17})
    assert response.status_code == 422 and "at most 16" in response.json()["detail"][0]["msg"]
    response = client.post(
        "/recommend/batch", json={"requests": [{"history": [1]}, {"history": [1], "k": 0}]}
    )
    assert response.json()["detail"][0]["loc"] == ["body", "requests", 1, "k"]


@pytest.mark.parametrize(
    "content", [b'{"history": [1,', b"", b"\xff\xfe{}", b'{"history": [1], "min_score": NaN}', b"[" * 100_000]
)
def test_malformed_json_is_4xx(client: TestClient, content: bytes) -> None:
    response = client.post("/recommend", content=content, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500
    assert response.json()["detail"]


def test_reload_swaps_bundle(client: TestClient, bundles: tuple[SyntheticBundle, SyntheticBundle]) -> None:
    old = client.get("/readyz").json()["bundle_id"]
    response = client.post("/admin/reload", json={"path": str(bundles[1].path)})
    assert response.status_code == 200
    new = response.json()["bundle_id"]
    assert new != old and response.json()["previous_bundle_id"] == old
    assert client.get("/metadata").json()["manifest"]["num_items"] == 60
    assert client.post("/recommend", json={"history": []}).json()["bundle_id"] == new
    assert client.post("/admin/reload").json() == {"bundle_id": new, "previous_bundle_id": new}  # same path


def test_bad_reload_is_refused_and_old_keeps_serving(
    client: TestClient, bundles: tuple[SyntheticBundle, SyntheticBundle], tmp_path: Path
) -> None:
    old = client.get("/readyz").json()["bundle_id"]
    corrupt = Path(shutil.copytree(bundles[1].path, tmp_path / "corrupt"))
    (corrupt / "items.parquet").write_bytes(b"garbage")
    for body, reason in [
        ({"path": str(corrupt)}, "items.parquet is corrupt"),
        ({"path": str(tmp_path / "missing")}, "is not a bundle directory"),
    ]:
        response = client.post("/admin/reload", json=body)
        assert response.status_code == 409
        assert reason in response.json()["detail"] and f"still serving {old}" in response.json()["detail"]
        assert client.post("/recommend", json={"history": []}).json()["bundle_id"] == old
    assert client.post("/admin/reload", json={"path": 7}).status_code == 422
    assert client.get("/readyz").json()["bundle_id"] == old


def test_reload_while_another_runs_is_refused(app: FastAPI, client: TestClient) -> None:
    with app.state.serving.lock:
        response = client.post("/admin/reload")
    assert response.status_code == 409 and "in progress" in response.json()["detail"]


def test_reload_under_load_drops_nothing(
    app: FastAPI, client: TestClient, bundles: tuple[SyntheticBundle, SyntheticBundle]
) -> None:
    history = _history(bundles[0], [1, 2, 3])
    expected = {}
    for bundle in bundles:
        recommender = Recommender.load(bundle.path)
        expected[recommender.bundle_id] = recommender.recommend(history, k=5).product_ids
    answers: list[tuple[int, dict[str, Any]]] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            response = client.post("/recommend", json={"history": history, "k": 5})
            answers.append((response.status_code, response.json()))

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for i in range(6):
            seen, deadline = len(answers), time.monotonic() + 10
            while len(answers) < seen + 3 and time.monotonic() < deadline:  # some requests per bundle
                time.sleep(0.005)
            path = bundles[(i + 1) % 2].path
            assert client.post("/admin/reload", json={"path": str(path)}).status_code == 200
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert answers and all(status == 200 for status, _ in answers)
    # Every answer is wholly one bundle's: never one bundle's id with the other's products.
    assert all(body["product_ids"] == expected[body["bundle_id"]] for _, body in answers)
    assert {body["bundle_id"] for _, body in answers} == set(expected)


def _random_value(rng: np.random.Generator, depth: int = 0) -> Any:
    """A random JSON value of any type, with numbers at and beyond the int64 and float limits."""
    kind = int(rng.integers(0, 9 if depth < 3 else 6))
    if kind == 0:
        return None
    if kind == 1:
        return bool(rng.integers(0, 2))
    if kind == 2:
        return int(rng.integers(-5, 200))
    if kind == 3:
        return int(rng.choice([2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 10**30, -(10**30)]))
    if kind == 4:
        return float(rng.choice([0.5, -1e308, 1e308, float("nan"), float("inf"), 1e-300]))
    if kind == 5:
        return "".join(chr(int(c)) for c in rng.integers(32, 0x2FF, size=int(rng.integers(0, 8))))
    if kind in (6, 7):
        return [_random_value(rng, depth + 1) for _ in range(int(rng.integers(0, 5)))]
    return {str(_random_value(rng, 3)): _random_value(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))}


def _random_request(rng: np.random.Generator, product_ids: np.ndarray) -> dict[str, Any]:
    """A mostly plausible /recommend body with random sizes and, often, a field broken or missing."""
    size = int(rng.choice([0, 1, 5, 49, 50, 51, 200]))
    known = rng.choice(product_ids, size=size).tolist()
    body: dict[str, Any] = {
        "history": [p if rng.random() < 0.8 else _random_value(rng, 3) for p in known],
        "k": int(rng.choice([-1, 0, 1, 10, 100, 101, 10**6])),
        "exclude_purchased": bool(rng.integers(0, 2)),
        "min_score": float(rng.choice([-1.0, 0.0, 2.0])) if rng.random() < 0.5 else None,
    }
    for field in list(body):
        roll = rng.random()
        if roll < 0.08:
            body[field] = _random_value(rng)
        elif roll < 0.12:
            del body[field]
    if rng.random() < 0.05:
        body[str(_random_value(rng, 3))] = _random_value(rng)
    return body


def test_fuzz_never_5xx(client: TestClient, bundles: tuple[SyntheticBundle, SyntheticBundle]) -> None:
    rng = np.random.default_rng(20240601)
    statuses: Counter[int] = Counter()
    for _ in range(1200):
        shape = rng.random()
        if shape < 0.55:
            url, body = "/recommend", _random_request(rng, bundles[0].product_ids)
        elif shape < 0.8:
            url = "/recommend/batch"
            batch = [
                _random_request(rng, bundles[0].product_ids)
                for _ in range(int(rng.choice([0, 1, 3, 16, 17])))
            ]
            body = {"requests": batch} if rng.random() < 0.9 else _random_value(rng)
        elif shape < 0.9:
            url, body = (
                str(rng.choice(["/recommend", "/recommend/batch", "/admin/reload"])),
                _random_value(rng),
            )
        else:
            url, body = "/admin/reload", {"path": _random_value(rng)}
        content = json.dumps(body).encode()  # allow_nan: NaN/Infinity tokens, which Python parses
        if rng.random() < 0.1:  # malformed bytes: cut short or spliced with junk
            cut = int(rng.integers(0, len(content) + 1))
            content = content[:cut] + rng.bytes(int(rng.integers(0, 4)))
        content_type = str(
            rng.choice(["application/json"] * 8 + ["text/plain", "application/x-www-form-urlencoded"])
        )
        response = client.post(url, content=content, headers={"content-type": content_type})
        statuses[response.status_code] += 1
        assert response.status_code < 500, (url, content[:500], response.text[:500])
        if response.status_code == 200 and url == "/recommend":
            assert len(response.json()["product_ids"]) <= body.get("k", 10)
    assert statuses[200] > 50 and statuses[422] > 500, statuses
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
