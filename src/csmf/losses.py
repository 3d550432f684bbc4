"""Training losses as pure tensor functions: the softmax retrieval loss over the full catalogue (per pair or
per user) or over sampled candidates (in-batch + uniform negatives with logQ: `sampled_softmax`, the one
sampled softmax CSMF and the multi-task towers share), the cross-stage adaptive margin (AML, method notes §5
[INTERPRETATION]) and distillation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _flat(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Positions of (rows, cols) in x's flat view. Reading and writing entries there keeps autograd off index_put,
    which takes a sort-based path under deterministic algorithms (~9 ms a call on a (512, 13k) score block)."""
    return rows * x.shape[1] + cols


def entries(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """x[rows, cols] whose gradient is an index_add (`_flat`)."""
    return x.reshape(-1).index_select(0, _flat(x, rows, cols))


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
    scaled = scores.float() / temperature  # the softmax in float32 also under mixed precision
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


def in_batch_scores(
    user: torch.Tensor, item: torch.Tensor, items: torch.Tensor, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-batch negatives: every other pair's item is a negative of each row.

    user: (B, D) vectors of the batch pairs; item, items: (M, D) vectors and (M,) ids of the batch items,
    row b's own at position offset + b (M = B and offset 0 for one process; the items of every rank's batch
    when they are gathered, csmf.distributed). Returns (scores (B, M), target (B,)). Other copies of a row's
    own positive item are masked out, so a repeated item is never a negative of itself. Pair with `log_q`
    of the batch items in `softmax_loss` (logQ correction).
    """
    scores = user @ item.T  # (B, M)
    rows = torch.arange(user.shape[0], device=user.device)
    target = rows + offset
    same = items.unsqueeze(0) == items[target].unsqueeze(1)
    same[rows, target] = False
    return scores.masked_fill(same, float("-inf")), target


def sampled_softmax(
    user: torch.Tensor,
    items: torch.Tensor,
    ids: torch.Tensor,
    item_log_q: torch.Tensor,
    temperature: float,
    offset: int = 0,
    negatives: torch.Tensor | None = None,
    negative_log_q: torch.Tensor | None = None,
    upstream_user: torch.Tensor | None = None,
    m0: float = 0.0,
    aml_form: str = "margin",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The sampled softmax: each row's positive against the batch's other items and `negatives`, logQ-corrected.

    user: (B, D); items, ids: (M, D) vectors and (M,) ids of the batch items, row b's own at offset + b (M = B
    for one process; every rank's when gathered); item_log_q: (N,) log share of each item in the training
    pairs (csmf.data.batches.log_q). negatives: (K, D) uniformly drawn extra items with negative_log_q (K,)
    = log(K / N).

    logQ: a candidate's logit loses the log of its expected count among the candidates: log(M q_i) for an
    in-batch item (M draws in proportion to q), log(K / N) for a uniform one. Both parts are expected counts
    of the same candidate set, so neither kind of negative outweighs the other (docs/method.md, *logQ*).

    AML (m0 > 0): upstream_user (B, D) is the user at the frozen upstream objective (u masked to its dims); the
    positive's margin is m0 x the share of candidates the upstream objective ranks above it ("margin": taken
    off the positive's logit; "weight": 1 + that margin multiplies the row's weight).
    """
    scores, target = in_batch_scores(user, items, ids, offset)  # (B, M)
    correction = item_log_q[ids] + np.log(len(ids))
    upstream = in_batch_scores(upstream_user, items, ids, offset)[0] if m0 > 0 else None
    if negatives is not None:
        scores = torch.cat([scores, user @ negatives.T], dim=1)  # (B, M + K)
        correction = torch.cat([correction, negative_log_q])
        if upstream is not None:
            upstream = torch.cat([upstream, upstream_user @ negatives.T], dim=1)
    return aml_softmax(scores, target, temperature, upstream, m0, aml_form, correction, weight)


def aml_softmax(
    scores: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    upstream: torch.Tensor | None,
    m0: float,
    aml_form: str,
    log_q: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """`softmax_loss` with the cross-stage margin of `upstream` (B, C) scores over the same candidates (None or
    m0 = 0: no margin), in AML form "margin" (off the positive's logit) or "weight" (1 + m multiplies the row)."""
    if aml_form not in ("margin", "weight"):
        raise ValueError(f"cascade.aml_form must be 'margin' or 'weight' on batches of pairs, got {aml_form!r}")
    margin = aml_margin(upstream, target, m0) if upstream is not None and m0 > 0 else None
    if margin is not None and aml_form == "weight":  # up-weight the positives the upstream stage misses
        weight, margin = (1.0 if weight is None else weight) * (1.0 + margin), None
    return softmax_loss(scores, target, temperature, margin=margin, log_q=log_q, weight=weight)


def user_softmax_loss(
    scores: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    weight: torch.Tensor,
    temperature: float,
    margin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Full-catalogue softmax over every positive of each user at once: the weighted mean over positive
    pairs (rows[p], cols[p]) of -log softmax(scores[rows[p]] / T)[cols[p]], one log-partition per user.

    Equal to the per-pair full softmax loss (each pair's row holds the same catalogue), at the cost of one
    softmax per user instead of one per pair. `margin` (P,) lowers each positive's own logit in its own
    softmax, exactly: the partition swaps exp(z) for exp(z - m). scores: (B, N); rows, cols, weight: (P,).
    """
    z = scores / temperature  # (B, N)
    log_partition = torch.logsumexp(z, dim=1)[rows]  # (P,)
    z_pos = entries(z, rows, cols)  # (P,)
    if margin is None:
        per_pair = log_partition - z_pos
    else:
        # log(Z') - log(Z); a positive holding nearly all of Z with a large margin would take log(0): kept finite
        shifted = torch.log1p((torch.exp(z_pos - log_partition) * torch.expm1(-margin)).clamp(min=-1 + 1e-6))
        per_pair = log_partition + shifted - (z_pos - margin)
    return (per_pair * weight).sum() / weight.sum()


def share_above(scores: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(P,) share of `candidates` (item columns) that row rows[p] scores strictly above its positive cols[p].

    With a uniform sample of the catalogue as candidates this estimates the positive's upstream rank share
    without comparing every positive with every item. scores: (B, N); rows, cols: (P,); candidates: (M,).
    Each row's pool is sorted once and every positive found in it by binary search: comparing each positive
    with the whole pool costs P x M (JD purchases with their view pairs: 8% of a training run).
    """
    pool = scores[:, candidates].sort(dim=1).values  # (B, M)
    positive = scores[rows, cols]  # (P,)
    # the positives of each row side by side, padded to the longest row, so one batched search finds them all
    order = torch.argsort(rows, stable=True)
    counts = torch.bincount(rows, minlength=scores.shape[0])  # (B,)
    starts = torch.cumsum(counts, 0) - counts
    sorted_rows = rows[order]
    slot = torch.arange(len(rows), device=rows.device) - starts[sorted_rows]  # place of each positive in its row
    padded = positive.new_full((scores.shape[0], int(counts.max()) if len(rows) else 0), float("inf"))
    padded[sorted_rows, slot] = positive[order]
    at_most = torch.searchsorted(pool, padded, right=True)  # (B, K) pool entries <= the positive
    above = torch.empty_like(positive)
    above[order] = (pool.shape[1] - at_most[sorted_rows, slot]).to(positive.dtype)
    return above / pool.shape[1]


def cross_stage_hinge(
    scores: torch.Tensor,
    upstream: torch.Tensor,
    rows: torch.Tensor,
    positives: torch.Tensor,
    upstream_only: torch.Tensor,
    m0: float,
    temperature: float,
) -> torch.Tensor:
    """AML as a ranking hinge across stages: each positive i of this stage should score above an item j
    the same user reached only upstream (viewed but not bought) by an adaptive margin
    m = m0 * sigmoid((s_up(j) - s_up(i)) / T): large where the frozen upstream objective ranks j above i
    (what this stage must add), small where it already agrees. Logit units; upstream is detached.

    scores, upstream: (B, N); rows, positives, upstream_only: (P,) one (user row, i, j) triple per pair.
    """
    up = upstream.detach()
    margin = m0 * torch.sigmoid((up[rows, upstream_only] - up[rows, positives]) / temperature)  # (P,)
    gap = (scores[rows, positives] - scores[rows, upstream_only]) / temperature  # (P,)
    return torch.relu(margin - gap).mean()


def distillation_loss(
    scores: torch.Tensor,
    seen: tuple[torch.Tensor, torch.Tensor],
    teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    temperature: float,
) -> torch.Tensor:
    """Cross-entropy of the student's full-catalogue softmax (seen items masked) against a teacher's list.

    scores: (B, N); seen: (rows, cols) of the items each user already has (never recommended, so never taught);
    teacher: (rows, cols, weights) of each user's list, weights summing to 1 per listed user (a user without a
    list adds nothing). Sparse on purpose: -sum_j t_j log p_j = logsumexp(unseen) - sum_j t_j z_j reads the
    scores at the listed items only, where dense (B, N) masks and lists cost 12% of a JD run.
    """
    t_rows, t_cols, t_weight = teacher
    if len(t_rows) == 0:
        return scores.sum() * 0.0
    z = scores / temperature
    masked = z.reshape(-1).index_fill(0, _flat(z, *seen), float("-inf")).view_as(z)  # (B, N) seen items out
    taught = torch.unique(t_rows)  # rows with a list (each has an unseen item: its list): finite logsumexp
    log_partition = torch.logsumexp(masked.index_select(0, taught), dim=1)  # (T,)
    t_weight = t_weight.to(z.dtype)
    mass = torch.zeros(len(z), dtype=z.dtype, device=z.device).index_add_(0, t_rows, t_weight)  # 1 per listed row
    listed = torch.zeros(len(z), dtype=z.dtype, device=z.device).index_add(
        0, t_rows, t_weight * entries(z, t_rows, t_cols)
    )
    return (log_partition * mass[taught] - listed[taught]).mean()
