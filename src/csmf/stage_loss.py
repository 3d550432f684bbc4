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
                     teacher: Callable[[str], sp.csr_matrix]) -> dict:  # fmt: skip
    """What the per-user loss of `stage` reads besides its positives, computed once a phase: the items each user
    reached only upstream (the hinge AML's negatives), the items each user has seen and the teacher's lists
    (distillation; `teacher(objective)` gives them)."""
    objective, extras = objectives[stage - 1], {}
    c, t = cfg.cascade, cfg.train
    if stage > 1 and c.aml_m0 > 0 and c.aml_form == "hinge":
        previous = tuning.matrix(objectives[stage - 2])
        extras["upstream_only"] = difference(previous, tuning.matrix(objective))
    if t.distill and per_stage(t.distill_weight, stage) > 0:  # the trainer refuses distillation without a teacher
        extras["seen"] = tuning.excluded(objective)
        extras["teacher"] = teacher(objective)
    return extras


class Pool:
    """The items a pooled step scores (`UserLoss` past train.full_softmax_max_items): `fixed`, every item the batch's
    loss reads (positives, teacher lists, upstream-only items), exactly, then `drawn`, a uniform draw from the rest
    of the catalogue whose logits carry log((N - |fixed|) / |drawn|), so the softmax's partition over the pool
    estimates the one over the whole catalogue without bias."""

    def __init__(self, fixed: np.ndarray, drawn: np.ndarray, n_items: int, draws: np.ndarray | None = None):
        self.fixed, self.drawn = fixed, drawn  # disjoint
        # the uniform draws as drawn (repeats and fixed items included, in draw order): a uniform sample of the
        # whole catalogue, every item of it in the pool (AML's rank sample)
        self.draws = np.zeros(0, dtype=np.int64) if draws is None else draws
        self.items = np.concatenate([fixed, drawn])
        self.log_weight = np.zeros(len(self.items), dtype=np.float32)
        if len(drawn):
            self.log_weight[len(fixed) :] = np.log((n_items - len(fixed)) / len(drawn))

    @classmethod
    def draw(cls, needed: list[np.ndarray], n_items: int, size: int, generator: torch.Generator) -> Pool:
        fixed = np.unique(np.concatenate(needed)) if needed else np.zeros(0, dtype=np.int64)
        if size >= n_items:  # the whole catalogue: the exact loss (AML samples its columns as the full loss does)
            rest = np.setdiff1d(np.arange(n_items), fixed, assume_unique=True)
            return cls(fixed, rest, n_items, np.zeros(0, dtype=np.int64))
        draws = torch.randint(0, n_items, (size,), generator=generator).numpy()
        return cls(fixed, np.setdiff1d(np.unique(draws), fixed, assume_unique=True), n_items, draws)

    def positions(self, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(where each item of `cols` sits in the pool, which of them are in it)."""
        order = np.argsort(self.items, kind="stable")
        ranked = self.items[order]
        at = np.minimum(np.searchsorted(ranked, cols), max(len(ranked) - 1, 0))
        found = ranked[at] == cols if len(ranked) else np.zeros(len(cols), dtype=bool)
        return order[at] if len(ranked) else at, found

    def columns(self, mat: sp.csr_matrix, device) -> tuple[torch.Tensor, ...]:
        """`coo_tensors` of `mat` (B, N) over the pool's columns (entries outside the pool dropped)."""
        coo = mat.tocoo()
        at, keep = self.positions(coo.col.astype(np.int64))
        return (torch.from_numpy(coo.row[keep].astype(np.int64)).to(device),
                torch.from_numpy(at[keep].astype(np.int64)).to(device),
                torch.from_numpy(coo.data[keep]).to(device))  # fmt: skip


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
        needed = [self.targets[users].indices]
        needed += [self.extras[k][users].indices for k in ("teacher", "upstream_only") if k in self.extras]
        pool = Pool.draw([n.astype(np.int64) for n in needed], model.n_items, self.pool, self.generator)
        u = model.user_vectors(users, stage)
        v = model.item_vectors(stage, torch.from_numpy(pool.items).to(u.device))
        log_weight = torch.from_numpy(pool.log_weight).to(u.device)
        return u, v, u @ v.T + self.cfg.model.temperature * log_weight, pool  # a logit gains log w

    def _entries(self, mat: sp.csr_matrix, pool: Pool | None, device) -> tuple[torch.Tensor, ...]:
        return coo_tensors(mat, device) if pool is None else pool.columns(mat, device)

    def __call__(self, users: np.ndarray) -> torch.Tensor:
        model, stage, temperature, form = self.model, self.stage, self.cfg.model.temperature, self.cfg.cascade.aml_form
        u, v, scores, pool = self._scores(users)
        # the index tensors go where the scores are (a backbone on a GPU); the generators stay on the CPU
        device = scores.device
        rows, cols, weight = self._entries(self.targets[users], pool, device)
        margin, hinge = None, None
        if self.m0 > 0:
            upstream = ((u * model.group_mask(stage - 1)) @ v.T).detach()  # (B, M) frozen earlier objective
            if form == "hinge":
                hinge = self._hinge(scores, upstream, users, rows, cols, pool)
            else:
                # as losses.aml_margin, against a uniform sample of the catalogue (an exact rank over all
                # items would sort every user's scores each step: more than the rest of the step together);
                # a pool's uniform draws are that sample (each is in the pool, fixed or drawn)
                if pool is not None and len(pool.draws):
                    sample = torch.from_numpy(pool.positions(pool.draws[:2048].astype(np.int64))[0])
                else:
                    sample = torch.randint(0, scores.shape[1], (min(2048, scores.shape[1]),), generator=self.generator)
                sample = sample.to(device)
                margin = self.m0 * share_above(upstream, rows, cols, sample)  # (P,)
                if form == "weight":
                    weight, margin = weight * (1.0 + margin), None
        loss = user_softmax_loss(scores, rows, cols, weight, temperature, margin=margin)
        if hinge is not None:
            loss = loss + hinge
        if "teacher" in self.extras:
            seen = self._entries(self.extras["seen"][users], pool, device)[:2]
            teacher = self._entries(self.extras["teacher"][users], pool, device)
            weight_kd = per_stage(self.cfg.train.distill_weight, stage)
            loss = loss + weight_kd * distillation_loss(scores, seen, teacher, temperature)
        return loss

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
        if pool is not None:  # every upstream-only item of the batch is in the pool's fixed part
            indices = pool.positions(indices)[0]
        negatives = torch.from_numpy(indices)[(starts + draw)[has]].to(scores.device)
        has = has.to(scores.device)
        return cross_stage_hinge(scores, upstream, rows[has], cols[has], negatives, self.m0, self.cfg.model.temperature)
