"""Distillation teachers: a classical model fit on the student's own training data gives each training user
a soft list of its top unseen items (backbone notes, *Distillation*).

The teacher is fit on the same data the student trains on (the tuning view: CSMF hands the cascade trainer
`teacher_for(cfg)` as its teacher, and the trainer calls it on that view), so it never sees a validation or test
pair. Each user's list is its top-`distill_top` items outside the user's seen items, weighted
exp(-rank / distill_decay) and normalised to sum to 1.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from csmf.backbones.neighbours import top_k_rows
from csmf.config import Config, config_to_dict
from csmf.data.schema import CascadeData
from csmf.evaluation import batch_size_for, rows_mask
from csmf.models.als import ALS, ALSSettings
from csmf.models.ease import EASE, EASESettings
from csmf.models.itemknn import ItemKNN, ItemKNNSettings
from csmf.retriever import Retriever
from csmf.rules import teacher_kind
from csmf.usercache import user_cache

TEACHERS = ("ease", "als", "itemknn")


def fit_teacher(data: CascadeData, objective: str, cfg: Config) -> Retriever:
    """The teacher `teacher_kind` names, at the first value of each of its config grids (no search: tuning it
    would read validation inside training)."""
    kind = teacher_kind(cfg, data.n_items)
    if kind == "ease":
        return EASE({objective: EASESettings(l2=cfg.ease.l2[0], aux_weight=cfg.ease.aux_weights[0])}).fit(data)
    if kind == "als":
        a = cfg.als
        s = ALSSettings(a.factors[0], a.regularization[0], a.alpha[0], a.aux_weights[0], a.iterations)
        return ALS({objective: s}, cfg.seed, a.num_threads).fit(data)
    if kind == "itemknn":
        k = cfg.itemknn
        s = ItemKNNSettings(k.similarity[0], k.neighbours[0], k.aux_weights[0], k.bm25_k1, k.bm25_b)
        return ItemKNN({objective: s}, k.num_threads).fit(data)
    raise ValueError(f"train.distill must be one of {TEACHERS} or empty, got {kind!r}")


# Teachers are deterministic functions of their training data and settings: runs in one process (the suite's
# rows and seeds, ablations) share them instead of refitting (an EASE fit on JD costs ~30 s).
_CACHE: dict[str, sp.csr_matrix] = {}
_CACHE_SIZE = 8
# part of every key: raise it when the teachers or the lists change, so no stored list of older code is read
_LISTS_FORMAT = 2  # 2: a sparse teacher's lists hold only the items it scores


def _fingerprint(data: CascadeData, objective: str, cfg: Config) -> str:
    digest = hashlib.sha256()
    for name in data.behaviours:
        mat = data.matrix(name)
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(mat.indptr).tobytes())
        digest.update(np.ascontiguousarray(mat.indices).tobytes())
    distill = {k: v for k, v in config_to_dict(cfg.train).items() if k.startswith("distill")}
    settings = {
        "objective": objective,
        "exclude": data.exclude[objective],
        "distill": distill,
        "teachers": [config_to_dict(c) for c in (cfg.ease, cfg.als, cfg.itemknn)],
        "teacher": teacher_kind(cfg, data.n_items),
        "seed": cfg.seed if cfg.train.distill == "als" else None,  # ALS is the only seeded teacher
        "lists": _LISTS_FORMAT,
    }
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def teacher_lists(data: CascadeData, objective: str, cfg: Config, batch: int = 2048) -> sp.csr_matrix:
    """(U, N) float32: each training user's teacher distribution over its top unseen items (rows sum to 1).

    Kept in memory for the process and, with train.teacher_cache, on disk by the fingerprint of the training
    data and the teacher's settings, so a later run on the same data (another seed, a selection candidate, a
    rerun of the main job) reads the lists instead of fitting the teacher again (EASE on JD: ~20 s a stage)."""
    key = _fingerprint(data, objective, cfg)
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        path = _disk_path(key) if cfg.train.teacher_cache else None
        lists = _read_lists(path, (data.n_users, data.n_items)) if path is not None else None
        if lists is None:
            lists = _teacher_lists(data, objective, cfg, batch)
            if path is not None:
                _write_lists(path, lists)
        _CACHE[key] = lists
    return _CACHE[key]


def _disk_path(key: str) -> Path:
    return user_cache("teachers", f"{key[:40]}.npz")


def _read_lists(path: Path, shape: tuple[int, int]) -> sp.csr_matrix | None:
    """The stored lists, or None when absent or not whole (then they are fit again and rewritten)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            lists = sp.csr_matrix((f["data"], f["indices"], f["indptr"]), shape=tuple(f["shape"]))
        lists.check_format(full_check=True)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    ok = lists.shape == shape and lists.dtype == np.float32 and np.isfinite(lists.data).all()
    return lists if ok else None


def _write_lists(path: Path, lists: sp.csr_matrix) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".part")
        with open(part, "wb") as f:
            np.savez(f, data=lists.data, indices=lists.indices, indptr=lists.indptr, shape=np.array(lists.shape))
        part.replace(path)  # whole or not at all
    except OSError:
        pass  # a read-only cache folder: the teacher is fit again next time


def _teacher_lists(data: CascadeData, objective: str, cfg: Config, batch: int) -> sp.csr_matrix:
    t = cfg.train
    teacher = fit_teacher(data, objective, cfg)
    seen = data.excluded(objective)
    users = np.flatnonzero(np.diff(seen.indptr))  # users with any training history
    decay = np.exp(-np.arange(t.distill_top) / t.distill_decay).astype(np.float32)  # (K,)
    if hasattr(teacher, "score_sparse"):
        return _sparse_teacher_lists(teacher, data, objective, users, seen, decay, batch)
    # a block of (users x items) scores within eval.score_budget_mb: 2,048 users x 200k items would be 1.6 GB
    batch = min(batch, batch_size_for(data.n_items, cfg.eval.score_budget_mb))
    rows, cols, vals = [], [], []
    for start in range(0, len(users), batch):
        chunk = users[start : start + batch]
        scores = teacher.score(chunk, objective).clone()  # (B, N)
        scores[rows_mask(seen, chunk, data.n_items)] = float("-inf")
        k = min(t.distill_top, scores.shape[1])
        top = torch.topk(scores, k, dim=1)
        ok = torch.isfinite(top.values).numpy()  # (B, K) a user with fewer unseen items than K
        w = np.where(ok, decay[None, :k], 0.0)
        w = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-12)
        r, c = np.nonzero(ok)
        rows.append(chunk[r])
        cols.append(top.indices.numpy()[r, c])
        vals.append(w[r, c])
    shape = (data.n_users, data.n_items)
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=shape,
                         dtype=np.float32)  # fmt: skip


def _sparse_teacher_lists(teacher, data: CascadeData, objective: str, users: np.ndarray, seen: sp.csr_matrix,
                          decay: np.ndarray, batch: int) -> sp.csr_matrix:  # fmt: skip
    """The lists of a teacher whose scores are sparse (item-kNN: only items near the history score): each row's
    top unseen items among those it scores, never dense (B, N) blocks. An item the teacher does not score is not
    in a list (a dense top-K filled short rows with arbitrary zero-score items): 125 s -> seconds a stage on the
    2.2M-row simulator's 194k items."""
    rows, cols, vals = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    for start in range(0, len(users), batch):
        chunk = users[start : start + batch]
        scores = teacher.score_sparse(chunk, objective)  # (B, N)
        scores = sp.csr_matrix(scores - scores.multiply(seen[chunk].astype(bool)))  # seen items out
        scores.data[scores.data <= 0] = 0  # a list holds items the teacher ranks above nothing
        scores.eliminate_zeros()
        top = top_k_rows(scores, len(decay))  # column order within a row
        counts = np.diff(top.indptr)
        row = np.repeat(np.arange(len(chunk)), counts)
        order = np.lexsort((top.indices, -top.data, row))  # by row, score descending, lower column first
        rank = np.empty(top.nnz, dtype=np.int64)
        rank[order] = np.arange(top.nnz) - top.indptr[row[order]]
        weight = decay[rank]
        total = np.bincount(row, weights=weight, minlength=len(chunk))
        rows.append(chunk[row])
        cols.append(top.indices.astype(np.int64))
        vals.append((weight / total[row]).astype(np.float32))
    shape = (data.n_users, data.n_items)
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=shape,
                         dtype=np.float32)  # fmt: skip


def teacher_for(cfg: Config):
    """The teacher a cascade trainer is handed for `cfg`: tuning data, objective -> that objective's lists
    (`teacher_lists`), or None when train.distill is off."""
    if not cfg.train.distill:
        return None
    return lambda data, objective: teacher_lists(data, objective, cfg)
