"""The cascaded trainer: pretrain stage 1 -> CPP -> AR -> fine-tune stage 2 (AML) -> CPP -> AR -> ...

Follows method notes §3-§6 (schedule table in §3). Every phase is seeded from (seed, phase index), logs
its loss and validation metrics, and is checkpointed; a killed run resumes from the last completed
phase and ends with the same weights as an uninterrupted one. Training uses the tuning view of the data
(validation pairs removed from train) and validation picks each stage's best epoch; the test split is
never read here. A one-objective run is the plain two-tower (`single-<stage>` in the benchmark).

Stage-1 pretraining depends only on the data, the seed and the model/train/eval config, not on anything
that happens later in the cascade, so runs that differ only downstream (ablations, a tau sweep, the
single stage-1 tower) may share it through `pretrain_cache`: a folder of pretrained states keyed by a
hash of exactly those inputs. The result is bit-identical to pretraining afresh.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from csmf import distributed
from csmf.config import CascadeConfig, Config, ConfigError
from csmf.data import context
from csmf.data.batches import log_q as item_log_q
from csmf.data.batches import log_q_from_counts, uniform_negatives
from csmf.data.schema import CascadeData, difference, union
from csmf.determinism import deterministic_torch
from csmf.evaluation import evaluate_stage, metric_values
from csmf.graph import GraphTwoTower, graph_weights
from csmf.loop import run_epochs
from csmf.losses import (
    aml_margin,
    cross_stage_hinge,
    distillation_loss,
    in_batch_scores,
    share_above,
    softmax_loss,
    user_softmax_loss,
)
from csmf.masks import claim_free
from csmf.prune import cpp_free, fixed_free, release
from csmf.runfolder import PretrainCache, RunFolder
from csmf.towers import TwoTower, context_tables, features_of


def per_stage(values: tuple, stage: int):
    """The value for 1-based `stage` from a per-stage tuple whose last value repeats."""
    return values[min(stage, len(values)) - 1]


@dataclass(frozen=True)
class Phase:
    kind: str  # "train" (pretrain / fine-tune), "prune" (CPP), "recover" (AR)
    stage: int  # 1-based position in the cascade

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.stage}"


def plan(n_stages: int, cfg: Config) -> list[Phase]:
    phases = []
    for k in range(1, n_stages + 1):
        phases.append(Phase("train", k))
        if k < n_stages and cfg.cascade.prune != "none":
            phases.append(Phase("prune", k))
            if cfg.cascade.recover_frac > 0:
                phases.append(Phase("recover", k))
    return phases


def pairs_of(mat: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    coo = mat.tocoo()
    order = np.lexsort((coo.col, coo.row))
    return coo.row[order].astype(np.int64), coo.col[order].astype(np.int64)


def stage_pairs(
    data: CascadeData, objective: str, aux_weight: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(users, items, weights) an objective trains on: its own pairs (weight 1), plus the pairs of every other
    training behaviour that are not already its positives, at `aux_weight` (None = all weight 1)."""
    own = data.train[objective]
    if aux_weight <= 0:
        return (*pairs_of(own), None)
    others = [data.matrix(b) for b in data.behaviours if b != objective]
    aux = difference(union(*others), own) if others else own[:0]
    users, items = pairs_of(own)
    aux_users, aux_items = pairs_of(aux)
    weights = np.concatenate([np.ones(len(users)), np.full(len(aux_users), aux_weight)]).astype(np.float32)
    return np.concatenate([users, aux_users]), np.concatenate([items, aux_items]), weights


def target_matrix(
    users: np.ndarray, items: np.ndarray, weights: np.ndarray | None, n_users: int, n_items: int
) -> sp.csr_matrix:
    """(U, N) weight of every training positive: the per-user full-catalogue loss reads its rows."""
    values = np.ones(len(users), dtype=np.float32) if weights is None else weights.astype(np.float32)
    mat = sp.csr_matrix((values, (users, items)), shape=(n_users, n_items), dtype=np.float32)
    mat.sum_duplicates()
    return mat


class SplitAdam(torch.optim.Optimizer):
    """SparseAdam on the sparse-gradient tables and Adam on the rest, stepped together as one optimizer."""

    def __init__(self, sparse: torch.optim.Optimizer, dense: torch.optim.Optimizer):
        self.parts = (sparse, dense)
        super().__init__([p for o in self.parts for g in o.param_groups for p in g["params"]], {})

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts:
            o.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        for o in self.parts:
            o.step()


def check_streamable(data: CascadeData, cfg: Config) -> None:
    """train.stream reads training rows from the cache in batches: everything that needs every user's pairs in
    memory at once is refused here, naming the setting (--config stream sets them all)."""
    m, t = cfg.model, cfg.train
    problems = []
    if data.stream is None:
        problems.append("data.cache_dir is not set (the rows are streamed from the cache)")
    if m.encoder != "mlp" or m.history:
        problems.append("model.encoder must be 'mlp' with model.history = false (both need every user's history)")
    if t.distill:
        problems.append("train.distill must be '' (a teacher scores every user against every item)")
    if any(w > 0 for w in t.aux_weight):
        problems.append("train.aux_weight must be 0 (each stage streams its own rows)")
    if problems:
        raise ConfigError("train.stream: " + "; ".join(problems) + "; --config stream sets these")


def build_model(data: CascadeData, cfg: Config, seed: int, objectives: tuple[str, ...] | None = None,
                context_sizes: dict[str, int] | None = None):  # fmt: skip
    """The backbone `model.encoder` names: GraphTwoTower ("graph") or TwoTower ("mlp"). context_sizes: the
    per-row context tables' sizes (default: those of data.context; a saved model passes its own)."""
    m = cfg.model
    user_features, item_features = features_of(data.user_features, m), features_of(data.item_features, m)
    if m.encoder == "graph":
        stage_weights = [
            graph_weights(o, data.stages, data.behaviours, m.graph_up_weight, m.graph_down_weight, m.graph_side_weight)
            for o in (objectives or data.stages)
        ]
        return GraphTwoTower(
            data.n_users, data.n_items, m.dim, stage_weights, m.graph_hops, user_features, item_features, seed,
            init_scale=m.init_scale,
        )  # fmt: skip
    if m.encoder != "mlp":
        raise ValueError(f"model.encoder must be 'graph' or 'mlp', got {m.encoder!r}")
    sizes = context_sizes_of(data) if context_sizes is None else context_sizes
    rows, hashed = context_tables(sizes, m) if m.features and m.context else ({}, {})
    return TwoTower(
        n_users=data.n_users,
        n_items=data.n_items,
        dim=m.dim,
        user_hidden=m.user_hidden,
        item_hidden=m.item_hidden,
        id_dim=m.id_dim,
        user_id_dim=m.id_dim if m.user_id else 0,
        history_dim=m.history_dim,
        behaviours=data.behaviours if m.history else (),
        user_features=user_features,
        item_features=item_features,
        feature_dim=m.feature_dim,
        seed=seed,
        dropout=m.dropout,
        bag_power=m.bag_power,
        context=rows,
        context_hashed=hashed,
    )


def context_sizes_of(data: CascadeData) -> dict[str, int]:
    """Rows of each context table: the cache's vocabulary when training streams (data.context then holds only
    the evaluated users' pairs), else the codes of data.context."""
    if data.stream is not None and data.context:
        return data.stream.context_sizes()
    return context.sizes(data.context)


def reads_context(model) -> bool:
    """Whether the model's user tower embeds per-row context (the MLP encoder with data.context)."""
    return isinstance(model, TwoTower) and len(model.user.ctx_emb) > 0


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """Eval mode for the block, then the mode the model had: scoring never changes how a caller trains."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


# ----- the phases that change ownership (pure functions of a model's owners) --------------------------


def claim(model, stage: int, naive: bool = False) -> None:
    """Start of fine-tuning stage `stage`: the free units become its own. `naive` (naive fine-tuning): the
    stage takes every unit, so it trains all weights and earlier objectives are not protected."""
    for _, _, owner in model.prunable():
        owner.copy_(torch.where(owner >= 1, stage, owner) if naive else claim_free(owner, stage))
    model.sync_output_owner()


def prune(model, stage: int, c: CascadeConfig, n_stages: int) -> dict:
    """CPP (or PackNet's fixed share) after stage `stage` trained: free the units the next stage will own.

    Pruning happens only when a later stage follows: each group frees at least one unit for it (without an
    output dimension of its own, the next objective would just repeat this one), and the output dimensions
    keep `min_share` of D for each stage still to come. Returns the phase record (criterion, tau, shares).
    """
    groups = model.prunable()
    tau = per_stage(c.tau, stage)
    to_come = n_stages - stage
    floor = {"output": max(1, math.ceil(c.min_share * len(model.output_owner) * to_come - 1e-9))}
    cpp = {name: cpp_free(mag, owner, stage, tau, min_free=floor.get(name, 1)) for name, mag, owner in groups}
    if c.prune == "cpp":
        frees = cpp
    elif c.prune == "fixed":
        owned = sum(int((owner == stage).sum()) for _, _, owner in groups)
        share = c.fixed_fraction if c.fixed_fraction >= 0 else sum(int(f.sum()) for f in cpp.values()) / owned
        frees = {name: fixed_free(mag, owner, stage, share, min_free=floor.get(name, 1)) for name, mag, owner in groups}
    else:
        raise ValueError(f"cascade.prune must be 'cpp', 'fixed' or 'none', got {c.prune!r}")
    for name, _, owner in groups:
        owner.copy_(release(owner, frees[name]))
    model.sync_output_owner()
    freed = {name: round(float(f.float().mean()), 4) for name, f in frees.items()}
    return {"criterion": c.prune, "tau": tau, "freed_share": freed}


class TrainedCascade:
    """Scores of a trained TwoTower over the whole catalogue, with a fixed history source.

    Duck-types `Retriever.score` so evaluation can rank with it mid-training; models/csmf.py wraps it
    as the full Retriever the benchmark sees.
    """

    def __init__(
        self,
        model: TwoTower,
        objectives: tuple[str, ...],
        history: dict[str, sp.csr_matrix],
        top: int,
        shared: bool = False,
    ):
        """`shared`: every objective scores with the whole final model (naive fine-tuning, no masks)."""
        self.model, self.objectives, self.history, self.top, self.shared = model, objectives, history, top, shared
        with torch.no_grad(), evaluating(model):  # scoring never drops inputs
            self.items = model.item_vectors(top)  # (N, D) computed once

    def stage_number(self, objective: str) -> int:
        if objective not in self.objectives:
            raise KeyError(f"unknown objective {objective!r}; this model serves {self.objectives}")
        return self.top if self.shared else self.objectives.index(objective) + 1

    def raw_user_vectors(self, users: np.ndarray, codes: dict[str, np.ndarray] | None = None) -> torch.Tensor:
        """(B, D) at the top stage; codes: per-row context (csmf.data.context), None = unknown context."""
        users = np.asarray(users, dtype=np.int64)
        with torch.no_grad(), evaluating(self.model):
            if codes and reads_context(self.model):
                return self.model.user_vectors(users, self.top, history=self.history, context=codes)
            return self.model.user_vectors(users, self.top, history=self.history)

    def score(self, users: np.ndarray, stage: str) -> torch.Tensor:
        mask = self.model.group_mask(self.stage_number(stage))
        return (self.raw_user_vectors(users) * mask) @ self.items.T  # (B, N)

    def score_in_context(self, users: np.ndarray, codes: dict[str, np.ndarray], stage: str) -> torch.Tensor:
        """`score` for requests made in a context: codes[column][b] is request b's (csmf.data.context)."""
        mask = self.model.group_mask(self.stage_number(stage))
        return (self.raw_user_vectors(users, codes) * mask) @ self.items.T  # (B, N)


class CascadeTrainer:
    def __init__(
        self,
        data: CascadeData,
        cfg: Config,
        objectives: tuple[str, ...] | None = None,
        run_dir: str | Path | None = None,
        progress: bool = False,
        log: Callable[[str], None] | None = None,
        pretrain_cache: str | Path | None = None,
    ):
        self.data = data
        self.cfg = cfg
        self.objectives = objectives or data.stages
        self.tuning = data.tuning_view()
        self.device = distributed.resolve_device(cfg.runtime.device)
        self.model = build_model(data, cfg, cfg.seed, self.objectives)
        if self.device.type != "cpu":
            if not isinstance(self.model, TwoTower):
                raise ConfigError("runtime.device: the graph encoder trains on the CPU only; use --config mlp "
                                  "(model.encoder = 'mlp') on a GPU")  # fmt: skip
            self.model.place(self.device)
        self.tuning_history = {b: self.tuning.matrix(b) for b in self.model.behaviours}
        self.model.set_history(self.tuning_history)
        self.phases = plan(len(self.objectives), cfg)
        fingerprint = data.fingerprint() if (run_dir or pretrain_cache) else ""
        names = [p.name for p in self.phases]
        self.folder = RunFolder(Path(run_dir), names, self.objectives, cfg, fingerprint) if run_dir else None
        self.pretrain = (
            PretrainCache(Path(pretrain_cache), data, cfg, self.objectives[0], fingerprint) if pretrain_cache else None
        )
        self.ranks = distributed.ranks()  # several training processes (csmf.distributed) or one
        self.progress = progress and self.ranks.main
        self.log = log if log is not None and self.ranks.main else (lambda _msg: None)
        self.history: list[dict] = []  # one record per completed phase
        self.stream = data.stream if cfg.train.stream else None
        if cfg.train.stream:
            check_streamable(data, cfg)
        self.full_softmax = data.n_items <= cfg.train.full_softmax_max_items and self.stream is None
        for table in self._sparse_tables():
            table.sparse = True
        # several processes: DDP averages every loss's gradients over the ranks before the masks apply
        self.parallel = distributed.data_parallel(self.model, self.device) if self.ranks.active else None
        # the graph encoder's full-catalogue loss takes each user's positives at once (one softmax per user)
        self.per_user = self.full_softmax and isinstance(self.model, GraphTwoTower)
        if data.context and not reads_context(self.model):
            why = (
                "model.features or model.context is off"
                if not (cfg.model.features and cfg.model.context)
                else "only model.encoder = 'mlp' reads it"
            )
            self.log(f"context columns {sorted(data.context)} are not used: {why}")
        if cfg.train.distill and not self.per_user:
            from csmf.distill import distillation_error

            raise distillation_error(cfg, data.n_items)

    # ----- run folder and pretrain cache (csmf.runfolder) --------------------------------------------
    def resume_point(self) -> int:
        """The first phase still to run (len(phases) = finished); reads the run folder, changes nothing."""
        last = self.folder.last() if self.folder is not None else None
        return 0 if last is None else last[0] + 1

    def _resume(self) -> int:
        """Load the last completed phase into the model; returns the first phase still to run."""
        last = self.folder.last() if self.folder is not None else None
        if last is None:
            return 0
        index, state, history, name = last
        self.model.load_state_dict(state)
        self.history = history
        self.log(f"resuming after phase {self.phases[index].name} ({name})")
        return index + 1

    def _save(self, index: int) -> None:
        if self.folder is not None and self.ranks.main:  # one writer; the others wait for the file
            self.folder.save(index, self.model.state_dict(), self.history)
        distributed.barrier()

    def _cached_pretrain(self) -> bool:
        """Load stage 1 from the pretrain cache if it holds this run's pretraining (then phase 0 is done)."""
        cached = self.pretrain.load()
        if cached is None:
            return False
        state, record = cached
        self.model.load_state_dict(state)
        self.history.append({**record, "cached": True})
        self.log(f"stage 1 pretraining loaded from the cache ({self.pretrain.path.name})")
        self._save(0)
        return True

    # ----- phases --------------------------------------------------------------------------------
    def run(self) -> TrainedCascade:
        # on a GPU some kernels have no deterministic form: warned about, not refused (CPU runs are bit-exact)
        with deterministic_torch(warn_only=self.device.type != "cpu"):
            return self._run()

    def _run(self) -> TrainedCascade:
        start = self._resume()
        if start == 0 and self.pretrain is not None and self._cached_pretrain():
            start = 1
        for index in range(start, len(self.phases)):
            phase = self.phases[index]
            torch.manual_seed(self.cfg.seed * 1000 + index)
            t0 = time.perf_counter()
            if phase.kind == "train":
                record = self._train(phase.stage, index)
            elif phase.kind == "prune":
                record = self._prune(phase.stage)
            else:
                record = self._recover(phase.stage, index)
            record.update(phase=phase.name, seconds=round(time.perf_counter() - t0, 2))
            if self.ranks.active:  # every rank must hold the same weights and owners: checked, not assumed
                record.update(processes=self.ranks.world, checksum=distributed.check_agreement(self.model, phase.name))
            self.history.append(record)
            self.log(_describe(record))
            self._save(index)
            if index == 0 and self.pretrain is not None and self.ranks.main:
                self.pretrain.store(self.model.state_dict(), self.history[0])
            distributed.barrier()
        if self.device.type != "cpu":  # the trained model is handed back on the CPU: evaluation, export, serving
            self.model.place(torch.device("cpu"))
        return self.retriever(self.data.train | self.data.side)

    def retriever(self, history: dict[str, sp.csr_matrix], top: int | None = None) -> TrainedCascade:
        top = top or len(self.objectives)
        return TrainedCascade(self.model, self.objectives, history, top, shared=self.cfg.cascade.prune == "none")

    def _validate(self, stage: int) -> dict[str, float]:
        objective = self.objectives[stage - 1]
        if objective not in self.tuning.test or self.tuning.test[objective].nnz == 0:
            return {}
        scorer = self.retriever(self.tuning_history, top=stage)
        result = evaluate_stage(
            scorer, self.tuning, objective, self.cfg.eval.ks, self.cfg.eval.score_budget_mb, shard=self.ranks
        )
        return {k: round(v, 5) for k, v in metric_values(result).items()}

    def _stage_pairs(self, stage: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        return stage_pairs(self.tuning, self.objectives[stage - 1], per_stage(self.cfg.train.aux_weight, stage))

    def _train(self, stage: int, index: int) -> dict:
        if stage > 1:
            self._claim(stage)
        epochs = per_stage(self.cfg.train.max_epochs, stage)
        if self.stream is not None:
            return self._streamed_epochs(stage, epochs, index, share=1.0)
        users, items, weights = self._stage_pairs(stage)
        return self._epochs(stage, users, items, weights, epochs, select=True, seed=index)

    def _recover(self, stage: int, index: int) -> dict:
        if self.stream is not None:
            return self._streamed_epochs(stage, self.cfg.cascade.recover_epochs, index, self.cfg.cascade.recover_frac)
        users, items, weights = self._stage_pairs(stage)
        rng = np.random.default_rng([self.cfg.seed, index])
        take = rng.random(len(users)) < self.cfg.cascade.recover_frac
        weights = None if weights is None else weights[take]
        epochs = self.cfg.cascade.recover_epochs
        return self._epochs(stage, users[take], items[take], weights, epochs, select=True, seed=index)

    def _claim(self, stage: int) -> None:
        claim(self.model, stage, naive=self.cfg.cascade.prune == "none")

    def _prune(self, stage: int) -> dict:
        record = prune(self.model, stage, self.cfg.cascade, len(self.objectives))
        distributed.broadcast_owners(self.model)  # rank 0's decision is every rank's
        return {**record, "valid": self._validate(stage)}

    def _epochs(
        self,
        stage: int,
        users: np.ndarray,
        items: np.ndarray,
        weights: np.ndarray | None,
        epochs: int,
        select: bool,
        seed: int,
    ) -> dict:
        t = self.cfg.train
        model = self.model
        lr = per_stage(t.lr, stage)
        generator = torch.Generator().manual_seed(self.cfg.seed * 1000 + seed)
        m0 = self.cfg.cascade.aml_m0 if stage > 1 else 0.0
        if self.per_user:  # a batch is a set of users with all their positives
            targets = target_matrix(users, items, weights, self.data.n_users, self.data.n_items)
            units = np.flatnonzero(np.diff(targets.indptr))
            batch_size = t.user_batch_size
            extras = self._stage_extras(stage)

            def batch_loss(idx: np.ndarray) -> torch.Tensor:
                return self._step(lambda: self._user_loss(stage, units[idx], targets, m0, generator, extras))
        else:  # a batch is a set of (user, item) pairs
            units, batch_size = users, t.batch_size
            log_q = item_log_q(items, self.data.n_items).to(self.device)
            # each pair's context (its latest row's); an auxiliary pair of another behaviour has its own
            codes = context.lookup(self.tuning.context, users, items) if reads_context(model) else {}

            def batch_loss(idx: np.ndarray) -> torch.Tensor:
                weight = None if weights is None else torch.from_numpy(weights[idx])
                ctx = self._context_dropout({n: c[idx] for n, c in codes.items()}, generator)
                return self._step(lambda: self._loss(stage, users[idx], items[idx], m0, log_q, generator, weight, ctx))

        def epoch_losses():
            order = torch.randperm(len(units), generator=generator).numpy()  # the same on every rank
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                if self.ranks.active and len(rows) < 2 * self.ranks.world:
                    continue  # a tail too short to give every rank a batch: skipped on every rank alike
                yield batch_loss(self.ranks.share(rows))

        if isinstance(model, GraphTwoTower):
            model.freeze_below(stage)
        try:
            steps = math.ceil(len(units) / batch_size)
            return self._epoch_loop(stage, epoch_losses, steps, epochs, select, lr, len(users))
        finally:
            if isinstance(model, GraphTwoTower):
                model.freeze_below(None)

    def _streamed_epochs(self, stage: int, epochs: int, seed: int, share: float) -> dict:
        """Epochs over the stage's training rows streamed from the cache (csmf.data.cache): batches come
        shuffled from a buffer; `share` < 1 keeps a seeded share of the rows (accuracy recovery)."""
        t, cache = self.cfg.train, self.stream
        objective = self.objectives[stage - 1]
        generator = torch.Generator().manual_seed(self.cfg.seed * 1000 + seed)
        m0 = self.cfg.cascade.aml_m0 if stage > 1 else 0.0
        counts = cache.train_item_counts(objective)
        log_q = log_q_from_counts(counts).to(self.device)
        n_rows = int(counts.sum())
        drawn = {"epoch": 0}

        def epoch_losses():
            drawn["epoch"] += 1
            rng = np.random.default_rng([self.cfg.seed, seed, drawn["epoch"]])
            order_seed = int(rng.integers(2**31))
            for users, items, codes in cache.batches(objective, t.batch_size, order_seed, t.stream_buffer_rows):
                if share < 1.0:
                    keep = rng.random(len(users)) < share
                    users, items, codes = users[keep], items[keep], {n: c[keep] for n, c in codes.items()}
                codes = self._context_dropout(codes, generator) if reads_context(self.model) else {}
                if len(users) < 2 * self.ranks.world:
                    continue
                mine = self.ranks.share(np.arange(len(users)))  # every rank reads the batch, trains on its part
                users, items, codes = users[mine], items[mine], {n: c[mine] for n, c in codes.items()}
                yield self._step(lambda u=users, i=items, c=codes: self._loss(stage, u, i, m0, log_q, generator,
                                                                              codes=c))  # fmt: skip

        steps = math.ceil(n_rows * share / t.batch_size)
        return self._epoch_loop(stage, epoch_losses, steps, epochs, True, per_stage(t.lr, stage), int(n_rows * share))

    def _optimizer(self, lr: float) -> torch.optim.Optimizer:
        """Adam; when streaming, the ID tables get sparse gradients and SparseAdam (lazy Adam: only the rows
        a batch touches move), because a dense step over a million-row table costs ~1 s on 2 cores."""
        sparse = [e.weight for e in self._sparse_tables()]
        if not sparse:
            return torch.optim.Adam(self.model.parameters(), lr=lr)
        dense = [p for p in self.model.parameters() if all(p is not q for q in sparse)]
        return SplitAdam(torch.optim.SparseAdam(sparse, lr=lr), torch.optim.Adam(dense, lr=lr))

    def _sparse_tables(self) -> list:
        # DDP all-reduces dense gradients only: with several processes every table steps densely (slower per
        # step on a large table; README, multi-process training)
        if self.stream is None or not isinstance(self.model, TwoTower) or self.ranks.active:
            return []
        return [t.id_emb for t in (self.model.user, self.model.item) if t.id_emb.weight.shape[1] > 0]

    def _epoch_loop(self, stage, epoch_losses, steps, epochs, select, lr, n_pairs) -> dict:
        model = self.model

        def validate() -> tuple[float | None, dict]:
            valid = self._validate(stage)
            return (valid[self.cfg.train.select_metric] if valid else None), valid

        records, best_epoch = run_epochs(
            model, self._optimizer(lr), epochs, epoch_losses, validate,
            self.cfg.train.patience, select=select,
            after_backward=lambda: model.mask_grads(stage),  # only the stage's own units learn
            describe=lambda e, loss, _s, valid: f"  stage {stage} epoch {e}: loss {loss:.4f} valid {_fmt(valid)}",
            log=self.log, progress=self.progress, desc=f"stage {stage} epoch", steps=steps,
        )  # fmt: skip
        return {"lr": lr, "pairs": int(n_pairs), "epochs": records, "best_epoch": best_epoch}

    # ----- the graph encoder's full-catalogue loss (one softmax per user) ----------------------------
    def _stage_extras(self, stage: int) -> dict:
        """What the per-user loss reads besides the positives: upstream-only items (hinge AML), the items
        each user has seen and the teacher's lists (distillation). Computed once per phase."""
        objective, extras = self.objectives[stage - 1], {}
        c, t = self.cfg.cascade, self.cfg.train
        if stage > 1 and c.aml_m0 > 0 and c.aml_form == "hinge":
            previous = self.tuning.matrix(self.objectives[stage - 2])
            extras["upstream_only"] = difference(previous, self.tuning.matrix(objective))
        if t.distill and per_stage(t.distill_weight, stage) > 0:
            extras["seen"] = self.tuning.excluded(objective)
            extras["teacher"] = self._teacher(objective)
        return extras

    def _teacher(self, objective: str) -> sp.csr_matrix:
        """The distillation teacher's lists for `objective`, fit on the tuning data (never validation or test);
        csmf.distill caches them per process, so later phases and runs reuse one fit."""
        from csmf.distill import teacher_lists  # the classical models load only when distillation is on

        t0 = time.perf_counter()
        lists = teacher_lists(self.tuning, objective, self.cfg)
        self.log(f"  teacher {self.cfg.train.distill} for {objective}: {time.perf_counter() - t0:.1f}s")
        return lists

    def _user_loss(self, stage: int, users: np.ndarray, targets: sp.csr_matrix, m0: float,
                   generator: torch.Generator, extras: dict) -> torch.Tensor:  # fmt: skip
        model, temperature, c = self.model, self.cfg.model.temperature, self.cfg.cascade
        u, v = model.vectors(users, stage)  # (B, D), (N, D)
        scores = u @ v.T  # (B, N)
        coo = targets[users].tocoo()
        rows, cols = torch.from_numpy(coo.row.astype(np.int64)), torch.from_numpy(coo.col.astype(np.int64))
        weight = torch.from_numpy(coo.data)
        margin, hinge = None, None
        if m0 > 0:
            upstream = ((u * model.group_mask(stage - 1)) @ v.T).detach()  # (B, N) frozen earlier objective
            if c.aml_form == "hinge":
                hinge = self._hinge(scores, upstream, users, rows, cols, extras["upstream_only"], m0, generator)
            elif c.aml_form in ("margin", "weight"):
                # as losses.aml_margin, against a uniform sample of the catalogue (an exact rank over all
                # items would sort every user's scores each step: more than the rest of the step together)
                sample = torch.randint(0, scores.shape[1], (min(2048, scores.shape[1]),), generator=generator)
                margin = m0 * share_above(upstream, rows, cols, sample)  # (P,)
                if c.aml_form == "weight":
                    weight, margin = weight * (1.0 + margin), None
            else:
                raise ValueError(f"cascade.aml_form must be 'margin', 'weight' or 'hinge', got {c.aml_form!r}")
        loss = user_softmax_loss(scores, rows, cols, weight, temperature, margin=margin)
        if hinge is not None:
            loss = loss + hinge
        if "teacher" in extras:
            seen = torch.from_numpy(extras["seen"][users].toarray() > 0)  # (B, N)
            teacher = torch.from_numpy(extras["teacher"][users].toarray())  # (B, N)
            weight_kd = per_stage(self.cfg.train.distill_weight, stage)
            loss = loss + weight_kd * distillation_loss(scores, seen, teacher, temperature)
        return loss

    def _hinge(self, scores, upstream, users, rows, cols, upstream_only: sp.csr_matrix, m0, generator):
        """Cross-stage hinge over one upstream-only item per positive, drawn uniformly from the user's."""
        sub = upstream_only[users]  # (B, N)
        counts = torch.from_numpy(np.diff(sub.indptr).astype(np.int64))[rows]  # (P,)
        starts = torch.from_numpy(sub.indptr[:-1].astype(np.int64))[rows]
        draw = (torch.rand(len(rows), generator=generator) * counts).long()
        has = counts > 0
        if not bool(has.any()):
            return None
        indices = torch.from_numpy(sub.indices.astype(np.int64))
        negatives = indices[(starts + draw)[has]]
        return cross_stage_hinge(scores, upstream, rows[has], cols[has], negatives, m0, self.cfg.model.temperature)

    def _step(self, loss: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One batch's loss; with several processes computed through DDP, whose backward averages the
        gradients over the ranks (the masks then zero the same entries everywhere). runtime.amp on a GPU:
        under bfloat16 autocast (no loss scaling needed: bfloat16 keeps float32's range)."""
        amp = self.cfg.runtime.amp and self.device.type == "cuda"
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=amp):
            return self.parallel(loss) if self.parallel is not None else loss()

    def _context_dropout(self, codes: dict[str, np.ndarray], generator: torch.Generator) -> dict[str, np.ndarray]:
        """A seeded share (model.context_dropout) of the rows lose their whole context (code 0 = unknown), so the
        context-free vector (a request without context, an exported vector) is trained too."""
        if not codes:
            return codes
        n = len(next(iter(codes.values())))
        drop = (torch.rand(n, generator=generator) < self.cfg.model.context_dropout).numpy()
        return {name: np.where(drop, 0, c) for name, c in codes.items()}

    def _loss(self, stage, users, items, m0, log_q, generator, weight=None, codes=None) -> torch.Tensor:
        model, temperature = self.model, self.cfg.model.temperature
        leave_out = items if isinstance(model, TwoTower) and model.user.history is not None else None
        if codes:
            u = model.user_vectors(users, stage, leave_out=leave_out, context=codes)
        else:
            u = model.user_vectors(users, stage, leave_out=leave_out)
        device = u.device
        target_items = torch.from_numpy(items).to(device)
        log_q = log_q.to(device)
        weight = None if weight is None else weight.to(device)
        if self.full_softmax:
            v = model.item_vectors(stage)  # (N, D)
            scores, target, correction = u @ v.T, target_items, None  # (B, N)
            upstream = (u * model.group_mask(stage - 1)) @ v.T if m0 > 0 else None
        else:
            v = model.item_vectors(stage, target_items)  # (B, D)
            pool, offset = target_items, 0
            if self.ranks.active and self.cfg.train.gather_negatives:  # every rank's batch items are negatives
                v, pool, offset = distributed.gather_rows(v, target_items)
            scores, target = in_batch_scores(u, v, pool, offset)
            correction = log_q[pool] + np.log(len(pool))
            upstream = None
            if m0 > 0:
                upstream, _ = in_batch_scores(u * model.group_mask(stage - 1), v, pool, offset)
            extra = self.cfg.train.extra_negatives
            if extra:
                negatives, uniform = uniform_negatives(self.data.n_items, extra, generator)
                negatives, uniform = negatives.to(device), uniform.to(device)
                v_neg = model.item_vectors(stage, negatives)  # (M, D)
                scores = torch.cat([scores, u @ v_neg.T], dim=1)  # (B, B + M)
                correction = torch.cat([correction, uniform])
                if upstream is not None:
                    upstream = torch.cat([upstream, (u * model.group_mask(stage - 1)) @ v_neg.T], dim=1)
        margin = aml_margin(upstream, target, m0) if upstream is not None else None
        form = self.cfg.cascade.aml_form
        if margin is not None and form == "weight":  # up-weight the positives the upstream stage misses
            weight, margin = (1.0 if weight is None else weight) * (1.0 + margin), None
        elif form not in ("margin", "weight"):
            raise ValueError(f"cascade.aml_form must be 'margin' or 'weight', got {form!r}")
        return softmax_loss(scores, target, temperature, margin=margin, log_q=correction, weight=weight)


def _fmt(valid: dict) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in valid.items() if k.endswith("@50")) or "-"


def _describe(record: dict) -> str:
    if "freed_share" in record:
        return f"{record['phase']}: freed {record['freed_share']} ({record['seconds']}s) valid {_fmt(record['valid'])}"
    last = record["epochs"][-1]["valid"] if record["epochs"] else {}
    return f"{record['phase']}: best epoch {record['best_epoch']} ({record['seconds']}s) last valid {_fmt(last)}"
