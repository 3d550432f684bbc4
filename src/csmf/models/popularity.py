"""Popularity per objective: every user gets the items with the most train positives in that stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from csmf.data.schema import CascadeData
from csmf.models.saving import read_model, write_model
from csmf.retriever import Retriever


class Popularity(Retriever):
    name = "popularity"

    def __init__(self) -> None:
        self.counts: dict[str, torch.Tensor] = {}

    def fit(self, data: CascadeData) -> Popularity:
        for stage in data.stages:
            counts = np.asarray(data.train[stage].sum(axis=0)).ravel().astype(np.float32)
            self.counts[stage] = torch.from_numpy(counts)
        return self

    def score(self, users: np.ndarray, stage: str) -> torch.Tensor:
        return self.counts[stage].unsqueeze(0).expand(len(users), -1)

    def save(self, folder) -> Path:
        return write_model(folder, "popularity", {"stages": list(self.counts)}, dict(self.counts))

    @classmethod
    def load(cls, folder) -> Popularity:
        meta, state, _, _ = read_model(folder, "popularity")
        out = cls()
        out.counts = {s: state[s] for s in meta["stages"]}
        return out
