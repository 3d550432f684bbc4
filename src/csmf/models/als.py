"""Implicit-feedback ALS (Hu, Koren & Volinsky 2008) from the `implicit` library, one model per objective.

Each objective's model trains on its stage's pairs plus the other behaviours at a tuned weight
(`aux_weight`), with confidence 1 + alpha * r. Hyper-parameters are chosen on validation (see tuning.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from implicit.cpu.als import AlternatingLeastSquares
from threadpoolctl import threadpool_limits

from csmf.data.schema import CascadeData
from csmf.models.base import input_matrix
from csmf.models.saving import read_model, write_model
from csmf.retriever import Retriever


@dataclass(frozen=True)
class ALSSettings:
    factors: int = 128
    regularization: float = 0.1
    alpha: float = 10.0
    aux_weight: float = 0.1
    iterations: int = 15


class ALS(Retriever):
    has_vectors = True
    name = "als"

    def __init__(self, settings: dict[str, ALSSettings], seed: int = 0, num_threads: int = 0) -> None:
        self.stage_settings = settings
        self.seed = seed
        self.num_threads = num_threads
        self.user_factors: dict[str, torch.Tensor] = {}
        self.item_factors: dict[str, torch.Tensor] = {}

    def fit(self, data: CascadeData) -> ALS:
        for stage, s in self.stage_settings.items():
            # implicit parallelises over users itself; a threaded BLAS underneath only oversubscribes
            # (implicit checks this when the model is built, so build it inside the limit too).
            with threadpool_limits(1, "blas"):
                model = AlternatingLeastSquares(
                    factors=s.factors,
                    regularization=s.regularization,
                    alpha=s.alpha,
                    iterations=s.iterations,
                    random_state=self.seed,
                    num_threads=self.num_threads,
                )
                model.fit(input_matrix(data, stage, s.aux_weight), show_progress=False)
            self.user_factors[stage] = torch.from_numpy(np.ascontiguousarray(model.user_factors))
            self.item_factors[stage] = torch.from_numpy(np.ascontiguousarray(model.item_factors))
        return self

    def stage_user_vectors(self, users: np.ndarray, stage: str) -> torch.Tensor:
        return self.user_factors[stage][torch.from_numpy(np.asarray(users, dtype=np.int64))]

    def score(self, users: np.ndarray, stage: str) -> torch.Tensor:
        return self.stage_user_vectors(users, stage) @ self.item_factors[stage].T  # (B, N)

    def user_vectors(self, users: np.ndarray, weights: Mapping[str, float]) -> torch.Tensor:
        """[w_1 u_1, ..., w_S u_S]: with item_vectors' [v_1, ..., v_S], one search ranks by sum_k w_k <u_k, v_k>."""
        if not any(weights.values()):
            raise ValueError(f"all objective weights are zero: {dict(weights)}")
        return torch.cat([float(weights.get(s, 0.0)) * self.stage_user_vectors(users, s) for s in self.user_factors], 1)

    def item_vectors(self) -> torch.Tensor:
        return torch.cat([self.item_factors[s] for s in self.user_factors], dim=1)  # (N, S * factors)

    def vectors_per_item(self) -> int:
        return len(self.item_factors)

    def num_params(self) -> int:
        return int(sum(u.numel() + self.item_factors[s].numel() for s, u in self.user_factors.items()))

    def settings(self) -> dict:
        return {stage: asdict(s) for stage, s in self.stage_settings.items()}

    def save(self, folder) -> Path:
        state = {f"user/{s}": u for s, u in self.user_factors.items()}
        state |= {f"item/{s}": v for s, v in self.item_factors.items()}
        meta = {"settings": self.settings(), "seed": self.seed, "num_threads": self.num_threads}
        return write_model(folder, "als", meta, state)

    @classmethod
    def load(cls, folder) -> ALS:
        meta, state, _, _ = read_model(folder, "als")
        out = cls({s: ALSSettings(**v) for s, v in meta["settings"].items()}, meta["seed"], meta["num_threads"])
        out.user_factors = {s: state[f"user/{s}"] for s in meta["settings"]}
        out.item_factors = {s: state[f"item/{s}"] for s in meta["settings"]}
        return out
