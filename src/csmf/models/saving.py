"""Save and load a fitted model, any kind, without pickle.

A saved model is a folder: `model.pt`, a weights-only checkpoint (tensors, plus JSON metadata naming the
model's kind, its settings and the shape of its data), `inputs.npz` (features, ids and other dense arrays,
read with allow_pickle=False) and `sparse/<group>/<name>.npz` (training histories and other sparse matrices,
scipy's format). `csmf.models.load_model(folder)` rebuilds whichever model wrote it; each model's own `load`
checks the kind. Nothing in it can run code when read. model.pt carries its own content digest
(csmf.checkpoints) and the sha256 of every other file of the folder, all checked before anything is read, so a
damaged model is refused rather than scored or exported. A folder saved before the digests loads with a note.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from csmf.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from csmf.data.schema import CascadeData
from csmf.hashing import file_sha256

logger = logging.getLogger(__name__)
SAVE_FORMAT = 2


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
    context_sizes: dict[str, int]  # per-row context column -> codes + 1 (csmf.data.context)
    recency: sp.csr_matrix | None = None  # the training pairs' time ranks: which items model.history_max keeps

    @classmethod
    def of(cls, data: CascadeData, tuning_history: dict[str, sp.csr_matrix],
           context_sizes: dict[str, int] | None = None) -> SavedInputs:  # fmt: skip
        return cls(data.name, data.stages, tuple(data.side), data.n_users, data.n_items, data.user_features,
                   data.item_features, data.user_ids, data.item_ids, tuning_history,
                   data.context_sizes() if context_sizes is None else context_sizes, data.recency)  # fmt: skip

    def meta(self) -> dict:
        return {"data": {"name": self.name, "stages": list(self.stages), "side": list(self.side),
                         "n_users": self.n_users, "n_items": self.n_items, "tuning": sorted(self.tuning_history),
                         "user_features": sorted(self.user_features), "item_features": sorted(self.item_features),
                         "ids": self.user_ids is not None, "context": self.context_sizes,
                         "recency": self.recency is not None}}  # fmt: skip

    def write(self, folder: Path, history: dict[str, sp.csr_matrix]) -> None:
        for kind, mats in (("history", history), ("tuning", self.tuning_history)):
            (folder / kind).mkdir(parents=True, exist_ok=True)
            for name, m in mats.items():
                sp.save_npz(folder / kind / f"{name}.npz", sp.csr_matrix(m))
        if self.recency is not None:
            sp.save_npz(folder / "recency.npz", sp.csr_matrix(self.recency))
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
            recency = sp.load_npz(folder / "recency.npz").tocsr() if d.get("recency") else None
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
                    arrays.get("ids/user"), arrays.get("ids/item"), tuning,
                    {str(k): int(v) for k, v in d.get("context", {}).items()}, recency)  # fmt: skip
        return saved, history

    def skeleton(self, history: dict[str, sp.csr_matrix]) -> CascadeData:
        """A CascadeData with what building the model reads (no validation or test pairs)."""
        return CascadeData(
            name=self.name, stages=self.stages, n_users=self.n_users, n_items=self.n_items,
            train={s: history[s] for s in self.stages if s in history}, valid={}, test={}, exclude={},
            side={s: history[s] for s in self.side if s in history}, user_ids=self.user_ids,
            item_ids=self.item_ids, user_features=self.user_features, item_features=self.item_features,
            recency=self.recency,
        )  # fmt: skip


def write_model(
    folder: str | Path,
    kind: str,
    meta: dict,
    state: dict[str, torch.Tensor],
    inputs: SavedInputs | None = None,
    history: dict[str, sp.csr_matrix] | None = None,
    sparse: dict[str, sp.csr_matrix] | None = None,
) -> Path:
    """Write a model folder. `history`: the matrices scoring reads; `sparse`: any other sparse state."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "format": SAVE_FORMAT, "kind": kind, "history": sorted(history or {}),
            "sparse": sorted(sparse or {})}  # fmt: skip
    if inputs is not None:
        meta |= inputs.meta()
        inputs.write(folder, history or {})
    elif history:
        _write_sparse(folder / "history", history)
    if sparse:
        _write_sparse(folder / "sparse", sparse)
    meta["files"] = {name: file_sha256(folder / name) for name in _files_of(meta)}  # model.pt's digest covers them
    save_checkpoint(folder / "model.pt", state, meta)
    return folder


def _files_of(meta: dict) -> list[str]:
    """The files besides model.pt that a model folder with this metadata holds, as paths inside it."""
    names = [f"history/{n}.npz" for n in meta["history"]] + [f"sparse/{n}.npz" for n in meta.get("sparse", [])]
    if "data" in meta:
        d = meta["data"]
        names += ["inputs.npz", *(f"tuning/{n}.npz" for n in d["tuning"])]
        names += ["recency.npz"] if d.get("recency") else []
    return names


def _resave_fix(folder: Path) -> str:
    return (f"save the model again (for a `csmf train` run folder: run csmf train with the same --out; it resumes "
            f"from the run's checkpoints, trains nothing already done, and writes {folder} anew)")  # fmt: skip


def _check_files(folder: Path, meta: dict) -> None:
    """Every file model.pt lists against the sha256 it records; a folder saved before the digests gets a note."""
    files = meta.get("files")
    if files is None:
        logger.warning(f"csmf: note: {folder} was saved by an older csmf without file digests: loaded without a "
                       "damage check")  # fmt: skip
        return
    try:
        expected = sorted(_files_of(meta))
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{folder / 'model.pt'}: metadata lacks {err}; {_resave_fix(folder)}") from None
    if not isinstance(files, dict) or sorted(files) != expected:
        raise CheckpointError(f"{folder / 'model.pt'}: its file list does not match the model's own; "
                              f"{_resave_fix(folder)}")  # fmt: skip
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: a saved model file is missing or damaged: no regular file there; "
                                  f"{_resave_fix(folder)}")  # fmt: skip
        if file_sha256(path) != digest:
            raise CheckpointError(f"{path}: a saved model file is missing or damaged: its sha256 does not match "
                                  f"the one model.pt records; {_resave_fix(folder)}")  # fmt: skip


def read_model(folder: str | Path, kind: str | None = None):
    """(meta, state, inputs or None, history) of a folder `write_model` wrote, checked as it is read;
    `meta["sparse_state"]` holds the other sparse matrices."""
    folder = Path(folder)
    if not (folder / "model.pt").exists():
        raise CheckpointError(f"{folder}: no model.pt; give a folder a model's save() wrote")
    state, meta = load_checkpoint(folder / "model.pt", fix=_resave_fix(folder))
    if meta.get("format") != SAVE_FORMAT:
        raise CheckpointError(f"{folder}: saved model format {meta.get('format')!r}, this csmf reads {SAVE_FORMAT}")
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{folder}: holds a {meta.get('kind')!r} model, not {kind!r}")
    _check_files(folder, meta)
    if "data" in meta:
        inputs, history = SavedInputs.read(folder, meta)
    else:
        inputs, history = None, _read_sparse(folder / "history", meta["history"], folder)
    meta["sparse_state"] = _read_sparse(folder / "sparse", meta.get("sparse", []), folder)
    return meta, state, inputs, history


def _write_sparse(folder: Path, mats: dict[str, sp.csr_matrix]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, m in mats.items():
        sp.save_npz(folder / f"{name}.npz", sp.csr_matrix(m))


def _read_sparse(folder: Path, names: list[str], root: Path) -> dict[str, sp.csr_matrix]:
    try:
        return {n: sp.load_npz(folder / f"{n}.npz").tocsr() for n in names}
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{root}: a saved model file is missing or damaged: {err}") from None
