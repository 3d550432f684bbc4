"""The POST /recommend history fast path: which bodies it answers in front of FastAPI, and reading them.

csmf.serving.app.FastRecommend answers a well-formed `{"history": {...}, "k": .., "weights": {..}}` here, without
FastAPI's routing, dependencies and pydantic (on JD about a third of such a request's CPU before, issue 28), and the
user tower runs for every history ready in one turn of the event loop (Batcher.recommend_history). It takes a body
only when the app would answer it 200 from the same fields; anything else (an escape in the text, a key given
twice, raw features, an unknown user or behaviour, a history naming nothing served, a value of the wrong type)
goes on to the app with its body, so every refusal and its wording stay the app's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from csmf.serving.serve import Recommender, RequestError, SentHistory, UnknownUser

FIELDS = frozenset(("history", "user_id", "k", "weights", "exclude_seen"))  # HistoryRequest's, less `features`
DEFAULT_K = 10  # HistoryRequest.k's default
Message = dict[str, Any]


@dataclass(frozen=True)
class HistoryAsk:
    """A history request the fast path answers: what Batcher.recommend_history takes."""

    sent: SentHistory
    k: int
    weights: dict[str, float]
    exclude_seen: bool


def json_length(headers: list[tuple[bytes, bytes]], max_bytes: int) -> int | None:
    """The body's length when the headers are the plain form (one `content-type: application/json`, one
    Content-Length within `max_bytes`, no Transfer-Encoding), else None: the app reads the body."""
    types = [value for name, value in headers if name == b"content-type"]
    lengths = [value for name, value in headers if name == b"content-length"]
    if types != [b"application/json"] or len(lengths) != 1 or not lengths[0].isdigit():
        return None
    if any(name == b"transfer-encoding" for name, _ in headers) or int(lengths[0]) > max_bytes:
        return None
    return int(lengths[0])


async def read_body(receive: Callable[[], Awaitable[Message]]) -> tuple[bytes | None, list[Message]]:
    """(the whole body, or None when the client went away first; every message received, to hand on)."""
    received, chunks = [], []
    while True:
        message = await receive()
        received.append(message)
        if message["type"] != "http.request":
            return None, received
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), received


def replaying(received: list[Message], receive: Callable[[], Awaitable[Message]]) -> Callable[[], Awaitable[Message]]:
    """A receive that gives the app the messages already read, then the server's."""
    queue = list(received)

    async def replay() -> Message:
        return queue.pop(0) if queue else await receive()

    return replay


def parse_history(body: bytes, recommender: Recommender) -> HistoryAsk | None:
    """The request in `body` when the app would answer it 200 for a user sent as a history without raw features,
    else None (the app answers, or refuses in its words)."""
    if b"\\" in body:  # an escape (perhaps a lone surrogate): the app reads it; without any, the count below holds
        return None
    try:
        given = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(given) is not dict or not given.keys() <= FIELDS:
        return None
    history, user_id, weights = given.get("history"), given.get("user_id"), given.get("weights")
    k, exclude_seen = given.get("k", DEFAULT_K), given.get("exclude_seen", True)
    # the request model's strict types: no coercion (a bool is not an int, an int is a float)
    if type(history) is not dict or type(k) is not int or type(exclude_seen) is not bool:
        return None
    if (user_id is not None and type(user_id) is not str) or (weights is not None and type(weights) is not dict):
        return None
    if weights is not None and any(type(w) not in (float, int) for w in weights.values()):
        return None
    texts = [*given, *history, *(weights or ()), user_id or ""]
    for items in history.values():
        if type(items) is not list or any(type(i) is not str for i in items):
            return None
        texts.append("".join(items))
    # a key given twice is refused by the app but silently kept once by orjson: every ':' of the body outside
    # the texts separates one key from its value, so a body without escapes has as many as the objects read
    members = len(given) + len(history) + len(weights or ())
    if body.count(b":") != members + sum(text.count(":") for text in texts):
        return None
    try:
        recommender.check_request(1, k)
        checked = recommender.weights_of(weights)
        sent = recommender.history_rows(history, user_id, None)
    except (RequestError, UnknownUser):
        return None
    if sent.user_row is None and not sent.names_items:  # nothing to rank by: refused, or the popularity fallback
        return None
    return HistoryAsk(sent, k, checked, exclude_seen)
