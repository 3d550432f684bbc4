"""`csmf serve`: top-k recommendations over HTTP with per-request objective weights.

The weights of a request are folded into the user's query vector (q = u * lambda), so every weighting is
one search of the same index. Per-objective scores of the returned items are exact inner products over
each objective's dimension groups, so a client sees why an item ranks where it does.

Every input is bounded before it reaches the index (ServeLimits, MAX_K, csmf.serving.artifact's MAX_ABS and weight
rules), so scores stay finite in float32 and an answer holds min(k, items the user may get) items, or says
why it holds fewer in `note`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from csmf.config import ServeConfig
from csmf.fusion import WeightError, clip
from csmf.fusion import check_weights as _check_weights
from csmf.fusion import parse_weights as _parse_weights
from csmf.serving.artifact import MAX_ABS, Artifact

if TYPE_CHECKING:  # csmf.serving.index loads faiss; the CLI reads ServeLimits' defaults without it
    from csmf.serving.index import Index

MAX_K = 1000  # largest k of one request
MAX_HISTORY = 100_000  # most items in one request's history (POST /recommend with "history")
CANDIDATE_BLOCK = 1 << 20  # most (users x candidates) one index search returns at once: bounds its memory
# most (queries x catalogue rows) one block of a batch scores under the lock (20 queries, about 5 ms, on JD's
# 13,465 items): the event loop's one-user searches then wait for one block, not for a 1,000-id batch (issue 27)
SEARCH_BLOCK = 1 << 18
MAX_FOLDS = 1024  # the most weightings whose lambda a server keeps (Recommender.fold)


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask of the server (`csmf serve --max-ids/--max-results/--max-body-bytes`)."""

    max_ids: int = ServeConfig.max_ids  # most user ids in one POST /recommend
    max_results: int = ServeConfig.max_results  # most items one request may ask for (ids x k): bounds time and size
    max_body_bytes: int = ServeConfig.max_body_bytes  # largest request body; a larger one answers 413 unparsed

    def __post_init__(self):
        for name in ("max_ids", "max_results", "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ServeLimits.{name} must be a positive integer, got {value!r}")


class RequestError(ValueError):
    """A request field with a bad value: `field` names it (the HTTP layer answers 422)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class NotMutable(RuntimeError):
    """Items cannot change in this server (several worker processes each hold an index): HTTP 409."""


class UnknownItem(KeyError):
    def __init__(self, item_id: str):
        super().__init__(item_id)
        self.item_id = item_id


class UnknownUser(KeyError):
    def __init__(self, user_id: str, field: str | None = None):
        """field: the request field that named the user (None: user_id in a query, user_ids in a body)."""
        super().__init__(user_id)
        self.user_id, self.field = user_id, field


def parse_weights(text: str, stages: tuple[str, ...]) -> dict[str, float]:
    """csmf.fusion.parse_weights (the one `stage:w,...` syntax) as a 422 on `weights`."""
    try:
        return _parse_weights(text, stages)
    except WeightError as err:
        raise RequestError("weights", str(err)) from None


def check_weights(weights: dict[str, float], stages: tuple[str, ...]) -> dict[str, float]:
    """The rules of csmf.fusion.check_weights (0 <= w <= 1e6 each, sum > 1e-6), as a 422 on `weights`."""
    try:
        return _check_weights(weights, stages)
    except WeightError as err:
        raise RequestError("weights", str(err)) from None


def checked_vector(values, dim: int, field: str) -> np.ndarray:
    """A caller's vector as (dim,) float32: numbers only, finite, within +-MAX_ABS (RequestError naming `field`)."""
    try:
        q = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise RequestError(field, "must be a list of numbers") from None
    if q.shape != (dim,):
        raise RequestError(field, f"must be a list of {dim} numbers, got shape {q.shape}")
    if not np.isfinite(q).all():
        raise RequestError(field, "must hold finite numbers only")
    if np.abs(q).max() > MAX_ABS:
        raise RequestError(field, f"entries must lie within +-{MAX_ABS:g}, got {np.abs(q).max():g}")
    return q.astype(np.float32)


def check_history_length(n: int) -> None:
    """The bound on one history's items (RequestError on `history`)."""
    if n > MAX_HISTORY:
        raise RequestError("history", f"more than {MAX_HISTORY:,} items: send the user's most recent ones")


def check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= MAX_K:
        raise RequestError("k", f"must be a whole number between 1 and {MAX_K}, got {clip(repr(k))}")


@dataclass
class Recommendation:
    user_id: str
    items: list[dict]
    weights: dict[str, float]
    fallback: bool
    seconds: float
    note: str | None = None  # why `items` holds fewer than k, when it does
    unknown_items: list[str] | None = None  # ids in a sent history that this catalogue does not hold
    unknown_features: list[str] | None = None  # sent features the tower could not read (name, or value unseen)


@dataclass
class Query:
    """One user's part of a request, ready to search: the query vector (weights folded in) and the item rows it
    must not return. `row` is the user's row in the artifact; None for a user sent as a history (or unknown)."""

    user_id: str
    row: int | None
    raw: np.ndarray | None  # (D,) float32 user vector; None = an unknown user answered from popularity
    vector: np.ndarray | None  # raw * the request's fold (csmf.fusion): what the index is searched with
    seen: np.ndarray  # sorted distinct item rows the user has (left out when exclude_seen)
    unknown_items: list[str] | None = None  # history item ids this catalogue does not serve (reported)
    unknown_features: list[str] | None = None  # feature names or values the user tower could not read
    note: str | None = None  # why the user is answered as they are (a history with nothing to rank by)


@dataclass
class SentHistory:
    """A history read against the catalogue, before the user tower runs (Recommender.history_rows)."""

    rows: dict[str, np.ndarray]  # behaviour -> distinct served item rows
    user_id: str | None  # a known user sent with the history, or None
    user_row: int | None  # that user's row in the artifact
    unknown_items: list[str] | None  # ids sent that this catalogue does not serve, in order (reported)

    @property
    def names_items(self) -> bool:
        """Whether any served item was sent (else the tower has nothing of the history to read)."""
        return any(len(r) for r in self.rows.values())


class Recommender:
    """An artifact plus an index: user id + weights -> ranked items with per-objective and fused scores.

    Items can be added, replaced and removed while serving (`put_items`, `remove_items`): the index and the
    item table here change together; the artifact on disk does not.
    """

    def __init__(
        self, artifact: Artifact, index: Index, popularity_fallback: bool = False, limits: ServeLimits = ServeLimits(),
        mutable: bool = True,
    ):  # fmt: skip
        """`mutable`: items may be added and removed (False when several worker processes each hold an index)."""
        if (index.n_items, index.dim) != (len(artifact.item_ids), artifact.dim):
            raise ValueError(f"the index holds {index.n_items} x {index.dim} vectors, the artifact "
                             f"{len(artifact.item_ids)} x {artifact.dim}: build it from this artifact")  # fmt: skip
        self.artifact, self.index, self.popularity_fallback = artifact, index, popularity_fallback
        self.limits, self.mutable = limits, mutable
        self.user_rows = {u: i for i, u in enumerate(artifact.user_ids)}
        self.masks = np.stack([artifact.objective_mask(s) for s in artifact.stages])  # (S, D)
        # the live catalogue: starts as the artifact's, rows appended by put_items; removed rows stay, marked
        self.item_ids = list(artifact.item_ids)
        self.item_vectors = artifact.item_vectors  # (rows, D); grown (copied once) when items are added
        self.live = np.ones(len(self.item_ids), dtype=bool)
        self.popularity = artifact.popularity  # (rows,): an added item starts at 0
        # (rows,) the artifact row of each row's item (its history row and degree in the user tower), -1 for an
        # item the artifact does not hold; a replaced item keeps its own
        self.origin = np.arange(len(self.item_ids), dtype=np.int64)
        self.lock = threading.RLock()  # item changes against searches (POST batches run on worker threads)
        self.excludes = bool(getattr(index, "excludes", False))  # the index leaves seen rows out itself
        self._item_rows: dict[str, int] | None = None  # id -> row, built on first use (1M ids cost ~100 MB)
        self._folds: dict[tuple[tuple[str, float], ...], np.ndarray] = {}  # weights -> lambda (fold)
        self.popular = np.argsort(-artifact.popularity, kind="stable")  # the live rows, most popular first
        self.tower = None  # the user tower (csmf.serving.online_towers): a history -> a vector; None in older artifacts
        self.item_tower = None  # the item tower: raw features -> a new item's vector; None when items have none
        if artifact.tower is not None:
            from csmf.serving.online_towers import ItemTower, UserTower

            entry = artifact.manifest["user_tower"]
            self.tower = UserTower(entry, artifact.tower, artifact.item_vectors, artifact.output_owner)
            if artifact.item_tower is not None:
                self.item_tower = ItemTower(artifact.manifest["item_tower"], artifact.item_tower, artifact.dim)
        # each user's seen items sorted and distinct, once at load: a request then tests membership by binary
        # search and reads its count, instead of sorting the list again (np.isin, np.unique) every time
        n_users, n_items = len(artifact.user_ids), len(artifact.item_ids)
        owner = np.repeat(np.arange(n_users, dtype=np.int64), np.diff(artifact.seen_indptr))
        key = np.unique(owner * n_items + artifact.seen_indices.astype(np.int64))  # by user, then item; distinct
        self.seen_items = key % n_items
        self.seen_starts = np.searchsorted(key, np.arange(n_users + 1, dtype=np.int64) * n_items)

    @property
    def stages(self) -> tuple[str, ...]:
        return self.artifact.stages

    @property
    def n_items(self) -> int:
        """Items a request may get (the artifact's, plus those added, less those removed)."""
        return self.index.n_items

    @property
    def item_rows(self) -> dict[str, int]:
        if self._item_rows is None:
            self._item_rows = {item: row for row, item in enumerate(self.item_ids) if self.live[row]}
        return self._item_rows

    def _seen(self, row: int) -> np.ndarray:
        """The user's seen item rows, sorted and distinct."""
        return self.seen_items[self.seen_starts[row] : self.seen_starts[row + 1]]

    def info(self) -> dict:
        a = self.artifact
        return {
            "stages": list(a.stages),
            "default_weights": a.default_weights,
            "index": self.index.kind,
            "items": self.n_items,
            "users": len(a.user_ids),
            "dim": a.dim,
            "dimension_groups": a.manifest["dimension_groups"],
            "popularity_fallback": self.popularity_fallback,
            "history_behaviours": list(self.tower.behaviours) if self.tower is not None else [],
            "user_features": self.tower.feature_names if self.tower is not None else [],
            "item_features": self.item_tower.feature_names if self.item_tower is not None else [],
            "limits": {"max_k": MAX_K, "max_abs": MAX_ABS, **vars(self.limits)},
        }

    def search_vector(self, vector: list[float], k: int) -> tuple[list[dict], str | None]:
        """Top-k items for a caller's query vector, and a note when fewer than k come back."""
        check_k(k)
        q = checked_vector(vector, self.artifact.dim, "vector")
        with self.lock:  # rows and ids read together: an item added meanwhile has a row before it has an id
            scores, rows = self.index.search(q[None, :], k)  # (1, k), (1, k)
            hits = zip(scores[0], rows[0], strict=True)
            items = [{"item_id": self.item_ids[r], "score": float(s)} for s, r in hits if r >= 0]
            n = self.n_items
        return items, self._note(len(items), k, n, f"the catalogue holds {n} items")

    def sample_users(self, limit: int) -> list[str]:
        activity = np.diff(self.artifact.seen_indptr)
        return [self.artifact.user_ids[i] for i in np.argsort(-activity, kind="stable")[:limit]]

    def weights_of(self, given: dict[str, float] | str | None) -> dict[str, float]:
        """A request's weights (a dict, or `stage:w,...` text from a query) checked and completed with a 0 for
        every stage it leaves out; None = the artifact's default weights (RequestError on `weights`)."""
        if isinstance(given, str):
            given = parse_weights(given, self.stages)
        return check_weights(given if given is not None else self.artifact.default_weights, self.stages)

    def check_request(self, n_ids: int, k: int) -> None:
        """The bounds on one request's work, before any of it is done (RequestError naming the field)."""
        check_k(k)
        if n_ids > self.limits.max_ids:
            raise RequestError("user_ids", f"{n_ids:,} ids, more than this server's limit of {self.limits.max_ids:,} "
                               "per request (csmf serve --max-ids): split the batch")  # fmt: skip
        if n_ids * k > self.limits.max_results:
            raise RequestError("user_ids" if n_ids > 1 else "k", f"{n_ids:,} ids x k {k:,} = {n_ids * k:,} items, more "
                               f"than this server's limit of {self.limits.max_results:,} per request (csmf serve "
                               "--max-results): send fewer ids per request or a smaller k")  # fmt: skip

    def fold(self, weights: dict[str, float]) -> np.ndarray:
        """(D,) lambda of checked weights (Artifact.fold), kept for the next request with the same weights: a few
        weightings are typical, and computing one costs about as much as the rest of a query (read-only)."""
        key = tuple(weights.items())
        fold = self._folds.get(key)
        if fold is None:
            if len(self._folds) >= MAX_FOLDS:  # any number of weightings may come: keep the latest ones
                self._folds.clear()
            fold = self._folds[key] = self.artifact.fold(weights)
            fold.flags.writeable = False
        return fold

    # ----- a request: queries -> one search -> answers -----------------------------------------------------
    def queries(self, user_ids: list[str], weights: dict[str, float]) -> list[Query]:
        """Each known user's query vector and seen items; an unknown user is a 404 unless popularity answers."""
        unknown = next((u for u in user_ids if u not in self.user_rows), None)
        if unknown is not None and not self.popularity_fallback:
            raise UnknownUser(unknown)
        rows = [self.user_rows.get(u, -1) for u in user_ids]
        fold, vectors, none = self.fold(weights), self.artifact.user_vectors, np.zeros(0, dtype=np.int64)
        return [
            Query(u, r, vectors[r], vectors[r] * fold, self._seen(r)) if r >= 0 else Query(u, None, None, None, none)
            for u, r in zip(user_ids, rows, strict=True)
        ]

    def history_query(
        self, history: dict[str, list[str]], user_id: str | None, weights: dict[str, float],
        features: dict | None = None,
    ) -> Query:  # fmt: skip
        """The query of a user sent as a behaviour history (item ids per behaviour): the user tower computes the
        vector (csmf.serving.online_towers). `user_id`, when given, is a known user whose ID embedding and features the
        tower reads (the MLP encoder) and whose seen items are left out too. Every item served counts, those added
        or replaced while serving too; ids this catalogue does not serve are skipped and reported in
        `unknown_items`. `features`: a new user's raw feature values (name -> value), read as in training; a name
        or value the tower does not know is reported in `unknown_features` and adds nothing. A request that gives
        the tower nothing to read (no served item, no user_id, no feature it knows) is answered from popularity
        with a note when the server falls back to popularity, else refused (RequestError on `history`)."""
        sent = self.history_rows(history, user_id, features)
        # read after the rows: the tables only grow, so every row found above is in them
        raw, unread = self.tower.vector(sent.rows, sent.user_row, features, self.item_vectors, self.origin)
        read_features = any(name not in unread for name in features or {})
        if sent.user_row is None and not read_features and not sent.names_items:
            # the vector would be the same for every such request (zero in the graph tower: every score 0.0)
            if not self.popularity_fallback:
                raise RequestError("history", "names no item served here, and there is no user_id or feature the "
                                   "model reads: nothing to rank by. Send at least one served item id (ids not "
                                   "served are listed in unknown_items), or serve with --fallback popularity to "
                                   "answer such a user with the most popular items")  # fmt: skip
            note = ("the history names no item served here (and no user_id or known feature): the most popular "
                    "items (--fallback popularity)")  # fmt: skip
            return Query("", None, None, None, np.zeros(0, dtype=np.int64), sent.unknown_items, unread or None, note)
        return self._history_query(sent, raw, weights, unread or None)

    def history_rows(self, history: dict[str, list[str]], user_id: str | None, features: dict | None) -> SentHistory:
        """A history's item ids as the served rows the user tower reads, checked (RequestError, UnknownUser) the
        way history_query checks them, before any tower arithmetic."""
        if self.tower is None:
            raise RequestError("history", "this artifact has no user tower (it was exported by an older csmf): "
                               "export the model again with `csmf export` to serve users by their history")  # fmt: skip
        wrong = [b for b in history if b not in self.tower.behaviours]
        if wrong:
            raise RequestError("history", f"behaviour {clip(repr(wrong[0]))} is not one this model reads "
                               f"{list(self.tower.behaviours)}")  # fmt: skip
        check_history_length(sum(len(items) for items in history.values()))
        row = None
        if user_id is not None:
            if user_id not in self.user_rows:
                raise UnknownUser(user_id, "user_id")
            if features:
                raise RequestError("features", "a known user's features are those of training: send features "
                                   "for a new user (no user_id) only")  # fmt: skip
            row = self.user_rows[user_id]
        rows, unknown = {}, {}
        for b, items in history.items():
            found = [self.item_rows.get(i, -1) for i in items]
            unknown.update((i, None) for i, r in zip(items, found, strict=True) if r < 0)
            rows[b] = np.array(sorted({r for r in found if r >= 0}), dtype=np.int64)  # np.unique's, faster when short
        return SentHistory(rows, user_id, row, list(unknown) or None)

    def history_queries(self, sent: list[SentHistory], weights: list[dict[str, float]]) -> list[Query]:
        """The queries of several users sent as histories without raw features, their tower vectors computed in
        one pass (UserTower.vectors): each the Query history_query gives for it alone. For a history that names
        no served item and no user (nothing to rank by) use history_query, which refuses it or falls back."""
        raw = self.tower.vectors([h.rows for h in sent], [h.user_row for h in sent], self.item_vectors, self.origin)
        pairs = zip(sent, weights, strict=True)
        return [self._history_query(h, raw[n].copy(), w, None) for n, (h, w) in enumerate(pairs)]

    def _history_query(self, sent: SentHistory, raw: np.ndarray, weights: dict[str, float],
                       unread: list[str] | None) -> Query:  # fmt: skip
        """A history's query from its user vector: its items (and a known user's) are the ones left out."""
        row = sent.user_row
        seen = np.unique(np.concatenate([*sent.rows.values(), self._seen(row) if row is not None else []]).astype(
            np.int64))  # fmt: skip
        fold = self.fold(weights)
        return Query(sent.user_id if sent.user_id is not None else "", row, raw, raw * fold, seen, sent.unknown_items,
                     unread)  # fmt: skip

    def width(self, query: Query, k: int, exclude_seen: bool) -> int:
        """Candidates to ask the index for: k from an index that leaves the seen rows out itself (exact), else k
        plus the user's seen items, which are filtered out afterwards."""
        return k + len(query.seen) if exclude_seen and not self.excludes else k

    def search(self, queries: list[Query], wide: int, exclude_seen: bool) -> np.ndarray:
        """One index search for `queries`: (B, wide) candidate rows, best first, -1 where fewer."""
        vectors = np.stack([q.vector for q in queries])
        if exclude_seen and self.excludes:
            return self.index.search(vectors, wide, [q.seen for q in queries])[1]
        return self.index.search(vectors, wide)[1]

    def recommend(
        self, user_ids: list[str], k: int, weights: dict[str, float] | None, exclude_seen: bool
    ) -> list[Recommendation]:
        self.check_request(len(user_ids), k)
        weights = self.weights_of(weights)
        t0 = time.perf_counter()
        queries = self.queries(user_ids, weights)
        searched = [q for q in queries if q.vector is not None]
        found = self._top(searched, [k] * len(searched), exclude_seen, step_aside=True)
        seconds = time.perf_counter() - t0  # the search itself, shared by the batch
        tops = iter(found)
        return [self.answer(q, next(tops) if q.vector is not None else None, k, weights, exclude_seen, seconds)
                for q in queries]  # fmt: skip

    def _top(
        self, queries: list[Query], ks: list[int], exclude_seen: bool, step_aside: bool = False
    ) -> list[np.ndarray]:
        """Each query's candidate rows, best first (at least its k, or all there are), searched in blocks of at
        most CANDIDATE_BLOCK candidates. `step_aside` (a batch on a worker thread): blocks of at most SEARCH_BLOCK
        scores, the lock given up between them."""
        width = [self.width(q, k, exclude_seen) for q, k in zip(queries, ks, strict=True)]
        most = max(1, SEARCH_BLOCK // max(len(self.item_ids), 1)) if step_aside else len(queries)  # queries a block
        out, start = [], 0
        while start < len(queries):
            stop, wide, end = start + 1, width[start], min(len(queries), start + most)
            while stop < end and (stop - start + 1) * max(wide, width[stop]) <= CANDIDATE_BLOCK:
                wide, stop = max(wide, width[stop]), stop + 1
            with self.lock:
                out.extend(self.search(queries[start:stop], wide, exclude_seen))
            start = stop
            if step_aside and start < len(queries):
                time.sleep(0)  # a lock is not fair: step aside so a thread waiting on it (the event loop) gets it
        return out

    # ----- items added, replaced and removed while serving ------------------------------------------------------
    def put_items(self, items: list[tuple[str, list[float] | dict]]) -> dict[str, list[str]]:
        """Add items by id and vector, or by raw features (a dict) through the item tower; an id already served
        is replaced (its old row removed, a new one added). Returns {"added": ids, "replaced": ids} and, for
        items given by features, "unknown_features": {id: names the tower could not read}."""
        if not self.mutable:
            raise NotMutable("items are fixed in a server with several worker processes (each holds its own index)")
        self.check_items(len(items))
        ids = [item_id for item_id, _ in items]
        repeated = next((i for i in ids if ids.count(i) > 1), None) if len(set(ids)) < len(ids) else None
        if repeated is not None:
            raise RequestError("items", f"item {clip(repr(repeated))} appears twice; give each item once")
        vectors, unread = [], {}
        for n, (item_id, given) in enumerate(items):
            if isinstance(given, dict):
                if self.item_tower is None:
                    raise RequestError(f"items.{n}.features", "this model's items have no features (or the "
                                       "artifact is older): send the item's vector")  # fmt: skip
                if not given:  # the tower would give every such item the same featureless vector
                    raise RequestError(f"items.{n}.features", f"is empty: give at least one of the item features "
                                       f"{self.item_tower.feature_names} (GET /info: item_features), or the item's "
                                       "vector")  # fmt: skip
                vector, unknown = self.item_tower.vector(given)
                if unknown:
                    unread[item_id] = unknown
                vectors.append(checked_vector(vector, self.artifact.dim, f"items.{n}.features"))
            else:
                vectors.append(checked_vector(given, self.artifact.dim, f"items.{n}.vector"))
        vectors = np.stack(vectors)
        with self.lock:
            replaced = [i for i in ids if i in self.item_rows]
            kept = {i: float(self.popularity[self.item_rows[i]]) for i in replaced}  # a replaced item keeps it
            origin = np.array([self.origin[self.item_rows[i]] if i in self.item_rows else -1 for i in ids])
            if replaced:
                self._remove([self.item_rows[i] for i in replaced])
            rows = self.index.add(vectors)
            if rows.tolist() != list(range(len(self.item_ids), len(self.item_ids) + len(rows))):
                raise RuntimeError(f"the {self.index.kind} index numbered new items {rows[:3]}..., not from "
                                   f"{len(self.item_ids)}: the item table and the index are out of step")  # fmt: skip
            # each table grows before anything that hands out its new rows (item_rows, popular): a request
            # reading them without the lock finds every row it is given
            self.item_vectors = np.concatenate([self.item_vectors, vectors])
            added = np.array([kept.get(i, 0.0) for i in ids], dtype=np.float32)
            self.popularity = np.concatenate([self.popularity, added])
            self.origin = np.concatenate([self.origin, origin.astype(np.int64)])
            self.live = np.concatenate([self.live, np.ones(len(rows), dtype=bool)])
            self.item_ids.extend(ids)
            self.item_rows.update(zip(ids, rows.tolist(), strict=True))
            order = np.argsort(-self.popularity, kind="stable")
            self.popular = order[self.live[order]]
        out = {"added": [i for i in ids if i not in set(replaced)], "replaced": replaced}
        return {**out, "unknown_features": unread} if unread else out

    def check_items(self, n: int) -> None:
        """The bound on one put_items call's items (RequestError on `items`)."""
        if not n:
            raise RequestError("items", "give at least one item")
        if n > self.limits.max_ids:
            raise RequestError("items", f"{n:,} items, more than this server's limit of {self.limits.max_ids:,} "
                               "per request (csmf serve --max-ids)")  # fmt: skip

    def remove_items(self, ids: list[str]) -> None:
        """Take items out of every answer (UnknownItem for an id not served)."""
        if not self.mutable:
            raise NotMutable("items are fixed in a server with several worker processes (each holds its own index)")
        with self.lock:
            missing = next((i for i in ids if i not in self.item_rows), None)
            if missing is not None:
                raise UnknownItem(missing)
            self._remove([self.item_rows[i] for i in ids])

    def _remove(self, rows: list[int]) -> None:
        self.index.remove(np.asarray(rows, dtype=np.int64))
        self.live[rows] = False
        self.popular = self.popular[self.live[self.popular]]  # the fallback then reads its first k, whatever churned
        for row in rows:
            del self.item_rows[self.item_ids[row]]

    def answer(
        self, query: Query, candidates: np.ndarray | None, k: int, weights: dict[str, float], exclude_seen: bool,
        seconds: float,
    ) -> Recommendation:  # fmt: skip
        """The answer to one query from its candidate rows (None: the popularity fallback)."""
        n = self.n_items
        if candidates is None:
            items = [{"item_id": self.item_ids[i], "popularity": float(self.popularity[i])}
                     for i in self.popular[:k] if self.live[i]]  # fmt: skip
            short = self._note(len(items), k, n, f"the catalogue holds {n} items")
            note = "; ".join(text for text in (query.note, short) if text) or None
            return Recommendation(query.user_id, items, weights, True, seconds, note, query.unknown_items,
                                  query.unknown_features)  # fmt: skip
        candidates = candidates[candidates >= 0]
        s = query.seen
        if exclude_seen and len(s):
            at = np.minimum(np.searchsorted(s, candidates), len(s) - 1)
            candidates = candidates[s[at] != candidates]  # not among the user's (sorted) seen items
        items = self._describe(query, candidates[:k], weights)
        seen = int(self.live[s].sum()) if exclude_seen else 0
        why = f"this user has seen all but {n - seen} of the {n} items (exclude_seen)" if seen else (
            f"the catalogue holds {n} items")  # fmt: skip
        note = self._note(len(items), k, n - seen, why)
        return Recommendation(query.user_id, items, weights, False, seconds, note, query.unknown_items,
                              query.unknown_features)  # fmt: skip

    def _note(self, got: int, k: int, available: int, why: str) -> str | None:
        """Why an answer holds fewer than k items: fewer exist for this request, or the index missed some."""
        if got >= k:
            return None
        if got >= available:
            return f"{got} items, not {k}: {why}"
        return (f"{got} items, not {min(k, available)}: the {self.index.kind} index returned fewer candidates "
                "than asked (an approximate index can miss items; the exact index does not)")  # fmt: skip

    def _describe(self, query: Query, items: np.ndarray, weights: dict[str, float]) -> list[dict]:
        """Each item's per-objective scores s_k = <u * mask_k, v> and the fused sum_k w_k s_k."""
        u, v = query.raw, self.item_vectors[items]  # (D,), (k, D)
        per_stage = (v * u) @ self.masks.T  # (k, S)
        w = np.array([weights[s] for s in self.stages], dtype=np.float32)
        fused = (per_stage @ w).tolist()  # (k,) Python floats in one call, not one float() per number
        rows, ids = per_stage.tolist(), self.item_ids
        return [
            {"item_id": ids[i], "score": fused[j], "scores": dict(zip(self.stages, rows[j], strict=True))}
            for j, i in enumerate(items.tolist())
        ]
