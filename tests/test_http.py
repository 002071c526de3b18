"""The HTTP API: validation (4xx with reasons, never 5xx), happy paths, probes, hot reload, fuzzing, and the
hardening: admin surface off by default, token and bundle-root checks, body size, batch size and
concurrency limits, no server paths in /metadata."""

from __future__ import annotations

import hmac
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from recsys.data.completejourney import load_complete_journey
from recsys.rules import Rules
from serving.app import (
    ADMIN_TOKEN_ENV,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BATCH_ITEMS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_HISTORY,
    DEFAULT_MAX_K,
    BodyLimit,
    create_app,
    public_manifest,
    read_admin_token,
)
from serving.recommender import Recommender
from tests.bundles import SyntheticBundle, make_bundle

# max_concurrency above the 3 hammering threads of test_reload_under_load_drops_nothing
LIMITS = {"max_history": 50, "max_k": 100, "max_batch": 16, "max_concurrency": 8}
TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticBundle, SyntheticBundle]:
    """Two bundles in one bundle root (``a`` and ``b``); the root is their common parent."""
    root = tmp_path_factory.mktemp("http") / "root"
    return make_bundle(root / "a", seed=0), make_bundle(root / "b", num_items=60, seed=1)


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> SyntheticBundle:
    """A valid bundle outside the bundle root: refusing it is the path check's doing, not the loader's."""
    return make_bundle(tmp_path_factory.mktemp("elsewhere") / "bundle", num_items=50, seed=2)


def _root(bundles: tuple[SyntheticBundle, SyntheticBundle]) -> Path:
    return bundles[0].path.parent


@pytest.fixture
def app(bundles: tuple[SyntheticBundle, SyntheticBundle]) -> FastAPI:
    return create_app(bundles[0].path, **LIMITS, admin=True, admin_token=TOKEN, bundle_root=_root(bundles))


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
    recommender = Recommender.load(bundles[0].path)
    expected = recommender.recommend(history, Rules(k=4, exclude_purchased=True))
    assert body["product_ids"] == expected.product_ids
    np.testing.assert_allclose(body["scores"], expected.scores, rtol=1e-6)
    assert (body["fallback"], body["unknown"], body["truncated"]) == (False, 1, False)
    assert body["bundle_id"] == client.get("/metadata").json()["bundle_id"]
    # explore slots reach the recommender: new products replace some of the shopper's own
    explore = client.post("/recommend", json={"history": history, "k": 4, "explore_slots": 3}).json()
    plain = client.post("/recommend", json={"history": history, "k": 4}).json()
    expected = recommender.recommend(history, Rules(k=4, explore_slots=3))
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
    assert metadata["manifest"] == json.loads((bundles[0].path / "bundle.json").read_text())  # no paths
    assert metadata["bundle_id"] == ready.json()["bundle_id"]
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert "/recommend/batch" in paths and "requestBody" in paths["/admin/reload"]["post"]


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


# ------------------------------------------------------------------------------------------- reload


def test_reload_swaps_bundle(client: TestClient, bundles: tuple[SyntheticBundle, SyntheticBundle]) -> None:
    old = client.get("/readyz").json()["bundle_id"]
    response = client.post("/admin/reload", json={"path": "b"}, headers=AUTH)  # relative to the root
    assert response.status_code == 200
    new = response.json()["bundle_id"]
    assert new != old and response.json()["previous_bundle_id"] == old
    assert client.get("/metadata").json()["manifest"]["num_items"] == 60
    assert client.post("/recommend", json={"history": []}).json()["bundle_id"] == new
    same = {"bundle_id": new, "previous_bundle_id": new}
    assert client.post("/admin/reload", headers=AUTH).json() == same  # no body: the current path again
    # an absolute path inside the root is fine too, as is one that leaves and re-enters it
    assert client.post("/admin/reload", json={"path": str(bundles[0].path)}, headers=AUTH).status_code == 200
    assert client.post("/admin/reload", json={"path": "b/../a"}, headers=AUTH).status_code == 200
    assert client.post("/admin/reload", json=None, headers=AUTH).json()["bundle_id"] == old


def test_bad_reload_is_refused_and_old_keeps_serving(
    client: TestClient, bundles: tuple[SyntheticBundle, SyntheticBundle], tmp_path: Path
) -> None:
    old = client.get("/readyz").json()["bundle_id"]
    corrupt = Path(shutil.copytree(bundles[1].path, _root(bundles) / f"corrupt-{tmp_path.name}"))
    (corrupt / "items.parquet").write_bytes(b"garbage")
    for body, reasons in [
        ({"path": corrupt.name}, ["items.parquet", "corrupt"]),
        ({"path": "missing"}, ["is not a bundle directory"]),
    ]:
        response = client.post("/admin/reload", json=body, headers=AUTH)
        assert response.status_code == 409
        detail = response.json()["detail"]
        assert all(reason in detail for reason in reasons) and f"still serving {old}" in detail
        assert str(_root(bundles)) not in detail  # the server's own layout stays private
        assert client.post("/recommend", json={"history": []}).json()["bundle_id"] == old
    assert client.post("/admin/reload", json={"path": 7}, headers=AUTH).status_code == 422
    assert client.post("/admin/reload", json={"path": "a\x00"}, headers=AUTH).status_code == 422
    bad_json = client.post("/admin/reload", content=b'{"path": ', headers=AUTH)
    assert bad_json.status_code == 422 and bad_json.json()["detail"][0]["loc"] == ["body"]
    assert client.get("/readyz").json()["bundle_id"] == old


def test_reload_while_another_runs_is_refused(app: FastAPI, client: TestClient) -> None:
    with app.state.serving.lock:
        response = client.post("/admin/reload", headers=AUTH)
    assert response.status_code == 409 and "in progress" in response.json()["detail"]


def test_reload_under_load_drops_nothing(
    app: FastAPI, client: TestClient, bundles: tuple[SyntheticBundle, SyntheticBundle]
) -> None:
    history = _history(bundles[0], [1, 2, 3])
    expected = {}
    for bundle in bundles:
        recommender = Recommender.load(bundle.path)
        expected[recommender.bundle_id] = recommender.recommend(history, Rules(k=5)).product_ids
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
            assert client.post("/admin/reload", json={"path": str(path)}, headers=AUTH).status_code == 200
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert answers and all(status == 200 for status, _ in answers)
    # Every answer is wholly one bundle's: never one bundle's id with the other's products.
    assert all(body["product_ids"] == expected[body["bundle_id"]] for _, body in answers)
    assert {body["bundle_id"] for _, body in answers} == set(expected)


# -------------------------------------------------------------------------------------- admin surface


def test_admin_is_off_by_default(bundles: tuple[SyntheticBundle, SyntheticBundle]) -> None:
    client = TestClient(create_app(bundles[0].path))
    for headers in ({}, AUTH):
        assert client.post("/admin/reload", json={"path": "b"}, headers=headers).status_code == 404
    assert "/admin/reload" not in client.get("/openapi.json").json()["paths"]
    with pytest.raises(ValueError, match="admin=True"):
        create_app(bundles[0].path, admin_token=TOKEN)
    with pytest.raises(ValueError, match="admin=True"):
        create_app(bundles[0].path, bundle_root=_root(bundles))


def test_admin_needs_a_real_token_and_a_root(
    bundles: tuple[SyntheticBundle, SyntheticBundle], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="admin_token"):
        create_app(bundles[0].path, admin=True, bundle_root=_root(bundles))
    with pytest.raises(ValueError, match="admin_token"):
        create_app(bundles[0].path, admin=True, admin_token="short", bundle_root=_root(bundles))
    with pytest.raises(ValueError, match="bundle_root"):
        create_app(bundles[0].path, admin=True, admin_token=TOKEN)
    with pytest.raises(FileNotFoundError):
        create_app(bundles[0].path, admin=True, admin_token=TOKEN, bundle_root=tmp_path / "missing")
    # the token comes from a file (stripped) or, without one, the environment
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    token_file.chmod(0o600)
    assert read_admin_token(token_file) == TOKEN
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "  from-the-environment-0123  ")
    assert read_admin_token() == "from-the-environment-0123"
    monkeypatch.delenv(ADMIN_TOKEN_ENV)
    with pytest.raises(ValueError, match=ADMIN_TOKEN_ENV):
        read_admin_token()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-0123456789"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"X-Admin-Token": TOKEN},
    ],
)
def test_reload_without_the_token_is_401(
    client: TestClient, bundles: tuple[SyntheticBundle, SyntheticBundle], headers: dict[str, str]
) -> None:
    old = client.get("/readyz").json()["bundle_id"]
    response = client.post("/admin/reload", json={"path": "b"}, headers=headers)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert client.get("/readyz").json()["bundle_id"] == old
    # refused before its body is even parsed: garbage gets the same 401, not a 422
    assert client.post("/admin/reload", content=b"{not json", headers=headers).status_code == 401


def test_token_is_compared_in_constant_time(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert client.post("/admin/reload", headers={"Authorization": "Bearer guess"}).status_code == 401
    assert client.post("/admin/reload", headers=AUTH).status_code == 200
    assert calls == [(b"guess", TOKEN.encode()), (TOKEN.encode(), TOKEN.encode())]


def _escapes(root: Path, outside: SyntheticBundle, tmp_path: Path) -> dict[str, str]:
    """Paths naming a valid bundle outside ``root``, each by a different way out."""
    link = root / f"link-{tmp_path.name}"
    link.symlink_to(outside.path, target_is_directory=True)
    mixed = Path(shutil.copytree(root / "a", root / f"mixed-{tmp_path.name}"))
    (mixed / "model.onnx").unlink()
    (mixed / "model.onnx").symlink_to(outside.path / "model.onnx")  # one file of the bundle escapes
    return {
        "dotdot": os.path.relpath(outside.path, root),
        "absolute": str(outside.path),
        "symlinked directory": link.name,
        "symlinked file": mixed.name,
        "root's parent": "..",
    }


def test_reload_outside_the_bundle_root_is_refused(
    client: TestClient,
    bundles: tuple[SyntheticBundle, SyntheticBundle],
    outside: SyntheticBundle,
    tmp_path: Path,
) -> None:
    old = client.get("/readyz").json()["bundle_id"]
    for way, path in _escapes(_root(bundles), outside, tmp_path).items():
        response = client.post("/admin/reload", json={"path": path}, headers=AUTH)
        assert response.status_code == 403, (way, response.text)
        assert "outside the server's bundle root" in response.json()["detail"]
        assert str(outside.path) not in response.json()["detail"] or way == "absolute"  # only as sent
        assert client.get("/readyz").json()["bundle_id"] == old


# ------------------------------------------------------------------------------------------- limits


def test_oversized_body_is_413_before_parsing(
    bundles: tuple[SyntheticBundle, SyntheticBundle], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = TestClient(create_app(bundles[0].path, max_body_bytes=1000))
    parsed: list[bytes] = []
    real = json.loads

    def spy(data: Any, *args: Any, **kwargs: Any) -> Any:
        parsed.append(data)
        return real(data, *args, **kwargs)

    monkeypatch.setattr(json, "loads", spy)  # starlette's Request.json() parses with json.loads
    body = json.dumps({"history": [1] * 400}).encode()
    assert len(body) > 1000
    declared = client.post("/recommend", content=body, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and "1000-byte limit" in declared.json()["detail"]
    assert "connection" not in declared.headers  # a little over: drained, so the client reads the 413
    huge = client.post("/recommend", content=body, headers={"content-length": str(10**12)})
    assert huge.status_code == 413 and huge.headers["connection"] == "close"  # not worth draining
    chunked = client.post(  # a generator body goes out chunked: no Content-Length to check
        "/recommend", content=iter([body[:600], body[600:]]), headers={"content-type": "application/json"}
    )
    assert chunked.status_code == 413 and "content-length" not in chunked.request.headers
    lying = client.post(  # a declared length under the limit does not let more bytes through
        "/recommend/batch", content=body, headers={"content-type": "application/json", "content-length": "10"}
    )
    assert lying.status_code == 413
    assert not any(b'"history"' in (p if isinstance(p, bytes) else p.encode()) for p in parsed)
    small = client.post("/recommend", json={"history": [1] * 10})
    assert small.status_code == 200 and parsed  # and the spy does see what is parsed


def test_body_limit_stops_reading_a_stream_and_times_out_slow_ones() -> None:
    """The middleware alone, over raw ASGI: a chunked body is refused once it passes the limit (the app
    never runs; the rest is drained up to a budget, so the client can read the 413, and an endless one is
    hung up on), and a body that stalls gets 408."""
    app_called = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        app_called.append(True)

    async def call(middleware: BodyLimit, receive: Any) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "path": "/recommend", "headers": [(b"transfer-encoding", b"chunked")]}
        await middleware(scope, receive, send)
        return sent

    chunks_read = 0

    async def endless() -> dict[str, Any]:
        nonlocal chunks_read
        chunks_read += 1
        return {"type": "http.request", "body": b"x" * 300, "more_body": True}

    sent = anyio.run(call, BodyLimit(app, max_bytes=1000, timeout=5), endless)
    assert sent[0]["status"] == 413 and not app_called
    # read up to the drain budget (16 x the limit, 54 chunks of 300 bytes), no further, then hung up on
    assert chunks_read == 54 and (b"connection", b"close") in sent[0]["headers"]

    remaining = 10

    async def finite() -> dict[str, Any]:
        nonlocal remaining
        remaining -= 1
        return {"type": "http.request", "body": b"x" * 300, "more_body": remaining > 0}

    sent = anyio.run(call, BodyLimit(app, max_bytes=1000, timeout=5), finite)
    assert sent[0]["status"] == 413 and remaining == 0 and (b"connection", b"close") not in sent[0]["headers"]

    async def stalled() -> dict[str, Any]:
        await anyio.sleep(60)
        raise AssertionError("unreachable")

    start = time.monotonic()
    sent = anyio.run(call, BodyLimit(app, max_bytes=1000, timeout=0.05), stalled)
    assert sent[0]["status"] == 408 and time.monotonic() - start < 5 and not app_called


def test_default_limits_are_consistent(bundles: tuple[SyntheticBundle, SyntheticBundle]) -> None:
    """The largest requests the defaults allow are answered, and fit in the default body limit even with
    19-digit product ids and full-precision timestamps; one history or one entry more is a 422."""
    client = TestClient(create_app(bundles[0].path))
    per = DEFAULT_MAX_BATCH_ITEMS // DEFAULT_MAX_BATCH
    catalogue = bundles[0].product_ids.tolist()

    def shopper(length: int, ids: list[int]) -> dict[str, Any]:
        stamps = [1_700_000_000.123457 + 3600.000001 * i for i in range(length)]
        return {"history": (ids * length)[:length], "timestamps": stamps, "k": DEFAULT_MAX_K}

    longest = [10**18 + i for i in range(DEFAULT_MAX_HISTORY)]  # as long as an int64 id gets, nearly
    for body in (
        {"requests": [shopper(per, longest)] * DEFAULT_MAX_BATCH},
        shopper(DEFAULT_MAX_HISTORY, longest),
    ):
        assert len(json.dumps(body)) < DEFAULT_MAX_BODY_BYTES / 2, len(json.dumps(body))
    largest = {"requests": [shopper(per, catalogue)] * DEFAULT_MAX_BATCH}
    response = client.post("/recommend/batch", json=largest)
    assert response.status_code == 200 and len(response.json()["results"]) == DEFAULT_MAX_BATCH
    assert client.post("/recommend", json=shopper(DEFAULT_MAX_HISTORY, catalogue)).status_code == 200

    small = {"history": [1]}
    response = client.post("/recommend/batch", json={"requests": [small] * (DEFAULT_MAX_BATCH + 1)})
    assert (
        response.status_code == 422 and f"at most {DEFAULT_MAX_BATCH}" in response.json()["detail"][0]["msg"]
    )
    over = [*largest["requests"][:-1], shopper(per + 1, catalogue)]
    response = client.post("/recommend/batch", json={"requests": over})
    assert response.status_code == 422 and f"at most {DEFAULT_MAX_BATCH_ITEMS}" in response.text
    assert client.post("/recommend", json={"history": [1] * (DEFAULT_MAX_HISTORY + 1)}).status_code == 422
    assert client.post("/recommend", json={"history": [1], "k": DEFAULT_MAX_K + 1}).status_code == 422


def test_the_default_history_limit_takes_every_complete_journey_household_whole() -> None:
    """The ranker reads a shopper's whole history, so a caller cutting one to fit the limit would be served
    other lists than training measured: every household of the embedded year of receipts fits, with room
    for a second year of the longest."""
    receipts = load_complete_journey()
    _, entries = np.unique(receipts.column("shopper_id").to_numpy(), return_counts=True)
    assert 2 * entries.max() <= DEFAULT_MAX_HISTORY, entries.max()


class _Held:
    """A recommender whose recommend calls wait inside the handler until ``release`` is set."""

    def __init__(self, real: Recommender) -> None:
        self.real = real
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def _hold(self) -> None:
        self.entered.set()
        assert self.release.wait(10), "the test never released the held request"

    def recommend(self, *args: Any, **kwargs: Any) -> Any:
        self._hold()
        return self.real.recommend(*args, **kwargs)

    def recommend_batch(self, *args: Any, **kwargs: Any) -> Any:
        self._hold()
        return self.real.recommend_batch(*args, **kwargs)


@pytest.fixture
def held(bundles: tuple[SyntheticBundle, SyntheticBundle]) -> Iterator[tuple[TestClient, _Held]]:
    app = create_app(bundles[0].path, max_concurrency=1)
    holder = _Held(app.state.serving.recommender)
    app.state.serving.recommender = holder
    yield TestClient(app), holder
    holder.release.set()


def test_concurrency_limit_is_503_with_retry_after(held: tuple[TestClient, _Held]) -> None:
    client, holder = held
    first: list[int] = []
    thread = threading.Thread(
        target=lambda: first.append(client.post("/recommend", json={"history": []}).status_code)
    )
    thread.start()
    try:
        assert holder.entered.wait(10)  # the first request now holds the only slot
        for url, body in [("/recommend", {"history": []}), ("/recommend/batch", {"requests": []})]:
            response = client.post(url, json=body)
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            assert "busy" in response.json()["detail"]
        # the probes and everything else are never limited
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        assert client.get("/metadata").status_code == 200
    finally:
        holder.release.set()
        thread.join()
    assert first == [200]
    assert client.post("/recommend", json={"history": []}).status_code == 200  # the slot came back


@contextmanager
def _server(bundle: Path, *flags: str) -> Iterator[int]:
    """``python -m serving`` on a free loopback port, for what only a real server shows."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "serving", "--bundle", str(bundle), "--port", str(port), *flags]
    process = subprocess.Popen([*command, "--log-level", "warning"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=15)


def _answer(port: int, *parts: bytes, timeout: float = 10) -> tuple[bytes, float]:
    """What the server sends back for ``parts`` (sent 50 ms apart, so as separate reads) until it closes
    the connection, and how long it took."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(timeout)
        start = time.monotonic()
        for i, part in enumerate(parts):
            time.sleep(0.05 if i else 0)
            try:
                sock.sendall(part)
            except OSError:  # the server hung up mid-way: what it said before is still there to read
                break
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return received, time.monotonic() - start


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_real_server_bounds_slow_and_large_requests(
    bundles: tuple[SyntheticBundle, SyntheticBundle], http: str
) -> None:
    """Over a socket, with each uvicorn parser: a connection that sends no complete request head is
    closed after --header-timeout, an oversized head is refused, and oversized bodies (declared or
    chunked) get a 413 the client can read."""
    pytest.importorskip(http)
    flags = [
        "--http",
        http,
        "--header-timeout",
        "1",
        "--max-header-bytes",
        "4096",
        "--max-body-bytes",
        "1000",
    ]
    with _server(bundles[0].path, *flags) as port:
        for partial in (b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"):
            received, seconds = _answer(port, partial)
            assert received == b"" and 0.9 < seconds < 6, (partial, seconds)
        received, _ = _answer(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ", *[b"a" * 3000] * 5)
        assert received.split(b" ")[1] in (b"400", b"431"), received[:100]
        head = b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        body = json.dumps({"history": [1] * 400}).encode()
        declared = head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        assert _answer(port, declared)[0].startswith(b"HTTP/1.1 413")
        chunks = b"".join(
            b"%x\r\n%s\r\n" % (len(body[i : i + 300]), body[i : i + 300]) for i in range(0, len(body), 300)
        )
        chunked = head + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunks + b"0\r\n\r\n"
        assert _answer(port, chunked)[0].startswith(b"HTTP/1.1 413")
        small = json.dumps({"history": [1]}).encode()
        ok = head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(small) + small
        assert _answer(port, ok)[0].startswith(b"HTTP/1.1 200")
        # keep-alive after a refusal: the 413 comes before the body, which is drained (its bytes are not
        # taken for the next request head), and the connection then serves the next request
        big = json.dumps({"history": [1] * 2000}).encode()
        parts = [big[i : i + 2000] for i in range(0, len(big), 2000)]
        received, _ = _answer(port, head + b"Content-Length: %d\r\n\r\n" % len(big), *parts, ok)
        assert received.startswith(b"HTTP/1.1 413") and b"HTTP/1.1 200" in received, received[:300]


def test_metadata_shows_no_absolute_paths(tmp_path: Path) -> None:
    manifest = {
        "source": {"checkpoint": "/home/alice/runs/2026-11-23/checkpoints/best.ckpt"},
        "training": {
            "data": {"receipts": {"source": "/data/receipts", "columns": {"shopper_id": "customer"}}},
            "command": "python -m training.train data.receipts.source=/srv/x/receipts.parquet seed=3",
            "windows": "C:\\Users\\bob\\receipts.parquet",
            "home": "~/caddie/outputs/run",
            "metrics": {"val/ndcg@10": 0.2, "test/recall@10": 0.1},
            "url": "https://example.org/a/b/c",
        },
        "/etc/some/key": 1,
    }
    bundle = make_bundle(tmp_path / "bundle", manifest=manifest)
    shown = TestClient(create_app(bundle.path)).get("/metadata").json()["manifest"]
    text = json.dumps(shown)
    for secret in ("/home", "alice", "/data/", "/srv", "Users", "bob", "~/", "/etc"):
        assert secret not in text, (secret, text)
    assert shown["source"]["checkpoint"] == "best.ckpt"
    assert shown["training"]["data"]["receipts"]["source"] == "receipts"
    assert shown["training"]["command"].endswith("data.receipts.source=receipts.parquet seed=3")
    assert shown["training"]["windows"] == "receipts.parquet"
    assert shown["training"]["metrics"] == manifest["training"]["metrics"]  # not paths: kept
    assert shown["training"]["url"] == "https://example.org/a/b/c"
    assert shown["model"] == json.loads((bundle.path / "bundle.json").read_text())["model"]
    assert public_manifest({"a": ["/x/y/z", 3, None]}) == {"a": ["z", 3, None]}


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
        headers = {"content-type": content_type, **(AUTH if url == "/admin/reload" else {})}
        response = client.post(url, content=content, headers=headers)
        statuses[response.status_code] += 1
        assert response.status_code < 500, (url, content[:500], response.text[:500])
        if response.status_code == 200 and url == "/recommend":
            assert len(response.json()["product_ids"]) <= body.get("k", 10)
    assert statuses[200] > 50 and statuses[422] > 500, statuses
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
