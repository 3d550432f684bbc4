"""The loss one cascade stage trains with, for either kind of batch (csmf.data.batches):

- `PairLoss`, batches of (user, item) pairs: the softmax over the whole catalogue when it is small enough
  (train.full_softmax_max_items), else the sampled softmax (in-batch + uniform negatives with logQ,
  csmf.losses.sampled_softmax), with AML as a margin or a weight;
- `UserLoss`, batches of users with all their positives (a backbone whose `per_user_loss` is set): one
  full-catalogue softmax per user, AML as a margin, a weight or the cross-stage hinge, plus distillation
  towards a teacher's lists.

Stage 1 trains without a margin (there is no upstream objective); a later stage's margin reads the frozen
objective before it, the user vector masked to that objective's dimensions (method notes §5).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch

from csmf import distributed
from csmf.backbones.base import Backbone
from csmf.config import Config, per_stage
from csmf.data.batches import PairBatch, coo_tensors, uniform_negatives
from csmf.data.schema import CascadeData, difference
from csmf.losses import (
    aml_softmax,
    cross_stage_hinge,
    distillation_loss,
    sampled_softmax,
    share_above,
    user_softmax_loss,
)


def margin_scale(cfg: Config, stage: int) -> float:
    """m0 of `stage`: the configured AML scale from stage 2 on, 0 for the first stage (nothing upstream)."""
    return cfg.cascade.aml_m0 if stage > 1 else 0.0


class PairLoss:
    """A batch of pairs -> the stage's loss. log_q: (N,) log share of each item in the stage's training rows."""

    def __init__(self, model: Backbone, stage: int, cfg: Config, log_q: torch.Tensor, generator: torch.Generator,
                 full_softmax: bool):  # fmt: skip
        self.model, self.stage, self.cfg, self.generator = model, stage, cfg, generator
        self.log_q, self.full_softmax = log_q.to(model.device), full_softmax
        self.m0 = margin_scale(cfg, stage)
        self.ranks = distributed.ranks()

    def __call__(self, batch: PairBatch) -> torch.Tensor:
        model, stage, t = self.model, self.stage, self.cfg.train
        # leave_out: a training pair's own item is not in the history bags its user vector reads
        u = model.user_vectors(batch.users, stage, leave_out=batch.items, context=batch.codes)
        device = u.device
        ids = torch.from_numpy(batch.items).to(device)
        weight = None if batch.weight is None else batch.weight.to(device)
        upstream_user = u * model.group_mask(stage - 1) if self.m0 > 0 else None
        temperature, form = self.cfg.model.temperature, self.cfg.cascade.aml_form
        if self.full_softmax:
            v = model.item_vectors(stage)  # (N, D)
            upstream = upstream_user @ v.T if upstream_user is not None else None
            return aml_softmax(u @ v.T, ids, temperature, upstream, self.m0, form, weight=weight)
        v = model.item_vectors(stage, ids)  # (B, D)
        pool, offset = ids, 0
        if self.ranks.active and t.gather_negatives:  # every rank's batch items are negatives
            v, pool, offset = distributed.gather_rows(v, ids)
        negatives = negative_log_q = None
        if t.extra_negatives:
            drawn, negative_log_q = uniform_negatives(model.n_items, t.extra_negatives, self.generator)
            negatives, negative_log_q = model.item_vectors(stage, drawn.to(device)), negative_log_q.to(device)
        return sampled_softmax(u, v, pool, self.log_q, temperature, offset, negatives, negative_log_q,
                               upstream_user, self.m0, form, weight)  # fmt: skip


def user_loss_extras(tuning: CascadeData, objectives: tuple[str, ...], stage: int, cfg: Config,
                     teacher: Callable[[str], sp.csr_matrix | None]) -> dict:  # fmt: skip
    """What the per-user loss of `stage` reads besides its positives, computed once a phase: the items each user
    reached only upstream (the hinge AML's negatives), the items each user has seen and the teacher's lists
    (distillation; `teacher(objective)` gives them)."""
    objective, extras = objectives[stage - 1], {}
    c, t = cfg.cascade, cfg.train
    if stage > 1 and c.aml_m0 > 0 and c.aml_form == "hinge":
        previous = tuning.matrix(objectives[stage - 2])
        extras["upstream_only"] = difference(previous, tuning.matrix(objective))
    if t.distill and per_stage(t.distill_weight, stage) > 0:  # the trainer refuses distillation without a teacher
        lists = teacher(objective)  # None: the trainer dropped it (train.distill_check)
        if lists is not None:
            extras["seen"] = tuning.excluded(objective)
            extras["teacher"] = lists
    return extras


class Pool:
    """The items a pooled step scores (`UserLoss` past train.full_softmax_max_items), per user: first the user's
    own items, every item its loss reads (positives, teacher list, upstream-only items), exactly, padded to the
    longest row; then a uniform draw shared by the batch, whose columns in row b carry log((N - |own_b|) / |draw
    outside own_b|) and mask the items own_b already holds, so each row's partition estimates the one over the
    whole catalogue without bias. A row scores its own ~100 items and the shared draw, not the union of the
    batch's (47k items of a 512-user step on the 2.2M-row simulator, against ~8k).

    own: (B, N) sparse, the pattern of each row's own items; draws: the uniform draws as drawn (repeats included,
    draw order: AML's rank sample), `shared` their distinct items; exact: the draw is the whole catalogue."""

    def __init__(self, own: sp.csr_matrix, draws: np.ndarray, n_items: int, exact: bool = False):
        own = sp.csr_matrix(own)
        own.sum_duplicates()
        self.n_items, self.draws = n_items, draws
        self.shared = np.arange(n_items) if exact else np.unique(draws)
        counts = np.diff(own.indptr)
        self.rows, self.width = own.shape[0], int(counts.max(initial=0))
        # own entry e: row own_rows[e], item own.indices[e], column own_slots[e] < width
        self.own_rows = np.repeat(np.arange(self.rows), counts)
        self.own_slots = np.arange(own.nnz) - np.repeat(own.indptr[:-1], counts)
        self.own_items = own.indices.astype(np.int64)
        self._keys = self.own_rows * n_items + self.own_items  # sorted: rows in order, columns sorted in each
        # what the catalogue holds once: the own items and the shared draw, each scored from one vector
        self.items, inverse = np.unique(np.concatenate([self.own_items, self.shared]), return_inverse=True)
        self.own_local, self.shared_local = inverse[: own.nnz], inverse[own.nnz :]
        # column bias, in logit units: 0 on an own item, -inf on padding and on a shared item the row owns,
        # log weight on the rest of the shared draw
        spot, clash = _find(self.shared, self.own_items)
        clash_rows, clash_cols = self.own_rows[clash], spot[clash]  # a row's own item in the shared draw
        outside = len(self.shared) - np.bincount(clash_rows, minlength=self.rows)  # (B,)
        log_weight = np.log(np.maximum(n_items - counts, 1) / np.maximum(outside, 1)).astype(np.float32)
        bias = np.full((self.rows, self.width + len(self.shared)), -np.inf, dtype=np.float32)
        bias[self.own_rows, self.own_slots] = 0.0
        bias[:, self.width :] = log_weight[:, None]
        bias[clash_rows, self.width + clash_cols] = -np.inf
        self.bias = torch.from_numpy(bias)

    @classmethod
    def draw(cls, own: sp.csr_matrix, n_items: int, size: int, generator: torch.Generator) -> Pool:
        if size >= n_items:  # the whole catalogue: the exact loss (AML samples its columns as the full loss does)
            return cls(own, np.zeros(0, dtype=np.int64), n_items, exact=True)
        return cls(own, torch.randint(0, n_items, (size,), generator=generator).numpy(), n_items)

    def locate(self, rows: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the column of each (row, item) in the score block, whether it is there): the row's own column, else the
        item's column in the shared draw."""
        at, own = _find(self._keys, rows * self.n_items + items)
        cols = np.where(own, self.own_slots[at] if len(self._keys) else 0, 0)
        spot, drawn = _find(self.shared, items)
        drawn &= ~own
        cols = np.where(drawn, self.width + spot, cols)
        return cols.astype(np.int64), own | drawn

    def columns(self, mat: sp.csr_matrix, device) -> tuple[torch.Tensor, ...]:
        """`coo_tensors` of `mat` (B, N) over the score block's columns (entries outside it dropped)."""
        coo = mat.tocoo()
        at, keep = self.locate(coo.row.astype(np.int64), coo.col.astype(np.int64))
        return (torch.from_numpy(coo.row[keep].astype(np.int64)).to(device),
                torch.from_numpy(at[keep]).to(device),
                torch.from_numpy(coo.data[keep]).to(device))  # fmt: skip

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        """Columns of a uniform sample of the catalogue, AML's rank sample: the first 2,048 uniform draws (each a
        shared column, in every row), or over the whole catalogue as the full loss draws them."""
        if not len(self.draws):
            drawn = torch.randint(0, self.n_items, (min(2048, self.n_items),), generator=generator)
            return self.width + drawn
        return torch.from_numpy(self.width + np.searchsorted(self.shared, self.draws[:2048]).astype(np.int64))

    def scores(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, width + shared) u against the pool: u (B, D), v (len(items), D) the vectors of `items`. The own
        columns hold each row's own items (0 on padding, which the bias masks)."""
        own_rows = torch.from_numpy(self.own_rows).to(u.device)
        own = (u.index_select(0, own_rows) * v.index_select(0, torch.from_numpy(self.own_local).to(u.device))).sum(1)
        flat = torch.zeros(self.rows * self.width, dtype=own.dtype, device=u.device)
        flat = flat.index_add(0, own_rows * self.width + torch.from_numpy(self.own_slots).to(u.device), own)
        shared = u @ v.index_select(0, torch.from_numpy(self.shared_local).to(u.device)).T  # (B, S)
        return torch.cat([flat.view(self.rows, self.width), shared], dim=1)


def _find(ordered: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(where each of `values` sits in the sorted array `ordered`, clamped to it; whether it is there)."""
    if not len(ordered):
        return np.zeros(len(values), dtype=np.int64), np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(ordered, values), len(ordered) - 1)
    return at, ordered[at] == values


class UserLoss:
    """A batch of users -> the stage's softmax over all of their positives: over the whole catalogue (pool 0), or
    over a `Pool` of `pool` uniform items besides the ones the loss reads. targets: (U, N) weight of every training
    positive (csmf.data.batches.target_matrix); extras: `user_loss_extras`."""

    def __init__(self, model: Backbone, stage: int, cfg: Config, targets: sp.csr_matrix, generator: torch.Generator,
                 extras: dict, pool: int = 0):  # fmt: skip
        self.model, self.stage, self.cfg, self.targets = model, stage, cfg, targets
        self.generator, self.extras, self.m0 = generator, extras, margin_scale(cfg, stage)
        self.pool = pool

    def _scores(self, users: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Pool | None]:
        """(u (B, D), v (M, D), scores (B, M), the pool or None): M = the catalogue or the pool."""
        model, stage = self.model, self.stage
        if not self.pool:
            u, v = model.vectors(users, stage)  # (B, D), (N, D)
            return u, v, u @ v.T, None
        own = self.targets[users]
        for key in ("teacher", "upstream_only"):
            if key in self.extras:
                own = own + self.extras[key][users]
        pool = Pool.draw(own, model.n_items, self.pool, self.generator)
        u = model.user_vectors(users, stage)
        v = model.item_vectors(stage, torch.from_numpy(pool.items).to(u.device))
        bias = pool.bias.to(u.device)
        return u, v, pool.scores(u, v) + self.cfg.model.temperature * bias, pool  # a logit gains log w

    def _entries(self, mat: sp.csr_matrix, pool: Pool | None, device) -> tuple[torch.Tensor, ...]:
        return coo_tensors(mat, device) if pool is None else pool.columns(mat, device)

    def __call__(self, users: np.ndarray) -> torch.Tensor:
        model, stage, temperature, form = self.model, self.stage, self.cfg.model.temperature, self.cfg.cascade.aml_form
        u, v, scores, pool = self._scores(users)
        # the index tensors go where the scores are (a backbone on a GPU); the generators stay on the CPU
        device = scores.device
        positives = self.targets[users]  # (B, N)
        rows, cols, weight = self._entries(positives, pool, device)
        margin, hinge = self._own_share(users, positives, v, pool), None
        if self.m0 > 0:
            upstream_user = u * model.group_mask(stage - 1)  # the frozen earlier objective
            upstream = (upstream_user @ v.T if pool is None else pool.scores(upstream_user, v)).detach()  # (B, M)
            if form == "hinge":
                hinge = self._hinge(scores, upstream, users, rows, cols, pool)
            else:
                # as losses.aml_margin, against a uniform sample of the catalogue (an exact rank over all
                # items would sort every user's scores each step: more than the rest of the step together);
                # a pool's uniform draws are that sample (each is one of its shared columns)
                if pool is not None:
                    sample = pool.sample(self.generator)
                else:
                    sample = torch.randint(0, scores.shape[1], (min(2048, scores.shape[1]),), generator=self.generator)
                sample = sample.to(device)
                aml = self.m0 * share_above(upstream, rows, cols, sample)  # (P,)
                if form == "weight":
                    weight = weight * (1.0 + aml)
                else:
                    margin = aml if margin is None else margin + aml
        loss = user_softmax_loss(scores, rows, cols, weight, temperature, margin=margin)
        if hinge is not None:
            loss = loss + hinge
        if "teacher" in self.extras:
            seen = self._entries(self.extras["seen"][users], pool, device)[:2]
            teacher = self._entries(self.extras["teacher"][users], pool, device)
            weight_kd = per_stage(self.cfg.train.distill_weight, stage)
            loss = loss + weight_kd * distillation_loss(scores, seen, teacher, temperature)
        return loss

    def _own_share(self, users: np.ndarray, positives: sp.csr_matrix, v: torch.Tensor,
                   pool: Pool | None) -> torch.Tensor | None:  # fmt: skip
        """(P,) each positive's own share of its score, in logit units, or None: a bag that holds the target scores
        it partly against itself (Backbone.bag_self_weights), so the loss lowers its logit by that share (a margin:
        exact in the positive's own softmax) and the model learns what the rest of the bag says about the item."""
        coo = positives.tocoo()  # the order of `_entries`' positives
        rows, items = coo.row.astype(np.int64), coo.col.astype(np.int64)
        coefficients = self.model.bag_self_weights(users, self.stage, rows, items)  # (P, D)
        if coefficients is None:
            return None
        at = items if pool is None else np.searchsorted(pool.items, items)  # the positives' rows of v
        own = v.index_select(0, torch.from_numpy(at).to(v.device))  # (P, D)
        return (coefficients.to(v.device) * own * own).sum(1) / self.cfg.model.temperature

    def _hinge(self, scores, upstream, users, rows, cols, pool: Pool | None) -> torch.Tensor | None:
        """Cross-stage hinge over one upstream-only item per positive, drawn uniformly from the user's."""
        sub = self.extras["upstream_only"][users]  # (B, N)
        on_cpu = rows.cpu()
        counts = torch.from_numpy(np.diff(sub.indptr).astype(np.int64))[on_cpu]  # (P,)
        starts = torch.from_numpy(sub.indptr[:-1].astype(np.int64))[on_cpu]
        draw = (torch.rand(len(on_cpu), generator=self.generator) * counts).long()
        has = counts > 0
        if not bool(has.any()):
            return None
        indices = sub.indices.astype(np.int64)
        if pool is not None:  # every upstream-only item of a row is one of its own
            indices = pool.locate(np.repeat(np.arange(sub.shape[0]), np.diff(sub.indptr)), indices)[0]
        negatives = torch.from_numpy(indices)[(starts + draw)[has]].to(scores.device)
        has = has.to(scores.device)
        return cross_stage_hinge(scores, upstream, rows[has], cols[has], negatives, self.m0, self.cfg.model.temperature)
