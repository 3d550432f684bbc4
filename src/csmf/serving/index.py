"""Inner-product top-k over one item-vector matrix, behind one small interface.

Objective weights never touch the index: they are folded into the query vector (csmf.fusion), so one
index built once serves every weighting. Back-ends: faiss exact inner product (default), faiss HNSW
(approximate; M and efSearch configurable), and Milvus through pymilvus: a local file URI runs it
embedded (milvus-lite), an http(s) URI talks to a Milvus server, with the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import faiss
import numpy as np

KINDS = ("exact", "hnsw", "milvus")


class Index(Protocol):
    kind: str
    n_items: int
    dim: int

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, D) float32 queries -> (scores (B, k), item rows (B, k)), best first; -1 rows where fewer exist."""
        ...


@dataclass(frozen=True)
class IndexSettings:
    kind: str = "exact"  # "exact" or "hnsw"
    hnsw_m: int = 32  # HNSW graph degree
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 128  # candidates kept while searching: recall against speed
    threads: int = 0  # faiss OpenMP threads; 0 = faiss's default (all cores)
    milvus_uri: str = "csmf-milvus.db"  # a local .db file (milvus-lite) or a server, e.g. http://host:19530
    milvus_collection: str = "csmf_items"
    milvus_index: str = "FLAT"  # Milvus index type (FLAT = exact; HNSW, IVF_FLAT, ... for large catalogues)


def _checked(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"item vectors must be a non-empty (N, D) matrix, got shape {vectors.shape}")
    return vectors


PARALLEL_QUERIES = 8  # a search of fewer queries runs on one faiss thread
DEFAULT_THREADS = faiss.omp_get_max_threads()  # OpenMP's own default (cores, or OMP_NUM_THREADS), read once


class FaissIndex:
    def __init__(self, vectors: np.ndarray, settings: IndexSettings = IndexSettings()):
        vectors = _checked(vectors)
        self.threads = settings.threads or DEFAULT_THREADS
        faiss.omp_set_num_threads(self.threads)  # building a large HNSW graph uses them all
        self.kind, (self.n_items, self.dim) = settings.kind, vectors.shape
        if settings.kind == "exact":
            self.index = faiss.IndexFlatIP(self.dim)
            self.index.add(vectors)
            return
        # HNSW navigates well in a metric space but poorly under raw inner product when item norms differ
        # (on JD it found 3% of the exact top-50). The standard MIPS -> L2 reduction: append
        # sqrt(max_norm^2 - |v|^2) to each item and 0 to each query; then the nearest item in L2 is the
        # largest inner product, and the score is recovered from the distance.
        norms = (vectors.astype(np.float64) ** 2).sum(axis=1)
        self.max_norm2 = float(norms.max())
        extra = np.sqrt(np.maximum(self.max_norm2 - norms, 0.0)).astype(np.float32)[:, None]
        self.index = faiss.IndexHNSWFlat(self.dim + 1, settings.hnsw_m)
        self.index.hnsw.efConstruction = settings.hnsw_ef_construction
        self.index.hnsw.efSearch = settings.hnsw_ef_search
        self.index.add(np.ascontiguousarray(np.hstack([vectors, extra])))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (B, {self.dim}), got shape {queries.shape}")
        k = min(k, self.n_items)
        # a few queries run on one thread: an OpenMP region over 2 threads cost a single JD query 32 ms instead of
        # 0.07 ms when the other core was busy (issue 17); a batch may spread over the configured threads
        faiss.omp_set_num_threads(1 if len(queries) < PARALLEL_QUERIES else self.threads)
        if self.kind == "exact":
            return self.index.search(queries, k)
        padded = np.ascontiguousarray(np.hstack([queries, np.zeros((len(queries), 1), dtype=np.float32)]))
        distances, rows = self.index.search(padded, k)  # |q|^2 + max_norm^2 - 2 <q, v>
        q2 = (queries.astype(np.float64) ** 2).sum(axis=1, keepdims=True)
        scores = ((q2 + self.max_norm2 - distances) / 2).astype(np.float32)
        return np.where(rows >= 0, scores, -np.inf).astype(np.float32), rows


class MilvusIndex:
    """The item vectors as a Milvus collection (id = item row), searched by inner product."""

    def __init__(self, vectors: np.ndarray, settings: IndexSettings = IndexSettings(), batch: int = 10_000):
        try:
            from pymilvus import MilvusClient
        except ImportError as err:
            raise ImportError("the milvus index needs pymilvus and milvus-lite: pip install 'csmf[milvus]'") from err
        vectors = _checked(vectors)
        self.kind, (self.n_items, self.dim) = "milvus", vectors.shape
        self.client, self.collection = MilvusClient(settings.milvus_uri), settings.milvus_collection
        if self.client.has_collection(self.collection):  # an index mirrors one artifact: rebuild it
            self.client.drop_collection(self.collection)
        params = self.client.prepare_index_params()
        params.add_index(field_name="vector", index_type=settings.milvus_index, metric_type="IP")
        self.client.create_collection(self.collection, dimension=self.dim, metric_type="IP", index_params=params)
        for start in range(0, self.n_items, batch):
            chunk = vectors[start : start + batch]
            self.client.insert(self.collection, [{"id": start + i, "vector": v.tolist()} for i, v in enumerate(chunk)])
        self.client.load_collection(self.collection)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (B, {self.dim}), got shape {queries.shape}")
        k = min(k, self.n_items)
        hits = self.client.search(self.collection, data=queries.tolist(), limit=k, output_fields=["id"],
                                  search_params={"metric_type": "IP"})  # fmt: skip
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        for b, found in enumerate(hits):
            for j, hit in enumerate(found):
                scores[b, j], rows[b, j] = hit["distance"], hit["id"]
        return scores, rows


def build_index(vectors: np.ndarray, settings: IndexSettings = IndexSettings()) -> Index:
    if settings.kind not in KINDS:
        raise ValueError(f"index kind must be one of {KINDS}, got {settings.kind!r}")
    return MilvusIndex(vectors, settings) if settings.kind == "milvus" else FaissIndex(vectors, settings)


def recall_against(exact: Index, approximate: Index, queries: np.ndarray, k: int = 50) -> float:
    """Mean share of the exact top-k that the approximate index also returns."""
    _, truth = exact.search(queries, k)
    _, found = approximate.search(queries, k)
    hits = [len(set(t[t >= 0]) & set(f[f >= 0])) / max((t >= 0).sum(), 1) for t, f in zip(truth, found, strict=True)]
    return float(np.mean(hits))
