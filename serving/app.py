"""HTTP API over a :class:`~serving.recommender.Recommender`, with validated input and bounded cost.

Bad input always gets a 4xx JSON answer naming the problem, never a 5xx. Every request is bounded before
it costs anything: bodies over ``max_body_bytes`` are refused (413) before they are parsed, histories and
batches are capped so the largest valid request stays cheap, and at most ``max_concurrency`` recommend
requests run at once (more get 503 with ``Retry-After``); the probes are never limited. docs/security.md
gives the threat model and the reasons for each default.

The admin surface (``POST /admin/reload``) is off unless ``admin=True``; then it needs the admin token
as ``Authorization: Bearer <token>`` and only loads bundles inside ``bundle_root``. The serving
recommender is one reference: each request reads it once and a reload swaps it in a single assignment
after the new bundle has been fully loaded and probed, so in-flight requests finish on the old bundle and
none is dropped.
"""

# No ``from __future__ import annotations``: FastAPI resolves endpoint annotations at runtime, and the
# request models are built per app (their limits are parameters), so they are not module globals.

import hmac
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recsys.bundle import BundleError
from recsys.rules import Rules
from serving.recommender import Recommendation, Recommender

log = logging.getLogger(__name__)

CONFIG_ENV = "CADDIE_SERVING_CONFIG"
ADMIN_TOKEN_ENV = "CADDIE_ADMIN_TOKEN"
MIN_TOKEN_LENGTH = 16
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
ProductId = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
Timestamp = Annotated[float, Field(allow_inf_nan=False)]

# Defaults: the measurements behind them are in BENCHMARKS.md ("Serving limits"), the reasons in
# docs/security.md. A request's cost grows with its history entries and its k's, so a batch is bounded
# by its total entries as well as its length; and the largest request they allow must fit in the body
# limit, or it could never be sent. A history is one shopper's whole record: the ranker's features read all
# of it, so the cap must fit real loyalty histories, not only the model's max_len.
DEFAULT_MAX_HISTORY = 10_000
DEFAULT_MAX_K = 100
DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_BATCH_ITEMS = 10_000
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_MAX_CONCURRENCY = 4
DEFAULT_BODY_TIMEOUT = 10.0
RETRY_AFTER_SECONDS = 1
LIMITED_PATHS = frozenset({"/recommend", "/recommend/batch"})


class RecommendResponse(BaseModel):
    """Recommendations for one shopper, best first."""

    product_ids: list[int]
    scores: list[float] = Field(
        description="next-basket probabilities when repeat_aware (listed by probability x the shopper's "
        "basket-size factor when the ranker has one, so they need not descend), else model scores; "
        "popularity counts when fallback is true"
    )
    fallback: bool = Field(description="the history had no known product: most popular products instead")
    unknown: int = Field(description="history entries outside the catalogue, dropped")
    truncated: bool = Field(description="only the most recent max_len known products were used")
    repeat_aware: bool = Field(description="scored with the bundle's repeat-aware scorer (timestamps given)")
    bundle_id: str


class BatchResponse(BaseModel):
    results: list[RecommendResponse]


class ReloadRequest(BaseModel):
    """A bundle directory inside the server's bundle root (relative to it, or absolute inside it);
    omitted, the current bundle's path is re-read."""

    model_config = ConfigDict(extra="forbid", strict=True)
    path: str | None = Field(None, min_length=1, max_length=4096)


class ReloadResponse(BaseModel):
    bundle_id: str
    previous_bundle_id: str


class _Serving:
    """The current recommender; reloads are serialised by ``lock``."""

    def __init__(self, recommender: Recommender, threads: dict[str, int]) -> None:
        self.recommender = recommender
        self.threads = threads
        self.lock = threading.Lock()


def _response(recommendation: Recommendation, bundle_id: str) -> RecommendResponse:
    return RecommendResponse(**vars(recommendation), bundle_id=bundle_id)


@contextmanager
def _unprocessable() -> Iterator[None]:
    """A request the bundle cannot answer as sent (the recommender's ``ValueError``, e.g. a basket-aware
    model without timestamps, timestamps out of order, or rules it refuses: ``RulesError`` is one) is the
    client's error: 422 with the reason."""
    try:
        yield
    except ValueError as error:
        raise HTTPException(status_code=422, detail=str(error)) from error


# --------------------------------------------------------------------------------------------- limits


async def _send_json(
    send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """A complete JSON error response straight from ASGI, for middleware that answers before the app."""
    body = json.dumps({"detail": detail}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head + (headers or [])})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Pure ASGI middleware: a request body over ``max_bytes`` gets 413 before the app parses any of it.

    A declared ``Content-Length`` over the limit is refused without reading a byte. Otherwise the body is
    read here, counting bytes as they stream in (a chunked body declares no length), and refused as soon
    as the count passes the limit; a body that takes longer than ``timeout`` seconds to arrive gets 408, so
    a slow client cannot hold a connection and its buffer indefinitely. An accepted body is then replayed
    to the app, which reads it as usual.

    After a refusal the rest of the body is still on its way. Closing at once would make the kernel reset
    the connection over the unread bytes, and the client would see a reset instead of the 413; so up to
    ``DRAIN_FACTOR`` times the limit is drained (discarded, never stored: by uvicorn after a declared
    length, here for a chunked body) and the connection kept. A body longer than that, possibly endless,
    gets the 413 with ``Connection: close``.
    """

    DRAIN_FACTOR = 16

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        close = [(b"connection", b"close")]
        drain = self.DRAIN_FACTOR * self.max_bytes
        lengths = [value for name, value in scope["headers"] if name == b"content-length"]
        if lengths:
            try:
                declared = int(lengths[0])
            except ValueError:
                await _send_json(send, 400, "invalid Content-Length", close)
                return
            if declared > self.max_bytes:
                await self._too_large(send, close if declared > drain else [])
                return

        chunks: list[bytes] = []
        size = 0
        over = False
        try:
            with anyio.fail_after(self.timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client went away: nobody to answer
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    more = message.get("more_body", False)
                    if size > self.max_bytes:
                        over = True
                        chunks.clear()
                        while more and size <= drain:  # discard the rest, up to the drain budget
                            message = await receive()
                            size += len(message.get("body", b""))
                            more = message["type"] == "http.request" and message.get("more_body", False)
                        await self._too_large(send, close if more else [])
                        return
                    chunks.append(chunk)
                    if not more:
                        break
        except TimeoutError:
            if over:  # too large and too slow: the 413 is the answer that matters
                await self._too_large(send, close)
            else:
                await _send_json(send, 408, f"request body not received within {self.timeout:g} s", close)
            return

        body = b"".join(chunks)
        del chunks
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the server's disconnect notice, as without us

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send, headers: list[tuple[bytes, bytes]]) -> None:
        await _send_json(send, 413, f"request body over the {self.max_bytes}-byte limit", headers)


class ConcurrencyLimit:
    """Pure ASGI middleware: at most ``limit`` requests to ``paths`` at once; more get 503 + Retry-After.

    Acquiring is non-blocking: a request over the limit is answered at once instead of queueing, so a
    burst costs memory for ``limit`` requests, never for the whole burst, and a client learns to back off.
    A threading semaphore, not an asyncio one, because the slot is held across the endpoint's worker
    thread and test clients may run apps on several event loops. Other paths (the probes above all) are
    never limited, so an overloaded server still answers ``/healthz``.
    """

    def __init__(self, app: ASGIApp, limit: int, paths: frozenset[str]) -> None:
        self.app = app
        self.limit = limit
        self.paths = paths
        self.slots = threading.BoundedSemaphore(limit)

    def _limited(self, scope: Scope) -> bool:
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):  # behind a proxy's prefix the route is what follows it
            path = path[len(root) :]
        return path.rstrip("/") in self.paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._limited(scope):
            await self.app(scope, receive, send)
            return
        if not self.slots.acquire(blocking=False):
            retry = [(b"retry-after", str(RETRY_AFTER_SECONDS).encode())]
            await _send_json(send, 503, f"server busy: {self.limit} requests in progress, retry later", retry)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.slots.release()


# ---------------------------------------------------------------------------------------------- admin


def read_admin_token(token_file: str | Path | None = None) -> str:
    """The admin token: the contents of ``token_file`` (surrounding whitespace stripped) if given, else
    the ``CADDIE_ADMIN_TOKEN`` environment variable. Raises ``ValueError`` if it is missing or shorter
    than ``MIN_TOKEN_LENGTH`` characters (a guessable token is no authentication)."""
    if token_file is not None:
        path = Path(token_file)
        token = path.read_text().strip()
        if path.stat().st_mode & 0o077:
            log.warning("admin token file %s is readable by other users; chmod 600 it", path.name)
        source = f"admin token file {path.name}"
    else:
        token = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
        source = f"${ADMIN_TOKEN_ENV}"
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(
            f"{source} must hold a token of at least {MIN_TOKEN_LENGTH} characters "
            '(e.g. python -c "import secrets; print(secrets.token_urlsafe(32))")'
        )
    return token


def _token_matches(presented: str, token: str) -> bool:
    """Compare in constant time, so response timing does not reveal how much of a guess was right."""
    return hmac.compare_digest(presented.encode(), token.encode())


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def confine(requested: str, root: Path) -> Path:
    """The resolved bundle directory ``requested`` names inside ``root`` (already resolved).

    Relative paths are taken from the root, absolute ones as they are; either way symlinks are resolved
    first, so ``..``, an absolute path elsewhere, and a symlink (the directory, or a file in it) pointing
    outside the root are all refused with 403. The message names only what the client sent.
    """
    try:
        resolved = (root / requested).resolve()  # strict=False: a missing bundle is the loader's 409
        escapes = not _inside(resolved, root)
        if not escapes and resolved.is_dir():
            escapes = any(not _inside(entry.resolve(), root) for entry in resolved.iterdir())
    except (OSError, ValueError, RuntimeError) as error:  # a NUL byte, a symlink loop, no permission
        raise HTTPException(422, f"bundle path {requested!r} cannot be resolved") from error
    if escapes:
        raise HTTPException(403, f"bundle path {requested!r} is outside the server's bundle root")
    return resolved


# -------------------------------------------------------------------------------------------- metadata

# An absolute path's directories inside a longer string (a command line, "key=/a/b/c"): not after a
# word character, ':' or '/', so URLs ("https://host/a/b") and relative paths ("val/ndcg") stay as they
# are. Windows drives and UNC shares too, since bundles are portable.
_EMBEDDED_DIRS = re.compile(r"(?<![\w:/.\\~-])(?:~|[A-Za-z]:)?[/\\](?:[^\s/\\'\"=,;]+[/\\])+")
_ABSOLUTE = re.compile(r"^(?:~|[A-Za-z]:)?[/\\]")


def public_manifest(value: Any) -> Any:
    """``value`` (a manifest, or any part of one) with every absolute filesystem path cut to its last
    component: ``/home/alice/runs/3/best.ckpt`` becomes ``best.ckpt``, also inside longer strings and in
    keys. Server paths tell a caller about accounts and layout and are no use to a client; what the
    bundle is (model, sizes, metrics, checksums) is kept."""
    if isinstance(value, dict):
        return {public_manifest(key): public_manifest(item) for key, item in value.items()}
    if isinstance(value, list):
        return [public_manifest(item) for item in value]
    if isinstance(value, str):
        if _ABSOLUTE.match(value) and not any(c.isspace() for c in value):
            return re.split(r"[/\\]", value.rstrip("/\\"))[-1] or "/"
        return _EMBEDDED_DIRS.sub("", value)
    return value


# ------------------------------------------------------------------------------------------------- app


def create_app(
    bundle_path: str | Path,
    max_history: int = DEFAULT_MAX_HISTORY,
    max_k: int = DEFAULT_MAX_K,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS,
    intra_op_threads: int = 1,
    search_threads: int = 1,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    admin: bool = False,
    admin_token: str | None = None,
    bundle_root: str | Path | None = None,
) -> FastAPI:
    """The API serving the bundle at ``bundle_path``, loaded (and verified) before this returns.

    ``max_history`` bounds a request's history length, ``max_k`` its ``k`` (a ``k`` above the catalogue
    size returns the whole catalogue), ``max_batch`` the requests of one batch call and
    ``max_batch_items`` their history entries all together. ``max_body_bytes``
    bounds a request body (413 beyond, before parsing) and ``body_timeout`` the seconds it may take to
    arrive (408); ``max_concurrency`` is how many recommend requests run at once (503 beyond). The thread
    counts go to :meth:`Recommender.load`, for this bundle and every reloaded one.

    ``admin`` mounts ``POST /admin/reload``; it then needs ``admin_token`` (see :func:`read_admin_token`)
    and ``bundle_root``, the only directory reloads may read bundles from. Without ``admin`` the route
    does not exist (404).
    """
    for name, value in [
        ("max_history", max_history),
        ("max_k", max_k),
        ("max_batch", max_batch),
        ("max_batch_items", max_batch_items),
        ("max_body_bytes", max_body_bytes),
        ("max_concurrency", max_concurrency),
    ]:
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not body_timeout > 0:
        raise ValueError(f"body_timeout must be > 0, got {body_timeout}")
    root: Path | None = None
    if admin:
        if admin_token is None or len(admin_token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"admin needs an admin_token of at least {MIN_TOKEN_LENGTH} characters")
        if bundle_root is None:
            raise ValueError("admin needs a bundle_root: the directory reloads may read bundles from")
        root = Path(bundle_root).resolve(strict=True)
        if not root.is_dir():
            raise ValueError(f"bundle_root {bundle_root} is not a directory")
    elif admin_token is not None or bundle_root is not None:
        raise ValueError("admin_token and bundle_root configure the admin surface: pass admin=True")

    threads = {"intra_op_threads": intra_op_threads, "search_threads": search_threads}
    serving = _Serving(Recommender.load(bundle_path, **threads), threads)

    class RecommendRequest(BaseModel):
        """One shopper: purchase history (product ids, oldest first) and what to return."""

        # strict: "5" is not a k and 1 is not a bool; forbid: a misspelt option is an error, not ignored
        model_config = ConfigDict(extra="forbid", strict=True)
        history: list[ProductId] = Field(
            max_length=max_history, description="product ids bought, oldest first; unknown ones are dropped"
        )
        k: int = Field(min(10, max_k), ge=1, le=max_k, description="products to return (at most)")
        exclude_purchased: bool = Field(False, description="never recommend a product of the history")
        min_score: float | None = Field(
            None, allow_inf_nan=False, description="drop scores below this (not applied to fallback)"
        )
        explore_slots: int = Field(
            0, ge=0, le=max_k, description="positions reserved for the best products new to the shopper"
        )
        timestamps: list[Timestamp] | None = Field(
            None,
            max_length=max_history,
            description="purchase time of each history entry, seconds since the epoch (a basket's products "
            "share one); turns on the bundle's repeat-aware scorer, if it has one",
        )

        @model_validator(mode="after")
        def timestamps_match_history(self) -> "RecommendRequest":
            if self.timestamps is not None and len(self.timestamps) != len(self.history):
                raise ValueError(
                    f"timestamps has {len(self.timestamps)} entries for {len(self.history)} history entries"
                )
            return self

        def rules(self) -> Rules:
            """The request's rules, validated once more by ``Rules`` itself (a ``RulesError`` is a 422)."""
            return Rules(
                k=self.k,
                exclude_purchased=self.exclude_purchased,
                min_score=self.min_score,
                explore_slots=self.explore_slots,
            )

    class BatchRequest(BaseModel):
        """Several shoppers, answered in order with one model run."""

        model_config = ConfigDict(extra="forbid", strict=True)
        requests: list[RecommendRequest] = Field(max_length=max_batch)

        @model_validator(mode="after")
        def entries_within_budget(self) -> "BatchRequest":
            # a batch's cost grows with its total history as well as its length, so both are bounded
            total = sum(len(r.history) for r in self.requests)
            if total > max_batch_items:
                raise ValueError(
                    f"the histories hold {total} entries in all; a batch may hold at most {max_batch_items}"
                )
            return self

    app = FastAPI(
        title="Caddie recommendations",
        description="Next-basket product recommendations from a Caddie bundle (ONNX encoder + FAISS).",
    )
    app.state.serving = serving
    # Added last is outermost: the body limit answers first, before a concurrency slot is taken, so an
    # oversized or slow upload never holds one of the few recommend slots.
    app.add_middleware(ConcurrencyLimit, limit=max_concurrency, paths=LIMITED_PATHS)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, timeout=body_timeout)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        # FastAPI's shape minus the echoed input, which for a rejected 1,000-item history is most of it.
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in error.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.post("/recommend")
    def recommend(request: RecommendRequest) -> RecommendResponse:
        """Top-k products for one shopper."""
        recommender = serving.recommender  # read once: a concurrent reload cannot split one request
        with _unprocessable():
            result = recommender.recommend(request.history, request.rules(), timestamps=request.timestamps)
        return _response(result, recommender.bundle_id)

    @app.post("/recommend/batch")
    def recommend_batch(batch: BatchRequest) -> BatchResponse:
        """Top-k products for many shoppers, encoded and searched together."""
        recommender = serving.recommender
        requests = batch.requests
        with _unprocessable():
            results = recommender.recommend_batch(
                [r.history for r in requests],
                [r.rules() for r in requests],
                timestamps=[r.timestamps for r in requests],
            )
        return BatchResponse(results=[_response(r, recommender.bundle_id) for r in results])

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive. ``async`` on purpose: it needs no worker thread, so it answers even when
        every thread is busy with recommendations."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """A bundle is loaded and answers a probe recommendation."""
        recommender = serving.recommender
        try:
            recommender.check()
        except Exception as error:  # any failure means not ready; the reason goes to the probe's log
            return JSONResponse({"ready": False, "reason": str(error)}, status_code=503)
        return JSONResponse({"ready": True, "bundle_id": recommender.bundle_id})

    @app.get("/metadata")
    def metadata() -> dict[str, Any]:
        """The serving bundle's id and manifest, absolute paths cut to their last component."""
        recommender = serving.recommender
        return {"bundle_id": recommender.bundle_id, "manifest": public_manifest(recommender.metadata)}

    if root is not None and admin_token is not None:  # both set exactly when admin is on (checked above)
        _mount_admin(app, serving, admin_token, root)
    return app


def _mount_admin(app: FastAPI, serving: _Serving, token: str, root: Path) -> None:
    """``POST /admin/reload``: token first, then the body, then the path check, then the load."""
    bearer = HTTPBearer(auto_error=False, description="the server's admin token")

    def load(path: Path) -> ReloadResponse:
        # In a worker thread: loading verifies checksums and probes the model, seconds for a big bundle.
        if not serving.lock.acquire(blocking=False):
            raise HTTPException(409, "another reload is in progress")
        try:
            previous = serving.recommender
            try:
                loaded = Recommender.load(path, **serving.threads)
            except (BundleError, OSError) as error:
                shown = str(error).replace(str(root), "<bundle-root>")
                raise HTTPException(
                    409, f"bundle refused, still serving {previous.bundle_id}: {shown}"
                ) from error
            serving.recommender = loaded  # one reference assignment: atomic for concurrent readers
            return ReloadResponse(bundle_id=loaded.bundle_id, previous_bundle_id=previous.bundle_id)
        finally:
            serving.lock.release()

    @app.post(
        "/admin/reload",
        responses={
            401: {"description": "missing or wrong admin token"},
            403: {"description": "the path is outside the server's bundle root"},
            409: {"description": "bundle refused; the old one keeps serving"},
        },
        openapi_extra={
            "requestBody": {
                "required": False,
                "content": {"application/json": {"schema": ReloadRequest.model_json_schema()}},
            }
        },
    )
    async def reload(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> ReloadResponse:
        """Load, verify and probe a bundle from the bundle root, then swap it in; on any problem the old
        one keeps serving. The body is read by hand, after the token check, so an unauthenticated caller
        gets its 401 without the server parsing anything it sent."""
        if credentials is None or not _token_matches(credentials.credentials, token):
            raise HTTPException(401, "admin token required", headers={"WWW-Authenticate": "Bearer"})
        body = await request.body()
        parsed = None
        if body.strip() not in (b"", b"null"):  # both mean "re-read the current bundle"
            try:
                parsed = ReloadRequest.model_validate_json(body)
            except ValidationError as error:
                raise RequestValidationError(
                    [{**e, "loc": ("body", *e["loc"])} for e in error.errors()]
                ) from error
        path = confine(parsed.path, root) if parsed and parsed.path else serving.recommender.path
        return await run_in_threadpool(load, path)


def app_from_env() -> FastAPI:
    """Factory for uvicorn workers: ``create_app(**kwargs)``, kwargs as JSON in ``CADDIE_SERVING_CONFIG``.

    The admin token never travels in that JSON: with ``admin`` each worker reads it itself, from
    ``admin_token_file`` if the config names one, else from ``CADDIE_ADMIN_TOKEN``.
    """
    config = json.loads(os.environ[CONFIG_ENV])
    token_file = config.pop("admin_token_file", None)
    if config.get("admin"):
        config["admin_token"] = read_admin_token(token_file)
    return create_app(**config)
