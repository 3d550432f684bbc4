"""Objective-weight sweep: what the per-request weight knob does to the fused ranking (issue 12, item 5).

For each pair (a, b) of served objectives and weights (1 - w, w) with w from 0 to 1, the fused score
(1 - w) s_a + w s_b ranks the full catalogue, and every served objective's Recall@K of that one ranking
is measured on its own test users (with its own exclusions). The top-K overlap between the end points
(a only vs b only) says how far the knob moves the list at all.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import torch

from csmf.data.schema import CascadeData, RowUnion
from csmf.evaluation import batch_size_for, exclude_block_, hits_of, users_with_positives, writable
from csmf.metrics import recall_ndcg
from csmf.retriever import Retriever


def objective_pairs(served: tuple[str, ...]) -> list[tuple[str, str]]:
    """Every pair of objectives in cascade order (2 stages: one pair; 3 stages: three)."""
    return list(combinations(served, 2))


def top_overlap(model: Retriever, data: CascadeData, a: str, b: str, k: int, max_users: int = 2000,
                budget_mb: int = 256) -> float:  # fmt: skip
    """Mean |top-k(a only) ∩ top-k(b only)| / k over test users of either objective (seen items excluded). A batch
    holds its two blocks of scores within `budget_mb`, and reads its users' seen items only (a dense mask of 512
    users and the whole union of seen items took 1.1 GiB at 200,000 items)."""
    users = np.union1d(users_with_positives(data.test[a]), users_with_positives(data.test[b]))[:max_users]
    seen = RowUnion(tuple((data.train | data.side).values()))
    k = min(k, data.n_items)
    found = 0  # items in both lists, counted exactly whatever the batches
    batch = batch_size_for(data.n_items, budget_mb // 2)
    for start in range(0, len(users), batch):
        ub = users[start : start + batch]
        seen_ub = seen[ub]  # the union of the batch's rows, built once for both lists
        with torch.no_grad():
            ta = torch.topk(exclude_block_(writable(model.score(ub, a).float()), seen_ub), k, dim=1).indices
            tb = torch.topk(exclude_block_(writable(model.score(ub, b).float()), seen_ub), k, dim=1).indices
        found += int((ta.unsqueeze(2) == tb.unsqueeze(1)).any(dim=2).sum())
    return found / k / max(len(users), 1)


def sweep_users(users: np.ndarray, n_items: int, max_scores: int, seed: int) -> np.ndarray:
    """The test users a sweep scores: all of them while users x items stays within `max_scores` (0 = no limit),
    else a seeded sample of max_scores // items users (sorted, so the batches read rows in order)."""
    if max_scores <= 0 or len(users) * n_items <= max_scores:
        return users
    keep = max(1, max_scores // n_items)
    return np.sort(np.random.default_rng(seed).choice(users, size=keep, replace=False))


def _objective_recalls(model: Retriever, data: CascadeData, objective: str, served: tuple[str, ...],
                       pairs: list[tuple[str, str]], grid: list[float], k: int, budget_mb: int, max_scores: int,
                       seed: int) -> tuple[dict[tuple[str, str], list[float]], int]:  # fmt: skip
    """Recall@k of `objective` for every pair's fused rankings (1 - w) s_a + w s_b: each user batch is scored
    once per served objective and mixed for every pair and weight. Returns ({pair: [R@k per w]}, users)."""
    truth = data.test[objective]
    users = sweep_users(users_with_positives(truth), data.n_items, max_scores, seed)
    if len(users) == 0:
        return {pair: [0.0 for _ in grid] for pair in pairs}, 0
    excluded = data.excluded_rows(objective)
    n_pos = np.diff(truth.indptr)[users]
    sums = {pair: np.zeros(len(grid)) for pair in pairs}
    needed = [s for s in served if any(s in pair for pair in pairs)]
    # the budget is for every block a batch holds at once: one per objective, and the fused one with its two
    # weighted terms (at 200,000 items that was six 268 MB blocks)
    batch = batch_size_for(data.n_items, budget_mb // (len(needed) + 3))
    for start in range(0, len(users), batch):
        ub = users[start : start + batch]
        seen = excluded[ub]  # built once a batch, not once per pair and weight
        with torch.no_grad():
            scores = {s: model.score(ub, s).float() for s in needed}  # (B, N) each
        for a, b in pairs:
            for j, w in enumerate(grid):
                fused = exclude_block_((1.0 - w) * scores[a] + w * scores[b], seen)  # a new block each
                hits = hits_of(torch.topk(fused, k=k, dim=1).indices.numpy(), truth, ub)
                found = recall_ndcg(hits, n_pos[start : start + batch], (k,))[f"recall@{k}"]
                sums[(a, b)][j] += float(found.sum())
    return {pair: [round(float(v) / len(users), 5) for v in sums[pair]] for pair in pairs}, len(users)


def weight_sweep(model: Retriever, data: CascadeData, served: tuple[str, ...], points: int = 6, k: int = 50,
                 budget_mb: int = 256, max_scores: int = 0, seed: int = 0) -> list[dict]:  # fmt: skip
    """[{"pair": [a, b], "weights": [w...], "recall": {objective: [R@k per w]}, "overlap": x, "users": {...}}, ...].

    The fused score is linear in the weights for every model here (a folded query vector is the same sum),
    so each user batch is scored once per objective and mixed for every pair and weight. On a large catalogue
    (users x items above `max_scores`, bench.sweep_max_scores) each objective's recall is measured on a sample
    of its test users drawn with `seed`; "users" says how many."""
    grid = [round(float(w), 4) for w in np.linspace(0.0, 1.0, points)]
    k = min(k, data.n_items)
    pairs = objective_pairs(served)
    recall, users = {}, {}
    for s in served:
        recall[s], users[s] = _objective_recalls(model, data, s, served, pairs, grid, k, budget_mb, max_scores, seed)
    out = []
    for a, b in pairs:
        overlap = round(top_overlap(model, data, a, b, k, budget_mb=budget_mb), 4)
        out.append({"pair": [a, b], "weights": grid, "k": k, "recall": {s: recall[s][(a, b)] for s in served},
                    "overlap": overlap, "users": users})  # fmt: skip
    return out


def mean_sweeps(sweeps: list[list[dict]]) -> list[dict]:
    """The mean of several seeds' sweeps (same pairs and weights)."""
    first = sweeps[0]
    out = []
    for i, entry in enumerate(first):
        recall = {
            s: [round(float(np.mean([sw[i]["recall"][s][j] for sw in sweeps])), 5) for j in range(len(values))]
            for s, values in entry["recall"].items()
        }
        overlap = round(float(np.mean([sw[i]["overlap"] for sw in sweeps])), 4)
        out.append({**entry, "recall": recall, "overlap": overlap})
    return out
