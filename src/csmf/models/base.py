"""The one interface every model implements: fit on a CascadeData, score users against all items.

Evaluation, the benchmark and (later) indexes and the server see only this, so every model is
measured the same way. Vector models also expose user and item vectors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np
import scipy.sparse as sp
import torch

from csmf.data.schema import CascadeData


class Retriever(ABC):
    name: str = "retriever"

    @abstractmethod
    def fit(self, data: CascadeData) -> Retriever:
        """Train on `data.train` (and `data.side`); never read `data.valid` or `data.test`."""

    @abstractmethod
    def score(self, users: np.ndarray, stage: str) -> torch.Tensor:
        """(len(users), n_items) float32 scores of objective `stage` over the whole catalogue."""

    def score_fused(self, users: np.ndarray, weights: Mapping[str, float]) -> torch.Tensor:
        """Linear fusion of objective scores: sum_k weights[k] * score_k."""
        total = None
        for stage, w in weights.items():
            if w:
                part = w * self.score(users, stage)
                total = part if total is None else total + part
        if total is None:
            raise ValueError(f"all objective weights are zero: {dict(weights)}")
        return total

    def served(self, data: CascadeData) -> tuple[str, ...]:
        """The objectives this model scores (a single-objective model serves one)."""
        return data.stages

    def num_params(self) -> int:
        """Trainable parameters (0 for count- and neighbourhood-based models)."""
        return 0

    def settings(self) -> dict:
        """The hyper-parameters this model was fit with (recorded in results)."""
        return {}


def input_matrix(data: CascadeData, stage: str, aux_weight: float) -> sp.csr_matrix:
    """The stage's train pairs plus every other train behaviour at weight `aux_weight`.

    Auxiliary behaviours (views for a purchase model, purchases for a view model) are legitimate
    training input: the split guarantees no test pair of `stage` is in them.
    """
    mat = data.train[stage].astype(np.float32).copy()
    if aux_weight > 0:
        for name in data.behaviours:
            if name != stage:
                mat = mat + aux_weight * data.matrix(name)
    mat = sp.csr_matrix(mat, dtype=np.float32)
    mat.sort_indices()
    return mat
