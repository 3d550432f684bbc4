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
from csmf.evaluate import evaluate_stage, users_with_positives
from csmf.models.base import Retriever


class Fused:
    """A model seen through fixed objective weights: every objective scores with the one fused ranking."""

    def __init__(self, model: Retriever, weights: dict[str, float]):
        self.model, self.weights = model, weights

    def score(self, users: np.ndarray, stage: str) -> torch.Tensor:
        return self.model.score_fused(users, self.weights)


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
            ta = torch.topk(model.score_fused(ub, {a: 1.0}).masked_fill(mask, float("-inf")), k, dim=1).indices
            tb = torch.topk(model.score_fused(ub, {b: 1.0}).masked_fill(mask, float("-inf")), k, dim=1).indices
        same = (ta.unsqueeze(2) == tb.unsqueeze(1)).any(dim=2).sum(dim=1)  # (B,) items in both lists
        total += float(same.sum()) / k
    return total / max(len(users), 1)


def weight_sweep(
    model: Retriever, data: CascadeData, served: tuple[str, ...], points: int = 6, k: int = 50, budget_mb: int = 256
) -> list[dict]:
    """[{"pair": [a, b], "weights": [w...], "recall": {objective: [R@k per w]}, "overlap": x}, ...]."""
    out = []
    grid = [round(float(w), 4) for w in np.linspace(0.0, 1.0, points)]
    for a, b in objective_pairs(served):
        recall: dict[str, list[float]] = {s: [] for s in served}
        for w in grid:
            fused = Fused(model, {a: round(1.0 - w, 4), b: w})
            for s in served:
                recall[s].append(round(evaluate_stage(fused, data, s, (k,), budget_mb)[f"recall@{k}"], 5))
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
