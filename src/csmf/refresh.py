"""Refresh a finished run on new data (issue 29, part 3): the same cascade and ownership, warm-started from the run's
weights, each stage fine-tuned for a few epochs in cascade order, in a fraction of a training from scratch.

`Refresh(run)` reads the run's saved model (csmf.models.saving) and config. `config` lays the caller's settings on the
run's and refuses any that would change the model (the encoder, a width, the features: whatever shapes a parameter
other than an ID table, or what the towers compute). `align` puts the new data in the run's id space: a known user or
item keeps its index, new ones follow in the order the new data lists them, and the run's users and items the new
data lacks keep theirs (`extend_ids`). `fit` builds the model afresh on the aligned data (seeded, as a training from
scratch would: that is how new rows start), copies every parameter and owner of the run into it (a known id's row, a
known feature value's row), then fine-tunes stage 1, 2, ... each for `epochs` epochs on its own units, earlier
stages' units frozen by the masks as in the cascade (method notes §3). No pruning: the ownership stays the run's. The
run folder records where it started (refresh.json) and resumes like any other (csmf.runfolder).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from csmf import distributed
from csmf.backbones import build_backbone
from csmf.cascade import CascadeTrainer, Teacher
from csmf.checkpoints import CheckpointError
from csmf.config import Config, ConfigError, ModelConfig, config_from_dict, override
from csmf.data.errors import DataError
from csmf.data.schema import CascadeData
from csmf.feature_schema import column_kind
from csmf.hashing import file_sha256
from csmf.models.csmf import CSMF
from csmf.models.saving import SavedInputs, read_model
from csmf.models.teachers import teacher_for
from csmf.phases import Phase
from csmf.runfolder import RunFolder
from csmf.tracking import Tracker

logger = logging.getLogger(__name__)

# epochs each stage fine-tunes for (csmf train --refresh-epochs): on the simulator's second period, the refresh's
# R@50 over training from scratch on both periods was 0.93-0.94x with one epoch (seed 0), 0.96-1.03x with three and
# 0.98-1.04x with four (seeds 0-2), at a fifth of its time or less (docs/method.md)
DEFAULT_EPOCHS = 4
RECORD = "refresh.json"  # in the refresh's run folder: the run it started from and what its id maps hold
# model fields a refresh may change: how the towers train, never a parameter's shape or what a trained tower computes
TRAINING_ONLY = ("dropout", "context_dropout", "temperature", "graph_leave_target_out", "init_scale")


class Refresh:
    """A warm start of the finished run in `run` (its folder, or its model folder) on new data; `epochs` per stage."""

    def __init__(self, run: str | Path, epochs: int = DEFAULT_EPOCHS):
        if epochs < 1:
            raise ConfigError(f"--refresh-epochs {epochs}: give 1 or more epochs per stage")
        self.run = Path(run).expanduser().resolve()
        folder = self.run / "model" if (self.run / "model" / "model.pt").exists() else self.run
        if not (folder / "model.pt").exists():
            raise CheckpointError(f"{self.run}: no saved model ({self.run / 'model' / 'model.pt'}); --init-from takes "
                                  "the folder of a finished csmf train: finish that run first (the same csmf train "
                                  "command resumes it)")  # fmt: skip
        meta, self.state, inputs, _ = read_model(folder, "csmf")
        if inputs is None:
            raise CheckpointError(f"{folder}: the saved model holds no id maps; save it again with this csmf")
        self.inputs: SavedInputs = inputs
        run_cfg = config_from_dict(meta["config"])
        # what a refresh starts from: the run's config without its distillation teacher (a teacher fit afresh on the
        # new log took 22 of a refresh's 42 s on the simulator and cost R@50: docs/method.md); settings given on top
        # (--set train.distill=ease) bring one back
        self.cfg = replace(run_cfg, train=replace(run_cfg.train, distill=""))
        self.objectives: tuple[str, ...] = tuple(meta["objectives"])
        self.digest = file_sha256(folder / "model.pt")  # names the source exactly (it covers every file of the model)
        self.epochs = epochs
        self.checked: Config | None = None  # the refresh's config, once `config` has checked it
        self.aligned: CascadeData | None = None  # the data `align` returned last, and the warm start made for it
        self.warm: dict[str, torch.Tensor] = {}
        self.record: dict = {}

    # ----- config --------------------------------------------------------------------------------
    def config(self, cfg: Config) -> Config:
        """`cfg` (the run's config with the caller's settings on top) after checking it keeps the run's model and
        cascade, without a configuration search (the run's model is the one trained)."""
        for f in fields(ModelConfig):
            before, now = getattr(self.cfg.model, f.name), getattr(cfg.model, f.name)
            if f.name not in TRAINING_ONLY and before != now:
                raise ConfigError(f"model.{f.name}: {before!r} in {self.run}, {now!r} here; a refresh keeps the run's "
                                  "model (its parameters and what they compute): drop the setting, or train from "
                                  "scratch (csmf train without --init-from)")  # fmt: skip
        for name in ("prune", "objectives"):  # how units are owned, and by which objectives
            before, now = getattr(self.cfg.cascade, name), getattr(cfg.cascade, name)
            if before != now:
                raise ConfigError(f"cascade.{name}: {before!r} in {self.run}, {now!r} here; a refresh keeps the run's "
                                  "cascade and ownership: drop the setting")  # fmt: skip
        if cfg.data.stages and tuple(cfg.data.stages) != self.inputs.stages:
            raise ConfigError(f"data.stages: {list(cfg.data.stages)} here, the run {self.run} serves the cascade "
                              f"{' -> '.join(self.inputs.stages)}; a refresh keeps the cascade (csmf extend adds "
                              "an objective)")  # fmt: skip
        if cfg.data.cache_dir or cfg.train.stream:
            raise ConfigError("data.cache_dir / train.stream: a refresh reads the new log in memory; drop them")
        self.checked = replace(cfg, select=replace(cfg.select, candidates=()))
        return self.checked

    # ----- data ----------------------------------------------------------------------------------
    def align(self, data: CascadeData) -> CascadeData:
        """`data` in the run's id space (extend_ids), with the warm start made for it: a model the new data would
        not fit (another cascade, features that change a parameter's shape) is refused here, before any training."""
        cfg = self.checked or self.config(self.cfg)
        s = self.inputs
        if data.stages != s.stages or tuple(data.side) != s.side:
            raise DataError(f"{data.name}: the cascade {' -> '.join(data.stages)} (side behaviours {list(data.side)}); "
                            f"the run {self.run} was trained on {' -> '.join(s.stages)} (side behaviours "
                            f"{list(s.side)}): a refresh keeps the cascade; give a log with the run's stage "
                            "columns, or train from scratch")  # fmt: skip
        if data.stream is not None:
            raise ConfigError("train.stream: a refresh reads the new log in memory; drop it")
        if cfg.model.features:
            for side, known, new in (("user", s.user_features, data.user_features),
                                     ("item", s.item_features, data.item_features)):  # fmt: skip
                if sorted(known) != sorted(new):
                    raise DataError(f"{data.name}: {side} features {sorted(new)}, the run {self.run} reads "
                                    f"{sorted(known)}; a refresh keeps the model's inputs: give the log the same "
                                    "feature columns (or name them with --set data.user_features / "
                                    "data.item_features)")  # fmt: skip
        aligned, counts = extend_ids(data, s.user_ids, s.n_users, s.item_ids, s.n_items, s.user_features,
                                     s.item_features)  # fmt: skip
        self.warm, values = self._warm_state(aligned, cfg)
        self.aligned = aligned
        self.record = {"init_from": str(self.run), "source_model_sha256": self.digest, "epochs": self.epochs,
                       "teacher": cfg.train.distill, **counts, "feature_values": values}  # fmt: skip
        u, i = counts["users"], counts["items"]
        logger.info(f"refresh of {self.run}: users {u['known']:,} known, {u['new']:,} new, {u['absent']:,} of the "
                    f"run's not in {data.name} (kept); items {i['known']:,} known, {i['new']:,} new, "
                    f"{i['absent']:,} kept")  # fmt: skip
        return aligned

    def _warm_state(self, data: CascadeData, cfg: Config) -> tuple[dict[str, torch.Tensor], dict]:
        """The weights a refresh starts from on `data` (aligned): a model built afresh on it (seeded), with the run's
        rows for known ids and known feature values and the run's every other parameter and owner; and per feature
        table, how many of its values kept their row and how many are new."""
        fresh = build_backbone(data, cfg, cfg.seed, self.objectives)
        state = {k: v.detach().clone() for k, v in fresh.state_dict().items()}
        extra, missing = sorted(set(state) - set(self.state)), sorted(set(self.state) - set(state))
        if extra or missing:
            raise ConfigError(f"{self.run}: the run's model has parameters {missing} this one lacks and lacks {extra}; "
                              "a refresh keeps the model: train from scratch")  # fmt: skip
        tables, values = fresh.entity_tables(), {}
        for key, before in self.state.items():
            now, (side, column) = state[key], tables.get(key, ("", None))
            if column is not None:
                values[f"{side}.{column}"] = self._copy_feature_rows(before, now, side, column, data, cfg)
            elif side and before.shape[1:] == now.shape[1:] and before.shape[0] <= now.shape[0]:
                now[: before.shape[0]] = before  # known ids keep their indices, new ones follow
            elif not side and before.shape == now.shape:
                now.copy_(before)
            else:
                raise ConfigError(f"parameter {key}: {tuple(before.shape)} in {self.run}, {tuple(now.shape)} on "
                                  f"{data.name}; a refresh keeps every parameter but the ID and feature-value "
                                  "tables (a context column with other values, or another dense feature?): train "
                                  "from scratch")  # fmt: skip
        return state, values

    def _copy_feature_rows(self, before: torch.Tensor, now: torch.Tensor, side: str, column: str,
                           data: CascadeData, cfg: Config) -> dict[str, int]:  # fmt: skip
        """A feature table's rows: a categorical value keeps its row wherever its new code puts it; a hashed column's
        buckets and a bag's codes keep theirs. Returns {"kept": rows copied, "new": rows started fresh}."""
        m = cfg.model
        known = np.asarray((self.inputs.user_features if side == "user" else self.inputs.item_features)[column])
        new = np.asarray((data.user_features if side == "user" else data.item_features)[column])
        kinds = [column_kind(column, v, m.max_categories, m.dense_features, m.categorical_features) for v in
                 (known, new)]  # fmt: skip
        if kinds[0] != kinds[1]:
            raise DataError(f"{data.name}: {side} feature {column!r} is {kinds[1]} here and was {kinds[0]} in the run "
                            f"{self.run} (model.max_categories = {m.max_categories:,}); a refresh keeps the model's "
                            "inputs: train from scratch")  # fmt: skip
        if kinds[0] == "categorical":
            before_values, now_values = np.unique(known), np.unique(new)
            if (len(before_values), len(now_values)) != (before.shape[0], now.shape[0]):
                raise DataError(f"{self.run}: {side} feature {column!r} has {len(before_values)} values but its table "
                                f"{before.shape[0]} rows; save the run's model again with this csmf")  # fmt: skip
            _, at_before, at_now = np.intersect1d(before_values, now_values, return_indices=True)
            now[torch.from_numpy(at_now)] = before[torch.from_numpy(at_before)]
            return {"kept": len(at_now), "new": now.shape[0] - len(at_now)}
        rows = min(before.shape[0], now.shape[0])
        now[:rows] = before[:rows]
        return {"kept": rows, "new": now.shape[0] - rows}

    # ----- training ------------------------------------------------------------------------------
    def fit(self, data: CascadeData, cfg: Config | None = None, run_dir: str | Path | None = None,
            progress: bool = False, log: Callable[[str], None] | None = None,
            tracker: Tracker | None = None) -> CSMF:  # fmt: skip
        """The refreshed model on `data` (what `align` returned); `run_dir`: its phase checkpoints and refresh.json
        (resumed when they are this refresh's). `cfg`: the refresh's config (default: what `config` checked)."""
        cfg = self.config(cfg) if cfg is not None else (self.checked or self.config(self.cfg))
        if data is not self.aligned:
            raise ValueError("Refresh.fit takes the data Refresh.align returned (the new data in the run's id space)")
        if distributed.ranks().active:
            raise ConfigError("--init-from trains in one process: drop --nproc (or torchrun)")
        self.record["data"] = data.fingerprint()
        if run_dir is not None and distributed.ranks().main:
            self._claim(Path(run_dir))
        own = Tracker.open(Path(run_dir) / "tensorboard", cfg, "csmf") if tracker is None and run_dir else None
        with own or contextlib.nullcontext():
            trainer = RefreshTrainer(data, cfg, self.objectives, self.warm, self.epochs, run_dir, progress, log,
                                     teacher_for(cfg), own or tracker)  # fmt: skip
            trained = trainer.run()
        model = CSMF(cfg, self.objectives, run_dir=None if run_dir is None else str(run_dir), progress=progress,
                     log=log)  # fmt: skip
        model.trained, model.phases = trained, trainer.history
        model.inputs = SavedInputs.of(data, trainer.tuning_history, data.context_sizes())
        return model

    def _claim(self, folder: Path) -> None:
        """Write refresh.json in the run folder, or check the one there: a folder holds one refresh (or one training
        from scratch), so a resume never mixes another source's or another schedule's phases into it."""
        path, wanted = folder / RECORD, {k: self.record[k] for k in ("init_from", "source_model_sha256", "epochs")}
        if path.exists():
            held = json.loads(path.read_text())
            differ = [k for k, v in wanted.items() if held.get(k) != v]
            if differ:
                raise CheckpointError(f"{folder} holds a refresh of {held.get('init_from')} with {held.get('epochs')} "
                                      f"epochs a stage ({', '.join(differ)} differ from this one); use a new --out "
                                      "folder, or --overwrite to discard its checkpoints")  # fmt: skip
        elif any(folder.glob("phase-*.pt")):
            raise CheckpointError(f"{folder} holds the checkpoints of a training from scratch; refresh into a new "
                                  "--out folder, or give --overwrite to discard them")  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.record, indent=2))


class RefreshTrainer(CascadeTrainer):
    """The cascade trainer over a refresh's plan: phase `refresh-k` fine-tunes stage k's own units for `epochs`
    epochs (validation keeps the best), stages in cascade order; the model starts from `warm` (Refresh)."""

    def __init__(self, data: CascadeData, cfg: Config, objectives: tuple[str, ...], warm: dict[str, torch.Tensor],
                 epochs: int, run_dir: str | Path | None = None, progress: bool = False,
                 log: Callable[[str], None] | None = None, teacher: Teacher | None = None,
                 tracker: Tracker | None = None):  # fmt: skip
        super().__init__(data, cfg, objectives, None, progress, log, teacher=teacher, tracker=tracker)
        self.model.load_state_dict(warm)
        self.epochs = epochs
        self.phases = [Phase("refresh", k) for k in range(1, len(self.objectives) + 1)]
        if run_dir is not None:
            names = [p.name for p in self.phases]
            self.folder = RunFolder(Path(run_dir), names, self.objectives, cfg, data.fingerprint())

    def _phase(self, phase: Phase, index: int) -> dict:
        if phase.kind != "refresh":
            return super()._phase(phase, index)
        return self._epochs(phase.stage, index, self.epochs, 1.0)  # the stage's own units: no claim, no prune


def refresh_model(run: str | Path, data: CascadeData, epochs: int = DEFAULT_EPOCHS, settings: Iterable[str] = (),
            run_dir: str | Path | None = None, progress: bool = False,
            log: Callable[[str], None] | None = None) -> tuple[CSMF, CascadeData]:  # fmt: skip
    """Warm-start a finished run on new data and fine-tune each stage of its cascade for a few epochs.

    The Python side of `csmf train --init-from`: the new data's ids are mapped onto the run's (known users, items
    and feature values keep their rows, new ones start as a fresh model would), then each stage fine-tunes its own
    units in cascade order, earlier stages frozen; nothing is pruned, so the ownership, the vector's dimension and
    the index's size are the run's. The run's config is used without its distillation teacher.

    Args:
        run: a finished `csmf train` run folder, or its `model/` folder.
        data: the new log, loaded and split (`split_log(load_log(path))`), with the run's stages and features.
        epochs: epochs each stage fine-tunes for (`--refresh-epochs`).
        settings: `"section.field=value"` assignments on top of the run's config; one that would change the model
            or the cascade (a width, the encoder, `cascade.objectives`, ...) is refused.
        run_dir: where the refresh's phases and `refresh.json` are written; a killed refresh resumes from there.
        progress: show progress bars (on a terminal).
        log: a callable that receives each training line (default: none shown).

    Returns:
        The refreshed model and `data` in its id space: pass both to `evaluate`.

    Raises:
        ConfigError: a setting that changes the model or cascade, or `epochs` < 1.
        DataError: `data` has another cascade or other feature columns than the run's.
        CheckpointError: `run` holds no finished model, or `run_dir` holds another training's checkpoints.
    """
    warm = Refresh(run, epochs)
    warm.config(override(warm.cfg, list(settings)))
    aligned = warm.align(data)
    return warm.fit(aligned, run_dir=run_dir, progress=progress, log=log), aligned


# ----- id maps ---------------------------------------------------------------------------------------
def id_positions(known: np.ndarray | None, n_known: int, ids: np.ndarray | None, n: int) -> tuple[np.ndarray, int]:
    """(index of each of the `n` entities `ids` names in the extended map, how many are new): an id among `known`
    (compared as text, as a saved model keeps them) keeps its index there; new ids follow, in their order in `ids`."""
    known_text = np.asarray(known if known is not None else np.arange(n_known)).astype(str)
    text = np.asarray(ids if ids is not None else np.arange(n)).astype(str)
    at = np.empty(n, dtype=np.int64)
    found = np.zeros(n, dtype=bool)
    if len(known_text):
        order = np.argsort(known_text, kind="stable")
        slot = np.minimum(np.searchsorted(known_text[order], text), len(order) - 1)
        found = known_text[order][slot] == text
        at[found] = order[slot[found]]
    fresh = int((~found).sum())
    at[~found] = n_known + np.arange(fresh)
    return at, fresh


def extend_ids(data: CascadeData, user_ids: np.ndarray | None, n_users: int, item_ids: np.ndarray | None,
               n_items: int, user_features: dict[str, np.ndarray] | None = None,
               item_features: dict[str, np.ndarray] | None = None) -> tuple[CascadeData, dict]:  # fmt: skip
    """`data` re-indexed onto known id maps (`user_ids`: the `n_users` known users' ids in index order, same for
    items): a known id keeps its index, a new one follows, and a known entity the data lacks keeps its index with no
    pairs (its features from `*_features`, the known entities' arrays, else zeros). Every split, context and
    recency matrix is re-indexed, the ids become text. Returns (the data, counts of known, new and absent ids)."""
    users, new_users = id_positions(user_ids, n_users, data.user_ids, data.n_users)
    items, new_items = id_positions(item_ids, n_items, data.item_ids, data.n_items)
    shape = (n_users + new_users, n_items + new_items)

    def mats(group: dict[str, sp.csr_matrix]) -> dict[str, sp.csr_matrix]:
        return {name: _reindex(m, users, items, shape) for name, m in group.items()}

    def ids(known: np.ndarray | None, n_known: int, own: np.ndarray | None, at: np.ndarray, total: int) -> np.ndarray:
        out = np.empty(total, dtype=object)
        out[:n_known] = np.asarray(known if known is not None else np.arange(n_known)).astype(str)
        out[at] = np.asarray(own if own is not None else np.arange(len(at))).astype(str)
        return out.astype(str)

    candidates = None
    if data.candidates is not None:  # the known items the data lacks are no candidates of its ranking either
        candidates = np.zeros(shape[1], dtype=bool)
        candidates[items] = data.candidates
    aligned = replace(
        data, n_users=shape[0], n_items=shape[1], train=mats(data.train), valid=mats(data.valid),
        test=mats(data.test), side=mats(data.side),
        valid_holdout=None if data.valid_holdout is None else _reindex(data.valid_holdout, users, items, shape),
        user_ids=ids(user_ids, n_users, data.user_ids, users, shape[0]),
        item_ids=ids(item_ids, n_items, data.item_ids, items, shape[1]),
        user_features=_extend_features(data.user_features, user_features, users, shape[0], n_users, data.name),
        item_features=_extend_features(data.item_features, item_features, items, shape[1], n_items, data.name),
        context=mats(data.context), candidates=candidates,
        recency=None if data.recency is None else _reindex(data.recency, users, items, shape),
    )  # fmt: skip
    counts = {
        side: {"known": int(len(at) - new), "new": int(new), "absent": int(n_known - (len(at) - new))}
        for side, at, new, n_known in (("users", users, new_users, n_users), ("items", items, new_items, n_items))
    }
    return aligned, counts


def _reindex(m: sp.spmatrix, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """`m` with row r moved to rows[r] and column c to cols[c] (one-to-one, so no entries merge), in `shape`."""
    coo = sp.coo_matrix(m)
    out = sp.csr_matrix((coo.data, (rows[coo.row], cols[coo.col])), shape=shape, dtype=m.dtype)
    out.sort_indices()
    out.indices = out.indices.astype(np.int32, copy=False)  # as csmf.data.schema keeps them
    return out


def _extend_features(own: dict[str, np.ndarray], known: dict[str, np.ndarray] | None, at: np.ndarray, n: int,
                     n_known: int, name: str) -> dict[str, np.ndarray]:  # fmt: skip
    """Each feature column over the extended entities: the known entities' values first (from `known`), then the
    data's own at their indices (`at`); a bag (a 2-D column) padded with 0 to the wider of the two."""
    out = {}
    for column, values in own.items():
        values, before = np.asarray(values), None if known is None else known.get(column)
        if before is not None and np.asarray(before).ndim != values.ndim:
            raise DataError(f"{name}: feature {column!r} is {'a bag' if values.ndim == 2 else 'one value'} per entity "
                            "here and was not in the run; a refresh keeps the model's inputs")  # fmt: skip
        width = max(values.shape[1], 0 if before is None else np.asarray(before).shape[1]) if values.ndim == 2 else 0
        dtype = values.dtype if before is None else np.result_type(values.dtype, np.asarray(before).dtype)
        full = np.zeros((n, width) if values.ndim == 2 else n, dtype=dtype)
        if before is not None:
            before = np.asarray(before)
            if values.ndim == 2:
                full[:n_known, : before.shape[1]] = before
            else:
                full[:n_known] = before
        if values.ndim == 2:
            full[at, : values.shape[1]] = values
            full[at, values.shape[1] :] = 0
        else:
            full[at] = values
        out[column] = full
    return out
