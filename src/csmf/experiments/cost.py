"""What serving a fused multi-objective query costs each model: parameters, index bytes and vectors per item,
and the measured time of one fused top-k for a batch of users, as a ratio to a single-objective two-tower
(one D-wide vector per item) timed in the same call.

A model's index is what its fused query searches: one D-wide vector per item for CSMF (weights folded into
the query) and MVKE (shared item vector); the S x D concatenation for shared-bottom / MMoE / PLE and for
per-objective ALS factors (sum_k w_k <u_k, v_k> = <[w_k u_k]_k, [v_k]_k>). Count- and neighbourhood-based
models (popularity, item-kNN) have no vector index; their fused query is timed as they score.
"""

from __future__ import annotations

import numpy as np
import torch

from csmf.data.schema import CascadeData
from csmf.retriever import Retriever
from csmf.timing import timed


def exact_top_k(
    queries: torch.Tensor, items: torch.Tensor, k: int, block: int = 65_536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-k of each query over all items, in item blocks so memory stays bounded.

    queries: (B, W); items: (N, W). Returns (scores (B, k), ids (B, k)), best first.
    """
    best_scores, best_ids = None, None
    for start in range(0, items.shape[0], block):
        scores = queries @ items[start : start + block].T  # (B, block)
        top = torch.topk(scores, k=min(k, scores.shape[1]), dim=1)
        ids = top.indices + start
        if best_scores is not None:
            merged = torch.cat([best_scores, top.values], dim=1)
            keep = torch.topk(merged, k=min(k, merged.shape[1]), dim=1).indices
            best_scores = merged.gather(1, keep)
            best_ids = torch.cat([best_ids, ids], dim=1).gather(1, keep)
        else:
            best_scores, best_ids = top.values, ids
    return best_scores, best_ids


def _synthetic_query_seconds(query: torch.Tensor, n_items: int, k: int, repeats: int, rng: torch.Generator) -> float:
    """Fused top-k time over `n_items` random item vectors as wide as the query (timing depends on shapes)."""
    items = torch.randn(n_items, query.shape[1], generator=rng)  # freed when this returns
    return timed(lambda: exact_top_k(query, items, k), repeats)


def index_of(model: Retriever) -> tuple[torch.Tensor | None, int]:
    """(item matrix the fused query searches, vectors per item); (None, 0) for a model without one."""
    if not model.has_vectors:
        return None, 0
    return model.item_vectors(), model.vectors_per_item()


def query_cost(
    model: Retriever,
    data: CascadeData,
    stages: tuple[str, ...],
    dim: int,
    users: int = 1024,
    synthetic_items: int = 1_000_000,
    k: int = 50,
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """The cost object of one model (see the module docstring); `dim` is the single two-tower's D."""
    rng = torch.Generator().manual_seed(seed)
    k = min(k, data.n_items)  # a catalogue smaller than k ranks every item
    batch = np.resize(np.arange(data.n_users), users)  # `users` query rows (users repeat on small data)
    weights = {s: 1.0 / len(stages) for s in stages}
    items, vectors_per_item = index_of(model)

    # The reference: a single-objective two-tower's query, one D-wide vector per item, same call.
    ref_items = torch.randn(data.n_items, dim, generator=rng)
    ref_query = torch.randn(users, dim, generator=rng)
    ref_jd = timed(lambda: exact_top_k(ref_query, ref_items, k), repeats)

    out: dict = {"params": int(model.num_params()), "vectors_per_item": vectors_per_item}
    if items is None:
        out["index_bytes_per_item"] = 0
        jd = timed(lambda: torch.topk(model.score_fused(batch, weights), k, dim=1), repeats)
        out.update(query_seconds_catalogue=round(jd, 5), query_ratio_catalogue=round(jd / ref_jd, 3))
        out.update(query_seconds_1m=None, query_ratio_1m=None)
        out["note"] = "no vector index: the fused query scores the catalogue from the user's history"
        return out
    width = int(items.shape[1])
    out["index_bytes_per_item"] = width * items.element_size()
    out["index_width"] = width
    query = torch.randn(users, width, generator=rng)  # timing depends on shapes only
    jd = timed(lambda: exact_top_k(query, items.contiguous(), k), repeats)
    ref_big = _synthetic_query_seconds(ref_query, synthetic_items, k, repeats, rng)
    big_t = _synthetic_query_seconds(query, synthetic_items, k, repeats, rng)
    out.update(
        query_seconds_catalogue=round(jd, 5),
        query_ratio_catalogue=round(jd / ref_jd, 3),
        query_seconds_1m=round(big_t, 5),
        query_ratio_1m=round(big_t / ref_big, 3),
        synthetic_items=synthetic_items,
    )
    return out
