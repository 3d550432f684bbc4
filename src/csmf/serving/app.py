"""The HTTP layer of `csmf serve` (FastAPI): routes, request models, input strictness and error mapping only.

GET  /recommend?user_id=..&k=..&weights=click:0.3,purchase:0.7&exclude_seen=true
POST /recommend  {"user_ids": [...], "k": 10, "weights": {"click": 0.3}, "exclude_seen": true}
POST /recommend  {"history": {"view": ["6741"], "purchase": []}, "k": 10, ...}: one user by behaviour history
POST /search     {"vector": [...], "k": 10}: top-k for a caller's own query vector
POST /items      {"items": [{"item_id": "x", "vector": [...]}]}: add or replace items; DELETE /items/{id}
                 (off unless the server has a write token; then `Authorization: Bearer <token>`, see WriteGuard)
GET  /health, GET /info, GET /users (example user ids); GET / is the scenario page; OpenAPI docs at /docs.
GET  /metrics: Prometheus text (csmf.serving.metrics); every request is counted and timed by its route template.

Bad input answers 422 with the field named in `loc`; an unknown user 404 (or the popularity fallback); a body
over ServeLimits.max_body_bytes 413. Input is read strictly, so an ambiguous request is refused rather than
guessed at: JSON types are not coerced (`"k": true` is not 1), unknown or repeated keys and query parameters
are refused, query integers are ASCII digits only (not `1_0`, not full-width digits), and text must be valid
Unicode (a JSON lone surrogate such as "\\ud800" has no UTF-8 form, so no answer could carry it). A list
longer than this server takes is refused from its length, and a list of ids or numbers stops at its first
wrong item, before any item-by-item validation (bounded time for any body). Error bodies never echo an input
whole: `input` is cut to a short text, and unknown_items / unknown_features list a few ids, each cut short.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import re
from collections.abc import Callable, Coroutine
from importlib import resources
from typing import Annotated, Any
from urllib.parse import parse_qsl

import anyio
import orjson
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag
from pydantic_core import PydanticCustomError

from csmf.fusion import clip
from csmf.serving import history_path
from csmf.serving.batching import Batcher
from csmf.serving.metrics import Metered, ServiceMetrics
from csmf.serving.serve import (
    MAX_K,
    NotMutable,
    Recommendation,
    Recommender,
    RequestError,
    UnknownItem,
    UnknownUser,
    check_history_length,
)

_DIGITS = re.compile(r"[0-9]{1,9}")
ECHO_CHARS = 200  # the most of an input an error body repeats
ECHO_ITEMS = 20  # the most entries of a list or object an error body repeats
ECHO_IDS, ECHO_ID_CHARS = 20, 64  # the most ids an answer's unknown_items / unknown_features list, each cut to this
MAX_ERRORS = 10  # the most validation errors one 422 lists (100,000 ids of the wrong type would be 100,000)


def _unencodable(text: str) -> str | None:
    """Where `text` cannot be written as UTF-8 (a lone surrogate, which JSON's \\uXXXX escapes can spell and
    Python decodes, but which neither orjson nor any answer can carry), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"{ord(text[err.start]):04X} at character {err.start}"
    return None


def _text(text: str) -> str:
    """A text field that every answer can carry back: an item id stored with a lone surrogate made every answer
    holding it a 500, and no DELETE could name it (issue 27)."""
    if (where := _unencodable(text)) is not None:
        raise PydanticCustomError("string_unicode", "holds a lone surrogate (U+{where}), which no UTF-8 text can: "
                                  "send valid Unicode", {"where": where})  # fmt: skip
    return text


def _ids(value: object) -> object:
    """A list of ids checked in one pass before pydantic reads it item by item, so a long list of wrong items is
    one error, not one each (400,000 of them: 1 s), and an id that no answer can carry is refused."""
    if not isinstance(value, list):
        return value  # pydantic says what it should be
    wrong = next((n for n, item in enumerate(value) if type(item) is not str), None)
    if wrong is not None:
        raise PydanticCustomError("string_type", "item {n} should be a text (an id), got {kind}",
                                  {"n": wrong, "kind": type(value[wrong]).__name__})  # fmt: skip
    if _unencodable("".join(value)) is not None:  # one encode for the list; the item only when one is wrong
        n, where = next((n, w) for n, item in enumerate(value) if (w := _unencodable(item)) is not None)
        raise PydanticCustomError("string_unicode", "item {n} holds a lone surrogate (U+{where}), which no UTF-8 "
                                  "text can: send valid Unicode", {"n": n, "where": where})  # fmt: skip
    return value


def _numbers(value: object) -> object:
    """A vector checked in one pass: its first entry that is not a number is the one error."""
    if isinstance(value, list):
        wrong = next((n for n, x in enumerate(value) if type(x) not in (float, int)), None)
        if wrong is not None:
            raise PydanticCustomError("float_type", "entry {n} should be a number, got {kind}",
                                      {"n": wrong, "kind": type(value[wrong]).__name__})  # fmt: skip
    return value


def _features(value: object) -> object:
    """Raw features checked in one pass: names and text values must be valid Unicode, values texts or numbers."""
    if not isinstance(value, dict):
        return value
    for name, raw in value.items():
        if (where := _unencodable(name)) is not None:
            raise PydanticCustomError("string_unicode", "feature name {name} holds a lone surrogate (U+{where}): "
                                      "send valid Unicode", {"name": clip(ascii(name)), "where": where})  # fmt: skip
        if type(raw) not in (str, int, float):
            raise PydanticCustomError("feature_type", "feature {name} should be a text or a number, got {kind}",
                                      {"name": clip(ascii(name)), "kind": type(raw).__name__})  # fmt: skip
        if isinstance(raw, str) and (where := _unencodable(raw)) is not None:
            raise PydanticCustomError("string_unicode", "feature {name} holds a lone surrogate (U+{where}): send "
                                      "valid Unicode", {"name": clip(ascii(name)), "where": where})  # fmt: skip
    return value


Text = Annotated[str, AfterValidator(_text)]
Ids = Annotated[list[str], BeforeValidator(_ids)]
Vector = Annotated[list[float], BeforeValidator(_numbers)]
Features = Annotated[dict[str, str | int | float], BeforeValidator(_features)]


class BatchRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    user_ids: Ids = Field(min_length=1)  # at most ServeLimits.max_ids: bounded_body checks it first
    k: int = Field(10, ge=1, le=MAX_K)
    weights: dict[str, float] | None = None  # None = the artifact's default weights
    exclude_seen: bool = True


class HistoryRequest(BaseModel):
    """One user sent as a behaviour history (item ids per behaviour): the user tower computes the vector."""

    model_config = ConfigDict(strict=True, extra="forbid")

    history: dict[str, Ids]  # behaviour -> item ids, e.g. {"view": ["6741", "2697"], "purchase": []}
    user_id: Text | None = None  # a known user whose ID embedding and features the tower reads (optional)
    features: Features | None = None  # a new user's raw features (GET /info: user_features)
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

    item_id: Text
    vector: Vector | None = None  # the item's vector in the artifact's space, or
    features: Features | None = None  # its raw features, through the item tower (at least one)


class ItemsRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    items: list[NewItem] = Field(min_length=1)  # at most ServeLimits.max_ids


class VectorQuery(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    vector: Vector  # a query vector of the artifact's dimension, weights already folded in if any
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


class WriteGuard:
    """ASGI middleware in front of every path under /items (POST /items, DELETE /items/{id}: they change what every
    later answer holds). Without a write token (csmf serve without --allow-writes) they answer 403; with one, a
    request needs `Authorization: Bearer <token>`: 401 when the header is missing or not that form, 403 when the
    token is wrong. Checked before the body is read, and in constant time (hmac.compare_digest of the sha256
    digests, so neither the bytes nor the length of the token leak through timing)."""

    def __init__(self, app, token: str | None):
        self.app = app
        self.digest = None if token is None else hashlib.sha256(token.encode()).digest()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (scope["path"] == "/items" or scope["path"].startswith("/items/")):
            refusal = self.refusal([value for name, value in scope["headers"] if name == b"authorization"])
            if refusal is not None:
                return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)

    def refusal(self, given: list[bytes]) -> JSONResponse | None:
        """The answer refusing a request with these Authorization headers, or None to let it through."""
        if self.digest is None:
            return _error(403, None, "item changes are off in this server: start csmf serve with --allow-writes "
                          "and a write token (CSMF_WRITE_TOKEN or --write-token-file; docs/security.md)",
                          "path")  # fmt: skip
        scheme, _, token = given[0].strip().partition(b" ") if len(given) == 1 else (b"", b"", b"")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token or b" " in token:
            answer = _error(401, "authorization", "send the write token as one header `Authorization: Bearer "
                            "<token>`", "header")  # fmt: skip
            answer.headers["www-authenticate"] = 'Bearer realm="csmf items"'
            return answer
        if not hmac.compare_digest(hashlib.sha256(token).digest(), self.digest):
            return _error(403, "authorization", "wrong write token", "header")
        return None


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


def bounded_body(recommender: Recommender) -> Callable[[Request], Coroutine[Any, Any, None]]:
    """A dependency refusing a JSON body whose lists or objects are longer than this server takes, from their
    lengths alone. FastAPI runs it before it validates the body, and the limits are this server's (the request
    models are shared), so a 400,000-id body is one 422 at once instead of 400,000 validation errors built on
    the event loop first (3.5 s, issue 27). It reads the body FastAPI has already parsed."""
    limits, dim, stages = recommender.limits, recommender.artifact.dim, recommender.stages
    behaviours = recommender.tower.behaviours if recommender.tower is not None else None  # None: no histories

    def longer(value: object, most: int) -> bool:
        return isinstance(value, list | dict) and len(value) > most

    async def check(request: Request) -> None:
        try:
            body = await request.json()
        except ValueError:
            return  # not JSON: FastAPI answers that
        if not isinstance(body, dict):
            return
        if isinstance(ids := body.get("user_ids"), list):
            recommender.check_request(len(ids), 1)  # the ids alone, at the smallest k
        if longer(items := body.get("items"), limits.max_ids):
            recommender.check_items(len(items))
        vectors = [("vector", body.get("vector"))]
        if isinstance(items, list):
            vectors += [(f"items.{n}.vector", i.get("vector")) for n, i in enumerate(items) if isinstance(i, dict)]
        for field, vector in vectors:
            if longer(vector, dim):
                raise RequestError(field, f"must be a list of {dim} numbers, got {len(vector):,}")
        if longer(weights := body.get("weights"), len(stages)):
            raise RequestError("weights", f"{len(weights):,} weights for the {len(stages)} objectives {list(stages)}")
        if isinstance(history := body.get("history"), dict) and behaviours is not None:
            if len(history) > len(behaviours):
                raise RequestError("history", f"{len(history):,} behaviours; this model reads {list(behaviours)}")
            check_history_length(sum(len(items) for items in history.values() if isinstance(items, list)))

    return check


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


def _printable(text: str, limit: int = ECHO_CHARS) -> str:
    """Text an error body can carry: cut short, a lone surrogate written as its escape (UTF-8 has none)."""
    return clip(text, limit).encode("utf-8", "backslashreplace").decode("utf-8")


def _error(status: int, field: str | None, message: str, where: str = "query") -> JSONResponse:
    loc = [where, _printable(field)] if field else [where]
    return JSONResponse(status_code=status, content={"detail": [{"loc": loc, "msg": _printable(message, 1000)}]})


def _where(request: Request) -> str:
    return "query" if request.method == "GET" else "body"


def _first_entries(value: object, depth: int = 0) -> object:
    """`value` with each list and object cut to its first ECHO_ITEMS entries, three levels deep: what an error
    body may show of it, found without reading a 400,000-item list."""
    if isinstance(value, list | tuple):
        return [_first_entries(v, depth + 1) for v in value[:ECHO_ITEMS]] if depth < 3 else ["..."]
    if isinstance(value, dict):
        entries = itertools.islice(value.items(), ECHO_ITEMS)
        return {str(k): _first_entries(v, depth + 1) for k, v in entries} if depth < 3 else {"...": "..."}
    return value


def _short_input(value: object) -> str:
    """An input as at most ECHO_CHARS of JSON-ish text (never a non-finite float, which JSON cannot hold)."""
    try:
        text = json.dumps(jsonable_encoder(_first_entries(value)))
    except (TypeError, ValueError):  # ValueError: an int too long to print, among others
        text = f"<{type(value).__name__}>"
    return clip(text, ECHO_CHARS)


def _echoed(ids: list[str]) -> list[str]:
    """What an answer repeats of the ids it could not use: the first ECHO_IDS, each cut to ECHO_ID_CHARS."""
    return [clip(i, ECHO_ID_CHARS) for i in ids[:ECHO_IDS]]


def _as_json(r: Recommendation) -> dict:
    out = {"user_id": r.user_id, "fallback": r.fallback, "weights": r.weights, "items": r.items}
    for name, ids in (("unknown_items", r.unknown_items), ("unknown_features", r.unknown_features)):
        if ids:
            out[name] = _echoed(ids)
            if len(ids) > ECHO_IDS:  # the whole count, when the list is cut
                out[f"{name}_count"] = len(ids)
    return {**out, "note": r.note} if r.note else out


def _one_answer(r: Recommendation, index_kind: str) -> bytes:
    """The body of a one-user answer (GET /recommend, POST /recommend with a history)."""
    return orjson.dumps({**_as_json(r), "seconds": r.seconds, "index": index_kind}, option=orjson.OPT_SERIALIZE_NUMPY)


def _batch_answer(recommender: Recommender, request: BatchRequest, metrics: ServiceMetrics) -> bytes:
    """The body of a POST /recommend batch answer (run off the event loop: up to ServeLimits.max_results items)."""
    result = recommender.recommend(request.user_ids, request.k, request.weights, request.exclude_seen)
    if searched := sum(not r.fallback for r in result):  # the known users' queries, searched as one batch
        metrics.searched(searched, "request")
    metrics.served(sum(len(r.items) for r in result))
    seconds = result[0].seconds if result else 0.0
    answer = {"results": [_as_json(r) for r in result], "seconds": seconds, "index": recommender.index.kind}
    return orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)


RECOMMEND_QUERY = ("user_id", "k", "weights", "exclude_seen")
JSON_HEADERS = [(b"content-type", b"application/json")]


class FastRecommend:
    """ASGI in front of the FastAPI app: a well-formed GET /recommend for a known user, and a well-formed POST
    /recommend of one user's history (csmf.serving.history_path), are answered here, without FastAPI's routing,
    dependency injection, validation and middleware (on JD about a third of a request's CPU, issues 17 and 28).
    Anything else, including every request this path would refuse or any spelling it does not take as is (a
    repeated parameter, `exclude_seen=True`, a non-ASCII query, a JSON escape), goes on to the app, which answers
    it and words its errors: the two paths cannot disagree on what is valid."""

    def __init__(self, app, recommender: Recommender, batcher: Batcher, metrics: ServiceMetrics | None = None):
        self.app, self.recommender, self.batcher = app, recommender, batcher  # app: the FastAPI app
        self.metrics = metrics  # counts the items served (the requests are counted in front, by Metered)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/recommend":
            if scope["method"] == "GET":
                request = self._parse(scope["query_string"])
                if request is not None:
                    r = self.recommender
                    return await self._answer(
                        send, await self.batcher.recommend(r.queries([request[0]], request[2])[0], *request[1:])
                    )
            elif scope["method"] == "POST" and self.recommender.tower is not None:
                return await self._post(scope, receive, send)
        await self.app(scope, receive, send)

    async def _post(self, scope, receive, send) -> None:
        """A history answered here when its body is one the fast path takes, else the app answers (its body
        handed on as read)."""
        if history_path.json_length(scope["headers"], self.recommender.limits.max_body_bytes) is None:
            return await self.app(scope, receive, send)
        body, received = await history_path.read_body(receive)
        ask = None if body is None else history_path.parse_history(body, self.recommender)
        if ask is None:
            return await self.app(scope, history_path.replaying(received, receive), send)
        await self._answer(send, await self.batcher.recommend_history(ask.sent, ask.k, ask.weights, ask.exclude_seen))

    async def _answer(self, send, result: Recommendation) -> None:
        body = _one_answer(result, self.recommender.index.kind)
        if self.metrics is not None:
            self.metrics.served(len(result.items))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})

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


def create_app(recommender: Recommender, write_token: str | None = None, multiprocess: bool = False) -> Metered:
    """The service: FastAPI behind the fast GET and POST /recommend paths (FastRecommend), behind the request metrics
    (Metered); `.app.app` is the FastAPI app. `write_token`: the bearer token POST /items and DELETE /items/{id}
    require; None = they answer 403. `multiprocess`: one of several workers (`csmf serve --workers`), whose
    GET /metrics reads every worker's values from PROMETHEUS_MULTIPROC_DIR."""
    metrics = ServiceMetrics(recommender.artifact.manifest, recommender.n_items, multiprocess)
    batcher = Batcher(recommender, on_search=metrics.searched)
    app = _fastapi_app(recommender, batcher, write_token, metrics)
    return Metered(FastRecommend(app, recommender, batcher, metrics), metrics, app.routes, recommender)


def _fastapi_app(
    recommender: Recommender, batcher: Batcher, write_token: str | None, metrics: ServiceMetrics
) -> FastAPI:
    app = FastAPI(title="csmf", description="Multi-objective retrieval with per-request objective weights")
    app.add_middleware(BodyLimit, max_bytes=recommender.limits.max_body_bytes)
    app.add_middleware(WriteGuard, token=write_token)  # added last, so it runs first: before the body is read

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
        """FastAPI's 422, with `input` cut short (its default repeats a 10 MB body), no non-finite floats, and
        every text printable (a key in `loc` may be a long or lone-surrogate input)."""
        errors = err.errors()
        detail = []
        for e in errors[:MAX_ERRORS]:
            loc = [_printable(str(part), ECHO_ID_CHARS) for part in e.get("loc", ())]
            if loc[:1] == ["body"] and loc[1:2] in (["ids"], ["history"]):  # the POST /recommend form's tag
                loc = loc[:1] + loc[2:]
            item = {"loc": loc, "msg": _printable(str(e.get("msg", "")))}
            item["type"] = str(e.get("type", ""))
            if "input" in e:
                item["input"] = _short_input(e["input"])
            if isinstance(e.get("ctx"), dict) and isinstance(e["ctx"].get("error"), str):
                item["ctx"] = {"error": _printable(e["ctx"]["error"])}
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
        return {**recommender.info(), "batching": searched, "item_writes": write_token is not None}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics_text() -> Response:
        """Prometheus text: requests by route template and status, latency, queries per search, items served
        and changed, index size, the artifact's manifest digest (every worker's, with --workers)."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    recommend_query = strict_query(RECOMMEND_QUERY, integers=("k",))
    # batches of user ids queue for one worker thread: two batches at once would double the threads taking the
    # interpreter (and the search lock) from the event loop, where the one-user requests are answered
    batch_lane = anyio.CapacityLimiter(1)
    bounded = Depends(bounded_body(recommender))  # before any other check of a body: it is the cheapest

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
        metrics.served(len(result.items))
        return Response(_one_answer(result, recommender.index.kind), media_type="application/json")

    @app.post("/recommend", dependencies=[bounded, Depends(unique_json_keys)])
    async def recommend_post(request: RecommendBody):
        """Several known users by id, or one user by behaviour history ({"history": {...}}: a new user, or a known
        user's latest behaviour), answered from the user tower exported with the model. A well-formed history
        without raw features is answered in front of this route, the same way (FastRecommend)."""
        if isinstance(request, HistoryRequest):
            recommender.check_request(1, request.k)
            weights = recommender.weights_of(request.weights)
            query = recommender.history_query(request.history, request.user_id, weights, request.features)
            result = await batcher.recommend(query, request.k, weights, request.exclude_seen)
            metrics.served(len(result.items))
            return Response(_one_answer(result, recommender.index.kind), media_type="application/json")
        # searched, described and written to bytes on a worker thread (built on the event loop, the largest batch's
        # 20,000 items held every other request for about 0.3 s, issue 27), one batch at a time (batch_lane)
        body = await anyio.to_thread.run_sync(_batch_answer, recommender, request, metrics, limiter=batch_lane)
        return Response(body, media_type="application/json")

    @app.post("/items", dependencies=[bounded, Depends(unique_json_keys)])
    async def put_items(request: ItemsRequest):
        """Add items, or replace those already served, by vector; answers from then on include them."""
        for n, item in enumerate(request.items):
            if (item.vector is None) == (item.features is None):
                raise RequestError(f"items.{n}", "give the item's vector or its features, one of the two")
        given = [(item.item_id, item.vector if item.vector is not None else item.features) for item in request.items]
        changed = recommender.put_items(given)
        metrics.changed(recommender.n_items, added=len(changed["added"]), replaced=len(changed["replaced"]))
        if "unknown_features" in changed:
            changed["unknown_features"] = {i: _echoed(names) for i, names in changed["unknown_features"].items()}
        return {**changed, "items": recommender.n_items}

    @app.delete("/items/{item_id}")
    async def delete_item(item_id: str):
        """Take one item out of every answer from now on."""
        recommender.remove_items([item_id])
        metrics.changed(recommender.n_items, removed=1)
        return {"removed": item_id, "items": recommender.n_items}

    @app.post("/search", dependencies=[bounded, Depends(unique_json_keys)])
    def search(query: VectorQuery):
        """Top-k items for a caller's own query vector (for example a user vector computed elsewhere)."""
        items, note = recommender.search_vector(query.vector, query.k)
        metrics.served(len(items))
        return {"items": items, "index": recommender.index.kind, **({"note": note} if note else {})}

    return app
