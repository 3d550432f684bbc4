"""Inner-product top-k over one item-vector matrix, behind one small interface.

Objective weights never touch the index: they are folded into the query vector (csmf.fusion), so one
index built once serves every weighting. Back-ends: exact inner product by BLAS (default), faiss HNSW
(approximate; M and efSearch configurable), and Milvus through pymilvus: a local file URI runs it
embedded (milvus-lite), an http(s) URI talks to a Milvus server, with the same code. Every back-end takes
items added and removed while it serves (POST /items, DELETE /items/{id}); an item's row is its id in the
index and is never reused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np

from csmf.hashing import file_sha256

KINDS = ("exact", "hnsw", "milvus")


class Index(Protocol):
    kind: str
    n_items: int  # items a search can return (rows added, less rows removed)
    dim: int

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, D) float32 queries -> (scores (B, k), item rows (B, k)), best first; -1 rows where fewer exist."""
        ...

    def add(self, vectors: np.ndarray) -> np.ndarray:
        """Append items; returns their rows (the next free rows, in order)."""
        ...

    def remove(self, rows: np.ndarray) -> None:
        """Rows no search returns any more (their row numbers are never reused)."""
        ...


@dataclass(frozen=True)
class IndexSettings:
    kind: str = "exact"  # "exact", "hnsw" or "milvus"
    hnsw_m: int = 32  # HNSW graph degree
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 128  # candidates kept while searching: recall against speed
    threads: int = 0  # threads of a batch search (BLAS or faiss OpenMP); 0 = the library's default (all cores)
    # (csmf serve uses serve.threads, 1 by default: on JD a second BLAS thread bought 4% more requests a second
    # for twice the CPU, issue 17)
    milvus_uri: str = "csmf-milvus.db"  # a local .db file (milvus-lite) or a server, e.g. http://host:19530
    milvus_collection: str = "csmf_items"
    milvus_index: str = "FLAT"  # Milvus index type (FLAT = exact; HNSW, IVF_FLAT, ... for large catalogues)


def _checked(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors)
    if vectors.dtype != np.float32 or not vectors.flags.c_contiguous:  # a float32 memmap stays mapped, uncopied
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"item vectors must be a non-empty (N, D) matrix, got shape {vectors.shape}")
    return vectors


def _check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must be (B, {dim}), got shape {queries.shape}")
    return queries


PARALLEL_QUERIES = 8  # a search of fewer queries runs on one thread
DEFAULT_THREADS = faiss.omp_get_max_threads()  # OpenMP's own default (cores, or OMP_NUM_THREADS), read once
RESCORE_MARGIN = 8  # candidates past k re-scored in float64, so rounding in the product never decides the order
COMPACT_SHARE = 0.25  # the exact index drops its removed rows once they pass this share of the live ones ...
COMPACT_MIN = 64  # ... or this many, whichever is more (a copy of the live rows each time: amortised, cheap)


class _Blas:
    """numpy's BLAS thread count, set only when it changes (a direct library call, not threadpoolctl's scan)."""

    def __init__(self):
        from threadpoolctl import ThreadpoolController

        self.libraries = [lib for lib in ThreadpoolController().lib_controllers
                          if lib.user_api == "blas" and "numpy" in lib.filepath]  # fmt: skip
        self.libraries = self.libraries or [lib for lib in ThreadpoolController().lib_controllers
                                            if lib.user_api == "blas"]  # fmt: skip
        self.current = None

    def use(self, threads: int) -> None:
        if threads != self.current:
            for lib in self.libraries:
                lib.set_num_threads(threads)
            self.current = threads


class ExactIndex:
    """Exact inner-product top-k: one BLAS matrix product for a whole batch of queries, then a partial sort.

    Measured on the JD artifact (13,465 x 128, this 2-core machine), per query: faiss IndexFlatIP 0.30-0.37 ms
    at any batch size, this 0.26 ms alone and 0.11 ms in a batch of 32 (one thread), as the item matrix is read
    once per batch rather than once per query. Candidates just past k are re-scored in float64 and ties go to
    the lower row, so an answer does not depend on the batch it was computed in. The matrix may be a read-only
    memmap (worker processes then share one copy in the page cache); adding items copies it once.

    A removed row is masked until removed rows pass COMPACT_SHARE of the live ones; then the matrix is copied
    without them (compact), so a catalogue that keeps changing is searched at the cost of its live rows (60
    rounds of replacing the same 1,000 JD items made every search 9x slower before, issue 27). Rows keep their
    numbers: `slot_rows` maps a slot of the matrix to its row.
    """

    kind = "exact"

    def __init__(self, vectors: np.ndarray, settings: IndexSettings = IndexSettings()):
        self.vectors = _checked(vectors)  # (slots, D): the rows still held, in row order, then spare capacity
        self.n_rows, self.dim = self.vectors.shape  # slots in use (live rows and removed ones not yet compacted)
        self.n_items = self.next_row = self.n_rows  # live rows; rows handed out so far
        self.slot_rows: np.ndarray | None = None  # (n_rows,) the row in each slot, ascending; None: slot = row
        self.threads = settings.threads or DEFAULT_THREADS
        self.removed = np.zeros(0, dtype=np.int64)  # slots taken out and not yet compacted away, sorted
        self._blas = _Blas()

    excludes = True  # search() can leave out rows per query (a user's seen items) before it selects

    def _slots(self, rows: np.ndarray) -> np.ndarray:
        """The slots of those `rows` the matrix still holds (a row compacted away has none)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.slot_rows is None:
            return rows[(rows >= 0) & (rows < self.n_rows)]
        if self.n_rows == 0:
            return rows[:0]
        at = np.minimum(np.searchsorted(self.slot_rows, rows), self.n_rows - 1)
        return at[self.slot_rows[at] == rows]

    def search(
        self, queries: np.ndarray, k: int, exclude: list[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """`exclude[b]`: rows query b must not return (they score -inf before the top k are chosen)."""
        queries = _check_queries(queries, self.dim)
        k = min(k, self.n_items)
        self._blas.use(1 if len(queries) < PARALLEL_QUERIES else self.threads)
        # (slots, D) @ (D, B), read as (B, slots): for a few queries twice as fast as queries @ vectors.T here
        scores = (self.vectors[: self.n_rows] @ queries.T).T
        if len(self.removed):
            scores[:, self.removed] = -np.inf
        for b, rows in enumerate(exclude or ()):
            scores[b, self._slots(rows)] = -np.inf
        wide = min(k + RESCORE_MARGIN, self.n_rows)
        if wide < self.n_rows:
            candidates = np.argpartition(scores, self.n_rows - wide, axis=1)[:, -wide:]  # (B, wide), unordered
        else:
            candidates = np.broadcast_to(np.arange(self.n_rows), scores.shape)
        out = np.take_along_axis(scores, candidates, 1) == -np.inf
        exact = np.einsum("bd,bwd->bw", queries.astype(np.float64), self.vectors[candidates].astype(np.float64))
        exact[out] = -np.inf
        order = np.lexsort((candidates, -exact), axis=1)[:, :k]  # best first, ties to the lower slot (= row)
        slots = np.take_along_axis(candidates, order, 1).astype(np.int64)
        rows = slots if self.slot_rows is None else self.slot_rows[slots]
        top = np.take_along_axis(exact, order, 1).astype(np.float32)
        rows[top == -np.inf] = -1
        return top, rows

    def add(self, vectors: np.ndarray) -> np.ndarray:
        vectors = _check_queries(vectors, self.dim)
        if self.n_rows + len(vectors) > len(self.vectors) or not self.vectors.flags.writeable:
            grown = np.empty((max(2 * len(self.vectors), self.n_rows + len(vectors)), self.dim), dtype=np.float32)
            grown[: self.n_rows] = self.vectors[: self.n_rows]
            self.vectors = grown
        rows = np.arange(self.next_row, self.next_row + len(vectors), dtype=np.int64)
        self.vectors[self.n_rows : self.n_rows + len(vectors)] = vectors
        if self.slot_rows is not None:
            self.slot_rows = np.concatenate([self.slot_rows, rows])
        self.n_rows += len(vectors)
        self.n_items += len(vectors)
        self.next_row += len(vectors)
        return rows

    def remove(self, rows: np.ndarray) -> None:
        slots = np.setdiff1d(self._slots(rows), self.removed)
        self.removed = np.union1d(self.removed, slots)
        self.n_items -= len(slots)
        if len(self.removed) > max(COMPACT_MIN, COMPACT_SHARE * self.n_items):
            self.compact()

    def compact(self) -> None:
        """Copy the matrix without its removed slots (rows keep their numbers; the memory of removed ones is freed)."""
        keep = np.ones(self.n_rows, dtype=bool)
        keep[self.removed] = False
        rows = np.arange(self.n_rows, dtype=np.int64) if self.slot_rows is None else self.slot_rows
        self.slot_rows, self.vectors = rows[keep], np.ascontiguousarray(self.vectors[: self.n_rows][keep])
        self.n_rows, self.removed = len(self.slot_rows), np.zeros(0, dtype=np.int64)


class HnswIndex:
    """faiss HNSW over the items, searched by inner product through the MIPS -> L2 reduction below."""

    kind = "hnsw"

    def __init__(self, vectors: np.ndarray, settings: IndexSettings = IndexSettings()):
        vectors = _checked(vectors)
        faiss.omp_set_num_threads(DEFAULT_THREADS)  # building a large HNSW graph uses every core
        # HNSW navigates well in a metric space but poorly under raw inner product when item norms differ
        # (on JD it found 3% of the exact top-50). The standard MIPS -> L2 reduction: append
        # sqrt(max_norm^2 - |v|^2) to each item and 0 to each query; then the nearest item in L2 is the
        # largest inner product (the scores returned are the inner products, from the stored vectors).
        self.max_norm2 = float((vectors.astype(np.float64) ** 2).sum(axis=1).max())
        graph = faiss.IndexHNSWFlat(vectors.shape[1] + 1, settings.hnsw_m)
        graph.hnsw.efConstruction = settings.hnsw_ef_construction
        graph.add(self._lifted(vectors))
        self._serve(graph, self.max_norm2, settings)

    def _serve(self, graph, max_norm2: float, settings: IndexSettings) -> None:
        """Take `graph` (a lifted HNSWFlat index, built or read) as this index, nothing removed yet."""
        self.index, self.max_norm2 = graph, max_norm2
        self.dim = graph.d - 1
        self.n_rows = self.n_items = int(graph.ntotal)
        self.index.hnsw.efSearch = self.ef_search = settings.hnsw_ef_search
        self.threads = settings.threads or DEFAULT_THREADS
        self.removed = np.zeros(0, dtype=np.int64)
        self.params = None  # search parameters that skip removed rows, once there are any

    def save(self, path: str | Path, built_from: dict | None = None) -> None:
        """The graph and vectors to `path` (faiss's format); what the reduction needs, `built_from` (what the graph
        was built from, for a later reader to compare) and the graph file's own sha256, to `path`.json. Each file
        is written whole, then renamed into place; the side file last, so a graph it does not describe fails its
        digest."""
        partial = Path(f"{path}.partial")
        faiss.write_index(self.index, str(partial))
        meta = {"max_norm2": self.max_norm2, "dim": self.dim, "built_from": built_from,
                "graph_sha256": file_sha256(partial)}  # fmt: skip
        partial.replace(path)
        Path(f"{path}.json.partial").write_text(json.dumps(meta))
        Path(f"{path}.json.partial").replace(f"{path}.json")

    @staticmethod
    def reuse_problem(path: str | Path, built_from: dict) -> str | None:
        """Why the graph at `path` cannot serve as the one built from `built_from`, in words; None when it can: its
        side file (save's) records these inputs and the graph file's sha256, and the file matches it. A cache
        that fails this is rebuilt, never read: faiss's reader trusts its file."""
        path = Path(path)
        if not path.exists():
            return f"no graph at {path} yet"
        if not path.is_file():
            return f"{path} is not a regular file"
        try:
            meta = json.loads(Path(f"{path}.json").read_text())
        except (OSError, ValueError) as err:
            return f"its side file {path}.json is missing or unreadable ({type(err).__name__})"
        if not isinstance(meta, dict) or not isinstance(meta.get("max_norm2"), float):
            return f"its side file {path}.json is not one csmf wrote"
        if meta.get("built_from") != built_from:
            return f"{path} was built from other item vectors or other HNSW settings"
        if "graph_sha256" not in meta:
            return f"its side file {path}.json records no digest of the graph (written by an older csmf)"
        if file_sha256(path) != meta["graph_sha256"]:
            return (f"{path} does not match the sha256 its side file records (damaged, truncated, or a graph of "
                    "other vectors put in its place)")  # fmt: skip
        return None

    @classmethod
    def load(cls, path: str | Path, settings: IndexSettings = IndexSettings(), mapped: bool = True) -> HnswIndex:
        """An index `save` wrote. `mapped`: its vectors memory-mapped read-only (worker processes share them; no
        items can then be added or removed); else read into memory. faiss's reader trusts the file: keep it with
        the artifact."""
        flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mapped else 0
        index = cls.__new__(cls)
        index._serve(faiss.read_index(str(path), flags), float(json.loads(Path(f"{path}.json").read_text())[
            "max_norm2"]), settings)  # fmt: skip
        return index

    def _lifted(self, vectors: np.ndarray) -> np.ndarray:
        norms = (vectors.astype(np.float64) ** 2).sum(axis=1)
        # an item added later with a larger norm than any at build time gets 0: still found, ranked less exactly
        extra = np.sqrt(np.maximum(self.max_norm2 - norms, 0.0)).astype(np.float32)[:, None]
        return np.ascontiguousarray(np.hstack([vectors, extra]))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = _check_queries(queries, self.dim)
        k = min(k, self.n_items)
        # a few queries run on one thread: an OpenMP region over 2 threads cost a single JD query 32 ms instead of
        # 0.07 ms when the other core was busy (issue 17); a batch may spread over the configured threads
        faiss.omp_set_num_threads(1 if len(queries) < PARALLEL_QUERIES else self.threads)
        padded = np.ascontiguousarray(np.hstack([queries, np.zeros((len(queries), 1), dtype=np.float32)]))
        _, rows = self.index.search(padded, k, params=self.params)  # nearest in L2 = largest inner product
        # scores are the inner products themselves, from the stored vectors (exact even for an item added later
        # with a larger norm than the build's, where the distance would not give it back)
        found = rows >= 0
        stored = self.index.reconstruct_batch(rows[found])[:, : self.dim]  # (hits, D)
        scores = np.full(rows.shape, -np.inf, dtype=np.float32)
        scores[found] = np.einsum("hd,hd->h", np.repeat(queries, found.sum(axis=1), axis=0), stored)
        return scores, rows

    def add(self, vectors: np.ndarray) -> np.ndarray:
        vectors = _check_queries(vectors, self.dim)
        rows = np.arange(self.n_rows, self.n_rows + len(vectors), dtype=np.int64)
        self.index.add(self._lifted(vectors))  # faiss numbers them on from n_rows: the row is the id
        self.n_rows += len(vectors)
        self.n_items += len(vectors)
        return rows

    def remove(self, rows: np.ndarray) -> None:
        """HNSW cannot delete from its graph: removed rows stay as waypoints, and a selector keeps them out of
        every answer."""
        rows = np.setdiff1d(np.asarray(rows, dtype=np.int64), self.removed)
        self.removed = np.union1d(self.removed, rows)
        self.n_items -= len(rows)
        self._selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(self.removed))  # kept: params hold a pointer
        self.params = faiss.SearchParametersHNSW(sel=self._selector, efSearch=self.ef_search)


class MilvusIndex:
    """The item vectors as a Milvus collection (id = item row), searched by inner product."""

    def __init__(self, vectors: np.ndarray, settings: IndexSettings = IndexSettings(), batch: int = 10_000):
        try:
            from pymilvus import MilvusClient
        except ImportError as err:
            raise ImportError("the milvus index needs pymilvus and milvus-lite: pip install 'csmf[milvus]'") from err
        vectors = _checked(vectors)
        self.kind, (self.n_rows, self.dim) = "milvus", vectors.shape
        self.n_items, self.batch = self.n_rows, batch
        self.removed: set[int] = set()
        self.client, self.collection = MilvusClient(settings.milvus_uri), settings.milvus_collection
        if self.client.has_collection(self.collection):  # an index mirrors one artifact: rebuild it
            self.client.drop_collection(self.collection)
        params = self.client.prepare_index_params()
        params.add_index(field_name="vector", index_type=settings.milvus_index, metric_type="IP")
        self.client.create_collection(self.collection, dimension=self.dim, metric_type="IP", index_params=params)
        self._upsert(np.arange(self.n_rows), vectors)
        self.client.load_collection(self.collection)

    def _upsert(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        for start in range(0, len(rows), self.batch):
            chunk = zip(rows[start : start + self.batch].tolist(), vectors[start : start + self.batch], strict=True)
            self.client.upsert(self.collection, [{"id": r, "vector": v.tolist()} for r, v in chunk])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = _check_queries(queries, self.dim)
        k = min(k, self.n_items)
        hits = self.client.search(self.collection, data=queries.tolist(), limit=k, output_fields=["id"],
                                  search_params={"metric_type": "IP"})  # fmt: skip
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        for b, found in enumerate(hits):
            for j, hit in enumerate(found):
                scores[b, j], rows[b, j] = hit["distance"], hit["id"]
        return scores, rows

    def add(self, vectors: np.ndarray) -> np.ndarray:
        vectors = _check_queries(vectors, self.dim)
        rows = np.arange(self.n_rows, self.n_rows + len(vectors), dtype=np.int64)
        self._upsert(rows, vectors)
        self.n_rows += len(vectors)
        self.n_items += len(vectors)
        return rows

    def remove(self, rows: np.ndarray) -> None:
        rows = sorted(set(np.asarray(rows, dtype=np.int64).tolist()) - self.removed)
        self.client.delete(self.collection, ids=rows)
        self.removed.update(rows)
        self.n_items -= len(rows)


def build_index(vectors: np.ndarray, settings: IndexSettings = IndexSettings()) -> Index:
    if settings.kind not in KINDS:
        raise ValueError(f"index kind must be one of {KINDS}, got {settings.kind!r}")
    return {"exact": ExactIndex, "hnsw": HnswIndex, "milvus": MilvusIndex}[settings.kind](vectors, settings)


def recall_against(exact: Index, approximate: Index, queries: np.ndarray, k: int = 50) -> float:
    """Mean share of the exact top-k that the approximate index also returns."""
    _, truth = exact.search(queries, k)
    _, found = approximate.search(queries, k)
    hits = [len(set(t[t >= 0]) & set(f[f >= 0])) / max((t >= 0).sum(), 1) for t, f in zip(truth, found, strict=True)]
    return float(np.mean(hits))
