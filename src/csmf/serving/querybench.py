"""`csmf querybench`: what per-request objective weights cost at query time, measured in one run.

Over a synthetic catalogue (default 1M items, D = 64, the exact index), for one batch of queries:
  single    one single-objective query per user: one search of the CSMF index
  fused     per-request weights: fold them into the query (q = u * lambda), then the same one search
  per-index the way single-objective towers must serve a fused query: one search per objective index
            (S indexes of N items), then every candidate rescored with every objective and re-ranked
The ratios fused / single and per-index / single are the result. With --artifact, HNSW (M, efSearch)
is also measured against exact on the artifact's items and users' fused queries: recall@50 and speed-up.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from csmf.fusion import fold_weights
from csmf.serving.index import IndexSettings, build_index, recall_against
from csmf.timing import timed

logger = logging.getLogger(__name__)


def fusion_cost(
    n_items: int = 1_000_000, dim: int = 64, stages: int = 2, users: int = 256, k: int = 50, repeats: int = 5, seed=0
) -> dict:
    rng = np.random.default_rng(seed)
    items = rng.standard_normal((n_items, dim), dtype=np.float32)
    raw = rng.standard_normal((users, dim), dtype=np.float32)
    owner = np.repeat(np.arange(1, stages + 1), int(np.ceil(dim / stages)))[:dim]  # dimension groups per stage
    weights = rng.random(stages).astype(np.float32) + 0.1
    lam = fold_weights(owner, {s + 1: w for s, w in enumerate(weights)})
    index = build_index(items)
    stacked = [rng.standard_normal((n_items, dim), dtype=np.float32) for _ in range(stages)]  # one tower each
    per_objective = [build_index(vectors) for vectors in stacked]

    def single():
        return index.search(raw, k)

    def fused():
        return index.search(raw * lam, k)

    def per_index():
        found = [ix.search(raw, k)[1] for ix in per_objective]  # S searches, top-k each
        out = []
        for u in range(users):  # rescore the union of candidates with every objective, keep the best k
            cand = np.unique(np.concatenate([f[u] for f in found]))
            score = sum(w * (stacked[s][cand] @ raw[u]) for s, w in enumerate(weights))
            out.append(cand[np.argsort(-score)[:k]])
        return out

    t_single = timed(single, repeats)
    t_fused = timed(fused, repeats)
    t_per_index = timed(per_index, repeats)
    return {
        "items": n_items,
        "dim": dim,
        "objectives": stages,
        "users_per_batch": users,
        "k": k,
        "repeats": repeats,
        "single_seconds": t_single,
        "fused_seconds": t_fused,
        "per_index_seconds": t_per_index,
        "fused_over_single": t_fused / t_single,
        "per_index_over_single": t_per_index / t_single,
    }


def hnsw_quality(artifact_path: str | Path, m: int = 32, ef_search: int = 128, users: int = 1024, k: int = 50) -> dict:
    from csmf.serving.artifact import load_artifact

    artifact = load_artifact(artifact_path)
    rows = np.random.default_rng(0).choice(len(artifact.user_ids), min(users, len(artifact.user_ids)), replace=False)
    queries = artifact.user_vectors[rows] * artifact.fold(
        {s: float(artifact.default_weights.get(s, 0.0)) for s in artifact.stages}
    )
    t0 = time.perf_counter()
    exact = build_index(artifact.item_vectors)
    hnsw = build_index(artifact.item_vectors, IndexSettings(kind="hnsw", hnsw_m=m, hnsw_ef_search=ef_search))
    build_seconds = time.perf_counter() - t0
    t_exact = timed(lambda: exact.search(queries, k), 5)
    t_hnsw = timed(lambda: hnsw.search(queries, k), 5)
    return {
        "items": len(artifact.item_ids),
        "queries": len(rows),
        "m": m,
        "ef_search": ef_search,
        "recall_at_50": recall_against(exact, hnsw, queries, k),
        "exact_seconds": t_exact,
        "hnsw_seconds": t_hnsw,
        "speedup": t_exact / t_hnsw,
        "build_seconds": build_seconds,
    }


def run_querybench(
    out: str | Path,
    n_items: int,
    users: int,
    artifact: str | None,
    log=logger.info,
    hnsw_m: int = 32,
    ef_search: int = 128,
) -> dict:
    result = {"fusion": fusion_cost(n_items=n_items, users=users)}
    f = result["fusion"]
    log(f"fused top-50 over {f['items']:,} items: {f['fused_over_single']:.3f}x a single-objective query; "
        f"one index per objective: {f['per_index_over_single']:.2f}x")  # fmt: skip
    if artifact:
        result["hnsw"] = h = hnsw_quality(artifact, m=hnsw_m, ef_search=ef_search)
        log(f"HNSW (M {h['m']}, efSearch {h['ef_search']}) on {h['items']:,} items: recall@50 {h['recall_at_50']:.4f} "
            f"against exact, {h['speedup']:.2f}x faster")  # fmt: skip
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    log(f"wrote {out}")
    return result
