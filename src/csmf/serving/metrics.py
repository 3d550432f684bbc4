"""The Prometheus metrics of `csmf serve` (GET /metrics, prometheus-client's text format): requests by route and
status, latency, queries per index search, items served and changed, the index size and the artifact served.

With several worker processes (`csmf serve --workers N`) the parent gives them one fresh folder in
PROMETHEUS_MULTIPROC_DIR before they start, and prometheus-client's multiprocess mode keeps each worker's values
in files there: a scrape answered by any worker sums every worker's counts. Labels are bounded and carry nothing a
client sent: a route is its template ("/items/{item_id}", never the path asked for), a method outside the HTTP
methods is OTHER, and no label holds a user id, an item id or a weight.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client reads it when it is first imported
# seconds: a known user's answer takes about a millisecond, the largest batch about a second
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # queries in one index search
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"  # the route label of a path no route takes (a 404): one label, whatever was asked
CHANGES = ("added", "replaced", "removed")


class ServiceMetrics:
    """The service's metrics, in a registry of its own (several apps in one process, as in the tests, do not
    collide). `multiprocess`: this process is one of several workers sharing PROMETHEUS_MULTIPROC_DIR; a scrape
    then reads every worker's files."""

    def __init__(self, manifest: dict, n_items: int, multiprocess: bool = False):
        # prometheus-client picks its value store once, at import: files only if the folder was set by then
        if multiprocess and not (os.environ.get(MULTIPROC_ENV) and values.ValueClass is not values.MutexValue):
            raise RuntimeError(f"metrics of several workers need {MULTIPROC_ENV} set to a folder before "
                               "prometheus_client is first imported (csmf serve --workers sets it)")  # fmt: skip
        self.multiprocess = multiprocess
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("csmf_requests", "HTTP requests answered, by route template, method and status",
                                ["route", "method", "status"], registry=registry)  # fmt: skip
        self.latency = Histogram("csmf_request_duration_seconds", "Time from a request's headers to its answer's "
                                 "last byte handed to the server, by route template and method", ["route", "method"],
                                 buckets=LATENCY_BUCKETS, registry=registry)  # fmt: skip
        self.batch_queries = Histogram("csmf_search_batch_queries", "Queries searched together: one-user requests "
                                       "ready in one turn of the event loop (batcher), or the ids of one POST "
                                       "/recommend (request)", ["source"], buckets=BATCH_BUCKETS,
                                       registry=registry)  # fmt: skip
        self.items_served = Counter("csmf_items_served", "Items returned in answers (recommendations and searches)",
                                    registry=registry)  # fmt: skip
        self.item_changes = Counter("csmf_item_changes", "Items added, replaced or removed over HTTP", ["change"],
                                    registry=registry)  # fmt: skip
        # every worker holds the same catalogue (items are fixed with several): the latest value written is it
        self.index_items = Gauge("csmf_index_items", "Items the index serves", registry=registry,
                                 multiprocess_mode="mostrecent")  # fmt: skip
        self.artifact = Gauge("csmf_artifact_info", "The artifact served (value 1): its manifest digest, model and "
                              "objectives", ["manifest_sha256", "model", "stages"], registry=registry,
                              multiprocess_mode="max")  # fmt: skip
        tower = manifest.get("user_tower") or {}
        model = f"csmf-{tower['kind']}" if tower.get("kind") else "csmf"
        self.artifact.labels(manifest.get("manifest_sha256", ""), model, ",".join(manifest["stages"])).set(1)
        self.index_items.set(n_items)
        for change in CHANGES:  # shown at 0 before the first change, so a rate over them starts from a value
            self.item_changes.labels(change)
        self._batcher, self._batch_request = self.batch_queries.labels("batcher"), self.batch_queries.labels("request")
        self._answered: dict[tuple[str, str, int], tuple] = {}  # (route, method, status) -> its two children

    def answered(self, route: str, method: str, status: int, seconds: float) -> None:
        """One request answered: its count and its time. Children are looked up once per label set (bounded)."""
        children = self._answered.get((route, method, status))
        if children is None:
            children = (self.requests.labels(route, method, str(status)), self.latency.labels(route, method))
            self._answered[(route, method, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def searched(self, queries: int, source: str = "batcher") -> None:
        (self._batcher if source == "batcher" else self._batch_request).observe(queries)

    def served(self, items: int) -> None:
        self.items_served.inc(items)

    def changed(self, n_items: int, **counts: int) -> None:
        """Items changed over HTTP (added=, replaced=, removed=) and the index's size after the change."""
        for change, n in counts.items():
            if n:
                self.item_changes.labels(change).inc(n)
        self.index_items.set(n_items)

    def exposition(self) -> bytes:
        """The text a scrape gets: this registry's, or with several workers every worker's values, summed."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # reads the folder's files now: one fresh registry per scrape
        return generate_latest(registry)


class Metered:
    """ASGI in front of everything the service answers (the fast GET /recommend path included): counts each
    request by its route template, method and status, and times it. Counted when its answer's last byte is handed
    to the server, so a client that has read an answer finds it in the next scrape."""

    def __init__(self, app, metrics: ServiceMetrics, routes: Iterable, recommender=None):
        self.app, self.metrics, self.recommender = app, metrics, recommender  # recommender: for the start line
        routes = [r for r in routes if hasattr(r, "path_regex")]
        self.static = {r.path for r in routes if not r.param_convertors}
        self.templated = [(r.path_regex, r.path) for r in routes if r.param_convertors]

    def route_of(self, path: str) -> str:
        """The template of the route taking `path`, or UNMATCHED: a label from a fixed set, whatever the path."""
        if path in self.static:
            return path
        return next((template for regex, template in self.templated if regex.match(path)), UNMATCHED)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        route = self.route_of(scope["path"])
        method = scope["method"] if scope["method"] in METHODS else "OTHER"
        status, counted = 500, False  # no answer started: uvicorn answers 500

        async def counted_send(message) -> None:
            nonlocal status, counted
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False) and not counted:
                counted = True
                self.metrics.answered(route, method, status, time.perf_counter() - t0)
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        finally:
            if not counted:  # an error before the answer ended, or a client that went away
                self.metrics.answered(route, method, status, time.perf_counter() - t0)
