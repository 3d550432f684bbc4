"""Requests that arrive together are searched together: one index search for every single-user request
ready in one turn of the event loop.

An exact search reads the whole item matrix; for one query that read is the cost (13,465 x 128 floats on
JD, about 0.3 ms here). A batch reads it once for all its queries, so under load, when many requests are
ready at once, each costs a fraction of that, and when few are, a request waits for nothing: the batch is
whatever is ready, searched on the next turn of the loop. The answer does not depend on the batch (the
exact index orders by float64 scores, ties to the lower row).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np

from csmf.serving.serve import Query, Recommendation, Recommender


class Batcher:
    """Collects (query, k, exclude_seen) from coroutines on one event loop and searches them in one go."""

    def __init__(self, recommender: Recommender, on_search: Callable[[int], None] | None = None):
        """`on_search`: called with the number of queries of each search (the service's metrics)."""
        self.recommender, self.on_search = recommender, on_search
        self.pending: list[tuple[Query, int, bool, asyncio.Future]] = []
        self.batches = self.searched = 0  # how much batching happened (GET /info shows it)

    async def candidates(self, query: Query, k: int, exclude_seen: bool) -> np.ndarray:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending.append((query, k, exclude_seen, future))
        if len(self.pending) == 1:  # the first of this turn schedules the search after the others have joined
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        pending, self.pending = self.pending, []
        for exclude_seen in (True, False):
            group = [p for p in pending if p[2] == exclude_seen]
            if not group:
                continue
            try:
                found = self.recommender._top([p[0] for p in group], [p[1] for p in group], exclude_seen)
            except Exception as err:  # every waiting request gets the error, none hangs
                for *_, future in group:
                    if not future.done():
                        future.set_exception(err)
                continue
            self.batches, self.searched = self.batches + 1, self.searched + len(group)
            if self.on_search is not None:
                self.on_search(len(group))
            for (*_, future), rows in zip(group, found, strict=True):
                if not future.done():  # a client that went away cancelled its future
                    future.set_result(rows)

    async def recommend(self, query: Query, k: int, weights: dict[str, float], exclude_seen: bool) -> Recommendation:
        """One user's answer (the query from Recommender.queries), searched with whatever else is ready."""
        t0 = time.perf_counter()
        rows = None if query.vector is None else await self.candidates(query, k, exclude_seen)
        return self.recommender.answer(query, rows, k, weights, exclude_seen, time.perf_counter() - t0)
