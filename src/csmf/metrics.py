"""Recall@K and NDCG@K from top-k hit arrays: pure numpy, no model, no torch.

Binary relevance. Recall@K = hits in the top K / |positives|. NDCG@K = DCG@K / IDCG@K where IDCG@K is
the DCG of min(|positives|, K) hits at the top (so a user with 3 positives can reach NDCG 1 at K=50).
"""

from __future__ import annotations

import numpy as np


def discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2))  # rank 1 -> 1/log2(2)


def recall_ndcg(hits: np.ndarray, n_pos: np.ndarray, ks: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Per-user metrics.

    hits: (U, Kmax) bool, hits[u, r] = the item at rank r+1 is a positive of user u.
    n_pos: (U,) number of positives of each user (>= 1).
    Returns {"recall@K": (U,), "ndcg@K": (U,)} for each K in ks.
    """
    hits = np.asarray(hits, dtype=bool)
    n_pos = np.asarray(n_pos, dtype=np.float64)
    if hits.shape[1] < max(ks):
        raise ValueError(f"need at least {max(ks)} ranked items per user, got {hits.shape[1]}")
    if (n_pos < 1).any():
        raise ValueError("every evaluated user needs at least one positive")
    disc = discounts(max(ks))
    ideal_cum = np.cumsum(disc)
    out = {}
    for k in ks:
        h = hits[:, :k]
        out[f"recall@{k}"] = h.sum(axis=1) / n_pos
        dcg = (h * disc[:k]).sum(axis=1)
        idcg = ideal_cum[np.minimum(n_pos, k).astype(int) - 1]
        out[f"ndcg@{k}"] = dcg / idcg
    return out
