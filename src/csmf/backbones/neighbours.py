"""The graph encoder's item smoothing as one sparse operator per stage graph, built once: each item's top-K
neighbours in the smoothed co-occurrence.

The exact smoothing averages the layers E, S E, ..., S^h E with S = Â^T Â (csmf.backbones.graph.StageGraph), a
product over the whole user x item graph (both directions, forward and backward) in every step. Here the same
average is one (N, N) operator M with at most K entries a row, so item vectors are M E at N x K x D multiply-adds
and a batch's items alone cost B x K x D (UltraGCN keeps about 10 item neighbours for the same reason):

- S's rows are computed in blocks of items, S[block] = Â[:, block]^T Â (blocks sized by how many products their
  rows take), and each row keeps its K largest entries: S_K;
- the layers are the powers of S_K: M' = (I + S_K + ... + S_K^h) / (h + 1), again K entries a row;
- each row is rescaled to the row sum of the exact average, (1 + r_1 + ... + r_h) / (h + 1) with r_j = S^j 1
  (sparse products with a vector, exact), so a truncated row keeps the weight the exact smoothing gives it.

With K at least the number of items within `hops` co-occurrence steps of an item (the row length of the exact
average) the operator is exact (tests check it against StageGraph.smooth); a smaller K cuts each power and the
sum to their largest entries. What that costs on each log is measured in docs/method.md.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def top_k_rows(mat: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """The K largest entries of each row (ties: the lower column), the rest dropped. Rows longer than K are sorted
    in groups of similar length, each padded to its longest row and sorted along the rows (a stable sort keeps the
    column order among ties): one global sort keyed by (row, value, column) took most of the operators' build."""
    mat = sp.csr_matrix(mat)
    mat.sum_duplicates()  # canonical: sorted columns, so a row's positions are in column order
    counts = np.diff(mat.indptr)
    if counts.max(initial=0) <= k:
        return mat
    keep = np.repeat(counts <= k, counts)  # short rows keep every entry
    long_rows = np.flatnonzero(counts > k)
    groups = np.ceil(np.log2(counts[long_rows])).astype(np.int64)  # rows within 2x of each other's length
    for g in np.unique(groups):
        rows = long_rows[groups == g]
        width = int(counts[rows].max())
        positions = mat.indptr[rows][:, None] + np.arange(width)[None, :]  # (r, width) entry positions
        valid = np.arange(width)[None, :] < counts[rows][:, None]
        values = np.where(valid, -mat.data[np.minimum(positions, mat.nnz - 1)], np.inf)  # padding sorts last
        top = np.argsort(values, axis=1, kind="stable")[:, :k]
        keep[np.take_along_axis(positions, top, axis=1).ravel()] = True
    kept = np.minimum(counts, k)
    indptr = np.concatenate([[0], np.cumsum(kept)]).astype(mat.indptr.dtype)
    return sp.csr_matrix((mat.data[keep], mat.indices[keep], indptr), shape=mat.shape)


def item_blocks(normalised: sp.csr_matrix, max_entries: int) -> list[tuple[int, int]]:
    """Consecutive item ranges whose rows of S = Â^T Â hold at most `max_entries` products together (a bound: the
    sum over an item's users of their degrees), so a popular item's dense row does not multiply a block's memory;
    an item above the bound alone is a block of its own."""
    user_degree = np.diff(sp.csr_matrix(normalised).indptr).astype(np.int64)  # (U,)
    pattern = sp.csr_matrix(normalised, copy=True)
    pattern.data = np.ones_like(pattern.data)
    bound = np.asarray(pattern.T @ user_degree).ravel()  # (N,): products behind each row of S
    blocks, start, total = [], 0, 0
    for i, b in enumerate(bound):
        if total + b > max_entries and i > start:
            blocks.append((start, i))
            start, total = i, 0
        total += b
    if start < len(bound):
        blocks.append((start, len(bound)))
    return blocks


def co_occurrence_top_k(normalised: sp.csr_matrix, k: int, max_entries: int = 20_000_000) -> sp.csr_matrix:
    """S_K: the K largest entries of each row of S = Â^T Â, built a block of items at a time (peak memory: one
    block's products, at most `max_entries` (~12 bytes each) unless one item alone has more, not the (N, N)
    matrix)."""
    by_item = sp.csr_matrix(normalised.T)  # (N, U)
    n = by_item.shape[0]
    parts = []
    for start, stop in item_blocks(normalised, max_entries):
        rows = by_item[start:stop] @ normalised  # (b, N): S's rows of this block
        parts.append(top_k_rows(sp.csr_matrix(rows), k))
    return sp.csr_matrix(sp.vstack(parts, format="csr")) if parts else sp.csr_matrix((n, n))


def smoothing_operator(normalised: sp.csr_matrix, hops: int, k: int, max_entries: int = 20_000_000) -> sp.csr_matrix:
    """M: (N, N) with at most K entries a row, M E ~ mean(E, S E, ..., S^hops E) (see the module docstring)."""
    n = normalised.shape[1]
    identity = sp.identity(n, dtype=np.float64, format="csr")
    if hops == 0:
        return identity
    s_k = co_occurrence_top_k(normalised, k, max_entries)
    parts, rows = [], max(1, max_entries // max(k * k, 1))  # a block's next power holds <= rows x K^2 entries
    for start in range(0, n, rows):
        layer = identity[start : start + rows]
        total = layer.copy()
        for _ in range(hops):
            layer = top_k_rows(layer @ s_k, k)  # the next power, kept sparse (rows are independent)
            total = total + layer
        parts.append(top_k_rows(total, k))
    total = sp.csr_matrix(sp.vstack(parts, format="csr"))
    # the exact average's row sums: r_j = S r_{j-1}, r_0 = 1, with S v = Â^T (Â v)
    r, exact = np.ones(n), np.ones(n)
    for _ in range(hops):
        r = normalised.T @ (normalised @ r)
        exact = exact + r
    kept = np.asarray(total.sum(axis=1)).ravel()
    scale = np.divide(exact, kept, out=np.zeros(n), where=kept > 0)
    return sp.csr_matrix(sp.diags(scale / (hops + 1)) @ total)
