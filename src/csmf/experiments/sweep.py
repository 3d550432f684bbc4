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

from csmf.data.schema import CascadeData, union
from csmf.evaluation import batch_size_for, rows_mask, topk_hits, users_with_positives
from csmf.metrics import recall_ndcg
from csmf.retriever import Retriever


def objective_pairs(served: tuple[str, ...]) -> list[tuple[str, str]]:
    """Every pair of objectives in cascade order (2 stages: one pair; 3 stages: three)."""
    return list(combinations(served, 2))


def top_overlap(model: Retriever, data: CascadeData, a: str, b: str, k: int, max_users: int = 2000) -> float:
    """Mean |top-k(a only) ∩ top-k(b only)| / k over test users of either objective (seen items excluded)."""
    users = np.union1d(users_with_positives(data.test[a]), users_with_positives(data.test[b]))[:max_users]
    seen = union(*(data.train | data.side).values())
    k = min(k, data.n_items)
    total = 0.0
    for start in range(0, len(users), 512):
        ub = users[start : start + 512]
        mask = torch.from_numpy(seen[ub].toarray() > 0)
        with torch.no_grad():
            ta = torch.topk(model.score(ub, a).masked_fill(mask, float("-inf")), k, dim=1).indices
            tb = torch.topk(model.score(ub, b).masked_fill(mask, float("-inf")), k, dim=1).indices
        same = (ta.unsqueeze(2) == tb.unsqueeze(1)).any(dim=2).sum(dim=1)  # (B,) items in both lists
        total += float(same.sum()) / k
    return total / max(len(users), 1)


def _pair_recalls(model: Retriever, data: CascadeData, a: str, b: str, objective: str, grid: list[float], k: int,
                  budget_mb: int) -> list[float]:  # fmt: skip
    """Recall@k of `objective` for every fused ranking (1 - w) s_a + w s_b, scoring each user batch once."""
    truth = data.test[objective]
    users = users_with_positives(truth)
    if len(users) == 0:
        return [0.0 for _ in grid]
    excluded = data.excluded(objective)
    n_pos = np.diff(truth.indptr)[users]
    batch = batch_size_for(data.n_items, budget_mb)
    sums = np.zeros(len(grid))
    for start in range(0, len(users), batch):
        ub = users[start : start + batch]
        with torch.no_grad():
            sa, sb = model.score(ub, a).float(), model.score(ub, b).float()  # (B, N) each
        mask, hit = rows_mask(excluded, ub, data.n_items), rows_mask(truth, ub, data.n_items)
        for j, w in enumerate(grid):
            hits = topk_hits((1.0 - w) * sa + w * sb, mask, hit, k)
            sums[j] += float(recall_ndcg(hits, n_pos[start : start + batch], (k,))[f"recall@{k}"].sum())
    return [round(float(v) / len(users), 5) for v in sums]


def weight_sweep(
    model: Retriever, data: CascadeData, served: tuple[str, ...], points: int = 6, k: int = 50, budget_mb: int = 256
) -> list[dict]:
    """[{"pair": [a, b], "weights": [w...], "recall": {objective: [R@k per w]}, "overlap": x}, ...].

    The fused score is linear in the weights for every model here (a folded query vector is the same sum),
    so each user batch is scored once per objective and mixed for every weight."""
    out = []
    grid = [round(float(w), 4) for w in np.linspace(0.0, 1.0, points)]
    k = min(k, data.n_items)
    for a, b in objective_pairs(served):
        recall = {s: _pair_recalls(model, data, a, b, s, grid, k, budget_mb) for s in served}
        overlap = round(top_overlap(model, data, a, b, k), 4)
        out.append({"pair": [a, b], "weights": grid, "k": k, "recall": recall, "overlap": overlap})
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
