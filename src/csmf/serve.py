"""`csmf serve`: top-k recommendations over HTTP with per-request objective weights.

The weights of a request are folded into the user's query vector (q = u * lambda), so every weighting is
one search of the same index. Per-objective scores of the returned items are exact inner products over
each objective's dimension groups, so a client sees why an item ranks where it does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from csmf.export import Artifact
from csmf.index import Index

MAX_K = 1000


class RequestError(ValueError):
    """A request field with a bad value: `field` names it (the HTTP layer answers 422)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class UnknownUser(KeyError):
    def __init__(self, user_id: str):
        super().__init__(user_id)
        self.user_id = user_id


def parse_weights(text: str, stages: tuple[str, ...]) -> dict[str, float]:
    """'click:0.3,purchase:0.7' -> {click: 0.3, purchase: 0.7}; stages not named get weight 0."""
    weights: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition(":")
        if not sep:
            raise RequestError("weights", f"{part!r} is not stage:weight (e.g. {stages[-1]}:0.7)")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise RequestError("weights", f"weight of {name.strip()!r} is not a number: {value!r}") from None
    return weights


def check_weights(weights: dict[str, float], stages: tuple[str, ...]) -> dict[str, float]:
    if not weights:
        raise RequestError("weights", f"give at least one stage:weight; stages are {list(stages)}")
    for name, w in weights.items():
        if name not in stages:
            raise RequestError("weights", f"unknown stage {name!r}; stages are {list(stages)}")
        if not math.isfinite(w) or w < 0:
            raise RequestError("weights", f"weight of {name!r} must be finite and >= 0, got {w}")
    if not any(weights.values()):
        raise RequestError("weights", "all weights are zero: nothing to rank by")
    return {s: float(weights.get(s, 0.0)) for s in stages}


@dataclass
class Recommendation:
    user_id: str
    items: list[dict]
    weights: dict[str, float]
    fallback: bool
    seconds: float


class Recommender:
    """An artifact plus an index: user id + weights -> ranked items with per-objective and fused scores."""

    def __init__(self, artifact: Artifact, index: Index, popularity_fallback: bool = False):
        self.artifact, self.index, self.popularity_fallback = artifact, index, popularity_fallback
        self.user_rows = {u: i for i, u in enumerate(artifact.user_ids)}
        self.masks = np.stack([artifact.objective_mask(s) for s in artifact.stages])  # (S, D)
        self.popular = np.argsort(-artifact.popularity, kind="stable")

    @property
    def stages(self) -> tuple[str, ...]:
        return self.artifact.stages

    def info(self) -> dict:
        a = self.artifact
        return {
            "stages": list(a.stages),
            "default_weights": a.default_weights,
            "index": self.index.kind,
            "items": len(a.item_ids),
            "users": len(a.user_ids),
            "dim": a.dim,
            "dimension_groups": a.manifest["dimension_groups"],
            "popularity_fallback": self.popularity_fallback,
        }

    def search_vector(self, vector: list[float], k: int) -> list[dict]:
        q = np.asarray(vector, dtype=np.float32)
        if q.shape != (self.artifact.dim,):
            raise RequestError("vector", f"must have {self.artifact.dim} numbers, got {q.size}")
        if not np.isfinite(q).all():
            raise RequestError("vector", "must hold finite numbers only")
        if not 1 <= k <= MAX_K:
            raise RequestError("k", f"must be between 1 and {MAX_K}, got {k}")
        scores, rows = self.index.search(q[None, :], k)
        hits = zip(scores[0], rows[0], strict=True)
        return [{"item_id": self.artifact.item_ids[r], "score": float(s)} for s, r in hits if r >= 0]

    def sample_users(self, limit: int) -> list[str]:
        activity = np.diff(self.artifact.seen_indptr)
        return [self.artifact.user_ids[i] for i in np.argsort(-activity, kind="stable")[:limit]]

    def query_vectors(self, rows: np.ndarray, weights: dict[str, float]) -> np.ndarray:
        return self.artifact.user_vectors[rows] * self.artifact.fold(weights)

    def recommend(
        self, user_ids: list[str], k: int, weights: dict[str, float] | None, exclude_seen: bool
    ) -> list[Recommendation]:
        if not 1 <= k <= MAX_K:
            raise RequestError("k", f"must be between 1 and {MAX_K}, got {k}")
        weights = check_weights(weights if weights is not None else self.artifact.default_weights, self.stages)
        t0 = time.perf_counter()
        known = [u for u in user_ids if u in self.user_rows]
        unknown = [u for u in user_ids if u not in self.user_rows]
        if unknown and not self.popularity_fallback:
            raise UnknownUser(unknown[0])
        rows = np.array([self.user_rows[u] for u in known], dtype=np.int64)
        found: dict[str, list[int]] = {}
        if len(rows):
            extra = max((len(self.artifact.seen(r)) for r in rows), default=0) if exclude_seen else 0
            _, top = self.index.search(self.query_vectors(rows, weights), k + extra)
            for u, r, candidates in zip(known, rows, top, strict=True):
                candidates = candidates[candidates >= 0]
                if exclude_seen:
                    candidates = candidates[~np.isin(candidates, self.artifact.seen(r))]
                found[u] = candidates[:k].tolist()
        seconds = time.perf_counter() - t0  # the search itself, shared by the batch
        out = []
        for u in user_ids:
            if u in found:
                items = self._describe(self.user_rows[u], found[u], weights)
            else:
                items = [{"item_id": self.artifact.item_ids[i], "popularity": float(self.artifact.popularity[i])}
                         for i in self.popular[:k]]  # fmt: skip
            out.append(Recommendation(u, items, weights, u not in found, seconds))
        return out

    def _describe(self, row: int, items: list[int], weights: dict[str, float]) -> list[dict]:
        """Each item's per-objective scores s_k = <u * mask_k, v> and the fused sum_k w_k s_k."""
        u, v = self.artifact.user_vectors[row], self.artifact.item_vectors[items]  # (D,), (k, D)
        per_stage = (v * u) @ self.masks.T  # (k, S)
        w = np.array([weights[s] for s in self.stages], dtype=np.float32)
        fused = per_stage @ w
        return [
            {
                "item_id": self.artifact.item_ids[i],
                "score": float(fused[j]),
                "scores": {s: float(per_stage[j, n]) for n, s in enumerate(self.stages)},
            }
            for j, i in enumerate(items)
        ]
