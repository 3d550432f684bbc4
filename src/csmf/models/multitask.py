"""Multi-task two-tower baselines: shared-bottom, MMoE, PLE and MVKE-style, trained jointly on every objective.

They read the same inputs as the CSMF backbone (pooled history bags with leave-target-out, user and item
features), use the same D, softmax loss (in-batch + uniform negatives with logQ) and optimiser, and pick
their epoch on validation (mean Recall@50 over the objectives). What differs is the network between the
inputs and the vectors, and so what serving a fused query costs:

- shared-bottom (Caruana 1997): one shared expert per tower, one output head per objective;
- mmoe (Ma et al., KDD 2018): shared experts, one softmax gate per objective, in each tower;
- ple (Tang et al., RecSys 2020; one CGC level): shared experts plus experts of each objective, gated;
  these three give each objective its own user AND item vector, so a fused score
  sum_k w_k <u_k, v_k> is one search over the concatenation [v_1; ...; v_S]: S x D floats per item;
- mvke (Xu et al., KDD 2022, "MVKE-style"): virtual kernels attend over the user's input fields and
  become experts; each objective's gate over the kernels gives its own user vector, and one item tower
  gives one shared item vector, so sum_k w_k <u_k, v> = <sum_k w_k u_k, v>: one D-wide index.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from csmf.backbones.features import features_of, pool_bags
from csmf.backbones.graph import StageGraph, graph_weights
from csmf.config import Config, config_from_dict, config_to_dict, per_stage
from csmf.data.batches import (
    JointPairBatches,
    PairBatch,
    UserBatches,
    coo_tensors,
    pairs_of,
    stage_pairs,
    target_matrix,
    uniform_negatives,
)
from csmf.data.batches import log_q as item_log_q
from csmf.data.schema import CascadeData
from csmf.determinism import deterministic_torch, seeded
from csmf.distributed import Ranks
from csmf.evaluation import evaluate_stage, metric_values
from csmf.losses import distillation_loss, sampled_softmax, user_softmax_loss
from csmf.models.saving import SavedInputs, read_model, write_model
from csmf.models.teachers import teacher_lists
from csmf.retriever import Retriever
from csmf.rules import check_training, fit_to_size
from csmf.tracking import Tracker
from csmf.training_loop import run_epochs

KINDS = ("shared-bottom", "mmoe", "ple", "mvke")


class GatedExperts(nn.Module):
    """Experts over one input and a softmax gate per objective: (B, n_in) -> one (B, H) per objective.

    shared-bottom = 1 shared expert, no gate; mmoe = `experts` shared experts; ple = shared experts plus
    `specific` experts of each objective, each objective's gate choosing among the shared and its own.
    """

    def __init__(self, n_in: int, width: int, n_objectives: int, shared: int, specific: int):
        super().__init__()
        self.shared = nn.ModuleList(nn.Linear(n_in, width) for _ in range(shared))
        self.specific = nn.ModuleList(
            nn.ModuleList(nn.Linear(n_in, width) for _ in range(specific)) for _ in range(n_objectives)
        )
        n_choices = shared + specific
        self.gates = nn.ModuleList(nn.Linear(n_in, n_choices) for _ in range(n_objectives)) if n_choices > 1 else None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        shared = [torch.relu(e(x)) for e in self.shared]
        out = []
        for t, own in enumerate(self.specific):
            choices = torch.stack(shared + [torch.relu(e(x)) for e in own], dim=1)  # (B, E, H)
            if self.gates is None:
                out.append(choices[:, 0])
            else:
                gate = torch.softmax(self.gates[t](x), dim=1)  # (B, E)
                out.append((gate.unsqueeze(2) * choices).sum(dim=1))  # (B, H)
        return out


class VirtualKernelExperts(nn.Module):
    """MVKE-style user side: each virtual kernel attends over the input fields and feeds its own expert;
    objective t mixes the kernel experts with weights softmax_k(<task_t, kernel_k>)."""

    def __init__(self, field_widths: list[int], kernel_dim: int, kernels: int, width: int, n_objectives: int):
        super().__init__()
        self.project = nn.ModuleList(nn.Linear(w, kernel_dim) for w in field_widths)
        self.kernels = nn.Parameter(torch.randn(kernels, kernel_dim) / math.sqrt(kernel_dim))
        self.tasks = nn.Parameter(torch.randn(n_objectives, kernel_dim) / math.sqrt(kernel_dim))
        self.experts = nn.ModuleList(nn.Linear(kernel_dim, width) for _ in range(kernels))

    def forward(self, fields: list[torch.Tensor]) -> list[torch.Tensor]:
        f = torch.stack([p(x) for p, x in zip(self.project, fields, strict=True)], dim=1)  # (B, F, A)
        attn = torch.softmax(torch.einsum("bfa,ka->bkf", f, self.kernels) / math.sqrt(f.shape[2]), dim=2)
        pooled = torch.einsum("bkf,bfa->bka", attn, f)  # (B, K, A): what each kernel reads of the user
        experts = torch.stack([torch.relu(e(pooled[:, k])) for k, e in enumerate(self.experts)], dim=1)  # (B, K, H)
        gates = torch.softmax(self.tasks @ self.kernels.T, dim=1)  # (S, K)
        return [(g.view(1, -1, 1) * experts).sum(dim=1) for g in gates]  # S x (B, H)


class MultiTaskTwoTower(nn.Module):
    """The towers of one multi-task model; their initial weights draw from torch's default generator (nn.Linear
    takes no other), so MultiTask builds them under `seeded(cfg.seed)`."""

    def __init__(self, kind: str, data: CascadeData, cfg: Config, n_objectives: int):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown multi-task model {kind!r}; choose from {KINDS}")
        m, mt = cfg.model, cfg.multitask
        self.kind, self.dropout, self.bag_power = kind, m.dropout, m.bag_power
        self.n_items = data.n_items
        # graph encoder: the experts read the graph backbone's vectors (one per objective's graph, from one
        # item table E) instead of ID embeddings and mean-pooled bags: the same inputs CSMF's columns see
        self.graph = m.encoder == "graph"
        self.stage_weights = [
            graph_weights(o, data.stages, data.behaviours, m.graph_up_weight, m.graph_down_weight, m.graph_side_weight)
            for o in data.stages[:n_objectives]
        ]
        self.graphs: list[StageGraph] = []
        self.hops, self.neighbours = m.graph_hops, m.graph_neighbours
        self.table = nn.Parameter(torch.randn(data.n_items, m.dim) * m.init_scale) if self.graph else None
        self.behaviours = data.behaviours if (m.history or self.graph) else ()
        self.history = (
            nn.Parameter(torch.randn(data.n_items, m.history_dim) * 0.05)
            if self.behaviours and not self.graph
            else None
        )
        self.user_id = nn.Embedding(data.n_users, m.id_dim) if m.user_id and not self.graph else None
        self.item_id = nn.Embedding(data.n_items, m.id_dim) if not self.graph else None
        self.user_features = features_of(data.user_features, m)
        self.item_features = features_of(data.item_features, m)
        self.user_cat = nn.ModuleDict(
            {k: nn.Embedding(c, m.feature_dim) for k, c in self.user_features.cardinality.items()}
        )
        self.item_cat = nn.ModuleDict(
            {k: nn.Embedding(c, m.feature_dim) for k, c in self.item_features.cardinality.items()}
        )
        for emb in [*self.user_cat.values(), *self.item_cat.values()] + [
            e for e in (self.item_id, self.user_id) if e is not None
        ]:
            nn.init.normal_(emb.weight, std=0.05)
        if self.graph:
            user_widths = [m.dim] * n_objectives
            item_in = m.dim * n_objectives
        else:
            user_widths = [m.history_dim] * len(self.behaviours) + ([m.id_dim] if self.user_id else [])
            item_in = m.id_dim
        user_widths += [m.feature_dim] * len(self.user_cat) + [1] * self.user_features.n_dense
        item_in += m.feature_dim * len(self.item_cat) + self.item_features.n_dense
        h = mt.expert_dim
        if kind == "mvke":
            self.user_body = VirtualKernelExperts(user_widths, mt.kernel_dim, mt.kernels, h, n_objectives)
            self.item_body = GatedExperts(item_in, h, 1, shared=1, specific=0)
        else:
            shared, specific = {
                "shared-bottom": (1, 0),
                "mmoe": (mt.experts, 0),
                "ple": (mt.experts, mt.specific_experts),
            }[kind]
            self.user_body = GatedExperts(sum(user_widths), h, n_objectives, shared, specific)
            self.item_body = GatedExperts(item_in, h, n_objectives, shared, specific)
        n_item_vectors = 1 if kind == "mvke" else n_objectives
        self.user_heads = nn.ModuleList(nn.Linear(h, m.dim) for _ in range(n_objectives))
        self.item_heads = nn.ModuleList(nn.Linear(h, m.dim) for _ in range(n_item_vectors))

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if self.graph:  # the graph backbone trains without input dropout, as CSMF's does
            return x
        return F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x

    def set_history(self, matrices: dict[str, sp.csr_matrix]) -> None:
        """Graph encoder: the training matrices each objective's graph is built from."""
        if self.graph:
            self.graphs = [
                StageGraph(w, matrices, self.n_items, self.hops, self.neighbours) for w in self.stage_weights
            ]

    def smoothed_items(self) -> list[torch.Tensor]:
        """Graph encoder: the item table smoothed over each objective's graph, (N, D) each."""
        return [g.smooth(self.table, self.hops) for g in self.graphs]

    def user_fields(
        self, users: np.ndarray, history: dict[str, sp.csr_matrix], leave_out=None, smoothed=None
    ) -> list[torch.Tensor]:
        ids = torch.from_numpy(np.asarray(users, dtype=np.int64))
        fields = []
        if self.graph:  # the user as a degree-normalised bag over each objective's graph (no leave-out)
            users = np.asarray(users, dtype=np.int64)
            for g, items in zip(self.graphs, smoothed or self.smoothed_items(), strict=True):
                fields.append(torch.sparse.mm(g.user_rows(users, history), items))  # (B, N) @ (N, D)
        elif self.behaviours:
            fields += pool_bags(self.history, [history[b] for b in self.behaviours], users, leave_out, self.bag_power)
        if self.user_id is not None:
            fields.append(self.user_id(ids))
        fields += [self.user_features.lookup(k, ids, emb.weight) for k, emb in self.user_cat.items()]
        if self.user_features.dense is not None:
            dense = self.user_features.dense[ids]  # (B, n_dense): one width-1 field per column
            fields += [dense[:, j : j + 1] for j in range(dense.shape[1])]
        return [self._drop(x) for x in fields]

    def user_vectors(
        self, users: np.ndarray, history: dict[str, sp.csr_matrix], leave_out=None, smoothed=None
    ) -> list[torch.Tensor]:
        """One (B, D) user vector per objective."""
        fields = self.user_fields(users, history, leave_out, smoothed)
        hidden = self.user_body(fields) if self.kind == "mvke" else self.user_body(torch.cat(fields, dim=1))
        return [head(x) for head, x in zip(self.user_heads, hidden, strict=True)]

    def item_vectors(self, items: torch.Tensor | None = None, smoothed=None) -> list[torch.Tensor]:
        """One (N, D) item matrix per objective (one shared matrix for mvke)."""
        ids = torch.arange(self.n_items) if items is None else items
        x = [torch.cat(smoothed or self.smoothed_items(), dim=1)[ids]] if self.graph else [self.item_id(ids)]
        x += [self.item_features.lookup(k, ids, emb.weight) for k, emb in self.item_cat.items()]
        if self.item_features.dense is not None:
            x.append(self.item_features.dense[ids])
        hidden = self.item_body(self._drop(torch.cat(x, dim=1)))
        return [head(v) for head, v in zip(self.item_heads, hidden, strict=True)]


def scaled_lr(lr: float, batch: int, reference: int) -> float:
    """Adam's square-root rule: `lr` holds for batches of up to `reference` users and grows with sqrt(batch /
    reference) above (never below `lr`, so a small log trains as before; 0 = no scaling)."""
    return lr * math.sqrt(batch / reference) if reference > 0 and batch > reference else lr


class MultiTask(Retriever):
    """A multi-task two-tower baseline behind the Retriever interface (see the module docstring)."""

    has_vectors = True

    def __init__(self, kind: str, cfg: Config, progress: bool = False, log=None, tracker: Tracker | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown multi-task model {kind!r}; choose from {KINDS}")
        self.name, self.kind, self.cfg, self.progress = kind, kind, cfg, progress
        self.asked = cfg  # `cfg` after a fit is the configuration trained (csmf.rules.fit_to_size)
        self.log = log or (lambda _msg: None)
        self.tracker = tracker  # each epoch's loss and validation, as phase "joint" (csmf.tracking)
        self.model: MultiTaskTwoTower | None = None
        self.objectives: tuple[str, ...] = ()
        self.phases: list[dict] = []
        self._teachers: dict[int, tuple[sp.csr_matrix, sp.csr_matrix]] = {}

    # ----- training ------------------------------------------------------------------------------
    def fit(self, data: CascadeData) -> MultiTask:
        self.cfg, notes = fit_to_size(self.asked, data.n_items, cascade=False)
        for note in notes:
            self.log(f"{self.kind}: {note}")
        check_training(self.cfg, data.n_items, streaming=False, cascade=False)
        # the layers' initial weights and dropout draw from torch's default generator, seeded for the fit
        with deterministic_torch(), seeded(self.cfg.seed):
            return self._fit(data)

    def _fit(self, data: CascadeData) -> MultiTask:
        cfg, t = self.cfg, self.cfg.train
        self.objectives = data.stages
        tuning = data.tuning_view()
        model = self.model = MultiTaskTwoTower(self.kind, data, cfg, len(self.objectives))
        self.history = {b: tuning.matrix(b) for b in model.behaviours}
        model.set_history(self.history)
        self.inputs = SavedInputs.of(data, self.history)  # what save() needs to rebuild the towers
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.multitask.lr)
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + 7)
        if model.graph and data.n_items <= t.full_softmax_max_items:
            # one full-catalogue softmax per user and objective over all of its positives (as CSMF's graph path)
            targets = [
                target_matrix(*stage_pairs(tuning, o, per_stage(t.aux_weight, k + 1)), data.n_users, data.n_items)
                for k, o in enumerate(self.objectives)
            ]
            self._teachers = self._teacher_lists(tuning)
            active = np.flatnonzero(sum(np.diff(m.indptr) for m in targets) > 0)
            # at most 1/min_steps of the users a batch: an epoch takes at least multitask.min_steps steps
            size = min(t.user_batch_size, max(1, -(-len(active) // cfg.multitask.min_steps)))
            batches = UserBatches(active, size, generator, Ranks())
            epoch_pairs = sum(m.nnz for m in targets)  # an epoch goes through every target pair once
            for group in optimizer.param_groups:
                group["lr"] = scaled_lr(cfg.multitask.lr, size, cfg.multitask.lr_batch)

            def epoch_batches():
                return (self._user_loss(users, targets) for users in batches.epoch())
        else:
            pairs = [pairs_of(tuning.train[o]) for o in self.objectives]
            log_q = [item_log_q(items, data.n_items) for _, items in pairs]
            batches = JointPairBatches(pairs, t.batch_size, generator)  # an epoch = one pass of the largest
            epoch_pairs = batches.rows

            def epoch_batches():
                return (self._loss(joint, log_q, data.n_items, generator) for joint in batches.epoch())

        def validate() -> tuple[float, dict]:  # the mean Recall@50 over the objectives picks the epoch
            valid = self._validate(tuning)
            return (float(np.mean([v["recall@50"] for v in valid.values()])) if valid else 0.0), valid

        def describe(epoch: int, loss: float, score: float, _valid: dict) -> str:
            return f"  {self.kind} epoch {epoch}: loss {loss:.4f} mean valid recall@50 {score:.4f}"

        epochs_log, best_epoch = run_epochs(
            model, optimizer, cfg.multitask.max_epochs, epoch_batches, validate, cfg.multitask.patience,
            describe=describe,
            log=self.log, progress=self.progress, desc=f"{self.kind} epoch", steps=batches.steps,
            tracker=self.tracker, phase="joint", pairs=epoch_pairs,
        )  # fmt: skip
        model.eval()
        self.phases = [{"phase": "joint", "epochs": epochs_log, "best_epoch": best_epoch,
                        "lr": optimizer.param_groups[0]["lr"]}]  # fmt: skip
        self.history = data.train | data.side
        with torch.no_grad():
            self.items = model.item_vectors()  # (N, D) per item vector
        return self

    def _loss(self, batches: list[PairBatch], log_q, n_items, generator) -> torch.Tensor:
        """Sum over objectives of each one's sampled softmax on its batch of pairs (csmf.losses.sampled_softmax,
        the loss CSMF's stages train with: in-batch + uniform extra negatives, logQ-corrected).

        batches[k]: objective k's pairs. All objectives go through each tower in one call (the towers compute
        every head anyway), and they share one draw of extra negatives, so the item tower runs over it once per
        step rather than once per objective: together a fifth of an epoch on JD.
        """
        model, extra = self.model, self.cfg.train.extra_negatives
        users = np.concatenate([b.users for b in batches])
        items = np.concatenate([b.items for b in batches])
        user_heads = model.user_vectors(users, self.history, leave_out=items)  # per head (K * B, D)
        item_heads = model.item_vectors(torch.from_numpy(items))
        negative_heads, uniform = None, None
        if extra:
            negatives, uniform = uniform_negatives(n_items, extra, generator)
            negative_heads = model.item_vectors(negatives)
        loss, start = 0.0, 0
        for k, batch in enumerate(batches):
            rows = slice(start, start + len(batch.items))
            start += len(batch.items)
            vk = min(k, len(item_heads) - 1)  # mvke: one shared item vector
            u, v, ids = user_heads[k][rows], item_heads[vk][rows], torch.from_numpy(batch.items)
            extra_v = negative_heads[vk] if negative_heads is not None else None
            loss = loss + sampled_softmax(u, v, ids, log_q[k], self.cfg.model.temperature, negatives=extra_v,
                                          negative_log_q=uniform)  # fmt: skip
        return loss

    def _user_loss(self, users: np.ndarray, targets: list[sp.csr_matrix]) -> torch.Tensor:
        """Sum over objectives of the per-user full-catalogue softmax (graph encoder)."""
        model = self.model
        smoothed = model.smoothed_items()  # one propagation per step serves both towers
        user_heads = model.user_vectors(users, self.history, smoothed=smoothed)  # per objective (B, D)
        item_heads = model.item_vectors(smoothed=smoothed)  # per item vector (N, D)
        loss = torch.zeros(())
        for k, mat in enumerate(targets):
            rows, cols, weight = coo_tensors(mat[users])
            if len(rows) == 0:
                continue
            scores = user_heads[k] @ item_heads[min(k, len(item_heads) - 1)].T  # (B, N)
            loss = loss + user_softmax_loss(scores, rows, cols, weight, self.cfg.model.temperature)
            if k in self._teachers:  # distillation: each objective's head learns its own teacher's lists
                seen, teacher = self._teachers[k]
                kd = distillation_loss(scores, coo_tensors(seen[users], scores.device)[:2],
                                       coo_tensors(teacher[users], scores.device),
                                       self.cfg.model.temperature)  # fmt: skip
                loss = loss + per_stage(self.cfg.train.distill_weight, k + 1) * kd
        return loss

    def _teacher_lists(self, tuning: CascadeData) -> dict[int, tuple[sp.csr_matrix, sp.csr_matrix]]:
        """Objective index -> (seen items, teacher lists) for the objectives `train.distill_weight` distils."""
        t = self.cfg.train
        if not t.distill:
            return {}
        return {
            k: (tuning.excluded(o), teacher_lists(tuning, o, self.cfg))
            for k, o in enumerate(self.objectives)
            if per_stage(t.distill_weight, k + 1) > 0
        }

    def _validate(self, tuning: CascadeData) -> dict[str, dict[str, float]]:
        self.model.eval()
        with torch.no_grad():
            self.items = self.model.item_vectors()
        out = {}
        for o in self.objectives:
            if o in tuning.test and tuning.test[o].nnz:
                r = evaluate_stage(self, tuning, o, self.cfg.eval.ks, self.cfg.eval.score_budget_mb,
                                   sample=self.cfg.eval.valid_users, seed=self.cfg.seed)  # fmt: skip
                out[o] = {k: round(v, 5) for k, v in metric_values(r).items()}
        return out

    # ----- save / load (csmf.models.saving) ---------------------------------------------------------
    def save(self, folder) -> Path:
        if self.model is None:
            raise RuntimeError(f"{self.name} is not fitted; fit it before saving")
        meta = {"name": self.kind, "config": config_to_dict(self.cfg), "objectives": list(self.objectives)}
        return write_model(folder, "multitask", meta, self.model.state_dict(), self.inputs, self.history)

    @classmethod
    def load(cls, folder) -> MultiTask:
        meta, state, saved, history = read_model(folder, "multitask")
        cfg = config_from_dict(meta["config"])
        out = cls(meta["name"], cfg)
        out.objectives = tuple(meta["objectives"])
        with seeded(cfg.seed):  # the initial weights, which the saved state then replaces
            model = out.model = MultiTaskTwoTower(out.kind, saved.skeleton(history), cfg, len(out.objectives))
        model.set_history(saved.tuning_history)
        model.load_state_dict(state)
        model.eval()
        out.history, out.inputs = history, saved
        with torch.no_grad():
            out.items = model.item_vectors()
        return out

    # ----- serving -------------------------------------------------------------------------------
    def _objective(self, stage: str) -> int:
        if stage not in self.objectives:
            raise KeyError(f"unknown objective {stage!r}; this model serves {self.objectives}")
        return self.objectives.index(stage)

    def _users(self, users: np.ndarray) -> list[torch.Tensor]:
        self.model.eval()
        with torch.no_grad():
            return self.model.user_vectors(np.asarray(users, dtype=np.int64), self.history)

    def score(self, users: np.ndarray, stage: str) -> torch.Tensor:
        k = self._objective(stage)
        return self._users(users)[k] @ self.items[min(k, len(self.items) - 1)].T  # (B, N)

    def user_vectors(self, users: np.ndarray, weights: Mapping[str, float]) -> torch.Tensor:
        """The fused query: sum_k w_k u_k for mvke (B, D); [w_1 u_1, ..., w_S u_S] otherwise (B, S*D)."""
        if not any(weights.values()):
            raise ValueError(f"all objective weights are zero: {dict(weights)}")
        per = self._users(users)
        w = [float(weights.get(o, 0.0)) for o in self.objectives]
        if self.kind == "mvke":
            return sum(wk * u for wk, u in zip(w, per, strict=True))
        return torch.cat([wk * u for wk, u in zip(w, per, strict=True)], dim=1)

    def item_vectors(self) -> torch.Tensor:
        """What the index holds: (N, D) for mvke, the concatenation (N, S*D) otherwise."""
        return self.items[0] if len(self.items) == 1 else torch.cat(self.items, dim=1)

    def score_fused(self, users: np.ndarray, weights: Mapping[str, float]) -> torch.Tensor:
        return self.user_vectors(users, weights) @ self.item_vectors().T  # (B, N): one search

    def vectors_per_item(self) -> int:
        return len(self.items)

    def served(self, data: CascadeData) -> tuple[str, ...]:
        return self.objectives

    def num_params(self) -> int:
        return int(sum(p.numel() for p in self.model.parameters()))

    def settings(self) -> dict:
        return {
            "objectives": list(self.objectives),
            "vector_dim": int(self.item_vectors().shape[1]),
            "vectors_per_item": len(self.items),
            "serving": "shared item vector, fused user vector"
            if self.kind == "mvke"
            else "concatenated per-objective vectors",
            "multitask": {k: v for k, v in vars(self.cfg.multitask).items()},
        }
