"""Popularity per objective: every user gets the items with the most train positives in that stage."""

from __future__ import annotations

import numpy as np
import torch

from csmf.data.schema import CascadeData
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
