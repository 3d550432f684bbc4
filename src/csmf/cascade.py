"""The cascaded trainer: pretrain stage 1 -> CPP -> AR -> fine-tune stage 2 (AML) -> CPP -> AR -> ...

Follows method notes §3-§6 (schedule table in §3). The trainer only orders and records phases; what it trains
sits behind seams: the backbone (csmf.backbones), the batches (csmf.data.batches), the stage loss
(csmf.stage_loss), ownership changes (csmf.phases) and the loop (csmf.training_loop). Every phase is seeded
from (seed, phase index) and checkpointed; a killed run resumes from the last completed phase and ends with
the same weights as an uninterrupted one. Training uses the tuning view of the data (validation pairs removed
from train), validation picks each stage's best epoch, and the test split is never read here.

Stage-1 pretraining depends only on the data, the seed and the model/train/eval config, so runs that differ
only downstream (ablations, a tau sweep, the single stage-1 tower) may share it through `pretrain_cache`, a
folder of pretrained states keyed by a hash of exactly those inputs: bit-identical to pretraining afresh.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

import csmf.data.context as context
from csmf import distributed
from csmf.backbones import build_backbone
from csmf.config import Config, ConfigError, per_stage
from csmf.data.batches import (
    PairBatches,
    StreamedBatches,
    UserBatches,
    log_q,
    log_q_from_counts,
    stage_pairs,
    target_matrix,
)
from csmf.data.schema import CascadeData
from csmf.data.stream_history import recent_histories
from csmf.determinism import deterministic_torch, seeded
from csmf.evaluation import evaluate_stage, list_recalls, metric_values
from csmf.phases import Phase, claim, plan, prune
from csmf.rules import check_training, teacher_kind
from csmf.runfolder import PretrainCache, RunFolder
from csmf.stage_loss import PairLoss, UserLoss, user_loss_extras
from csmf.tracking import Tracker
from csmf.trained import TrainedCascade
from csmf.training_loop import adam, run_epochs

# (tuning data, objective) -> a teacher's (U, N) lists (csmf.models.teachers.teacher_for)
Teacher = Callable[[CascadeData, str], sp.csr_matrix]


class CascadeTrainer:
    """Trains a backbone through the cascade's phases on `data` (objectives: default every stage).

    teacher: the distillation teacher (train.distill), called on the tuning data; the model layer hands it in,
    so the trainer never reaches for a model itself. tracker: records each epoch, and the owners after each prune
    (csmf.tracking); the caller opens and closes it."""

    def __init__(self, data: CascadeData, cfg: Config, objectives: tuple[str, ...] | None = None,
                 run_dir: str | Path | None = None, progress: bool = False, log: Callable[[str], None] | None = None,
                 pretrain_cache: str | Path | None = None, teacher: Teacher | None = None,
                 tracker: Tracker | None = None):  # fmt: skip
        self.data, self.cfg, self.teacher = data, cfg, teacher
        self.objectives = objectives or data.stages
        self.stream = data.stream if cfg.train.stream else None
        self.device = distributed.resolve_device(cfg.runtime.device)  # "auto": a GPU when there is one
        check_training(cfg, data.n_items, data.stream is not None, self.device.type)  # before any model is built
        if cfg.train.distill and teacher is None:
            raise ConfigError(f"train.distill = {cfg.train.distill!r}: give the trainer its teacher, "
                              "teacher=csmf.models.teachers.teacher_for(cfg) (CSMF(cfg).fit does)")  # fmt: skip
        self.tuning = data.tuning_view()
        self.model = build_backbone(data, cfg, cfg.seed, self.objectives)
        if self.device.type != "cpu":
            self.model.place(self.device)
        # streamed, memory holds only the evaluated users' rows: the bags read each behaviour's latest
        # model.history_max items of every user, built once from the cache (training rows only), and validation and
        # the test read the same matrices
        self.streamed_history, t0 = self.stream is not None and bool(self.model.behaviours), time.perf_counter()
        if self.streamed_history:
            self.tuning_history = recent_histories(self.stream, self.model.behaviours, cfg.model.history_max,
                                                   cfg.seed, cfg.train.stream_buffer_rows)  # fmt: skip
        else:
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
        if self.streamed_history:
            size = sum(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes for m in self.tuning_history.values())
            self.log(f"histories built from the cache: {sum(m.nnz for m in self.tuning_history.values()):,} items "
                     f"(each behaviour's latest {cfg.model.history_max or 'all'} a user), {size / 2**20:.1f} MB, "
                     f"{time.perf_counter() - t0:.1f}s")  # fmt: skip
        self.tracker = tracker if self.ranks.main else None  # the curves (csmf.tracking): one writer, rank 0
        self.history: list[dict] = []  # one record per completed phase
        self.full_softmax = data.n_items <= cfg.train.full_softmax_max_items and self.stream is None
        # a per-user backbone takes each user's positives at once: over the whole catalogue while it fits, else over
        # a pool of the items the loss reads and a uniform draw (train.pool_items, csmf.stage_loss.Pool)
        self.per_user = self.model.per_user_loss and self.stream is None
        # a streamed catalogue's ID tables step sparsely, and in memory those of train.sparse_table_rows rows or more;
        # DDP all-reduces dense gradients only, so not with ranks (those row-reduce: runtime.row_reduce_rows)
        self.sparse = [] if self.ranks.active else [t for t in self.model.sparse_tables() if self._sparse(t)]
        for table in self.sparse:
            table.sparse = True
        # several processes: DDP averages every loss's gradients over the ranks before the masks apply
        # large ID tables average their gradients by the rows a batch touched, not densely (runtime.row_reduce_rows)
        limit = cfg.runtime.row_reduce_rows
        self.row_reduced = {
            name: p for name, p in self.model.row_tables().items() if self.ranks.active and 0 < limit <= p.shape[0]
        }
        self.parallel = (
            distributed.data_parallel(self.model, self.device, tuple(self.row_reduced)) if self.ranks.active else None
        )
        if data.context and not self.model.reads_context:
            off = not (cfg.model.features and cfg.model.context)
            why = "model.features or model.context is off" if off else f"model.encoder {cfg.model.encoder!r} does not"
            self.log(f"context columns {sorted(data.context)} are not used: {why}")

    def _sparse(self, table: torch.nn.Module) -> bool:
        """Whether an ID table steps row-sparse: streamed, or at least train.sparse_table_rows rows in memory."""
        limit = self.cfg.train.sparse_table_rows
        return self.stream is not None or 0 < limit <= table.weight.shape[0]

    # ----- run folder and pretrain cache (csmf.runfolder) --------------------------------------------
    def resume_point(self) -> int:
        """The first phase still to run (len(phases) = finished); reads the run folder, changes nothing."""
        last = self.folder.last() if self.folder is not None else None
        return 0 if last is None else last[0] + 1

    def _start(self) -> int:
        """Load the last completed phase, or stage 1 from the pretrain cache when it holds this run's
        pretraining; returns the first phase still to run."""
        last = self.folder.last() if self.folder is not None else None
        if last is not None:
            index, state, self.history, name = last
            self.model.load_state_dict(state)
            self.log(f"resuming after phase {self.phases[index].name} ({name})")
            return index + 1
        cached = self.pretrain.load() if self.pretrain is not None else None
        if cached is None:
            return 0
        self.model.load_state_dict(cached[0])
        self.history.append({**cached[1], "cached": True})
        self.log(f"stage 1 pretraining loaded from the cache ({self.pretrain.path.name})")
        self._save(0)
        return 1

    def _save(self, index: int) -> None:
        if self.folder is not None and self.ranks.main:  # one writer; the others wait for the file
            self.folder.save(index, self.model.state_dict(), self.history)
        distributed.barrier()

    # ----- phases --------------------------------------------------------------------------------
    def run(self) -> TrainedCascade:
        """Every phase still to run, each recorded and checkpointed; the trained cascade on the CPU."""
        # on a GPU some kernels have no deterministic form: warned about, not refused (CPU runs are bit-exact)
        with deterministic_torch(warn_only=self.device.type != "cpu"):
            for index in range(self._start(), len(self.phases)):
                self.run_phase(index)
        if self.device.type != "cpu":  # the trained model is handed back on the CPU: evaluation, export, serving
            self.model.place(torch.device("cpu"))
        return self.retriever(self.tuning_history if self.streamed_history else self.data.train | self.data.side)

    def run_phase(self, index: int) -> dict:
        """Phase `index` of the plan: train, prune or recover its stage; recorded, logged and checkpointed."""
        phase, t0 = self.phases[index], time.perf_counter()
        with seeded(self.cfg.seed * 1000 + index):  # dropout draws from torch's default generator
            record = self._phase(phase, index)
        record.update(phase=phase.name, seconds=round(time.perf_counter() - t0, 2))
        if self.ranks.active:  # every rank must hold the same weights and owners: checked, not assumed
            record.update(processes=self.ranks.world, checksum=distributed.check_agreement(self.model, phase.name))
        self.history.append(record)
        self.log(_describe(record))
        if phase.kind == "prune" and self.tracker is not None:
            self.tracker.pruned(phase.name, phase.stage, record["valid"], self.model.ownership())
        self._save(index)
        if index == 0 and self.pretrain is not None and self.ranks.main:
            self.pretrain.store(self.model.state_dict(), self.history[0])
        distributed.barrier()
        return record

    def _phase(self, phase: Phase, index: int) -> dict:
        stage, c = phase.stage, self.cfg.cascade
        if phase.kind == "prune":
            record = prune(self.model, stage, c, len(self.objectives))
            distributed.broadcast_owners(self.model)  # rank 0's decision is every rank's
            return {**record, "valid": self.validate(stage)}
        if phase.kind == "train" and stage > 1:
            claim(self.model, stage, naive=c.prune == "none")
        if phase.kind == "recover" and (skipped := self._pruning_cost_is_small(stage)):
            return {"skipped": skipped, "valid": self.history[-1].get("valid", {})}
        epochs = per_stage(self.cfg.train.max_epochs, stage) if phase.kind == "train" else c.recover_epochs
        share = 1.0 if phase.kind == "train" else c.recover_frac  # AR re-trains a seeded share of the data
        return self._epochs(stage, index, epochs, share)

    def _pruning_cost_is_small(self, stage: int) -> str:
        """Why AR after `stage`'s pruning is skipped ("" = it runs): pruning lost at most cascade.recover_skip of
        the stage's best validation metric (the train phase's best epoch against the prune phase's record)."""
        limit, metric = self.cfg.cascade.recover_skip, self.cfg.train.select_metric
        trained = [r for r in self.history if r.get("phase") == f"train-{stage}" and r.get("epochs")]
        pruned = self.history[-1] if self.history and self.history[-1].get("phase") == f"prune-{stage}" else {}
        if limit <= 0 or not trained or metric not in pruned.get("valid", {}):
            return ""
        record = trained[-1]
        best = record["epochs"][record["best_epoch"] - 1]["valid"].get(metric)
        after = pruned["valid"][metric]
        if not best or best - after > limit * best:
            return ""
        return (f"pruning cost {max(best - after, 0) / best:.1%} of validation {metric} ({best:.4f} -> {after:.4f}), "
                f"at most cascade.recover_skip = {limit:g}")  # fmt: skip

    def retriever(self, history: dict[str, sp.csr_matrix], top: int | None = None) -> TrainedCascade:
        top = top or len(self.objectives)
        return TrainedCascade(self.model, self.objectives, history, top, shared=self.cfg.cascade.prune == "none")

    def validate(self, stage: int) -> dict[str, float]:
        """Objective `stage`'s metrics on the validation pairs (empty without any)."""
        objective = self.objectives[stage - 1]
        if objective not in self.tuning.test or self.tuning.test[objective].nnz == 0:
            return {}
        scorer = self.retriever(self.tuning_history, top=stage)
        result = evaluate_stage(
            scorer, self.tuning, objective, self.cfg.eval.ks, self.cfg.eval.score_budget_mb, shard=self.ranks,
            sample=self.cfg.eval.valid_users, seed=self.cfg.seed,
        )  # fmt: skip
        return {k: round(v, 5) for k, v in metric_values(result).items()}

    def _epochs(self, stage: int, index: int, epochs: int, share: float) -> dict:
        """Epochs of `stage` on its data (a seeded `share` of it for AR); validation keeps the best epoch."""
        batches, loss = self._batches_and_loss(stage, index, share)
        lr = per_stage(self.cfg.train.lr, stage)

        def step(batch) -> torch.Tensor:
            """One batch's loss, under bfloat16 autocast with runtime.amp on a GPU; with several processes through
            DDP, whose backward averages the gradients over the ranks (the masks then zero the same entries)."""
            amp = self.cfg.runtime.amp and self.device.type == "cuda"
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=amp):
                return self.parallel(lambda: loss(batch)) if self.parallel is not None else loss(batch)

        def validate() -> tuple[float | None, dict]:
            valid = self.validate(stage)
            return (valid[self.cfg.train.select_metric] if valid else None), valid

        shrink = self._decay(stage, lr * self.cfg.train.weight_decay)
        with self.model.training_stage(stage):
            records, best_epoch = run_epochs(
                self.model, adam(self.model, lr, [t.weight for t in self.sparse]), epochs,
                lambda: (step(b) for b in batches.epoch()), validate, self.cfg.train.patience,
                after_backward=lambda: self._after_backward(stage, shrink),
                describe=lambda e, loss, _s, valid: f"  stage {stage} epoch {e}: loss {loss:.4f} valid {_fmt(valid)}",
                log=self.log, progress=self.progress, desc=f"stage {stage} epoch", steps=batches.steps,
                tracker=self.tracker, phase=self.phases[index].name, pairs=int(batches.rows),
            )  # fmt: skip
        return {"lr": lr, "pairs": int(batches.rows), "epochs": records, "best_epoch": best_epoch}

    def _after_backward(self, stage: int, shrink: list[tuple[torch.Tensor, torch.Tensor]] = ()) -> None:
        """The row-reduced tables averaged over the ranks, then only the stage's own units keep a gradient; with
        weight decay, what the stage trains shrinks (before Adam's step, as AdamW does)."""
        for table in self.row_reduced.values():
            distributed.reduce_rows(table)
        self.model.mask_grads(stage)
        with torch.no_grad():
            for p, factor in shrink:
                p.mul_(factor)

    def _decay(self, stage: int, rate: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, per-entry factor) pairs: 1 - `rate` where `stage` may change the entry, exactly 1 elsewhere.
        Where it may is what Backbone.mask_grads keeps of a gradient of ones, so every backbone's masks (columns,
        hidden units, read inputs) are honoured without a second description of them. Sparse tables do not decay."""
        if rate <= 0:
            return []
        sparse = {id(t.weight) for t in self.sparse}
        params = [p for p in self.model.parameters() if p.requires_grad and id(p) not in sparse]
        saved = [p.grad for p in params]
        for p in params:
            p.grad = torch.ones_like(p)
        self.model.mask_grads(stage)
        out = []
        for p, grad in zip(params, saved, strict=True):
            keep = p.grad if p.grad is not None else torch.zeros_like(p)
            if bool(keep.any()):
                out.append((p, 1.0 - rate * (keep != 0).to(p.dtype)))
            p.grad = grad
        return out

    def _batches_and_loss(self, stage: int, index: int, share: float):
        """The phase's batch producer (csmf.data.batches) and the loss of one of its batches (csmf.stage_loss)."""
        cfg, t, model = self.cfg, self.cfg.train, self.model
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + index)
        objective, dropout = self.objectives[stage - 1], cfg.model.context_dropout
        if self.stream is not None:
            others = tuple(s for s in self.stream.stages if s != objective)  # as stage_pairs: every other behaviour
            batches = StreamedBatches(self.stream, objective, t.batch_size, t.stream_buffer_rows, share,
                                      (cfg.seed, index), generator, self.ranks, model.reads_context,
                                      dropout, others, per_stage(t.aux_weight, stage))  # fmt: skip
            return batches, PairLoss(model, stage, cfg, log_q_from_counts(batches.counts), generator, False)
        users, items, weights = stage_pairs(self.tuning, objective, per_stage(t.aux_weight, stage))
        if share < 1.0:
            draw = np.random.default_rng([cfg.seed, index])
            if cfg.cascade.recover_by == "users":  # each user in or out with all of its pairs
                take = (draw.random(self.data.n_users) < share)[users]
            else:
                take = draw.random(len(users)) < share
            users, items, weights = users[take], items[take], None if weights is None else weights[take]
        if self.per_user:  # a batch is a set of users with all their positives
            targets = target_matrix(users, items, weights, self.data.n_users, self.data.n_items)
            extras = user_loss_extras(self.tuning, self.objectives, stage, cfg, self._teacher)
            batches = UserBatches.of(targets, t.user_batch_size, generator, self.ranks, rows=len(users))
            pool = 0 if self.full_softmax else t.pool_items
            # several processes: the loss draws from a generator of its own, because the hinge draws as many numbers
            # as the rank's positives, and from the batches' generator that put the ranks' user orders out of step
            # after the first epoch (one process keeps the one generator: its numbers are unchanged)
            draws = torch.Generator().manual_seed(cfg.seed * 1000 + index + 500) if self.ranks.active else generator
            return batches, UserLoss(model, stage, cfg, targets, draws, extras, pool)
        # each pair's context (its latest row's); an auxiliary pair of another behaviour has its own
        codes = context.lookup(self.tuning.context, users, items) if model.reads_context else {}
        batches = PairBatches(users, items, weights, codes, t.batch_size, generator, self.ranks, dropout)
        return batches, PairLoss(model, stage, cfg, log_q(items, self.data.n_items), generator, self.full_softmax)

    def _teacher(self, objective: str) -> sp.csr_matrix | None:
        """The distillation teacher's lists for `objective`, fit on the tuning data (never validation or test);
        None (no distillation this stage) when they find less than train.distill_check times what as many most
        popular unseen items find of the validation pairs."""
        t0 = time.perf_counter()
        lists = self.teacher(self.tuning, objective)
        kind, asked = teacher_kind(self.cfg, self.tuning.n_items), self.cfg.train.distill
        why = f" (an {asked} teacher would not fit {self.tuning.n_items:,} items)" if kind != asked else ""
        self.log(f"  teacher {kind} for {objective}{why}: {time.perf_counter() - t0:.1f}s")
        share = self.cfg.train.distill_check
        if share <= 0 or objective not in self.tuning.test:
            return lists
        taught, popular, users = list_recalls(lists, self.tuning, objective, self.cfg.eval.valid_users, self.cfg.seed)
        if taught >= share * popular:
            return lists
        self.log(f"  teacher {kind} for {objective} dropped (train.distill_check = {share}): its lists hold "
                 f"{taught:.4f} of {users:,} users' validation pairs, as many most popular unseen items "
                 f"{popular:.4f}")  # fmt: skip
        return None


def _fmt(valid: dict) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in valid.items() if k.endswith("@50")) or "-"


def _describe(record: dict) -> str:
    if "skipped" in record:
        return f"{record['phase']}: skipped, {record['skipped']}"
    if "freed_share" in record:
        return f"{record['phase']}: freed {record['freed_share']} ({record['seconds']}s) valid {_fmt(record['valid'])}"
    last = record["epochs"][-1]["valid"] if record["epochs"] else {}
    return f"{record['phase']}: best epoch {record['best_epoch']} ({record['seconds']}s) last valid {_fmt(last)}"
