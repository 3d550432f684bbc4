"""A trained cascade as scores: a backbone, the objectives it serves and the history its users are read from.

`TrainedCascade` duck-types `Retriever.score` so validation ranks with it mid-training; models/csmf.py wraps it
as the full Retriever the benchmark sees.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch

from csmf.backbones.base import Backbone


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode for the block, then the mode the model had: scoring never changes how a caller trains."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


class TrainedCascade:
    """Scores of a trained backbone over the whole catalogue, with a fixed history source."""

    def __init__(
        self,
        model: Backbone,
        objectives: tuple[str, ...],
        history: dict[str, sp.csr_matrix],
        top: int,
        shared: bool = False,
    ):
        """`shared`: every objective scores with the whole final model (naive fine-tuning, no masks)."""
        self.model, self.objectives, self.history, self.top, self.shared = model, objectives, history, top, shared
        with torch.no_grad(), evaluating(model):  # scoring never drops inputs
            self.items = model.item_vectors(top)  # (N, D) computed once

    def stage_number(self, objective: str) -> int:
        if objective not in self.objectives:
            raise KeyError(f"unknown objective {objective!r}; this model serves {self.objectives}")
        return self.top if self.shared else self.objectives.index(objective) + 1

    def raw_user_vectors(self, users: np.ndarray, codes: dict[str, np.ndarray] | None = None) -> torch.Tensor:
        """(B, D) at the top stage; codes: per-row context (csmf.data.context), None = unknown context."""
        users = np.asarray(users, dtype=np.int64)
        with torch.no_grad(), evaluating(self.model):
            if codes and self.model.reads_context:
                return self.model.user_vectors(users, self.top, history=self.history, context=codes)
            return self.model.user_vectors(users, self.top, history=self.history)

    def score(self, users: np.ndarray, stage: str) -> torch.Tensor:
        mask = self.model.group_mask(self.stage_number(stage))
        return (self.raw_user_vectors(users) * mask) @ self.items.T  # (B, N)

    def score_in_context(self, users: np.ndarray, codes: dict[str, np.ndarray], stage: str) -> torch.Tensor:
        """`score` for requests made in a context: codes[column][b] is request b's (csmf.data.context)."""
        mask = self.model.group_mask(self.stage_number(stage))
        return (self.raw_user_vectors(users, codes) * mask) @ self.items.T  # (B, N)

    def export_towers(self, user_columns: list[dict], item_columns: list[dict]):
        """The backbone's towers at the top stage, masks folded in (Backbone.export_towers), in eval mode."""
        with torch.no_grad(), evaluating(self.model):
            return self.model.export_towers(self.top, user_columns, item_columns)
