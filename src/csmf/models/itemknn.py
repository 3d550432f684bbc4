"""Item-kNN from the `implicit` library (BM25- or cosine-weighted item-item), one model per objective.

Score of item j for user u = sum over the user's (weighted) history items i of sim(i, j), with each
item's K nearest neighbours kept. The history mixes the stage's pairs with other behaviours at
`aux_weight`; both the similarity and the weighting are chosen on validation.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from implicit.nearest_neighbours import BM25Recommender, CosineRecommender

from csmf.data.schema import CascadeData
from csmf.models.base import input_matrix
from csmf.models.saving import read_model, write_model
from csmf.retriever import Retriever


@dataclass(frozen=True)
class ItemKNNSettings:
    similarity: str = "bm25"  # "bm25" or "cosine"
    neighbours: int = 100
    aux_weight: float = 0.1
    bm25_k1: float = 1.2
    bm25_b: float = 0.75


class ItemKNN(Retriever):
    name = "itemknn"

    def __init__(self, settings: dict[str, ItemKNNSettings], num_threads: int = 0) -> None:
        self.stage_settings = settings
        self.num_threads = num_threads
        self.history: dict[str, sp.csr_matrix] = {}
        self.similarity: dict[str, sp.csr_matrix] = {}

    def fit(self, data: CascadeData) -> ItemKNN:
        for stage, s in self.stage_settings.items():
            if s.similarity == "bm25":
                model = BM25Recommender(K=s.neighbours, K1=s.bm25_k1, B=s.bm25_b, num_threads=self.num_threads)
            elif s.similarity == "cosine":
                model = CosineRecommender(K=s.neighbours, num_threads=self.num_threads)
            else:
                raise ValueError(f"itemknn similarity must be 'bm25' or 'cosine', got {s.similarity!r}")
            history = input_matrix(data, stage, s.aux_weight)
            with warnings.catch_warnings():
                # implicit converts its own BM25/cosine-weighted COO copy to CSR and warns about it.
                warnings.filterwarnings("ignore", message="Method expects CSR input")
                model.fit(history, show_progress=False)
            self.history[stage] = history
            self.similarity[stage] = sp.csr_matrix(model.similarity, dtype=np.float32)
        return self

    def score(self, users: np.ndarray, stage: str) -> torch.Tensor:
        return torch.from_numpy(self.score_sparse(users, stage).toarray())  # (B, N)

    def score_sparse(self, users: np.ndarray, stage: str) -> sp.csr_matrix:
        """`score` as the sparse (B, N) float32 matrix it is: an item no history item neighbours scores 0."""
        return sp.csr_matrix(self.history[stage][users] @ self.similarity[stage], dtype=np.float32)

    def num_params(self) -> int:
        """The stored neighbour weights: what the model learned (at most K per item per objective)."""
        return int(sum(m.nnz for m in self.similarity.values()))

    def settings(self) -> dict:
        return {stage: asdict(s) for stage, s in self.stage_settings.items()}

    def save(self, folder) -> Path:
        meta = {"settings": self.settings(), "num_threads": self.num_threads}
        sparse = {f"similarity-{s}": m for s, m in self.similarity.items()}
        return write_model(folder, "itemknn", meta, {}, history=self.history, sparse=sparse)

    @classmethod
    def load(cls, folder) -> ItemKNN:
        meta, _, _, history = read_model(folder, "itemknn")
        out = cls({s: ItemKNNSettings(**v) for s, v in meta["settings"].items()}, meta["num_threads"])
        out.history = history
        out.similarity = {s: meta["sparse_state"][f"similarity-{s}"] for s in meta["settings"]}
        return out
