"""EASE (Steck, WWW 2019, "Embarrassingly Shallow Autoencoders for Sparse Data"), one model per objective.

A closed-form item-item model: B = argmin ||X - X B||^2 + l2 ||B||^2 with diag(B) = 0, solved as
P = (X^T X + l2 I)^-1, B_ij = -P_ij / P_jj. The score of item j for user u is X_u B[:, j]. It is the
strongest closed-form peer on sparse e-commerce data; its cost is one dense N x N inverse per objective
(about 15 s at 13k items on 2 cores), so it is meant for catalogues up to a few tens of thousands of items.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from scipy.linalg import lapack

from csmf.data.schema import CascadeData
from csmf.models.base import input_matrix
from csmf.models.saving import read_model, write_model
from csmf.retriever import Retriever

MAX_ITEMS = 60_000  # a dense N x N float32 matrix of this size is 14 GB


@dataclass(frozen=True)
class EASESettings:
    l2: float = 400.0  # ridge weight on B
    aux_weight: float = 0.2  # weight of the other behaviours' train pairs in X


def ease_weights(x: sp.csr_matrix, l2: float) -> torch.Tensor:
    """(N, N) float32 EASE item-item weights of the user x item matrix `x`, zero diagonal.

    Solved on the items `x` touches only: an item without a training row has a Gram row of zeros but for its
    ridge term, so P is block-diagonal and its weights are exactly 0 (the solve shrinks by the cube of the
    untouched share: 8% of JD's items are test-only, 21% less work). The Cholesky factor and inverse are
    LAPACK's potrf/potri through scipy's OpenBLAS: 15.7 s against torch's 20.4 s at JD's 13k items, 2 idle cores.
    """
    n = x.shape[1]
    if n > MAX_ITEMS:
        raise ValueError(f"EASE needs a dense {n:,} x {n:,} matrix; it supports at most {MAX_ITEMS:,} items")
    if l2 <= 0:
        raise ValueError(f"EASE l2 must be > 0, got {l2}")
    touched = np.flatnonzero(np.diff(sp.csc_matrix(x).indptr) > 0)  # (M,) items with a training row
    if len(touched) == 0:
        return torch.zeros(n, n)
    sub = x[:, touched]
    gram = (sub.T @ sub).toarray().astype(np.float32)  # (M, M) symmetric, so its F-order view is itself
    gram[np.diag_indices_from(gram)] += l2
    factor, info = lapack.spotrf(gram.T, lower=1, overwrite_a=1)
    if info == 0:
        factor, info = lapack.spotri(factor, lower=1, overwrite_c=1)
    if info != 0:  # X^T X + l2 I is positive definite for l2 > 0: only float32 round-off at a tiny l2 gets here
        raise ValueError(f"EASE: the Gram matrix is not positive definite in float32 (LAPACK info {info}); "
                         f"raise ease.l2 (now {l2})")  # fmt: skip
    inverse = torch.from_numpy(factor).tril_()  # potri fills the lower triangle of P only
    inverse += inverse.tril(-1).T  # (M, M) P
    block = inverse / (-inverse.diagonal()).unsqueeze(0)  # B_ij = -P_ij / P_jj
    block.diagonal().zero_()
    del inverse, factor, gram
    index = torch.from_numpy(touched)
    if len(touched) == n:
        # LAPACK's storage is column-major; scipy's sparse x dense product would copy an F-ordered N x N matrix
        # to row-major on every call (4 s at 13k items), so make it row-major once here
        return block.contiguous()
    weights = torch.zeros(n, n)
    weights.index_put_((index.unsqueeze(1), index.unsqueeze(0)), block)
    return weights


class EASE(Retriever):
    name = "ease"

    def __init__(self, settings: dict[str, EASESettings]) -> None:
        self.stage_settings = settings
        self.history: dict[str, sp.csr_matrix] = {}
        self.weights: dict[str, torch.Tensor] = {}

    def fit(self, data: CascadeData) -> EASE:
        for stage, s in self.stage_settings.items():
            self.history[stage] = input_matrix(data, stage, s.aux_weight)
            self.weights[stage] = ease_weights(self.history[stage], s.l2)
        return self

    def score(self, users: np.ndarray, stage: str) -> torch.Tensor:
        # scipy's sparse x dense product costs nnz x N (a history is short); torch's dense one B x N x N
        scores = self.history[stage][users] @ self.weights[stage].numpy()  # (B, N)
        return torch.from_numpy(np.asarray(scores, dtype=np.float32))

    def num_params(self) -> int:
        """The dense item-item weights, N x N per objective (the diagonal is fixed at 0)."""
        return int(sum(w.numel() - w.shape[0] for w in self.weights.values()))

    def settings(self) -> dict:
        return {stage: asdict(s) for stage, s in self.stage_settings.items()}

    def save(self, folder) -> Path:
        return write_model(folder, "ease", {"settings": self.settings()}, dict(self.weights), history=self.history)

    @classmethod
    def load(cls, folder) -> EASE:
        meta, state, _, history = read_model(folder, "ease")
        out = cls({s: EASESettings(**v) for s, v in meta["settings"].items()})
        out.history, out.weights = history, {s: state[s].contiguous() for s in meta["settings"]}
        return out
