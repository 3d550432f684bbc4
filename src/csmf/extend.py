"""Grow a trained cascade by one objective (`csmf extend`): CPP and AR on its last stage, then the new stage on the
units they free, with AML against the stage before it; every earlier objective but the last scores as before.

Follows the cascade's own schedule (method notes §3-§6, csmf.cascade): a finished cascade over o_1..o_S holds
exactly the first phases of the cascade over o_1..o_S, o_new, so an extension runs that plan's remaining phases,
prune-S, recover-S and train-(S+1), with the same per-phase seeds and checkpoints, in the run folder the cascade
trained in (an interrupted extension resumes like any run). Stages 1..S-1 own their units and no phase here
changes them, so their vectors and scores stay bit-identical; stage S gives up units to the new stage and AR
re-trains what it keeps, so its change is measured (`compare`) and reported.

Room: the cascade frees min_share * D output units for each stage still to come, but a finished cascade's last
stage was pruned for none, so it owns what it was given (on JD 1/8 of D). The extension frees what CPP frees
(cascade.tau) and at least min_share * D, but never more than half of the last stage's output units (PackNet's
share for adding one task), so neither stage is left with a sliver.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from csmf import distributed
from csmf.backbones.base import Backbone
from csmf.cascade import CascadeTrainer
from csmf.checkpoints import load_checkpoint
from csmf.config import (
    Config,
    ConfigError,
    absolute_data_paths,
    config_to_dict,
    override,
    same_training,
    save_config,
)
from csmf.data.datasets import load_dataset
from csmf.data.schema import CascadeData
from csmf.data.stream_history import recent_histories
from csmf.evaluation import evaluate, exclude_rows_, users_with_positives
from csmf.models.csmf import CSMF
from csmf.models.saving import SavedInputs
from csmf.models.teachers import teacher_for
from csmf.phases import Phase, plan, prune
from csmf.runfolder import RunLock, last_checkpoints

logger = logging.getLogger(__name__)
OVERLAP_K = 50  # the top-k whose overlap before and after measures how the previous last objective moved
OVERLAP_USERS = 2000  # at most this many of its test users (a seeded draw)


class ExtensionError(ConfigError):
    """A cascade that cannot be extended as asked; the message says why and what to do."""


def room(model: Backbone, cfg: Config) -> int:
    """The least number of output units the extension frees from the last stage: min_share * D (the reserve
    the cascade keeps for a stage to come), at most half of what that stage owns. 0 = no room (it owns one)."""
    last = int(model.output_owner.max())
    owned = int((model.output_owner == last).sum())
    reserve = max(1, math.ceil(cfg.cascade.min_share * len(model.output_owner) - 1e-9))
    return min(reserve, owned // 2)


class ExtensionTrainer(CascadeTrainer):
    """The cascade over the old objectives and the new one, started after the old cascade's last phase from its
    weights (`base_state`, `base_history`), or resumed from the extension's own checkpoints in `run_dir`."""

    def __init__(self, data: CascadeData, cfg: Config, objectives: tuple[str, ...], base_state: dict[str, torch.Tensor],
                 base_history: list[dict], floor: int, run_dir: str | Path | None = None, progress: bool = False,
                 log: Callable[[str], None] | None = None):  # fmt: skip
        super().__init__(data, cfg, objectives, run_dir, progress, log, teacher=teacher_for(cfg))
        self.first = len(plan(len(objectives) - 1, cfg))  # the first phase the old cascade did not run
        self.base_state, self.base_history, self.floor = base_state, base_history, floor

    def _start(self) -> int:
        path = self.folder.path if self.folder is not None else None
        done = sorted(path.glob("phase-*.pt")) if path is not None and path.exists() else []
        if done and phase_index(done[-1]) >= self.first:  # the extension's own checkpoints: resume as any run
            return super()._start()
        self.model.load_state_dict(self.base_state)
        self.history = [dict(record) for record in self.base_history]
        return self.first

    def _phase(self, phase: Phase, index: int) -> dict:
        if phase.kind != "prune" or index < self.first:
            return super()._phase(phase, index)
        # the old last stage was pruned for no stage to come: free the extension's room (module docstring)
        record = prune(self.model, phase.stage, self.cfg.cascade, len(self.objectives), output_floor=self.floor)
        distributed.broadcast_owners(self.model)
        return {**record, "valid": self.validate(phase.stage)}


def phase_index(path: Path) -> int:
    """phase-NN-<name>.pt -> NN (csmf.runfolder.RunFolder's file names)."""
    return int(path.name.split("-")[1])


def extend_model(model: CSMF, data: CascadeData, stage: str, run_dir: str | Path | None = None,
                 progress: bool = False, log: Callable[[str], None] | None = None,
                 base_history: list[dict] | None = None) -> CSMF:  # fmt: skip
    """Grow a fitted CSMF model's cascade by one objective, keeping the objectives before its last bit-identical.

    Runs the phases a cascade with `stage` last would have run after the model's last stage: CPP on that stage,
    accuracy recovery on what it keeps, then `stage` trains on the units it freed (`room`) with AML against it.
    Every objective but the model's last scores bit-identically in the result; the last gives up units to the new
    one, so its change is what `compare` measures. `model` itself is not changed. `extend_run` is `csmf extend`:
    the same on a run folder, with the before/after report.

    Args:
        model: a fitted (or loaded) masked cascade; naive fine-tuning (`cascade.prune = "none"`) is refused.
        data: the data the model was fit on (the same pairs its stages trained on), holding `stage` as a stage.
        stage: the objective to add, a stage of `data` the model does not serve.
        run_dir: where the extension's phases are checkpointed; an interrupted extension resumes from there.
        progress: show progress bars (on a terminal).
        log: a callable that receives each training line (default: none shown).
        base_history: the phase records of the model's own training, kept at the head of the result's
            (default: `model.phases`).

    Returns:
        A new CSMF serving the model's objectives and then `stage`, with the same vector dimension.

    Raises:
        ExtensionError: the model cannot take `stage` (unfitted, serving it already, no masks, no room) or `data`
            is not the model's; the message says what to do.
    """
    check_extendable(model, stage, data)
    check_same_data(model, data)
    objectives = (*model.trained.objectives, stage)
    cfg = replace(model.cfg, cascade=replace(model.cfg.cascade, objectives=objectives))
    history = model.phases if base_history is None else base_history
    trainer = ExtensionTrainer(data, cfg, objectives, model.model.state_dict(), history, room(model.model, model.cfg),
                               run_dir, progress, log)  # fmt: skip
    grown = CSMF(cfg, objectives, name=model.name)
    grown.trained = trainer.run()
    grown.phases = trainer.history
    grown.inputs = SavedInputs.of(data, trainer.tuning_history, data.context_sizes())
    return grown


def check_extendable(model: CSMF, stage: str, data: CascadeData | None, where: str = "the model") -> None:
    """Refuse (ExtensionError) a model that cannot take `stage`: unfitted, serving it already, trained without
    masks, `stage` not a stage of `data` (None: not checked), or its last stage owning a single output unit."""
    if model.trained is None:
        raise ExtensionError(f"{where} is not fitted: fit it (or CSMF.load a saved one) before extending it")
    objectives = model.trained.objectives
    if stage in objectives:
        raise ExtensionError(f"{where} already serves {stage!r} (stage {objectives.index(stage) + 1} of "
                             f"{' -> '.join(objectives)}): there is nothing to add")  # fmt: skip
    if model.trained.shared or model.cfg.cascade.prune == "none":
        raise ExtensionError(f"{where} was trained with cascade.prune = 'none' (naive fine-tuning): no stage owns "
                             "units of its own, so a new objective could not train without changing the others; "
                             "extend a masked cascade (cascade.prune = 'cpp' or 'fixed')")  # fmt: skip
    if data is not None and stage not in data.stages:
        raise ExtensionError(f"{stage!r} is not a stage of {data.name} (its stages: {', '.join(data.stages)}). "
                             "A cascade grows by a stage of the data it trained on: train with data.stages listing "
                             "it and cascade.objectives leaving it out (csmf train --stages view,favorite,purchase "
                             "--set cascade.objectives=view,purchase), then extend it with that stage")  # fmt: skip
    if room(model.model, model.cfg) < 1:
        owner = model.model.output_owner
        raise ExtensionError(f"{where} has no free room for {stage!r}: its last stage {objectives[-1]!r} owns "
                             f"{int((owner == len(objectives)).sum())} of the D = {len(owner)} output units and keeps "
                             "at least one; train it with a larger model.dim or cascade.min_share, so that the last "
                             "stage owns two or more")  # fmt: skip


def check_same_data(model: CSMF, data: CascadeData) -> None:
    """Refuse data other than the model's: the same users, items and stages, and every history the backbone reads
    (the tuning view its graphs or bags were built from, and the train + side pairs users are scored from) the
    model's own, pair for pair; otherwise the earlier objectives could not score as before."""
    saved = model.inputs
    why = ""
    if (saved.n_users, saved.n_items, tuple(saved.stages)) != (data.n_users, data.n_items, data.stages):
        why = (f"the model's data is {saved.n_users:,} users x {saved.n_items:,} items with stages "
               f"{list(saved.stages)}, this is {data.n_users:,} x {data.n_items:,} with "
               f"{list(data.stages)}")  # fmt: skip
    else:
        tuning, scored = data.tuning_view(), data.train | data.side
        training, scoring = tuning.matrix, lambda b: scored[b]
        if data.stream is not None and saved.tuning_history:
            # a streamed run's bags (training and scoring alike) read every user's bounded history, built from the
            # cache; the data in memory holds only the evaluated users' rows
            cfg = model.cfg
            bounded = recent_histories(data.stream, tuple(saved.tuning_history), cfg.model.history_max, cfg.seed,
                                       cfg.train.stream_buffer_rows)  # fmt: skip
            training = scoring = bounded.__getitem__
        for kind, mats, now in (("training", saved.tuning_history, training),
                                ("scoring", model.trained.history, scoring)):  # fmt: skip
            changed = [b for b, m in mats.items() if b not in data.behaviours or not same_pairs(m, now(b))]
            if changed:
                why = f"the {kind} pairs of {changed} differ from the model's"
                break
    if why:
        raise ExtensionError(f"{data.name} is not the data the model was fit on ({why}): extend it with that data (the "
                             "same log, split and stages)")  # fmt: skip


def same_pairs(a: sp.spmatrix, b: sp.spmatrix) -> bool:
    a, b = sp.csr_matrix(a), sp.csr_matrix(b)
    if a.shape != b.shape or a.nnz != b.nnz:
        return False
    a.sort_indices()
    b.sort_indices()
    return bool(np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)
                and np.array_equal(a.data, b.data))  # fmt: skip


# ----- what the extension changed ---------------------------------------------------------------------------
def compare(before: CSMF, after: CSMF, data: CascadeData, ks: tuple[int, ...], budget_mb: int,
            progress: bool = False) -> dict:  # fmt: skip
    """Test metrics of every objective before and after, whether each earlier objective but the last scores
    bit-identically (its user vectors, item vectors and full-catalogue scores, every user), how far the last one
    moved (its metrics, and the top-50 overlap of its test users' rankings), and the index's shape."""
    old, new = before.trained.objectives, after.trained.objectives
    metrics = {"before": evaluate(before, data, ks, budget_mb, old, progress),
               "after": evaluate(after, data, ks, budget_mb, new, progress)}  # fmt: skip
    change = {}
    for objective in old:
        b, a = metrics["before"].get(objective, {}), metrics["after"].get(objective, {})
        change[objective] = {m: {"before": b[m], "after": a[m], "relative": (a[m] / b[m] - 1) if b[m] else 0.0}
                             for m in b if "@" in m}  # fmt: skip
    before_items, after_items = before.item_vectors(), after.item_vectors()
    return {
        "objectives": {"before": list(old), "after": list(new)},
        "metrics": metrics,
        "change": change,
        "identical": {o: identical_objective(before, after, o, data.n_users) for o in old[:-1]},
        "previous_last": {"objective": old[-1], f"top{OVERLAP_K}_overlap": top_overlap(before, after, old[-1], data)},
        "item_vectors": {"before": list(before_items.shape), "after": list(after_items.shape)},
        "ownership": {"before": before.model.ownership(), "after": after.model.ownership()},
    }


def identical_objective(before: CSMF, after: CSMF, objective: str, n_users: int, chunk: int = 2048) -> dict:
    """Whether `objective` is bit-identical in the two models (torch.equal): its item vectors (the item matrix on the
    dimensions it scores with), every user's query vector for it alone, and every user's scores over the catalogue."""
    k = before.trained.stage_number(objective)
    same = {"item_vectors": torch.equal(before.item_vectors() * before.model.group_mask(k),
                                        after.item_vectors() * after.model.group_mask(k)),  # (N, D) each
            "user_vectors": True, "scores": True}  # fmt: skip
    for start in range(0, n_users, chunk):
        users = np.arange(start, min(start + chunk, n_users))
        same["user_vectors"] &= torch.equal(before.user_vectors(users, {objective: 1.0}),
                                            after.user_vectors(users, {objective: 1.0}))  # fmt: skip
        same["scores"] &= torch.equal(before.score(users, objective), after.score(users, objective))  # (B, N)
    return same


def top_overlap(before: CSMF, after: CSMF, objective: str, data: CascadeData, seed: int = 0) -> float | None:
    """Mean share of the top-50 (unseen items, as evaluation ranks them) that the two models' `objective` rankings
    share, over its test users (a seeded draw of at most OVERLAP_USERS); None without test users."""
    users = users_with_positives(data.test[objective]) if objective in data.test else np.zeros(0, dtype=np.int64)
    if len(users) == 0:
        return None
    if len(users) > OVERLAP_USERS:
        users = np.sort(np.random.default_rng(seed).choice(users, OVERLAP_USERS, replace=False))
    excluded, shares = data.excluded(objective), []
    k = min(OVERLAP_K, data.n_items)
    for start in range(0, len(users), 512):
        batch = users[start : start + 512]
        tops = []
        for model in (before, after):
            scores = exclude_rows_(model.score(batch, objective).clone(), excluded, batch)  # (B, N)
            tops.append(torch.topk(scores, k, dim=1).indices.numpy())
        shares += [len(np.intersect1d(a, b)) / k for a, b in zip(*tops, strict=True)]
    return round(float(np.mean(shares)), 4)


def describe(report: dict, metric: str = "recall@50") -> list[str]:
    """The report in lines: each objective's metric before -> after, and what stayed bit-identical."""
    lines, after = [], report["metrics"]["after"]
    n_at = metric.replace("recall", "ndcg")
    for objective in report["objectives"]["after"]:
        a = after.get(objective, {})
        if objective not in report["change"]:
            lines.append(f"  {objective} (new): {metric} {a.get(metric, float('nan')):.4f}  {n_at} "
                         f"{a.get(n_at, float('nan')):.4f}")  # fmt: skip
            continue
        parts = [f"{m} {c['before']:.4f} -> {c['after']:.4f} ({100 * c['relative']:+.2f}%)"
                 for m, c in report["change"][objective].items() if m in (metric, n_at)]  # fmt: skip
        same = report["identical"].get(objective)
        if same is not None:
            note = "bit-identical" if all(same.values()) else f"NOT bit-identical: {same}"
        else:
            overlap = report["previous_last"][f"top{OVERLAP_K}_overlap"]
            note = f"the previous last stage: top-{OVERLAP_K} overlap {overlap}"
        lines.append(f"  {objective}: " + "  ".join(parts) + f"  ({note})")
    shape = report["item_vectors"]
    lines.append(f"  item vectors: {' x '.join(map(str, shape['before']))} before, "
                 f"{' x '.join(map(str, shape['after']))} after")  # fmt: skip
    return lines


# ----- a run folder (csmf extend) ---------------------------------------------------------------------------
def extend_run(run: str | Path, stage: str, sets: Sequence[str] = (), progress: bool = False,
               log: Callable[[str], None] = logger.info) -> dict:  # fmt: skip
    """Grow the model of a finished `csmf train` run folder by the objective `stage`, in place: the extension's
    phases are checkpointed beside the run's own (interrupted, it resumes), the grown model replaces <run>/model
    (the one before is kept in <run>/model-before-<stage>), config.toml and metrics.json describe it, and
    <run>/extend-<stage>.json reports what changed (`compare`), the data fingerprint and the wall times.
    sets: data settings (data.dataset=..., as --dataset) when the log has moved; other data is refused."""
    run = Path(run)
    if not (run / "model" / "model.pt").exists():
        finish = (f"finish it first: csmf train --config {run / 'config.toml'} --out {run}"
                  if (run / "config.toml").exists() else "give the folder csmf train --out wrote")  # fmt: skip
        raise ExtensionError(f"{run}: no saved model (model/model.pt), so its training has not finished; {finish}")
    with RunLock(run):  # no csmf train (or another extension) writes the folder meanwhile
        return _extend_run(run, stage, sets, progress, log)


def _extend_run(run: Path, stage: str, sets: Sequence[str], progress: bool, log: Callable[[str], None]) -> dict:
    start = time.perf_counter()
    before = CSMF.load(run / "model")
    if stage in before.trained.objectives:  # refused before the data loads (a rerun of a finished extension)
        check_extendable(before, stage, None, where=str(run))
    cfg = absolute_data_paths(override(before.cfg, list(sets)))
    data = load_dataset(cfg, progress=progress)
    check_extendable(before, stage, data, where=str(run))
    folder, meta = checkpoints_of(run, before, stage)
    if meta["data"] != data.fingerprint():
        raise ExtensionError(f"{folder}: the run's stages trained on data of fingerprint {meta['data']}, and "
                             f"the data loaded now ({data.name}) has {data.fingerprint()}: a stage added on other "
                             "data would not share the earlier stages' pairs. Extend with the data the run trained "
                             f"on (the [data] section of {run / 'config.toml'}; drop --dataset/--stages)")  # fmt: skip
    log(data.summary())
    log(f"extending {' -> '.join(before.trained.objectives)} with {stage} (checkpoints in {folder})")
    base_history = meta["history"] if tuple(meta["objectives"]) == before.trained.objectives else before.phases
    after = extend_model(before, data, stage, folder, progress, log, base_history=base_history)
    trained_at = time.perf_counter()
    report = compare(before, after, data, cfg.eval.ks, cfg.eval.score_budget_mb, progress)
    new_phases = after.phases[len(plan(len(before.trained.objectives), before.cfg)) :]
    report |= {
        "run": str(run),
        "stage": stage,
        "dataset": data.name,
        "data_fingerprint": data.fingerprint(),
        "room": {
            "floor_units": room(before.model, before.cfg),
            "freed_units": new_phases[0]["bound"]["output"]["freed_units"] if new_phases else None,
        },  # fmt: skip
        "phases": new_phases,
        "train_seconds": round(sum(p["seconds"] for p in new_phases), 2),  # the extension's phases (resumed ones too)
        "wall_seconds": round(trained_at - start, 2),  # this call: loading, training (what was left), no evaluation
        "eval_seconds": round(time.perf_counter() - trained_at, 2),
    }
    _write(run, stage, before, after, report)
    moved = f"{report['room']['freed_units']} output units went from {before.trained.objectives[-1]} to {stage}"
    log(f"\nextended in {report['train_seconds']:.1f}s of training ({report['wall_seconds']:.1f}s this call); {moved}")
    log("test metrics before -> after (full catalogue):")
    for line in describe(report):
        log(line)
    log(f"wrote {run / f'extend-{stage}.json'}; {run / 'model'} is the grown model (csmf export serves it)")
    return report


def checkpoints_of(run: Path, model: CSMF, stage: str) -> tuple[Path, dict]:
    """The run folder under <run>/checkpoints holding the model's training (a search writes one per candidate) and
    the metadata of its last phase: the model's last phase, or one of this extension's (it resumes). Refuses
    (ExtensionError) an unfinished training and an extension by another stage that has not finished."""
    objectives = model.trained.objectives
    grown = (*objectives, stage)
    grown_cfg = config_to_dict(replace(model.cfg, cascade=replace(model.cfg.cascade, objectives=grown)))
    n_phases = len(plan(len(objectives), model.cfg))
    for path in last_checkpoints(run / "checkpoints"):
        meta = load_checkpoint(path)[1]
        held = tuple(meta.get("objectives", ()))
        if held == objectives and same_training(meta["config"], config_to_dict(model.cfg)):
            if meta["phase"] + 1 < n_phases:
                raise ExtensionError(f"{path.parent}: the run's training stopped after phase {meta['phase'] + 1} of "
                                     f"{n_phases}; finish it first: csmf train --config {run / 'config.toml'} --out "
                                     f"{run}")  # fmt: skip
            return path.parent, meta
        if held[: len(objectives)] == objectives and len(held) == len(objectives) + 1:
            if held[-1] != stage:
                raise ExtensionError(f"{path.parent}: an extension by {held[-1]!r} has not finished; finish it first "
                                     f"(csmf extend --run {run} --stage {held[-1]}), or remove its phase files "
                                     f"(phase-{n_phases:02d}-* and after) to drop it")  # fmt: skip
            if same_training(meta["config"], grown_cfg):
                return path.parent, meta
    raise ExtensionError(f"{run / 'checkpoints'} holds no checkpoints of the saved model's training (objectives "
                         f"{list(objectives)}), which the extension continues; retrain the run: csmf train --config "
                         f"{run / 'config.toml'} --out {run}")  # fmt: skip


def _write(run: Path, stage: str, before: CSMF, after: CSMF, report: dict) -> None:
    """The report, then the grown model in place of the old one (kept beside it), its config and metrics.json."""
    (run / f"extend-{stage}.json").write_text(json.dumps(report, indent=2, default=float))
    staging, kept = run / f"model-{stage}.partial", run / f"model-before-{stage}"
    for folder in (staging, kept):
        if folder.exists():
            shutil.rmtree(folder)
    after.save(staging)
    os.replace(run / "model", kept)  # two renames: <run>/model is always a whole model, the old or the new
    os.replace(staging, run / "model")
    save_config(after.cfg, run / "config.toml")
    summary_path = run / "metrics.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.update(
        metrics=report["metrics"]["after"], ownership=after.model.ownership(), phases=after.phases,
        config=config_to_dict(after.cfg), params=after.num_params(), vector_dim=int(after.item_vectors().shape[1]),
        extended=[*summary.get("extended", []), {"stage": stage, "train_seconds": report["train_seconds"],
                                                 "report": f"extend-{stage}.json"}],
    )  # fmt: skip
    summary_path.write_text(json.dumps(summary, indent=2, default=float))
