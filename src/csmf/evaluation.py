"""Full-catalogue evaluation of any Retriever: every item is a candidate, per objective.

For each stage: users with at least one test positive are ranked over all items, minus the items
the split says to exclude (their training positives), in user batches sized so one score block
stays under `score_budget_mb`. Metrics are averaged over those users.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp
import torch

import csmf.data.context as context
from csmf.data.schema import CascadeData, RowUnion
from csmf.distributed import Ranks, all_sum
from csmf.metrics import recall_ndcg
from csmf.progress import bar
from csmf.retriever import Retriever


@runtime_checkable
class ScoresInContext(Protocol):
    """A model that ranks requests made in a context (csmf.data.context); others rank every request of a user alike."""

    def score_in_context(self, users: np.ndarray, codes: dict[str, np.ndarray], stage: str) -> torch.Tensor: ...


def users_with_positives(mat: sp.csr_matrix) -> np.ndarray:
    return np.flatnonzero(np.diff(mat.indptr) > 0).astype(np.int64)


def _rows_only(mat: sp.csr_matrix, rows: np.ndarray) -> sp.csr_matrix:
    """`mat` with every row but the sorted distinct `rows` emptied (same shape, same row numbers)."""
    counts = np.zeros(mat.shape[0], dtype=np.int64)
    lengths = np.diff(mat.indptr)[rows].astype(np.int64)
    counts[rows] = lengths
    firsts = np.repeat(mat.indptr[rows].astype(np.int64) - np.cumsum(lengths) + lengths, lengths)
    take = firsts + np.arange(int(lengths.sum()), dtype=np.int64)  # each kept row's entries, in order
    indptr = np.concatenate([[0], np.cumsum(counts)])
    return sp.csr_matrix((mat.data[take], mat.indices[take], indptr), shape=mat.shape)


def batch_size_for(n_items: int, budget_mb: int) -> int:
    # A block holds the scores plus a same-size mask; count 8 bytes per (user, item).
    return max(1, int(budget_mb * 2**20 // (8 * max(n_items, 1))))


def rows_mask(mat: sp.csr_matrix, users: np.ndarray, n_items: int) -> torch.Tensor:
    """(B, N) bool tensor marking each user's pairs in `mat`."""
    sub = mat[users]
    rows = np.repeat(np.arange(len(users)), np.diff(sub.indptr))
    mask = torch.zeros((len(users), n_items), dtype=torch.bool)
    mask[torch.from_numpy(rows), torch.from_numpy(sub.indices.astype(np.int64))] = True
    return mask


def writable(scores: torch.Tensor) -> torch.Tensor:
    """Scores that may be written in place: a broadcast row (popularity) or a view is copied first."""
    return scores.clone() if scores._is_view() or not scores.is_contiguous() else scores


def exclude_rows_(scores: torch.Tensor, mat: sp.csr_matrix | RowUnion, users: np.ndarray) -> torch.Tensor:
    """`scores` (B, N) with each user's pairs in `mat` set to -inf, in place: it writes the excluded entries
    only, where a dense (B, N) mask and masked_fill read and write the whole block (at 194k items those took
    about as long as the matrix product that made the scores)."""
    return exclude_block_(scores, mat[users])


def exclude_block_(scores: torch.Tensor, seen: sp.csr_matrix) -> torch.Tensor:
    """`scores` (B, N) with row b's items in row b of `seen` (B, N) set to -inf, in place: for a batch that
    excludes the same rows from several blocks (the weight sweep), read once."""
    rows = np.repeat(np.arange(seen.shape[0]), np.diff(seen.indptr))
    scores[torch.from_numpy(rows), torch.from_numpy(seen.indices.astype(np.int64))] = float("-inf")
    return scores


def hits_of(top: np.ndarray, mat: sp.csr_matrix, rows: np.ndarray) -> np.ndarray:
    """(B, k) bool: whether ranked item top[b, j] is among row rows[b]'s pairs in `mat` (a sorted-key lookup of
    the B x k ranked items, not a dense (B, N) mask)."""
    sub = mat[rows]
    n = np.int64(mat.shape[1])
    keys = np.sort(np.repeat(np.arange(len(rows), dtype=np.int64), np.diff(sub.indptr)) * n + sub.indices)
    if len(keys) == 0:
        return np.zeros(top.shape, dtype=bool)
    asked = np.arange(len(rows), dtype=np.int64)[:, None] * n + top
    return keys[np.minimum(np.searchsorted(keys, asked), len(keys) - 1)] == asked


def list_recalls(lists: sp.csr_matrix, data: CascadeData, objective: str, sample: int = 0,
                 seed: int = 0) -> tuple[float, float, int]:  # fmt: skip
    """(teacher, popularity, users): the mean share of each user's validation pairs (data.test of a tuning view)
    that the teacher's list holds, and that the same number of most popular unseen items hold (popularity by the
    objective's training pairs), over the users with validation pairs (a seeded `sample` of them when > 0)."""
    truth, seen = data.test[objective], data.excluded(objective)
    users = np.flatnonzero(np.diff(truth.indptr))
    if 0 < sample < len(users):
        users = np.sort(np.random.default_rng(seed).choice(users, sample, replace=False))
    if len(users) == 0:
        return 0.0, 0.0, 0
    counts = np.asarray(data.matrix(objective).sum(axis=0)).ravel()
    popular = np.lexsort((np.arange(len(counts)), -counts))  # most pairs first, then the lower item id
    taught = popular_found = 0.0
    for u in users:
        wanted = truth.indices[truth.indptr[u] : truth.indptr[u + 1]]
        listed = lists.indices[lists.indptr[u] : lists.indptr[u + 1]]
        k = max(len(listed), 1)
        had = seen.indices[seen.indptr[u] : seen.indptr[u + 1]]
        head = popular[: k + len(had)]
        head = head[~np.isin(head, had)][:k]
        taught += np.isin(wanted, listed).sum() / len(wanted)
        popular_found += np.isin(wanted, head).sum() / len(wanted)
    return float(taught / len(users)), float(popular_found / len(users)), len(users)


def metric_values(result: dict) -> dict[str, float]:
    """The ranking metrics of an evaluation result (recall@K, ndcg@K), without its counts."""
    return {k: v for k, v in result.items() if "@" in k}


def evaluate_stage(
    model: Retriever,
    data: CascadeData,
    stage: str,
    ks: tuple[int, ...] = (10, 20, 50),
    budget_mb: int = 256,
    progress: bool = False,
    shard: Ranks | None = None,
    sample: int = 0,
    seed: int = 0,
) -> dict[str, float]:
    """Metrics of one stage, averaged over its users with test positives; with per-row context
    (data.context) over requests instead, a request being a (user, context) with test positives
    (csmf.data.context). A model that reads no context ranks every request of a user alike.
    `shard` (training processes, csmf.distributed): each ranks every world-th user and the sums are
    all-reduced, so every process returns one process's metrics. `sample` > 0: a seeded draw of that many of those
    users (every request of each), as validation takes past the full-softmax limit (eval.valid_users)."""
    truth_mat = data.test[stage]
    units = users = users_with_positives(truth_mat)
    if len(units) == 0:
        return {}
    drawn = 0 < sample < len(units)
    if drawn:
        chosen = np.random.default_rng(seed).choice(units, sample, replace=False)
        keep = np.isin(users, chosen)
        units, users = units[keep], users[keep]
    codes: dict[str, np.ndarray] = {}
    if data.context:  # the requests of the drawn users only (every user's took 0.3 GiB at the 42M-row release)
        asked = context.requests(_rows_only(truth_mat, units) if drawn else truth_mat, data.context)
        truth_mat, units, users, codes = asked.truth, np.arange(len(asked.users)), asked.users, asked.codes
    in_context = model if codes and isinstance(model, ScoresInContext) else None
    excluded = data.excluded_rows(stage)
    n_pos = np.diff(truth_mat.indptr)[units]
    batch = batch_size_for(data.n_items, budget_mb)
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")}
    mine = np.arange(len(units))  # the rows this process ranks: every world-th when sharded
    if shard is not None and shard.active:
        mine = mine[shard.rank :: shard.world]
    batches = range(0, len(mine), batch)
    for start in bar(batches, progress, desc=f"eval {stage}", unit="batch", leave=False):
        at = mine[start : start + batch]
        rows, ub = units[at], users[at]
        with torch.no_grad():
            if in_context is not None:
                scores = in_context.score_in_context(ub, {n: c[rows] for n, c in codes.items()}, stage).float().cpu()
            else:
                scores = model.score(ub, stage).float().cpu()  # (B, N); from a GPU while training there
        scores = exclude_rows_(writable(scores), excluded, ub)
        if data.candidates is not None:  # rank only these items (a cold-item split)
            scores.masked_fill_(~torch.from_numpy(data.candidates).unsqueeze(0), float("-inf"))
        top = torch.topk(scores, k=min(max(ks), scores.shape[1]), dim=1).indices.numpy()  # (B, k)
        hits = hits_of(top, truth_mat, rows)
        if hits.shape[1] < max(ks):  # fewer items than K: pad with misses
            hits = np.pad(hits, ((0, 0), (0, max(ks) - hits.shape[1])))
        for name, values in recall_ndcg(hits, n_pos[at], ks).items():
            sums[name] += float(values.sum())
    if shard is not None and shard.active:
        sums = dict(zip(sums, all_sum(list(sums.values())), strict=True))
    metrics = {name: total / len(units) for name, total in sums.items()}
    metrics["users"] = int(len(np.unique(users)))
    if codes:
        metrics["requests"] = int(len(units))
    return metrics


def evaluate(
    model: Retriever,
    data: CascadeData,
    ks: tuple[int, ...] = (10, 20, 50),
    budget_mb: int = 256,
    stages: tuple[str, ...] | None = None,
    progress: bool = False,
    shard: Ranks | None = None,
) -> dict[str, dict[str, float]]:
    """{stage: {"recall@10": x, "ndcg@10": x, ..., "users": n}} for every stage with test pairs."""
    out = {}
    for stage in stages or data.stages:
        result = evaluate_stage(model, data, stage, ks, budget_mb, progress, shard)
        if result:
            out[stage] = result
    return out
