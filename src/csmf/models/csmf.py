"""CSMF and the plain two-tower behind the Retriever interface (the benchmark's `csmf*` and `single-*`).

The variants are config edits, not classes: `csmf-no-cpp` prunes a fixed share (PackNet) instead of
CPP, `csmf-no-aml` sets the margin to 0, `csmf-no-ar` skips accuracy recovery, and `single-<stage>`
trains the same backbone on one objective. Two baselines are config edits of the same trainer too:
`packnet` (PackNet's fixed 50% share, no margin) and `naive-ft` (no masks: every stage fine-tunes all
weights, and the final model scores every objective, so earlier objectives are forgotten).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from csmf.cascade import CascadeTrainer, TrainedCascade, build_model
from csmf.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from csmf.config import Config, config_from_dict, config_to_dict
from csmf.data.schema import CascadeData
from csmf.fusion import fold_weights
from csmf.retriever import Retriever

SAVE_FORMAT = 1


@dataclass
class SavedInputs:
    """What a fitted model reads besides its weights: the shape of the data, its features and ids, and the
    histories its graphs were built from (tuning) and that user vectors read (train + side)."""

    name: str
    stages: tuple[str, ...]
    side: tuple[str, ...]
    n_users: int
    n_items: int
    user_features: dict[str, np.ndarray]
    item_features: dict[str, np.ndarray]
    user_ids: np.ndarray | None
    item_ids: np.ndarray | None
    tuning_history: dict[str, sp.csr_matrix]

    @classmethod
    def of(cls, data: CascadeData, tuning_history: dict[str, sp.csr_matrix]) -> SavedInputs:
        return cls(data.name, data.stages, tuple(data.side), data.n_users, data.n_items, data.user_features,
                   data.item_features, data.user_ids, data.item_ids, tuning_history)  # fmt: skip

    def meta(self) -> dict:
        return {"data": {"name": self.name, "stages": list(self.stages), "side": list(self.side),
                         "n_users": self.n_users, "n_items": self.n_items, "tuning": sorted(self.tuning_history),
                         "user_features": sorted(self.user_features), "item_features": sorted(self.item_features),
                         "ids": self.user_ids is not None}}  # fmt: skip

    def write(self, folder: Path, history: dict[str, sp.csr_matrix]) -> None:
        for kind, mats in (("history", history), ("tuning", self.tuning_history)):
            (folder / kind).mkdir(parents=True, exist_ok=True)
            for name, m in mats.items():
                sp.save_npz(folder / kind / f"{name}.npz", sp.csr_matrix(m))
        arrays = {f"user/{k}": v for k, v in self.user_features.items()}
        arrays |= {f"item/{k}": v for k, v in self.item_features.items()}
        if self.user_ids is not None:  # ids as text: the same whatever their type in the log
            arrays |= {
                "ids/user": np.asarray(self.user_ids).astype(str),
                "ids/item": np.asarray(self.item_ids).astype(str),
            }
        np.savez(folder / "inputs.npz", **arrays)

    @classmethod
    def read(cls, folder: Path, meta: dict) -> tuple[SavedInputs, dict[str, sp.csr_matrix]]:
        d = meta["data"]
        try:
            history = {n: sp.load_npz(folder / "history" / f"{n}.npz").tocsr() for n in meta["history"]}
            tuning = {n: sp.load_npz(folder / "tuning" / f"{n}.npz").tocsr() for n in d["tuning"]}
            with np.load(folder / "inputs.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"{folder}: a saved model file is missing or damaged: {err}") from None
        for name, m in (history | tuning).items():
            if m.shape != (d["n_users"], d["n_items"]):
                raise CheckpointError(f"{folder}: history {name!r} is {m.shape}, not {d['n_users']} x {d['n_items']}")
        saved = cls(d["name"], tuple(d["stages"]), tuple(d["side"]), d["n_users"], d["n_items"],
                    {k: arrays[f"user/{k}"] for k in d["user_features"]},
                    {k: arrays[f"item/{k}"] for k in d["item_features"]},
                    arrays.get("ids/user"), arrays.get("ids/item"), tuning)  # fmt: skip
        return saved, history

    def skeleton(self, history: dict[str, sp.csr_matrix]) -> CascadeData:
        """A CascadeData with what building the model reads (no validation or test pairs)."""
        return CascadeData(
            name=self.name, stages=self.stages, n_users=self.n_users, n_items=self.n_items,
            train={s: history[s] for s in self.stages if s in history}, valid={}, test={}, exclude={},
            side={s: history[s] for s in self.side if s in history}, user_ids=self.user_ids,
            item_ids=self.item_ids, user_features=self.user_features, item_features=self.item_features,
        )  # fmt: skip


ABLATIONS = {
    "csmf": lambda c: c,
    "csmf-no-cpp": lambda c: replace(c, prune="fixed"),
    "csmf-no-aml": lambda c: replace(c, aml_m0=0.0),
    "csmf-no-ar": lambda c: replace(c, recover_frac=0.0),
}
# Baselines that are config edits of the same trainer (issue: baselines and report).
BASELINES = {
    # PackNet (Mallya & Lazebnik 2018): fixed-share magnitude pruning, post-prune retraining, no margin.
    "packnet": lambda c: replace(c, prune="fixed", fixed_fraction=c.packnet_fraction, aml_m0=0.0),
    # Naive sequential fine-tuning: no masks; each stage fine-tunes all weights; one final model serves all.
    "naive-ft": lambda c: replace(c, prune="none", aml_m0=0.0),
}
VARIANTS = {**ABLATIONS, **BASELINES}


class CSMF(Retriever):
    has_vectors = True
    """A cascade over `objectives` (default: every stage of the data); one objective = a plain two-tower."""

    def __init__(self, cfg: Config, objectives: tuple[str, ...] | None = None, name: str = "csmf",
                 run_dir: str | None = None, progress: bool = False, log=None,
                 pretrain_cache: str | None = None):  # fmt: skip
        self.cfg, self.objectives, self.name = cfg, objectives, name
        self.run_dir, self.progress, self.log = run_dir, progress, log
        self.pretrain_cache = pretrain_cache  # shared stage-1 pretraining (see csmf.cascade)
        self.trained: TrainedCascade | None = None
        self.phases: list[dict] = []

    @classmethod
    def variant(cls, name: str, cfg: Config, **kw) -> CSMF:
        if name.startswith("single-"):
            return cls(cfg, objectives=(name.removeprefix("single-"),), name=name, **kw)
        if name not in VARIANTS:
            raise KeyError(name)
        return cls(replace(cfg, cascade=VARIANTS[name](cfg.cascade)), name=name, **kw)

    def fit(self, data: CascadeData) -> CSMF:
        objectives = self.objectives or data.stages
        missing = [o for o in objectives if o not in data.stages]
        if missing:
            raise ValueError(f"{self.name}: objectives {missing} are not stages of {data.name} {data.stages}")
        trainer = CascadeTrainer(
            data, self.cfg, objectives, self.run_dir, self.progress, self.log, pretrain_cache=self.pretrain_cache
        )
        self.trained = trainer.run()
        self.phases = trainer.history
        self._saved = SavedInputs.of(data, trainer.tuning_history)
        return self

    # ----- save / load ---------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write the fitted model to `folder`: weights (a weights-only checkpoint), config and the data it
        needs to score (training histories, features, ids), so `CSMF.load` scores bit-identically without
        the dataset or a trainer. Nothing in it is pickled."""
        if self.trained is None:
            raise RuntimeError(f"{self.name} is not fitted; fit it before saving")
        folder = Path(folder)
        t = self.trained
        meta = {"format": SAVE_FORMAT, "name": self.name, "config": config_to_dict(self.cfg),
                "objectives": list(t.objectives), "top": t.top, "shared": t.shared,
                "history": sorted(t.history), **self._saved.meta()}  # fmt: skip
        self._saved.write(folder, t.history)
        save_checkpoint(folder / "model.pt", self.model.state_dict(), meta)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> CSMF:
        """A model `save` wrote; every file is checked as it is read (no pickle, no code)."""
        folder = Path(folder)
        if not (folder / "model.pt").exists():
            raise CheckpointError(f"{folder}: no model.pt; give a folder CSMF.save wrote")
        state, meta = load_checkpoint(folder / "model.pt")
        if meta.get("format") != SAVE_FORMAT:
            raise CheckpointError(f"{folder}: saved model format {meta.get('format')!r}, this csmf reads {SAVE_FORMAT}")
        cfg = config_from_dict(meta["config"])
        saved, history = SavedInputs.read(folder, meta)
        objectives = tuple(meta["objectives"])
        model = build_model(saved.skeleton(history), cfg, cfg.seed, objectives)
        model.set_history(saved.tuning_history)
        model.load_state_dict(state)
        out = cls(cfg, objectives, name=meta["name"])
        out.trained = TrainedCascade(model, objectives, history, meta["top"], shared=meta["shared"])
        out._saved, out.phases = saved, []
        return out

    @property
    def model(self):
        if self.trained is None:
            raise RuntimeError(f"{self.name} is not fitted")
        return self.trained.model

    def user_vectors(self, users: np.ndarray, weights: Mapping[str, float]) -> torch.Tensor:
        """(B, D) query vectors with the objective weights folded in: <q, v_i> = sum_k w_k s_k(u, i)."""
        by_stage: dict[int, float] = {}
        for name, w in weights.items():  # naive-ft maps every objective to its one final stage: add them up
            k = self.trained.stage_number(name)
            by_stage[k] = by_stage.get(k, 0.0) + float(w)
        if not any(by_stage.values()):
            raise ValueError(f"all objective weights are zero: {dict(weights)}")
        return self.trained.raw_user_vectors(users) * fold_weights(self.model.output_owner, by_stage)

    def item_vectors(self) -> torch.Tensor:
        return self.trained.items  # (N, D): one vector per item for every objective

    def score(self, users: np.ndarray, stage: str) -> torch.Tensor:
        return self.trained.score(users, stage)

    def score_fused(self, users: np.ndarray, weights: Mapping[str, float]) -> torch.Tensor:
        return self.user_vectors(users, weights) @ self.item_vectors().T  # (B, N): one search

    def served(self, data: CascadeData) -> tuple[str, ...]:
        return self.trained.objectives

    def num_params(self) -> int:
        return int(sum(p.numel() for p in self.model.parameters()))

    def settings(self) -> dict:
        return {
            "objectives": list(self.trained.objectives),
            "vector_dim": int(self.item_vectors().shape[1]),
            "ownership": self.model.ownership(),
        }
