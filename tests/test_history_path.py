"""POST /recommend with a history, answered in front of FastAPI (csmf.serving.history_path, issue 28): the same
bytes as the FastAPI route, every malformed or unusual body left to the route (so its 4xx stay as they were), the
user tower batched without changing any user's vector, and every request counted in GET /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from test_serving import _free_port, _requests_by_label, _samples, _serve_process, _train_and_export

from csmf.serving.app import create_app
from csmf.serving.artifact import load_artifact
from csmf.serving.batching import Batcher
from csmf.serving.history_path import json_length, parse_history
from csmf.serving.index import build_index
from csmf.serving.serve import Recommender, ServeLimits

FAST_TYPE = "application/json"  # the one content type the fast path reads
ROUTE_TYPE = "application/json; charset=utf-8"  # JSON to FastAPI too, but the fast path leaves it to the route
MAX_BODY = 4096  # the servers here refuse larger bodies (413), so one case reaches that limit


@pytest.fixture(scope="module")
def exported(sim_parquet, tmp_path_factory):
    """The default (graph) encoder, exported with default weights click 1, conversion 2."""
    return _train_and_export(tmp_path_factory.mktemp("history-path"), sim_parquet[0], [],
                             ["--weights", "click:1,conversion:2"])  # fmt: skip


@pytest.fixture(scope="module")
def exported_mlp(sim_parquet, tmp_path_factory):
    """The MLP encoder with a user-ID embedding and history bags."""
    train = ["--config", "mlp", "--set", "model.user_id=true"]
    return _train_and_export(tmp_path_factory.mktemp("history-path-mlp"), sim_parquet[0], train, [])


def _recommender(artifact_dir: Path) -> Recommender:
    artifact = load_artifact(artifact_dir)
    return Recommender(artifact, build_index(artifact.item_vectors), limits=ServeLimits(max_body_bytes=MAX_BODY))


class _CountingRoute:
    """ASGI around the FastAPI app: counts the requests that reach FastAPI's routing."""

    def __init__(self, app):
        self.app, self.calls = app, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/recommend":
            self.calls += 1
        await self.app(scope, receive, send)


@contextlib.contextmanager
def _serving(recommender: Recommender):
    """The service under uvicorn in a thread; yields (url, the counter of requests FastAPI's routing got)."""
    service = create_app(recommender)
    route = service.app.app = _CountingRoute(service.app.app)  # Metered -> FastRecommend -> (this) -> FastAPI
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(service, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "server did not start"
    try:
        yield f"http://127.0.0.1:{port}", route
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _post(url: str, body: bytes, content_type: str = FAST_TYPE) -> httpx.Response:
    return httpx.post(f"{url}/recommend", content=body, headers={"content-type": content_type})


def _timeless(body: bytes) -> bytes:
    """An answer's bytes without its timing (the one field two answers to one request may differ in)."""
    return re.sub(rb'"seconds":[-+.eE0-9]+', b'"seconds":0', body)


def _good_bodies(artifact, behaviours: tuple[str, ...]) -> list[bytes]:
    """Well-formed history requests of every shape the fast path takes, as JSON text."""
    ids, users = artifact.item_ids, artifact.user_ids
    first, second = behaviours[0], behaviours[-1]
    history = {first: ids[:3], second: [ids[3], ids[1], "no-such-item"]}  # an item in two behaviours; one unknown
    ints = {artifact.stages[0]: 1, artifact.stages[-1]: 2}  # integer weights are numbers too
    bodies = [
        {"history": history, "k": 10},
        {"history": history, "k": 7, "weights": ints, "exclude_seen": False},
        {"history": {first: ids[5:10]}},  # k and weights left out: the defaults
        {"history": {first: ids[2:4], second: []}, "user_id": users[3], "k": 12},  # a known user's latest
        {"history": {}, "user_id": users[4]},  # a known user and no history
        {"history": {first: [ids[0], "a:b:c", "x:y"]}, "user_id": None, "k": 5},  # ':' inside texts
        {"history": {first: [ids[6], *[f"gone-{n}" for n in range(30)]]}, "k": 3},  # unknown_items cut to 20
        {"history": {first: ids[:2]}, "k": 1000},
    ]
    text = [json.dumps(b).encode() for b in bodies]
    return [*text, json.dumps(bodies[1], indent=2).encode(), json.dumps(bodies[0], separators=(",", ":")).encode()]


def _unusual_bodies(artifact, behaviours: tuple[str, ...]) -> list[bytes]:
    """Bodies the fast path leaves to the route: refused ones, and valid ones in a form it does not read."""
    first, item, user = behaviours[0], artifact.item_ids[0], artifact.user_ids[0]
    good = json.dumps({"history": {first: [item]}, "k": 5})[1:-1]  # the members of a valid body, to extend
    one = json.dumps(first) + ": " + json.dumps([item])  # a behaviour and its items
    texts = [
        "{" + good + ', "k": 6}',  # a key twice: refused, though orjson would keep the last
        '{"history": {' + one + ", " + one + "}}",  # twice inside history
        "{" + good + ', "weights": {"click": 1, "click": 2}}',  # twice inside weights
        '{"history": {' + json.dumps(first) + ': ["\\u00e9", ' + json.dumps(item) + "]}}",  # an escape: valid
        '{"history": {' + json.dumps(first) + ': ["\\ud800"]}}',  # a lone surrogate
        "{" + good + ', "weights": {"click": NaN}}', "NaN", "", '{"history": ', "[1]",
        '{"history": {' + one + '}, "k": 18446744073709551616}',  # orjson reads it as a float
        *[json.dumps({"history": {first: [item]}, **extra}) for extra in [
            {"k": True}, {"k": 1.0}, {"k": "5"}, {"k": 0}, {"k": 1001}, {"exclude_seen": "true"}, {"user_id": 5},
            {"user_id": "nobody"}, {"features": {"user_segment": 2}}, {"extra": 1}, {"weights": {"nope": 1}},
            {"weights": {}}, {"weights": {"click": True}}, {"weights": {"click": -1}}, {"weights": [1]},
        ]],
        json.dumps({"history": {first: ["no-such-item"]}}),  # nothing to rank by: refused (no fallback here)
        json.dumps({"history": {}}), json.dumps({"history": [item]}), json.dumps({"history": {first: [1]}}),
        json.dumps({"history": {"likes": [item]}}), json.dumps({"history": {first: item}}),
        json.dumps({"user_ids": [user], "k": 3}),  # a batch of ids: the route's
        json.dumps({"history": {first: [item] * 1500}}),  # over MAX_BODY: 413
    ]  # fmt: skip
    return [text.encode() for text in texts]


@pytest.mark.parametrize("which", ["exported", "exported_mlp"])
def test_the_fast_path_answers_a_history_with_the_routes_bytes(which, request):
    recommender = _recommender(request.getfixturevalue(which)[1])
    artifact, behaviours = recommender.artifact, recommender.tower.behaviours
    good = _good_bodies(artifact, behaviours)
    assert all(parse_history(body, recommender) is not None for body in good)  # each is the fast path's
    with _serving(recommender) as (url, route):
        for body in good:
            fast = _post(url, body)
            assert route.calls == 0, body  # answered in front of FastAPI
            slow = _post(url, body, ROUTE_TYPE)
            assert route.calls == 1
            route.calls = 0
            assert fast.status_code == slow.status_code == 200, (body, slow.text)
            assert fast.headers["content-type"] == slow.headers["content-type"] == "application/json"
            assert _timeless(fast.content) == _timeless(slow.content), body  # same items, scores, keys, order
            assert fast.json()["items"], body
        sent = json.loads(good[0])["history"]
        answer = json.loads(_post(url, good[0]).content)
        assert answer["unknown_items"] == ["no-such-item"] and answer["user_id"] == ""
        assert not {i["item_id"] for i in answer["items"]} & {i for items in sent.values() for i in items}
        cut = json.loads(_post(url, good[6]).content)
        assert len(cut["unknown_items"]) == 20 and cut["unknown_items_count"] == 30


@pytest.mark.parametrize("which", ["exported", "exported_mlp"])
def test_malformed_or_unusual_history_bodies_get_the_routes_answer(which, request):
    recommender = _recommender(request.getfixturevalue(which)[1])
    artifact, behaviours = recommender.artifact, recommender.tower.behaviours
    unusual = _unusual_bodies(artifact, behaviours)
    assert all(parse_history(body, recommender) is None for body in unusual[:-1])  # the last: by its length
    with _serving(recommender) as (url, route):
        statuses = []
        for n, body in enumerate(unusual):
            read_first = _post(url, body)  # read by the fast path, then handed on to the route with its body
            assert route.calls == 2 * n + 1, body
            slow = _post(url, body, ROUTE_TYPE)
            assert read_first.status_code == slow.status_code, (body, read_first.text, slow.text)
            assert _timeless(read_first.content) == _timeless(slow.content), body
            statuses.append(read_first.status_code)
        chunked = httpx.post(f"{url}/recommend", content=iter([_good_bodies(artifact, behaviours)[0]]),
                             headers={"content-type": FAST_TYPE})  # fmt: skip
        assert chunked.status_code == 200 and route.calls == 2 * len(unusual) + 1  # no Content-Length: the route
        duplicate = _post(url, unusual[0]).json()["detail"][0]
        assert duplicate["loc"] == ["body", "k"] and "appears twice" in duplicate["msg"]
        k = _post(url, unusual[11]).json()["detail"][0]  # {"k": true}: not coerced to 1
        assert k["loc"] == ["body", "k"] and k["type"] == "int_type"
        assert _post(url, unusual[-1]).status_code == 413
    assert statuses.count(200) == 3  # the escape, the raw features and the batch of ids: valid, answered by the route
    assert 404 in statuses and all(s in (200, 404, 413, 422) for s in statuses)


def test_headers_other_than_plain_json_with_a_length_go_to_the_route():
    plain = [(b"content-type", b"application/json"), (b"content-length", b"120")]
    assert json_length(plain, 4096) == 120
    for headers in (plain[:1], plain[1:], [*plain, (b"transfer-encoding", b"chunked")], [*plain, plain[1]],
                    [(b"content-type", b"application/json; charset=utf-8"), plain[1]],
                    [plain[0], (b"content-length", b"1_0")]):  # fmt: skip
        assert json_length(headers, 4096) is None, headers
    assert json_length(plain, 119) is None  # over the body limit: the route's 413


def _histories(recommender: Recommender) -> list[tuple[dict[str, list[str]], str | None]]:
    """Histories of every kind the tower reads: known users, items in several behaviours, items added or replaced
    while serving (no training row or edge), unknown ids, long and short."""
    ids, users, behaviours = recommender.item_ids, recommender.artifact.user_ids, recommender.tower.behaviours
    rng = np.random.default_rng(5)
    out = []
    for n in range(14):
        history = {b: [ids[int(i)] for i in rng.integers(0, len(ids), int(rng.integers(0, 9)))] for b in behaviours}
        history[behaviours[0]] += ["fresh", ids[11], "no-such-item"] if n % 3 == 0 else [ids[40]]
        out.append((history, users[n] if n % 4 == 1 else None))
    return out


@pytest.mark.parametrize("which", ["exported", "exported_mlp"])
def test_histories_ready_together_get_the_vectors_and_answers_each_gets_alone(which, request):
    """The tower runs once for every history ready in a turn of the event loop; a user's vector (its bits) and
    answer do not depend on which others were in the batch."""
    recommender = _recommender(request.getfixturevalue(which)[1])
    recommender.put_items([("fresh", [0.25] * recommender.artifact.dim),
                           (recommender.item_ids[11], [-0.5] * recommender.artifact.dim)])  # fmt: skip
    histories = _histories(recommender)
    weights = [recommender.weights_of({recommender.stages[n % len(recommender.stages)]: 1.0}) for n in range(14)]
    alone = [recommender.history_query(h, u, w) for (h, u), w in zip(histories, weights, strict=True)]
    sent = [recommender.history_rows(h, u, None) for h, u in histories]
    for batch in (list(range(14)), list(range(13, -1, -2)), [3]):
        queries = recommender.history_queries([sent[n] for n in batch], [weights[n] for n in batch])
        for n, query in zip(batch, queries, strict=True):
            assert query.raw.tobytes() == alone[n].raw.tobytes() and query.vector.tobytes() == alone[n].vector.tobytes()
            assert query.seen.tolist() == alone[n].seen.tolist() and query.unknown_items == alone[n].unknown_items
    batcher = Batcher(recommender)
    users = recommender.artifact.user_ids[:3]

    async def together():
        asked = [
            batcher.recommend_history(s, 6, w, n % 2 == 0) for n, (s, w) in enumerate(zip(sent, weights, strict=True))
        ]
        known = [batcher.recommend(recommender.queries([u], weights[0])[0], 6, weights[0], True) for u in users]
        return await asyncio.gather(*asked, *known)

    answers = asyncio.run(together())
    assert batcher.batches == 2 and batcher.searched == 17  # one search per exclude_seen setting, histories and all
    for n, got in enumerate(answers[:14]):
        want = recommender.answer(alone[n], recommender._top([alone[n]], [6], n % 2 == 0)[0], 6, weights[n],
                                  n % 2 == 0, 0.0)  # fmt: skip
        assert got.items == want.items and got.note == want.note and got.unknown_items == want.unknown_items


async def _load(url: str, bodies: list[tuple[str, str, bytes]], connections: int) -> dict[tuple[str, str], int]:
    """Every request sent over `connections` kept-alive connections at once; (method, status) -> answers."""
    counts: dict[tuple[str, str], int] = {}
    queue = list(bodies)

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            while queue:
                method, target, body = queue.pop()
                if method == "GET":
                    response = await http.get(target)
                else:
                    response = await http.post(target, content=body, headers={"content-type": FAST_TYPE})
                key = (method, str(response.status_code))
                counts[key] = counts.get(key, 0) + 1

    await asyncio.gather(*(client() for _ in range(connections)))
    return counts


def _mixed_load(recommender: Recommender, n: int) -> list[tuple[str, str, bytes]]:
    """n requests: known-user GETs, histories (fast path), and bodies the route answers (a 422, a batch of ids)."""
    artifact, first = recommender.artifact, recommender.tower.behaviours[0]
    out = []
    for i in range(n):
        ids = [artifact.item_ids[(7 * i + j) % len(artifact.item_ids)] for j in range(5)]
        kind = i % 4
        if kind == 0:
            out.append(("GET", f"/recommend?user_id={artifact.user_ids[i % 50]}&k=10", b""))
        elif kind == 1:
            out.append(("POST", "/recommend", json.dumps({"history": {first: ids}, "k": 10}).encode()))
        elif kind == 2:
            out.append(("POST", "/recommend", json.dumps({"history": {first: ids}, "k": 0}).encode()))  # 422
        else:
            out.append(("POST", "/recommend", json.dumps({"user_ids": artifact.user_ids[:2], "k": 4}).encode()))
    return out


def test_metrics_count_every_request_of_a_concurrent_load_on_both_paths(exported):
    """The /metrics count against the client's own, as a load generator checks it (wrk in README's measurement)."""
    recommender = _recommender(exported[1])
    load = _mixed_load(recommender, 400)
    with _serving(recommender) as (url, _):
        before = _requests_by_label(_samples(httpx.get(f"{url}/metrics").text))
        sent = asyncio.run(_load(url, load, 16))
        after = _requests_by_label(_samples(httpx.get(f"{url}/metrics").text))
    assert sent == {("GET", "200"): 100, ("POST", "200"): 200, ("POST", "422"): 100}
    counted = {(m, s): after.get((m, "/recommend", s), 0) - before.get((m, "/recommend", s), 0) for m, s in sent}
    assert counted == sent


def _per_worker(metrics_dir: Path, scratch: Path, label: tuple[str, str, str]) -> dict[str, float]:
    """Requests with `label` (method, route, status) each worker counted, from its own metrics file."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    counts = {}
    for file in metrics_dir.glob("counter_*.db"):
        one = scratch / file.stem
        one.mkdir(parents=True, exist_ok=True)
        shutil.copy(file, one / file.name)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(one))
        counts[file.stem] = _requests_by_label(_samples(generate_latest(registry).decode())).get(label, 0.0)
    return counts


def test_with_two_workers_the_history_fast_path_is_counted_by_both(exported, tmp_path):
    url, process = _serve_process(exported[1], tmp_path, "--workers", "2")
    recommender = _recommender(exported[1])
    try:
        metrics_dir = next((tmp_path / "tmp").glob("csmf-serve-*/metrics"))
        deadline = time.time() + 180
        while len(list(metrics_dir.glob("counter_*.db"))) < 2 and time.time() < deadline:
            time.sleep(0.2)  # a worker writes its file once its service is built: /health may come from the first
        label, sent, per_worker = ("POST", "/recommend", "200"), {}, {}
        for _ in range(40):  # rounds of new connections, until each worker has answered some
            counts = asyncio.run(_load(url, _mixed_load(recommender, 40), 8))
            sent = {key: sent.get(key, 0) + n for key, n in counts.items()}
            per_worker = _per_worker(metrics_dir, tmp_path / "scratch", label)
            if len([n for n in per_worker.values() if n > 0]) == 2:
                break
        assert len(per_worker) == 2 and min(per_worker.values()) > 0
        assert sum(per_worker.values()) == sent[("POST", "200")]
        for _ in range(4):  # either worker answers the scrape with both workers' counts
            counted = _requests_by_label(_samples(httpx.get(f"{url}/metrics").text))
            assert {(m, s): counted.get((m, "/recommend", s), 0) for m, s in sent} == sent
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert process.returncode == 0
