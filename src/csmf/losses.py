"""Training losses as pure tensor functions: softmax retrieval loss (full catalogue or in-batch with logQ)
and the cross-stage adaptive margin (AML, method notes §5 [INTERPRETATION]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softmax_loss(
    scores: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    margin: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax cross-entropy of scores / temperature, averaged over rows (weighted by `weight` if given).

    scores: (B, C); target: (B,) column of each row's positive; margin: (B,) logit units taken off each
    positive (AML); log_q: (C,) log sampling probability of each candidate, subtracted from its logit
    (logQ correction for sampled candidates); weight: (B,) importance of each row (auxiliary pairs of an
    upstream behaviour count less than the stage's own positives).
    """
    scaled = scores / temperature
    if log_q is not None:
        scaled = scaled - log_q.unsqueeze(0)
    if margin is not None:
        scaled = scaled.scatter_add(1, target.unsqueeze(1), -margin.unsqueeze(1))
    if weight is None:
        return F.cross_entropy(scaled, target)
    per_row = F.cross_entropy(scaled, target, reduction="none")  # (B,)
    return (per_row * weight).sum() / weight.sum()


def aml_margin(upstream: torch.Tensor, target: torch.Tensor, m0: float) -> torch.Tensor:
    """Cross-stage adaptive margin: m0 * (share of candidates the frozen upstream objective ranks above
    the positive). A positive the upstream stage already ranks on top gets no margin; one it ranks low
    (what this stage must add) gets up to m0. Stop-gradient: upstream is detached.

    upstream: (B, C) upstream-objective scores over the same candidates as the loss; target: (B,).
    """
    up = upstream.detach()
    positive = up.gather(1, target.unsqueeze(1))  # (B, 1)
    above = (up > positive).float().mean(dim=1)  # (B,) in [0, 1)
    return m0 * above


def in_batch_scores(user: torch.Tensor, item: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In-batch negatives: every other pair's item is a negative of each row.

    user, item: (B, D) vectors of the batch pairs; items: (B,) item ids. Returns (scores (B, B), target).
    Other copies of a row's own positive item are masked out, so a repeated item is never a negative of
    itself. Pair with `log_q` of the batch items in `softmax_loss` (logQ correction).
    """
    scores = user @ item.T  # (B, B)
    same = items.unsqueeze(0) == items.unsqueeze(1)
    same.fill_diagonal_(False)
    return scores.masked_fill(same, float("-inf")), torch.arange(len(items))
