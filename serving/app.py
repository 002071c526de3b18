"""HTTP API over a :class:`~serving.recommender.Recommender`, with validated input and hot bundle reload.

Bad input always gets a 4xx JSON answer naming the problem, never a 5xx. The serving recommender is one
reference: each request reads it once and a reload swaps it in a single assignment after the new bundle
has been fully loaded and probed, so in-flight requests finish on the old bundle and none is dropped.
"""

# No ``from __future__ import annotations``: FastAPI resolves endpoint annotations at runtime, and the
# request models are built per app (their limits are parameters), so they are not module globals.

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from recsys.bundle import BundleError
from serving.recommender import Recommendation, Recommender

CONFIG_ENV = "CADDIE_SERVING_CONFIG"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
ProductId = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
Timestamp = Annotated[float, Field(allow_inf_nan=False)]


class RecommendResponse(BaseModel):
    """Recommendations for one shopper, best first."""

    product_ids: list[int]
    scores: list[float] = Field(
        description="next-basket probabilities when repeat_aware, else model scores; popularity counts "
        "when fallback is true"
    )
    fallback: bool = Field(description="the history had no known product: most popular products instead")
    unknown: int = Field(description="history entries outside the catalogue, dropped")
    truncated: bool = Field(description="only the most recent max_len known products were used")
    repeat_aware: bool = Field(description="scored with the bundle's repeat-aware scorer (timestamps given)")
    bundle_id: str


class BatchResponse(BaseModel):
    results: list[RecommendResponse]


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
    model without timestamps, or timestamps out of order) is the client's error: 422 with the reason."""
    try:
        yield
    except ValueError as error:
        raise HTTPException(status_code=422, detail=str(error)) from error


def create_app(
    bundle_path: str | Path,
    max_history: int = 1000,
    max_k: int = 1000,
    max_batch: int = 1024,
    intra_op_threads: int = 1,
    search_threads: int = 1,
) -> FastAPI:
    """The API serving the bundle at ``bundle_path``, loaded (and verified) before this returns.

    ``max_history`` bounds a request's history length, ``max_k`` its ``k`` (a ``k`` above the catalogue
    size returns the whole catalogue), ``max_batch`` the requests of one batch call. The thread counts go
    to :meth:`Recommender.load`, for this bundle and every reloaded one.
    """
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

    class BatchRequest(BaseModel):
        """Several shoppers, answered in order with one model run."""

        model_config = ConfigDict(extra="forbid", strict=True)
        requests: list[RecommendRequest] = Field(max_length=max_batch)

    class ReloadRequest(BaseModel):
        """A bundle directory on the server; omitted, the current bundle's path is re-read."""

        model_config = ConfigDict(extra="forbid", strict=True)
        path: str | None = Field(None, min_length=1, max_length=4096)

    app = FastAPI(
        title="Caddie recommendations",
        description="Next-basket product recommendations from a Caddie bundle (ONNX encoder + FAISS).",
    )
    app.state.serving = serving

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
            result = recommender.recommend(
                request.history,
                request.k,
                request.exclude_purchased,
                request.min_score,
                request.timestamps,
                request.explore_slots,
            )
        return _response(result, recommender.bundle_id)

    @app.post("/recommend/batch")
    def recommend_batch(batch: BatchRequest) -> BatchResponse:
        """Top-k products for many shoppers, encoded and searched together."""
        recommender = serving.recommender
        requests = batch.requests
        with _unprocessable():
            results = recommender.recommend_batch(
                [r.history for r in requests],
                [r.k for r in requests],
                [r.exclude_purchased for r in requests],
                [r.min_score for r in requests],
                [r.timestamps for r in requests],
                [r.explore_slots for r in requests],
            )
        return BatchResponse(results=[_response(r, recommender.bundle_id) for r in results])

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """The process is alive."""
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
        """The serving bundle's id and manifest."""
        recommender = serving.recommender
        return {"bundle_id": recommender.bundle_id, "manifest": recommender.metadata}

    @app.post("/admin/reload", responses={409: {"description": "bundle refused; the old one keeps serving"}})
    def reload(request: ReloadRequest | None = None) -> ReloadResponse:
        """Load, verify and probe a bundle, then swap it in; on any problem the old one keeps serving."""
        if not serving.lock.acquire(blocking=False):
            raise HTTPException(409, "another reload is in progress")
        try:
            previous = serving.recommender
            path = Path(request.path) if request and request.path else previous.path
            try:
                loaded = Recommender.load(path, **serving.threads)
            except (BundleError, OSError) as error:
                raise HTTPException(
                    409, f"bundle at {path} refused, still serving {previous.bundle_id}: {error}"
                ) from error
            serving.recommender = loaded  # one reference assignment: atomic for concurrent readers
            return ReloadResponse(bundle_id=loaded.bundle_id, previous_bundle_id=previous.bundle_id)
        finally:
            serving.lock.release()

    return app


def app_from_env() -> FastAPI:
    """Factory for uvicorn workers: ``create_app(**kwargs)``, kwargs as JSON in ``CADDIE_SERVING_CONFIG``."""
    return create_app(**json.loads(os.environ[CONFIG_ENV]))
