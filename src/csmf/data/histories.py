"""A user's history as the user towers read it: the latest H items per behaviour (`model.history_max`).

A bag over a whole history costs in proportion to the history: a heavy user of an impression log holds
thousands of rows, and one such user in a batch sets the step's cost. Keeping each behaviour's H most recent
items bounds a batch's bags by B x H per behaviour, whatever the log.

Recency comes from the log's timestamps (CascadeData.recency: the rank of each training pair's latest row, 1 =
oldest). A generic log holds a pair out whole, so a training pair's time is training data. Without timestamps
(JD's files, the cache's streamed rows) the H kept are a seeded hash of (user, item): the same ones every time,
unrelated to the ranking.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from csmf.hashing import mix64


@dataclass(frozen=True)
class RecentHistory:
    """The rule that cuts a batch's history rows to the latest `limit` items (0 = keep them all)."""

    limit: int = 0
    recency: sp.csr_matrix | None = None  # (U, N) rank of each training pair's time, 1 = oldest; None = no times
    seed: int = 0

    def rows(self, matrix: sp.csr_matrix, users: np.ndarray) -> sp.csr_matrix:
        """(B, N): `matrix[users]` with each row cut to its `limit` latest entries (values kept)."""
        rows = sp.csr_matrix(matrix[users])
        if self.limit <= 0 or rows.nnz == 0 or int(np.diff(rows.indptr).max()) <= self.limit:
            return rows
        rows.sort_indices()
        counts = np.diff(rows.indptr)
        row_of = np.repeat(np.arange(rows.shape[0]), counts)
        keys = self._keys(rows, np.asarray(users, dtype=np.int64), row_of)
        order = np.lexsort((-keys, row_of))  # by row, newest first
        rank = np.empty(rows.nnz, dtype=np.int64)
        rank[order] = np.arange(rows.nnz) - np.repeat(rows.indptr[:-1], counts)[order]
        keep = rank < self.limit  # positions stay in row order, so the kept entries are a valid CSR
        indptr = np.r_[0, np.cumsum(np.bincount(row_of[keep], minlength=rows.shape[0]))]
        return sp.csr_matrix((rows.data[keep], rows.indices[keep], indptr), shape=rows.shape)

    def _keys(self, rows: sp.csr_matrix, users: np.ndarray, row_of: np.ndarray) -> np.ndarray:
        """A recency key per stored entry of `rows` (larger = newer)."""
        if self.recency is not None:
            ones = rows.copy()
            ones.data = np.ones_like(ones.data)
            # same structure as `rows` (every entry kept, +1 where a time is known), so .data lines up entry by entry
            keyed = sp.csr_matrix(ones + ones.multiply(self.recency[users]))
            keyed.sort_indices()
            if keyed.nnz == rows.nnz and np.array_equal(keyed.indices, rows.indices):
                return keyed.data.astype(np.float64)
        return seeded_keys(users[row_of], rows.indices, self.seed)


def seeded_keys(users: np.ndarray, items: np.ndarray, seed: int) -> np.ndarray:
    """(P,) the recency key of each (users[p], items[p]) pair where the log has no times: a seeded hash, larger =
    kept first (RecentHistory; csmf.data.stream_history builds streamed runs' histories by the same key)."""
    pair = users.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + items.astype(np.uint64)
    return mix64(pair ^ np.uint64(seed)).astype(np.float64)


def recency_ranks(users: np.ndarray, items: np.ndarray, times: np.ndarray, n_users: int,
                  n_items: int) -> sp.csr_matrix:  # fmt: skip
    """(U, N) the rank of each pair's time among all of them (1 = oldest; equal times share a rank)."""
    ranks = np.unique(times, return_inverse=True)[1].astype(np.float64) + 1.0
    return sp.csr_matrix((ranks, (users, items)), shape=(n_users, n_items))
