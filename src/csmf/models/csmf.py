"""CSMF and the plain two-tower behind the Retriever interface (the benchmark's `csmf*` and `single-*`).

The variants are config edits, not classes: `csmf-no-cpp` prunes a fixed share (PackNet) instead of
CPP, `csmf-no-aml` sets the margin to 0, `csmf-no-ar` skips accuracy recovery, and `single-<stage>`
trains the same backbone on one objective. Two baselines are config edits of the same trainer too:
`packnet` (PackNet's fixed 50% share, no margin) and `naive-ft` (no masks: every stage fine-tunes all
weights, and the final model scores every objective, so earlier objectives are forgotten).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from csmf import distributed
from csmf.backbones import build_backbone
from csmf.cascade import CascadeTrainer
from csmf.config import Config, ConfigError, config_from_dict, config_to_dict
from csmf.data.schema import CascadeData, union
from csmf.feature_schema import feature_columns
from csmf.fusion import fold_weights
from csmf.models.saving import SavedInputs, read_model, write_model
from csmf.models.teachers import teacher_for
from csmf.retriever import Retriever
from csmf.rules import fit_to_size
from csmf.tracking import Tracker
from csmf.trained import TrainedCascade

logger = logging.getLogger(__name__)
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
# The same cascade without any user or item feature (model.features = false): what the features add.
ID_ONLY = "csmf-id-only"
# The same cascade without the per-row context columns (model.context = false): what request context adds,
# ranked on the same (user, context) requests.
NO_CONTEXT = "csmf-no-context"


class CSMF(Retriever):
    """A cascade over `objectives` (default: every stage of the data); one objective = a plain two-tower."""

    has_vectors = True

    def __init__(self, cfg: Config, objectives: tuple[str, ...] | None = None, name: str = "csmf",
                 run_dir: str | None = None, progress: bool = False, log=None,
                 pretrain_cache: str | None = None, pinned: set[str] | None = None,
                 tracker: Tracker | None = None):  # fmt: skip
        """pinned: the keys the user set (csmf.selection.pins; default every value off the defaults), which the
        catalogue's size never changes (csmf.rules.fit_to_size). `cfg` after a fit is the configuration trained.
        tracker: where the fit's curves go (csmf.tracking); None = `run_dir`/tensorboard, or nowhere without one."""
        self.cfg, self.objectives, self.name = cfg, objectives, name
        self.asked, self.pinned = cfg, pinned
        self.run_dir, self.progress, self.log = run_dir, progress, log
        self.pretrain_cache = pretrain_cache  # shared stage-1 pretraining (see csmf.cascade)
        self.tracker = tracker
        self.trained: TrainedCascade | None = None
        self.phases: list[dict] = []

    @classmethod
    def variant(cls, name: str, cfg: Config, **kw) -> CSMF:
        if name.startswith("single-"):
            return cls(cfg, objectives=(name.removeprefix("single-"),), name=name, **kw)
        if name == ID_ONLY:
            return cls(replace(cfg, model=replace(cfg.model, features=False)), name=name, **kw)
        if name == NO_CONTEXT:
            return cls(replace(cfg, model=replace(cfg.model, context=False)), name=name, **kw)
        if name not in VARIANTS:
            raise KeyError(name)
        return cls(replace(cfg, cascade=VARIANTS[name](cfg.cascade)), name=name, **kw)

    def fit(self, data: CascadeData) -> CSMF:
        # the objectives handed in, else the config's (cascade.objectives: a subset, to extend later), else every stage
        objectives = self.objectives or self.asked.cascade.objectives or data.stages
        missing = [o for o in objectives if o not in data.stages]
        if missing:
            named = "" if self.objectives else " (cascade.objectives)"
            raise ConfigError(f"{self.name}: objectives {missing}{named} are not stages of {data.name} {data.stages}")
        self.cfg, notes = fit_to_size(self.asked, data.n_items, self.pinned)
        for note in notes:  # what the catalogue's size changed, and why (the saved config holds the result)
            (self.log or logger.info)(f"{self.name}: {note}")
        own = None  # no tracker handed in: the run folder's own, opened and closed around this fit
        if self.tracker is None and self.run_dir is not None and distributed.ranks().main:
            own = Tracker.open(Path(self.run_dir) / "tensorboard", self.cfg, self.name)
        with own or contextlib.nullcontext():
            trainer = CascadeTrainer(data, self.cfg, objectives, self.run_dir, self.progress, self.log,
                                     pretrain_cache=self.pretrain_cache, teacher=teacher_for(self.cfg),
                                     tracker=own or self.tracker)  # fmt: skip
            self.trained = trainer.run()
        self.phases = trainer.history
        self.inputs = SavedInputs.of(data, trainer.tuning_history, data.context_sizes())
        return self

    def validation_view(self) -> CSMF:
        """This model scoring users from the history it trained on (training pairs without the validation fold),
        as the trainer's own validation does: a fitted model scores from the whole training history, which
        holds the validation pairs, so a validation metric of it would read them (csmf.selection)."""
        if self.trained is None:
            raise RuntimeError(f"{self.name} is not fitted; fit it before validating")
        t, view = self.trained, copy.copy(self)
        view.trained = TrainedCascade(t.model, t.objectives, self.inputs.tuning_history, t.top, shared=t.shared)
        return view

    # ----- save / load (csmf.models.saving) ---------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write the fitted model to `folder`: weights, config and the data it needs to score (histories,
        features, ids), so `CSMF.load` scores bit-identically without the dataset or a trainer. No pickle."""
        if self.trained is None:
            raise RuntimeError(f"{self.name} is not fitted; fit it before saving")
        t = self.trained
        meta = {"name": self.name, "config": config_to_dict(self.cfg), "objectives": list(t.objectives),
                "top": t.top, "shared": t.shared}  # fmt: skip
        return write_model(folder, "csmf", meta, self.model.state_dict(), self.inputs, t.history)

    @classmethod
    def load(cls, folder: str | Path) -> CSMF:
        """A model `save` wrote; every file is checked as it is read (no pickle, no code)."""
        meta, state, saved, history = read_model(folder, "csmf")
        cfg = config_from_dict(meta["config"])
        objectives = tuple(meta["objectives"])
        model = build_backbone(saved.skeleton(history), cfg, cfg.seed, objectives, saved.context_sizes)
        model.set_history(saved.tuning_history)
        model.load_state_dict(state)
        out = cls(cfg, objectives, name=meta["name"])
        out.trained = TrainedCascade(model, objectives, history, meta["top"], shared=meta["shared"])
        out.inputs, out.phases = saved, []
        return out

    def served_arrays(self) -> dict:
        """What a serving artifact holds of this model (csmf.serving.export writes it): the item vectors, every
        user's vector from the training history the model holds, the output owners, the items each user has
        seen, item popularity, ids, the stages, and the user (and item) tower with its feature columns."""
        if self.trained is None:
            raise RuntimeError(f"{self.name} is not fitted; fit or load it before exporting")
        trained, inputs = self.trained, self.inputs
        users = np.arange(inputs.n_users)
        user_vectors = torch.cat([trained.raw_user_vectors(users[i : i + 4096]) for i in range(0, len(users), 4096)])
        seen = union(*trained.history.values()).tocsr()
        seen.sort_indices()
        m = self.cfg.model
        user_tower, item_tower = trained.export_towers(
            feature_columns(inputs.user_features, m), feature_columns(inputs.item_features, m)
        )
        return {
            "item_vectors": trained.items.numpy(), "user_vectors": user_vectors.numpy(),
            "output_owner": self.model.output_owner.numpy(), "seen_indptr": seen.indptr, "seen_indices": seen.indices,
            "popularity": np.asarray(seen.sum(axis=0)).ravel(),
            "user_ids": _ids(inputs.user_ids, inputs.n_users), "item_ids": _ids(inputs.item_ids, inputs.n_items),
            "stages": tuple(trained.objectives), "dataset": inputs.name, "user_tower": user_tower,
            "item_tower": item_tower,
        }  # fmt: skip

    @property
    def model(self):
        if self.trained is None:
            raise RuntimeError(f"{self.name} is not fitted")
        return self.trained.model

    def user_vectors(self, users: np.ndarray, weights: Mapping[str, float]) -> torch.Tensor:
        """(B, D) query vectors with the objective weights folded in: `<q, v_i> = sum_k w_k s_k(u, i)`."""
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

    def score_in_context(self, users: np.ndarray, codes: dict[str, np.ndarray], stage: str) -> torch.Tensor:
        """`score` for requests in a per-row context (csmf.data.context; evaluation ranks per request)."""
        return self.trained.score_in_context(users, codes, stage)

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


def _ids(original: np.ndarray | None, n: int) -> list[str]:
    return [str(v) for v in (original if original is not None else range(n))]
