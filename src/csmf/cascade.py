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

import copy
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from tqdm import tqdm

from csmf.config import Config, config_to_dict
from csmf.data.schema import CascadeData, difference, union
from csmf.determinism import deterministic_torch
from csmf.evaluate import evaluate_stage
from csmf.losses import aml_margin, in_batch_scores, softmax_loss
from csmf.masks import claim_free
from csmf.prune import cpp_free, fixed_free, release
from csmf.towers import Features, TwoTower


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


def build_model(data: CascadeData, cfg: Config, seed: int) -> TwoTower:
    m = cfg.model
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
        user_features=Features.from_arrays(data.user_features, m.max_categories),
        item_features=Features.from_arrays(data.item_features, m.max_categories),
        feature_dim=m.feature_dim,
        seed=seed,
        dropout=m.dropout,
        bag_power=m.bag_power,
    )


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
        model.eval()  # scoring never drops inputs (a freshly loaded module starts in training mode)
        with torch.no_grad():
            self.items = model.item_vectors(top)  # (N, D) computed once

    def stage_number(self, objective: str) -> int:
        if objective not in self.objectives:
            raise KeyError(f"unknown objective {objective!r}; this model serves {self.objectives}")
        return self.top if self.shared else self.objectives.index(objective) + 1

    def raw_user_vectors(self, users: np.ndarray) -> torch.Tensor:
        self.model.eval()
        with torch.no_grad():
            return self.model.user_vectors(np.asarray(users, dtype=np.int64), self.top, history=self.history)

    def score(self, users: np.ndarray, stage: str) -> torch.Tensor:
        mask = self.model.group_mask(self.stage_number(stage))
        return (self.raw_user_vectors(users) * mask) @ self.items.T  # (B, N)


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
        self.model = build_model(data, cfg, cfg.seed)
        self.tuning_history = {b: self.tuning.matrix(b) for b in self.model.behaviours}
        self.model.set_history(self.tuning_history)
        self.phases = plan(len(self.objectives), cfg)
        self.run_dir = Path(run_dir) if run_dir else None
        self.pretrain_cache = Path(pretrain_cache) if pretrain_cache else None
        self.progress = progress
        self.log = log or (lambda _msg: None)
        self.history: list[dict] = []  # one record per completed phase
        self.full_softmax = data.n_items <= cfg.train.full_softmax_max_items

    # ----- checkpoints ---------------------------------------------------------------------------
    def _checkpoint_path(self, index: int) -> Path:
        return self.run_dir / f"phase-{index:02d}-{self.phases[index].name}.pt"

    def _save(self, index: int) -> None:
        if self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self._checkpoint_path(index)
        tmp = path.with_suffix(".pt.partial")
        state = {"state": self.model.state_dict(), "phase": index, "history": self.history,
                 "objectives": list(self.objectives), "config": config_to_dict(self.cfg)}  # fmt: skip
        torch.save(state, tmp)
        tmp.replace(path)  # a checkpoint is either complete or absent
        (self.run_dir / "phases.json").write_text(json.dumps(self.history, indent=2))

    def resume_point(self) -> int:
        """Load the last completed phase from run_dir; returns the next phase (len(phases) = finished)."""
        return self._resume()

    def _resume(self) -> int:
        """Index of the first phase still to run (0 when starting fresh)."""
        if self.run_dir is None or not self.run_dir.exists():
            return 0
        done = sorted(self.run_dir.glob("phase-*.pt"))
        if not done:
            return 0
        state = torch.load(done[-1], weights_only=False)
        if state["objectives"] != list(self.objectives) or _training_part(state["config"]) != _training_part(
            config_to_dict(self.cfg)
        ):
            raise ValueError(
                f"{self.run_dir} holds a run with another config or cascade; use a new --out folder or delete it"
            )
        self.model.load_state_dict(state["state"])
        self.history = state["history"]
        self.log(f"resuming after phase {self.phases[state['phase']].name} ({done[-1].name})")
        return state["phase"] + 1

    def _pretrain_key(self) -> str:
        """Hash of everything stage-1 pretraining reads: data identity, first objective, seed, config."""
        c = config_to_dict(self.cfg)
        inputs = {
            "data": [self.data.name, self.data.n_users, self.data.n_items, self.data.stages, c["data"], c["sim"]],
            "objective": self.objectives[0],
            "seed": self.cfg.seed,
            "model": c["model"],
            "train": c["train"],
            "eval": c["eval"],
        }
        return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def _cached_pretrain(self) -> bool:
        """Load stage 1 from the pretrain cache if it holds this run's pretraining (then phase 0 is done)."""
        path = self.pretrain_cache / f"pretrain-{self._pretrain_key()}.pt"
        if not path.exists():
            return False
        state = torch.load(path, weights_only=False)
        self.model.load_state_dict(state["state"])
        self.history.append({**state["record"], "cached": True})
        self.log(f"stage 1 pretraining loaded from the cache ({path.name})")
        self._save(0)
        return True

    def _cache_pretrain(self) -> None:
        self.pretrain_cache.mkdir(parents=True, exist_ok=True)
        path = self.pretrain_cache / f"pretrain-{self._pretrain_key()}.pt"
        tmp = path.with_suffix(".pt.partial")
        torch.save({"state": self.model.state_dict(), "record": self.history[0]}, tmp)
        tmp.replace(path)

    # ----- phases --------------------------------------------------------------------------------
    def run(self) -> TrainedCascade:
        with deterministic_torch():
            return self._run()

    def _run(self) -> TrainedCascade:
        start = self._resume()
        if start == 0 and self.pretrain_cache is not None and self._cached_pretrain():
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
            self.history.append(record)
            self.log(_describe(record))
            self._save(index)
            if index == 0 and self.pretrain_cache is not None:
                self._cache_pretrain()
        return self.retriever(self.data.train | self.data.side)

    def retriever(self, history: dict[str, sp.csr_matrix], top: int | None = None) -> TrainedCascade:
        top = top or len(self.objectives)
        return TrainedCascade(self.model, self.objectives, history, top, shared=self.cfg.cascade.prune == "none")

    def _validate(self, stage: int) -> dict[str, float]:
        objective = self.objectives[stage - 1]
        if objective not in self.tuning.test or self.tuning.test[objective].nnz == 0:
            return {}
        scorer = self.retriever(self.tuning_history, top=stage)
        result = evaluate_stage(scorer, self.tuning, objective, self.cfg.eval.ks, self.cfg.eval.score_budget_mb)
        return {k: round(v, 5) for k, v in result.items() if k != "users"}

    def _stage_pairs(self, stage: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(users, items, weights) a stage trains on: its own pairs (weight 1), plus the pairs of every other
        training behaviour that are not already its positives, at `train.aux_weight` (None = all weight 1)."""
        own = self.tuning.train[self.objectives[stage - 1]]
        aux_weight = per_stage(self.cfg.train.aux_weight, stage)
        if aux_weight <= 0:
            return (*pairs_of(own), None)
        others = [self.tuning.matrix(b) for b in self.tuning.behaviours if b != self.objectives[stage - 1]]
        aux = difference(union(*others), own) if others else own[:0]
        users, items = pairs_of(own)
        aux_users, aux_items = pairs_of(aux)
        weights = np.concatenate([np.ones(len(users)), np.full(len(aux_users), aux_weight)]).astype(np.float32)
        return np.concatenate([users, aux_users]), np.concatenate([items, aux_items]), weights

    def _train(self, stage: int, index: int) -> dict:
        if stage > 1:
            self._claim(stage)
        users, items, weights = self._stage_pairs(stage)
        epochs = per_stage(self.cfg.train.max_epochs, stage)
        return self._epochs(stage, users, items, weights, epochs, select=True, seed=index)

    def _recover(self, stage: int, index: int) -> dict:
        users, items, weights = self._stage_pairs(stage)
        rng = np.random.default_rng([self.cfg.seed, index])
        take = rng.random(len(users)) < self.cfg.cascade.recover_frac
        weights = None if weights is None else weights[take]
        epochs = self.cfg.cascade.recover_epochs
        return self._epochs(stage, users[take], items[take], weights, epochs, select=True, seed=index)

    def _claim(self, stage: int) -> None:
        naive = self.cfg.cascade.prune == "none"  # naive fine-tuning: the new stage takes (and trains) every unit
        for _, _, owner in self.model.prunable():
            owner.copy_(torch.where(owner >= 1, stage, owner) if naive else claim_free(owner, stage))
        self.model.sync_output_owner()

    def _prune(self, stage: int) -> dict:
        c = self.cfg.cascade
        groups = self.model.prunable()
        tau = per_stage(c.tau, stage)
        # Pruning happens only when a later stage follows: each group frees at least one unit for it
        # (without an output dimension of its own, the next objective would just repeat this one).
        cpp = {name: cpp_free(mag, owner, stage, tau, min_free=1) for name, mag, owner in groups}
        if c.prune == "cpp":
            frees = cpp
        elif c.prune == "fixed":
            owned = sum(int((owner == stage).sum()) for _, _, owner in groups)
            share = c.fixed_fraction if c.fixed_fraction >= 0 else sum(int(f.sum()) for f in cpp.values()) / owned
            frees = {name: fixed_free(mag, owner, stage, share, min_free=1) for name, mag, owner in groups}
        else:
            raise ValueError(f"cascade.prune must be 'cpp', 'fixed' or 'none', got {c.prune!r}")
        for name, _, owner in groups:
            owner.copy_(release(owner, frees[name]))
        self.model.sync_output_owner()
        freed = {name: round(float(f.float().mean()), 4) for name, f in frees.items()}
        return {"criterion": c.prune, "tau": tau, "freed_share": freed, "valid": self._validate(stage)}

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
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(self.cfg.seed * 1000 + seed)
        m0 = self.cfg.cascade.aml_m0 if stage > 1 else 0.0
        log_q = self._log_q(items)
        best, best_state, best_epoch, epochs_log = -1.0, None, 0, []
        for epoch in range(1, epochs + 1):
            model.train()
            order = torch.randperm(len(users), generator=generator).numpy()
            total, batches = 0.0, 0
            steps = range(0, len(order), t.batch_size)
            desc = f"stage {stage} epoch {epoch}"
            for start in tqdm(steps, desc=desc, unit="batch", disable=not self.progress, leave=False):
                idx = order[start : start + t.batch_size]
                weight = None if weights is None else torch.from_numpy(weights[idx])
                loss = self._loss(stage, users[idx], items[idx], m0, log_q, generator, weight)
                optimizer.zero_grad()
                loss.backward()
                model.mask_grads(stage)  # only the stage's own units learn; earlier stages stay bit-identical
                optimizer.step()
                total += float(loss.detach())
                batches += 1
            model.eval()
            valid = self._validate(stage)
            epochs_log.append({"epoch": epoch, "loss": round(total / max(batches, 1), 5), "valid": valid})
            self.log(f"  stage {stage} epoch {epoch}: loss {total / max(batches, 1):.4f} valid {_fmt(valid)}")
            if not select or not valid:  # no validation pairs: keep the last epoch
                continue
            score = valid[t.select_metric]
            if score > best:
                best, best_state, best_epoch = score, copy.deepcopy(model.state_dict()), epoch
            elif epoch - best_epoch >= t.patience:
                break
        if select and best_state is not None:
            model.load_state_dict(best_state)
        return {
            "lr": lr,
            "pairs": int(len(users)),
            "epochs": epochs_log,
            "best_epoch": best_epoch if select else epochs,
        }

    def _log_q(self, items: np.ndarray) -> torch.Tensor:
        counts = np.bincount(items, minlength=self.data.n_items).astype(np.float64) + 1.0
        return torch.from_numpy(np.log(counts / counts.sum())).float()

    def _loss(self, stage, users, items, m0, log_q, generator, weight=None) -> torch.Tensor:
        model, temperature = self.model, self.cfg.model.temperature
        u = model.user_vectors(users, stage, leave_out=items if model.user.history is not None else None)
        target_items = torch.from_numpy(items)
        if self.full_softmax:
            v = model.item_vectors(stage)  # (N, D)
            scores, target, correction = u @ v.T, target_items, None  # (B, N)
            upstream = (u * model.group_mask(stage - 1)) @ v.T if m0 > 0 else None
        else:
            v = model.item_vectors(stage, target_items)  # (B, D)
            scores, target = in_batch_scores(u, v, target_items)
            correction = log_q[target_items] + np.log(len(items))
            upstream = None
            if m0 > 0:
                upstream, _ = in_batch_scores(u * model.group_mask(stage - 1), v, target_items)
            extra = self.cfg.train.extra_negatives
            if extra:
                negatives = torch.randint(0, self.data.n_items, (extra,), generator=generator)
                v_neg = model.item_vectors(stage, negatives)  # (M, D)
                scores = torch.cat([scores, u @ v_neg.T], dim=1)  # (B, B + M)
                uniform = torch.full((extra,), float(np.log(extra / self.data.n_items)))
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


def _training_part(config: dict) -> dict:
    """What decides a checkpoint's weights: everything but the bench section (output folders, row lists)."""
    return {k: v for k, v in config.items() if k != "bench"}


def _fmt(valid: dict) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in valid.items() if k.endswith("@50")) or "-"


def _describe(record: dict) -> str:
    if "freed_share" in record:
        return f"{record['phase']}: freed {record['freed_share']} ({record['seconds']}s) valid {_fmt(record['valid'])}"
    last = record["epochs"][-1]["valid"] if record["epochs"] else {}
    return f"{record['phase']}: best epoch {record['best_epoch']} ({record['seconds']}s) last valid {_fmt(last)}"
