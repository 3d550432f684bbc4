"""The one contract every model meets: fit on a CascadeData, then score users against the whole catalogue.

Evaluation, the benchmark, the cost measurement and export see only this, so every model is measured the
same way. One signature per method for every model:

- `score(users, stage)`: (B, N) scores of one objective;
- `score_fused(users, weights)`: the linear fusion sum_k w_k score_k, what a weighted request ranks by;
- vector models (`has_vectors`) also serve that fusion as one inner-product search:
  `user_vectors(users, weights)` (B, W) with the weights folded in, and `item_vectors()` (N, W), so
  `score_fused == user_vectors @ item_vectors().T`. W is D for CSMF and MVKE (one shared item vector) and
  S x D for per-objective vectors (ALS factors, shared-bottom / MMoE / PLE heads), concatenated.

This module sits below evaluation and the models: it imports neither.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

from csmf.data.schema import CascadeData

if TYPE_CHECKING:
    from csmf.tracking import Tracker


class Retriever(ABC):
    name: str = "retriever"
    has_vectors: bool = False  # True: user_vectors / item_vectors are the index a fused query searches
    # where `fit` records its curves (csmf.tracking): the neural models report each epoch, the others have none;
    # `csmf bench` sets it on each row before the fit
    tracker: Tracker | None = None

    @abstractmethod
    def fit(self, data: CascadeData) -> Retriever:
        """Train on `data.train` and `data.side`. Neural models choose their epochs on validation pairs
        (`data.tuning_view()`, whose test side is `data.valid`); no model ever reads `data.test`."""

    @abstractmethod
    def score(self, users: np.ndarray, stage: str) -> torch.Tensor:
        """(len(users), n_items) float32 scores of objective `stage` over the whole catalogue; a new tensor or a
        view (evaluation writes into one that is neither a view nor shared: never return a tensor the model keeps)."""

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

    def user_vectors(self, users: np.ndarray, weights: Mapping[str, float]) -> torch.Tensor:
        """(len(users), W) query vectors with the objective weights folded in (vector models only)."""
        raise NotImplementedError(f"{self.name} has no vector index; rank with score_fused")

    def item_vectors(self) -> torch.Tensor:
        """(n_items, W) the index a fused query searches (vector models only)."""
        raise NotImplementedError(f"{self.name} has no vector index; rank with score_fused")

    def vectors_per_item(self) -> int:
        """How many D-wide vectors per item the index holds (1 for CSMF: the point of the method)."""
        return 1

    def save(self, folder):
        """Write the fitted model to `folder` (csmf.models.saving: weights-only, no pickle); `load_model(folder)`
        or the class's `load(folder)` rebuilds it and scores bit-identically."""
        raise NotImplementedError(f"{self.name} cannot be saved")

    def served(self, data: CascadeData) -> tuple[str, ...]:
        """The objectives this model scores (a single-objective model serves one)."""
        return data.stages

    def num_params(self) -> int:
        """Trainable parameters (0 for count- and neighbourhood-based models)."""
        return 0

    def settings(self) -> dict:
        """The hyper-parameters this model was fit with (recorded in results)."""
        return {}
