"""Objective weights -> query scale: the "one vector per item" claim lives here (method notes §2, §7).

Objective k scores with the output dimensions owned by stages 1..k, so a fused score
sum_k w_k * s_k(u, i) = <u * lambda, v_i> with lambda_d = sum of w_k over the objectives k whose score
uses dimension d (k >= owner(d)). One inner-product search over one item matrix serves any weighting.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def fold_weights(output_owner: torch.Tensor, weights: Mapping[int, float]) -> torch.Tensor:
    """(D,) lambda for objective weights keyed by stage number (1-based); free dimensions get 0."""
    lam = torch.zeros(len(output_owner), dtype=torch.float32)
    for stage, w in weights.items():
        lam += float(w) * ((output_owner >= 1) & (output_owner <= stage)).float()
    return lam
