"""The HTTP layer of `csmf serve` (FastAPI): routes, request models, input strictness and error mapping only.

GET  /recommend?user_id=..&k=..&weights=click:0.3,purchase:0.7&exclude_seen=true
POST /recommend  {"user_ids": [...], "k": 10, "weights": {"click": 0.3}, "exclude_seen": true}
POST /recommend  {"history": {"view": ["6741"], "purchase": []}, "k": 10, ...}: one user by behaviour history
POST /search     {"vector": [...], "k": 10}: top-k for a caller's own query vector
POST /items      {"items": [{"item_id": "x", "vector": [...]}]}: add or replace items; DELETE /items/{id}
GET  /health, GET /info, GET /users (example user ids); GET / is the scenario page; OpenAPI docs at /docs.

Bad input answers 422 with the field named in `loc`; an unknown user 404 (or the popularity fallback); a body
over ServeLimits.max_body_bytes 413. Input is read strictly, so an ambiguous request is refused rather than
guessed at: JSON types are not coerced (`"k": true` is not 1), unknown or repeated keys and query parameters
are refused, query integers are ASCII digits only (not `1_0`, not full-width digits). Error bodies never
echo an input whole: `input` is cut to a short text.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Annotated
from urllib.parse import parse_qsl

import orjson
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag
from starlette.concurrency import run_in_threadpool

from csmf.fusion import clip
from csmf.serving.batching import Batcher
from csmf.serving.serve import (
    MAX_K,
    NotMutable,
    Recommendation,
    Recommender,
    RequestError,
    UnknownItem,
    UnknownUser,
)

_DIGITS = re.compile(r"[0-9]{1,9}")
ECHO_CHARS = 200  # the most of an input an error body repeats
MAX_ERRORS = 10  # the most validation errors one 422 lists (100,000 ids of the wrong type would be 100,000)


class BatchRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    user_ids: list[str] = Field(min_length=1)  # at most ServeLimits.max_ids, checked with the work bound
    k: int = Field(10, ge=1, le=MAX_K)
    weights: dict[str, float] | None = None  # None = the artifact's default weights
    exclude_seen: bool = True


class HistoryRequest(BaseModel):
    """One user sent as a behaviour history (item ids per behaviour): the user tower computes the vector."""

    model_config = ConfigDict(strict=True, extra="forbid")

    history: dict[str, list[str]]  # behaviour -> item ids, e.g. {"view": ["6741", "2697"], "purchase": []}
    user_id: str | None = None  # a known user whose ID embedding and features the tower reads (optional)
    features: dict[str, str | int | float] | None = None  # a new user's raw features (GET /info: user_features)
    k: int = Field(10, ge=1, le=MAX_K)
    weights: dict[str, float] | None = None  # None = the artifact's default weights
    exclude_seen: bool = True  # leaves out the history's items (and a known user's seen ones)


def _body_kind(body: object) -> str:
    return "history" if isinstance(body, dict) and "history" in body else "ids"


# POST /recommend takes user ids (a batch) or one user's history; the body's keys say which
RecommendBody = Annotated[
    Annotated[BatchRequest, Tag("ids")] | Annotated[HistoryRequest, Tag("history")], Discriminator(_body_kind)
]


class NewItem(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    item_id: str
    vector: list[float] | None = None  # the item's vector in the artifact's space, or
    features: dict[str, str | int | float] | None = None  # its raw features, through the item tower


class ItemsRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    items: list[NewItem] = Field(min_length=1)  # at most ServeLimits.max_ids


class VectorQuery(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    vector: list[float]  # a query vector of the artifact's dimension, weights already folded in if any
    k: int = Field(10, ge=1, le=MAX_K)


class BodyTooLarge(HTTPException):
    """Raised from the body reader, so FastAPI passes it through its body parsing as an HTTP error."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over this server's limit of {limit:,} bytes (csmf serve --max-body-bytes)")


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` answers 413, at once when Content-Length says so, else as soon as
    the bytes read pass the limit (a chunked body), before anything is parsed or kept."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = [value for name, value in scope["headers"] if name == b"content-length"]
        if declared and (len(declared) > 1 or not declared[0].isdigit() or int(declared[0]) > self.max_bytes):
            return await _error(413, None, BodyTooLarge(self.max_bytes).detail, "body")(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        return await self.app(scope, limited_receive, send)


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)
    return dict(pairs)


async def unique_json_keys(request: Request) -> None:
    """A JSON object with a key given twice is refused (a JSON parser would silently keep the last)."""
    try:
        json.loads(await request.body(), object_pairs_hook=_unique_keys)
    except _DuplicateKey as dup:
        fields = {*BatchRequest.model_fields, *HistoryRequest.model_fields, *VectorQuery.model_fields}
        field = dup.key if dup.key in fields else "weights"
        message = f"key {clip(repr(dup.key))} appears twice in one JSON object; give each key once"
        raise RequestError(field, message) from None
    except ValueError:
        pass  # not JSON: FastAPI has already answered that


def strict_query(allowed: tuple[str, ...], integers: tuple[str, ...] = ()):
    """A dependency refusing query parameters that are unknown, repeated, or integers not in ASCII digits."""

    def check(request: Request) -> None:
        given: set[str] = set()
        for name, value in request.query_params.multi_items():
            if name not in allowed:
                raise RequestError(clip(name), f"unknown query parameter; this route takes {list(allowed)}")
            if name in given:
                raise RequestError(name, "given more than once; give it once")
            given.add(name)
            if name in integers and not re.fullmatch(r"[0-9]{1,9}", value):
                raise RequestError(name, f"must be a whole number in the digits 0-9, got {clip(repr(value))}")

    return check


def _error(status: int, field: str | None, message: str, where: str = "query") -> JSONResponse:
    loc = [where, field] if field else [where]
    return JSONResponse(status_code=status, content={"detail": [{"loc": loc, "msg": message}]})


def _where(request: Request) -> str:
    return "query" if request.method == "GET" else "body"


def _short_input(value: object) -> str:
    """An input as at most ECHO_CHARS of JSON-ish text (never a non-finite float, which JSON cannot hold)."""
    try:
        text = json.dumps(jsonable_encoder(value))
    except (TypeError, ValueError):  # ValueError: an int too long to print, among others
        text = f"<{type(value).__name__}>"
    return clip(text, ECHO_CHARS)


def _as_json(r: Recommendation) -> dict:
    out = {"user_id": r.user_id, "fallback": r.fallback, "weights": r.weights, "items": r.items}
    if r.unknown_items:
        out["unknown_items"] = r.unknown_items
    if r.unknown_features:
        out["unknown_features"] = r.unknown_features
    return {**out, "note": r.note} if r.note else out


def _one_answer(r: Recommendation, index_kind: str) -> bytes:
    """The body of a one-user answer (GET /recommend, POST /recommend with a history)."""
    return orjson.dumps({**_as_json(r), "seconds": r.seconds, "index": index_kind}, option=orjson.OPT_SERIALIZE_NUMPY)


RECOMMEND_QUERY = ("user_id", "k", "weights", "exclude_seen")
JSON_HEADERS = [(b"content-type", b"application/json")]


class FastRecommend:
    """ASGI in front of the FastAPI app: a well-formed GET /recommend for a known user is answered here, without
    FastAPI's routing, dependency injection and middleware (on JD about a third of a request's CPU, issue 17).
    Anything else, including every request this path would refuse or any spelling it does not take as is (a
    repeated parameter, `exclude_seen=True`, a non-ASCII query), goes on to the app, which answers it and words
    its errors: the two paths cannot disagree on what is valid."""

    def __init__(self, app, recommender: Recommender, batcher: Batcher):
        self.app, self.recommender, self.batcher = app, recommender, batcher  # app: the FastAPI app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == "/recommend":
            request = self._parse(scope["query_string"])
            if request is not None:
                r = self.recommender
                result = await self.batcher.recommend(r.queries([request[0]], request[2])[0], *request[1:])
                body = _one_answer(result, r.index.kind)
                await send({"type": "http.response.start", "status": 200,
                            "headers": [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]})  # fmt: skip
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    def _parse(self, query_string: bytes) -> tuple[str, int, dict[str, float], bool] | None:
        """(user_id, k, weights, exclude_seen) of a request the app would answer 200 for a known user, else None."""
        try:
            pairs = parse_qsl(query_string.decode("ascii"), keep_blank_values=True, strict_parsing=True)
        except (UnicodeDecodeError, ValueError):
            return None
        given = dict(pairs)
        if len(given) != len(pairs) or not given.keys() <= set(RECOMMEND_QUERY) or "user_id" not in given:
            return None
        r, k, exclude = self.recommender, given.get("k", "10"), given.get("exclude_seen", "true")
        if given["user_id"] not in r.user_rows or exclude not in ("true", "false") or not _DIGITS.fullmatch(k):
            return None
        try:
            r.check_request(1, int(k))
            weights = r.weights_of(given.get("weights"))
        except RequestError:
            return None
        return given["user_id"], int(k), weights, exclude == "true"


class FastJSON(JSONResponse):
    """JSON rendered by orjson (several times faster than the standard library for a top-k list); numpy
    scalars and arrays are written as numbers (a non-finite float, which JSON cannot hold, as null)."""

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def create_app(recommender: Recommender) -> FastRecommend:
    """The service: FastAPI behind the fast GET /recommend path (FastRecommend); `.app` is the FastAPI app."""
    batcher = Batcher(recommender)
    return FastRecommend(_fastapi_app(recommender, batcher), recommender, batcher)


def _fastapi_app(recommender: Recommender, batcher: Batcher) -> FastAPI:
    app = FastAPI(title="csmf", description="Multi-objective retrieval with per-request objective weights")
    app.add_middleware(BodyLimit, max_bytes=recommender.limits.max_body_bytes)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError) -> JSONResponse:
        return _error(422, err.field, err.message, _where(request))

    @app.exception_handler(UnknownUser)
    async def unknown_user(request: Request, err: UnknownUser) -> JSONResponse:
        field = err.field or ("user_id" if request.method == "GET" else "user_ids")
        message = f"unknown user {clip(repr(err.user_id))} (start the server with --fallback popularity to answer them)"
        return _error(404, field, message, _where(request))

    @app.exception_handler(UnknownItem)
    async def unknown_item(request: Request, err: UnknownItem) -> JSONResponse:
        return _error(404, "item_id", f"unknown item {clip(repr(err.item_id))}: not served here", "path")

    @app.exception_handler(NotMutable)
    async def not_mutable(request: Request, err: NotMutable) -> JSONResponse:
        return _error(409, None, f"{err}: serve with --workers 1 to change items", "path")

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, err: BodyTooLarge) -> JSONResponse:
        return _error(413, None, err.detail, "body")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        """FastAPI's 422, with `input` cut short (its default repeats a 10 MB body) and no non-finite floats."""
        errors = err.errors()
        detail = []
        for e in errors[:MAX_ERRORS]:
            loc = [str(part) for part in e.get("loc", ())]
            if loc[:1] == ["body"] and loc[1:2] in (["ids"], ["history"]):  # the POST /recommend form's tag
                loc = loc[:1] + loc[2:]
            item = {"loc": loc, "msg": clip(str(e.get("msg", "")), ECHO_CHARS)}
            item["type"] = str(e.get("type", ""))
            if "input" in e:
                item["input"] = _short_input(e["input"])
            if isinstance(e.get("ctx"), dict) and isinstance(e["ctx"].get("error"), str):
                item["ctx"] = {"error": clip(e["ctx"]["error"], ECHO_CHARS)}
            detail.append(item)
        if len(errors) > MAX_ERRORS:
            detail.append({"loc": detail[-1]["loc"][:1], "msg": f"and {len(errors) - MAX_ERRORS:,} more errors"})
        return JSONResponse(status_code=422, content={"detail": detail})

    page = resources.files("csmf.serving").joinpath("static/index.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page() -> str:
        return page  # the scenario page: one slider per objective

    @app.get("/users", dependencies=[Depends(strict_query(("limit",), integers=("limit",)))])
    def users(limit: int = Query(50, ge=1, le=1000)) -> dict:
        """The most active users (most training interactions): handy examples for the page and for curl."""
        return {"user_ids": recommender.sample_users(limit)}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/info")
    def info() -> dict:
        """The artifact, the index, the limits, and how requests were batched so far (this process)."""
        searched = {"searches": batcher.batches, "queries": batcher.searched}
        return {**recommender.info(), "batching": searched}

    recommend_query = strict_query(RECOMMEND_QUERY, integers=("k",))

    # One user's answer is a sub-millisecond search: it runs on the event loop (async, no worker-thread hop),
    # searched with the other requests ready at the same time (Batcher), and is written with orjson straight to
    # bytes. A well-formed request never gets here: FastRecommend answers it the same way, with less overhead.
    @app.get("/recommend", dependencies=[Depends(recommend_query)], response_class=FastJSON)
    async def recommend(
        user_id: str,
        k: int = Query(10, ge=1, le=MAX_K),
        weights: str | None = Query(None, description="stage:weight,... (default: the artifact's weights)"),
        exclude_seen: bool = True,
    ):
        recommender.check_request(1, k)
        parsed = recommender.weights_of(weights)
        result = await batcher.recommend(recommender.queries([user_id], parsed)[0], k, parsed, exclude_seen)
        return Response(_one_answer(result, recommender.index.kind), media_type="application/json")

    @app.post("/recommend", dependencies=[Depends(unique_json_keys)])
    async def recommend_post(request: RecommendBody):
        """Several known users by id, or one user by behaviour history ({"history": {...}}: a new user, or a known
        user's latest behaviour), answered from the user tower exported with the model."""
        if isinstance(request, HistoryRequest):
            recommender.check_request(1, request.k)
            weights = recommender.weights_of(request.weights)
            query = recommender.history_query(request.history, request.user_id, weights, request.features)
            result = await batcher.recommend(query, request.k, weights, request.exclude_seen)
            return Response(_one_answer(result, recommender.index.kind), media_type="application/json")
        result = await run_in_threadpool(
            recommender.recommend, request.user_ids, request.k, request.weights, request.exclude_seen
        )
        seconds = result[0].seconds if result else 0.0
        return {"results": [_as_json(r) for r in result], "seconds": seconds, "index": recommender.index.kind}

    @app.post("/items", dependencies=[Depends(unique_json_keys)])
    async def put_items(request: ItemsRequest):
        """Add items, or replace those already served, by vector; answers from then on include them."""
        for n, item in enumerate(request.items):
            if (item.vector is None) == (item.features is None):
                raise RequestError(f"items.{n}", "give the item's vector or its features, one of the two")
        given = [(item.item_id, item.vector if item.vector is not None else item.features) for item in request.items]
        changed = recommender.put_items(given)
        return {**changed, "items": recommender.n_items}

    @app.delete("/items/{item_id}")
    async def delete_item(item_id: str):
        """Take one item out of every answer from now on."""
        recommender.remove_items([item_id])
        return {"removed": item_id, "items": recommender.n_items}

    @app.post("/search", dependencies=[Depends(unique_json_keys)])
    def search(query: VectorQuery):
        """Top-k items for a caller's own query vector (for example a user vector computed elsewhere)."""
        items, note = recommender.search_vector(query.vector, query.k)
        return {"items": items, "index": recommender.index.kind, **({"note": note} if note else {})}

    return app
