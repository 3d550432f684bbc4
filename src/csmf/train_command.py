"""`csmf train`: train CSMF end to end into a run directory, evaluate every objective, and show one
user's top-k under different objective weightings (one query vector each, one item matrix).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from csmf import distributed
from csmf.config import Config, config_to_dict, save_config
from csmf.data.errors import DataError
from csmf.data.schema import CascadeData
from csmf.evaluation import evaluate, metric_values
from csmf.models.csmf import CSMF
from csmf.refresh import Refresh
from csmf.runfolder import refuse_other_data
from csmf.selection import pins, select
from csmf.tracking import Tracker

logger = logging.getLogger(__name__)


def default_weightings(stages: tuple[str, ...]) -> list[dict[str, float]]:
    """Two contrasting scenarios: the first objective leads, then the last one leads."""
    first = {s: (1.0 if n == 0 else 0.1) for n, s in enumerate(stages)}
    last = {s: (1.0 if n == len(stages) - 1 else 0.1) for n, s in enumerate(stages)}
    return [first, last]


def pick_user(data: CascadeData) -> int:
    """A user with test positives of the last objective (else of any objective) and the longest train history:
    a readable demo. check_test_split has made sure some stage has a test pair."""
    held = np.diff(data.test[data.stages[-1]].indptr) > 0
    if not held.any():  # the last stage held nothing out: a user with any test pair still shows hits
        held = sum(np.diff(data.test[s].indptr) for s in data.stages) > 0
    candidates = np.flatnonzero(held)
    history = sum(np.diff(data.matrix(b).indptr) for b in data.behaviours)
    return int(candidates[np.argmax(history[candidates])])


def check_test_split(data: CascadeData, cfg: Config) -> None:
    """Refuse before training a split that holds out no test pair in any stage: training would end with
    nothing to evaluate and no user to show."""
    if any(data.test[s].nnz for s in data.stages):
        return
    d = cfg.data
    if d.cache_dir:  # the cache splits each (user, item) pair by a seeded hash (csmf.data.sources.pair_split)
        why = f"data.test_frac = {d.test_frac} of the pairs drew none: raise data.test_frac or use a larger log"
    else:  # split_log holds out a share of each user's pairs, and keeps a user's only pair in training
        pairs = np.diff(sum(data.train[s] for s in data.stages).tocsr().indptr)  # distinct items per user
        several = int((pairs >= 2).sum())
        why = (f"data.split = {d.split!r} holds out pairs only of users with 2 or more, and {several:,} of "
               f"{data.n_users:,} users have 2 or more: use a log with more rows per user")  # fmt: skip
    raise DataError(f"{data.name}: the split leaves no test pair in any stage, so training would end with nothing to "
                    f"evaluate ({why})")  # fmt: skip


def top_k_table(model: CSMF, data: CascadeData, user: int, weights: dict[str, float], k: int = 10) -> str:
    users = np.array([user])
    stages = model.served(data)  # the objectives it trained (cascade.objectives may leave a stage of the data out)
    fused = model.score_fused(users, weights)[0].clone()  # (N,)
    seen = data.excluded(stages[-1])[user].indices
    fused[torch.from_numpy(seen.astype(np.int64))] = float("-inf")  # already bought: not recommended
    top = torch.topk(fused, min(k, fused.shape[-1])).indices.numpy()
    per_stage = {s: model.score(users, s)[0, top].numpy() for s in stages}
    truth = {s: set(data.test[s][user].indices.tolist()) for s in stages}
    item_ids = data.item_ids if data.item_ids is not None else np.arange(data.n_items)
    head = "| rank | item | " + " | ".join(f"{s} score" for s in stages) + " | fused | in test |"
    lines = [head, "|---:|---|" + "---:|" * (len(stages) + 1) + "---|"]
    for rank, item in enumerate(top, start=1):
        hits = ",".join(s for s in stages if item in truth[s]) or ""
        scores = " | ".join(f"{per_stage[s][rank - 1]:.3f}" for s in stages)
        lines.append(f"| {rank} | {item_ids[item]} | {scores} | {float(fused[item]):.3f} | {hits} |")
    return "\n".join(lines)


def train_and_report(
    cfg: Config,
    data: CascadeData,
    out: str | Path,
    weightings: list[dict[str, float]] | None = None,
    user: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = logger.info,
    pinned: dict | None = None,
    refresh: Refresh | None = None,
) -> dict:
    """Train (choosing among select.candidates on validation; `pinned`: the keys the user fixed, default every
    value off the defaults: csmf.selection.pins), save the model, evaluate on test, write metrics.json. The curves
    go to <out>/tensorboard and, with track.mlflow_uri, to an MLflow run with the saved model (csmf.tracking).
    `refresh`: warm-start from a finished run instead (csmf.refresh; `data` as its `align` returned it), no search."""
    main = distributed.ranks().main  # the other ranks record nothing
    with Tracker.open(Path(out) / "tensorboard", cfg, str(out)) if main else Tracker.off() as tracker:
        return _train_and_report(cfg, data, Path(out), weightings, user, progress, log, pinned, tracker, refresh)


def _train_and_report(cfg: Config, data: CascadeData, out: Path, weightings: list[dict[str, float]] | None,
                      user: int | None, progress: bool, log: Callable[[str], None], pinned: dict | None,
                      tracker: Tracker, refresh: Refresh | None = None) -> dict:  # fmt: skip
    check_test_split(data, cfg)  # before any phase trains or an earlier run's file is replaced
    ranks = distributed.ranks()  # several training processes: all train and evaluate, rank 0 writes and reports
    if not ranks.main:
        progress, log = False, lambda _msg: None
    refuse_other_data(out / "checkpoints", data.fingerprint())  # before any file of the earlier run is replaced
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.toml")
    distributed.barrier()
    log(data.summary())
    start = time.perf_counter()

    keys = set(pins(cfg) if pinned is None else pinned)  # what the catalogue's size must not change either

    def fit(candidate: Config, tag: str) -> CSMF:
        checkpoints = out / "checkpoints" / tag if tag else out / "checkpoints"
        part = tracker.child(tag) if tag else tracker  # each candidate's curves apart
        if refresh is not None:  # a warm start on the run's model: nothing to search
            return refresh.fit(data, candidate, checkpoints, progress=progress, log=log, tracker=part)
        return CSMF(candidate, run_dir=str(checkpoints), progress=progress, log=log, pinned=keys,
                    tracker=part).fit(data)  # fmt: skip

    if cfg.select.candidates and refresh is None:
        model, cfg, selection = select(cfg, data, fit, pinned, log)
    else:
        model, selection = fit(cfg, ""), None
    seconds = time.perf_counter() - start
    cfg = model.cfg  # what was trained: the pick, as the catalogue's size adapted it (csmf.rules.fit_to_size)
    if ranks.main:
        save_config(cfg, out / "config.toml")  # what was trained: the pick, when candidates were searched
        model.save(out / "model")  # what `csmf export` and CSMF.load read: no data loading, no trainer
    metrics = evaluate(
        model, data, cfg.eval.ks, cfg.eval.score_budget_mb, model.served(data), progress=progress, shard=ranks
    )
    if not ranks.main:
        return {"metrics": metrics}
    tracker.test({stage: metric_values(m) for stage, m in metrics.items()})
    tracker.artifact(out / "model")
    vector_dim = int(model.item_vectors().shape[1])
    if selection and len(selection["trials"]) > 1:
        log(f"\n{selection['pick']!r} chosen on validation ({selection['metric']}): "
            + ", ".join(f"{t['candidate']!r} {t['mean']:.4f}" for t in selection["trials"]))  # fmt: skip
    log(f"\ntrained in {seconds:.1f}s; {model.num_params():,} parameters; one item vector of dimension {vector_dim}")
    log("ownership (share of units per stage; 0 = free): " + json.dumps(model.model.ownership()))
    log("\ntest metrics (full catalogue):")
    for stage, m in metrics.items():
        log(f"  {stage}: " + "  ".join(f"{k} {v:.4f}" for k, v in m.items() if "@" in k) + f"  ({m['users']} users)")
    unheld = [s for s in model.served(data) if s not in metrics]
    if unheld:  # evaluation skips a stage with no test pair: say so rather than print nothing for it
        log(f"  note: no test metrics for {', '.join(map(repr, unheld))}: the split holds out no test pair there")
    user = pick_user(data) if user is None else user
    uid = data.user_ids[user] if data.user_ids is not None else user
    for weights in weightings or default_weightings(model.served(data)):
        log(f"\ntop-10 for user {uid} with weights {weights}:")
        log(top_k_table(model, data, user, weights))
    summary = {
        "dataset": data.name,
        "seed": cfg.seed,
        "train_seconds": round(seconds, 2),
        "params": model.num_params(),
        "vector_dim": vector_dim,
        "metrics": metrics,
        "ownership": model.model.ownership(),
        "phases": model.phases,
        "config": config_to_dict(cfg),
        "selection": selection,
        "processes": ranks.world,
        **({"refresh": refresh.record} if refresh is not None else {}),  # the run it started from, its id maps
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary
