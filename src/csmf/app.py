"""The HTTP layer of `csmf serve` (FastAPI): routes, request models and error mapping only.

GET  /recommend?user_id=..&k=..&weights=click:0.3,purchase:0.7&exclude_seen=true
POST /recommend  {"user_ids": [...], "k": 10, "weights": {"click": 0.3}, "exclude_seen": true}
POST /search     {"vector": [...], "k": 10}: top-k for a caller's own query vector
GET  /health, GET /info, GET /users (example user ids); GET / is the scenario page; OpenAPI docs at /docs.
Bad input answers 422 with the field named; an unknown user 404 (or the popularity fallback).
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, Query
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field

from csmf.serve import MAX_K, Recommendation, Recommender, RequestError, UnknownUser, parse_weights


class BatchRequest(BaseModel):
    user_ids: list[str] = Field(min_length=1, max_length=10_000)
    k: int = Field(10, ge=1, le=MAX_K)
    weights: dict[str, float] | None = None  # None = the artifact's default weights
    exclude_seen: bool = True


class VectorQuery(BaseModel):
    vector: list[float]  # a query vector of the artifact's dimension, weights already folded in if any
    k: int = Field(10, ge=1, le=MAX_K)


def _error(status: int, field: str | None, message: str, where: str = "query") -> JSONResponse:
    loc = [where, field] if field else []
    return JSONResponse(status_code=status, content={"detail": [{"loc": loc, "msg": message}]})


def _as_json(r: Recommendation) -> dict:
    return {"user_id": r.user_id, "fallback": r.fallback, "weights": r.weights, "items": r.items}


def create_app(recommender: Recommender) -> FastAPI:
    app = FastAPI(title="csmf", description="Multi-objective retrieval with per-request objective weights")

    def answer(user_ids: list[str], k: int, weights: dict[str, float] | None, exclude_seen: bool, where: str):
        try:
            return recommender.recommend(user_ids, k, weights, exclude_seen)
        except RequestError as err:
            return _error(422, err.field, err.message, where)
        except UnknownUser as err:
            field = "user_id" if where == "query" else "user_ids"
            return _error(404, field, f"unknown user {err.user_id!r} (start the server with --fallback popularity "
                          "to answer unknown users)", where)  # fmt: skip

    page = resources.files("csmf").joinpath("static/index.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page() -> str:
        return page  # the scenario page: one slider per objective

    @app.get("/users")
    def users(limit: int = Query(50, ge=1, le=1000)) -> dict:
        """The most active users (most training interactions): handy examples for the page and for curl."""
        return {"user_ids": recommender.sample_users(limit)}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/info")
    def info() -> dict:
        return recommender.info()

    @app.get("/recommend")
    def recommend(
        user_id: str,
        k: int = Query(10, ge=1, le=MAX_K),
        weights: str | None = Query(None, description="stage:weight,... (default: the artifact's weights)"),
        exclude_seen: bool = True,
    ):
        try:
            parsed = parse_weights(weights, recommender.stages) if weights is not None else None
        except RequestError as err:
            return _error(422, err.field, err.message)
        result = answer([user_id], k, parsed, exclude_seen, "query")
        if isinstance(result, JSONResponse):
            return result
        return {**_as_json(result[0]), "seconds": result[0].seconds, "index": recommender.index.kind}

    @app.post("/recommend")
    def recommend_batch(request: BatchRequest):
        result = answer(request.user_ids, request.k, request.weights, request.exclude_seen, "body")
        if isinstance(result, JSONResponse):
            return result
        seconds = result[0].seconds if result else 0.0
        return {"results": [_as_json(r) for r in result], "seconds": seconds, "index": recommender.index.kind}

    @app.post("/search")
    def search(query: VectorQuery):
        """Top-k items for a caller's own query vector (for example a user vector computed elsewhere)."""
        try:
            return {"items": recommender.search_vector(query.vector, query.k), "index": recommender.index.kind}
        except RequestError as err:
            return _error(422, err.field, err.message, "body")

    return app
