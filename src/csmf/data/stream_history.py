"""Streamed training's user histories: each behaviour's latest H items of every user, built once from the Parquet
cache, block by block, into one CSR matrix per behaviour (csmf.data.histories' rule; docs/scale.md).

A streamed run holds no user's training rows in memory, but the MLP encoder's history bags read a user's items of
every behaviour in each step. The bags read at most `model.history_max` = H items a behaviour anyway, so those H
are what is kept: the cache holds no times, so "latest" is the seeded (user, item) hash RecentHistory ranks by
without timestamps, and a user's kept items are exactly those RecentHistory keeps of the same user's in-memory
training pairs (tested). Only training rows (split 0) are read: no validation or test row reaches a history.

Memory of the result: per user and behaviour, 4 bytes of row pointer (int32) and 8 bytes per kept item (int32
index, float32 value, the dtype of every other history matrix), so at most 8H + 4 bytes (1,604 at H = 200).
While it is built: the kept items of the buckets already read (4 bytes each, each bucket's freed once copied
into its matrix), one bucket's working set (its users' kept items and at most max(`pending_rows`, that many) rows
read since they were last cut, ~60 bytes each while cut), and, while one behaviour's matrix is filled, its parts
beside it (4 bytes an item more): at most 1.5 times the result plus one bucket's working set, never the log.
H = 0 keeps every distinct training pair (8 bytes a pair).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from csmf.data.errors import DataError
from csmf.data.histories import seeded_keys

# (users with kept items, their counts, their items by user then item) of one bucket, int32
_Part = tuple[np.ndarray, np.ndarray, np.ndarray]


def recent_histories(cache, behaviours: tuple[str, ...], limit: int, seed: int,
                     pending_rows: int = 1 << 20) -> dict[str, sp.csr_matrix]:  # fmt: skip
    """behaviour -> (U, N) binary float32 CSR (int32 indices): each user's latest `limit` distinct training items
    of that behaviour in `cache` (csmf.data.cache.Cache; 0 = all), by RecentHistory's hash of (user, item, seed).
    pending_rows: rows read before a bucket's kept items are cut again (train.stream_buffer_rows)."""
    parts: dict[str, list[_Part]] = {b: [] for b in behaviours}
    for path in cache.bucket_files():  # every row of a user is in one bucket: a bucket's cut is its users' final one
        kept = {b: (np.zeros(0, np.int32), np.zeros(0, np.int32)) for b in behaviours}
        pending: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {b: [] for b in behaviours}
        held = dict.fromkeys(behaviours, 0)
        for block in cache.blocks(path, ["user", "item", "split", *behaviours]):
            train = block.column("split").to_numpy() == 0
            users, items = block.column("user").to_numpy(), block.column("item").to_numpy()
            for b in behaviours:
                on = train & (block.column(b).to_numpy() == 1)
                pending[b].append((users[on], items[on]))
                held[b] += int(on.sum())
                if held[b] >= max(pending_rows, len(kept[b][0])):  # amortised: each cut at least doubles the rows
                    kept[b] = _cut([kept[b], *pending[b]], cache.n_items, limit, seed)
                    pending[b], held[b] = [], 0
        for b in behaviours:
            users, items = _cut([kept[b], *pending[b]], cache.n_items, limit, seed)
            rows, counts = np.unique(users, return_counts=True)
            parts[b].append((rows, counts.astype(np.int32), items))
    return {b: _assemble(parts.pop(b), cache.n_users, cache.n_items, cache.folder) for b in behaviours}


def _cut(blocks: list[tuple[np.ndarray, np.ndarray]], n_items: int, limit: int,
         seed: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(users, items) int32, sorted by user then item: the distinct pairs of `blocks`, each user's `limit` with
    the largest keys (ties: the smaller item, as RecentHistory.rows; 0 = all)."""
    pair = np.unique(np.concatenate([u.astype(np.int64) * n_items + i for u, i in blocks]))  # by user, then item
    users, items = np.divmod(pair, n_items)
    del pair
    if limit > 0 and len(users):
        keys = seeded_keys(users, items, seed)
        order = np.lexsort((-keys, users))  # by user, newest first; stable, so ties keep the item order
        first = np.searchsorted(users, users, side="left")  # each entry's user's first position
        rank = np.empty(len(users), np.int64)
        rank[order] = np.arange(len(users)) - first[order]
        keep = rank < limit  # kept entries stay in (user, item) order
        users, items = users[keep], items[keep]
    return users.astype(np.int32), items.astype(np.int32)


def _assemble(parts: list[_Part], n_users: int, n_items: int, folder) -> sp.csr_matrix:
    """One (U, N) CSR from the buckets' parts (disjoint users), each part freed once copied in."""
    counts = np.zeros(n_users, np.int64)
    for rows, n, _ in parts:
        if counts[rows].any():
            raise DataError(f"{folder}: a user's rows are in two buckets; delete the folder and convert again")
        counts[rows] = n
    total = int(counts.sum())
    index = np.int32 if total < 2**31 else np.int64
    indptr = np.zeros(n_users + 1, index)
    np.cumsum(counts, out=indptr[1:])
    del counts
    indices = np.empty(total, index)
    parts.reverse()
    while parts:
        rows, n, items = parts.pop()
        local = np.cumsum(n, dtype=np.int64) - n  # each user's first position in the part
        indices[np.repeat(indptr[rows].astype(np.int64) - local, n) + np.arange(len(items))] = items
    mat = sp.csr_matrix((np.ones(total, np.float32), indices, indptr), shape=(n_users, n_items))
    mat.has_sorted_indices = True  # each row was filled in item order
    return mat
