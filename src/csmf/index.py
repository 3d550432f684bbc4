"""Inner-product top-k over one item-vector matrix, behind one small interface.

Objective weights never touch the index: they are folded into the query vector (csmf.fusion), so one
index built once serves every weighting. Back-ends: faiss exact inner product (default), faiss HNSW
(approximate; M and efSearch configurable). Milvus is not wired in yet (see README, *Serving*).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import faiss
import numpy as np

KINDS = ("exact", "hnsw")


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


class FaissIndex:
    def __init__(self, vectors: np.ndarray, settings: IndexSettings = IndexSettings()):
        if settings.kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, got {settings.kind!r}")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"item vectors must be a non-empty (N, D) matrix, got shape {vectors.shape}")
        if settings.threads:
            faiss.omp_set_num_threads(settings.threads)
        self.kind, (self.n_items, self.dim) = settings.kind, vectors.shape
        if settings.kind == "exact":
            self.index = faiss.IndexFlatIP(self.dim)
        else:
            self.index = faiss.IndexHNSWFlat(self.dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = settings.hnsw_ef_construction
            self.index.hnsw.efSearch = settings.hnsw_ef_search
        self.index.add(vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (B, {self.dim}), got shape {queries.shape}")
        scores, rows = self.index.search(queries, min(k, self.n_items))
        return scores, rows


def build_index(vectors: np.ndarray, settings: IndexSettings = IndexSettings()) -> Index:
    return FaissIndex(vectors, settings)


def recall_against(exact: Index, approximate: Index, queries: np.ndarray, k: int = 50) -> float:
    """Mean share of the exact top-k that the approximate index also returns."""
    _, truth = exact.search(queries, k)
    _, found = approximate.search(queries, k)
    hits = [len(set(t[t >= 0]) & set(f[f >= 0])) / max((t >= 0).sum(), 1) for t, f in zip(truth, found, strict=True)]
    return float(np.mean(hits))
