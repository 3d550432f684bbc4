"""Choosing CSMF's configuration on validation, as the benchmark tunes ALS and item-kNN (issue 25).

No encoder wins on every log: the graph encoder leads on sparse JD, the MLP encoder on a denser log. So a run
fits each candidate of `select.candidates` (a preset plus settings, e.g. "graph model.graph_hops=1") and keeps
the one with the best mean validation metric over the objectives (`eval.tune_metric`, on the validation pairs
only: the test pairs are never read). The kept candidate is the model: nothing is refit.

Pinning: every key the user set (a --config file, --set, or any value that differs from the defaults) holds in
every candidate, so `--set model.encoder=mlp` leaves only MLP candidates and `--config mlp` pins them all into
one (no search). A variant ("graph model.graph_hops=1") is not fit when its bare preset, fit before it, scored
more than `select.variant_gap` below the best so far. The search stops starting candidates when the mean fit so far
would pass `select.budget_s`;
the pick is stored by data fingerprint and candidate list, and a later run on the same data trains the pick
alone and says so (`select.reuse`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from csmf.config import (
    SCALE_ITEMS,
    Config,
    ConfigError,
    config_to_dict,
    leaves,
    load_config,
    override,
    read_leaves,
    training_part,
    with_values,
)
from csmf.data.schema import CascadeData
from csmf.evaluation import evaluate_stage
from csmf.retriever import Retriever
from csmf.usercache import user_cache

logger = logging.getLogger(__name__)

# Past SCALE_ITEMS the search first tries the stream preset's encoder in memory: the MLP with user-ID rows and no
# history bags. On the 2.2M-row simulator (194k items) it scored test R@50 0.055 / 0.060 / 0.069 in one streamed
# epoch a stage against 0.032 / 0.041 / 0.052 for the graph encoder, and it costs a fraction of a graph fit, which
# alone spent select.budget_s there, so the default candidates never reached an MLP (docs/method.md)
SCALE_CANDIDATE = "mlp model.history=false model.user_id=true"

# sections a candidate may not change: where the data comes from, how it is judged, what runs and records the search
_FIXED = ("seed", "data.", "sim.", "eval.", "select.", "bench.", "serve.", "runtime.", "track.")


@dataclass(frozen=True)
class Candidate:
    name: str  # as written in select.candidates
    cfg: Config  # the candidate with the user's pins applied


def pins(cfg: Config, named: Iterable[str] = ()) -> dict[str, Any]:
    """The keys a user fixed: every value of `cfg` that differs from the defaults, and the keys in `named` (set
    explicitly, perhaps to the default value)."""
    given, default = leaves(cfg), leaves(Config())
    named = set(named)
    return {k: v for k, v in given.items() if k in named or default.get(k) != v}


def candidates(cfg: Config, pinned: dict[str, Any]) -> list[Candidate]:
    """The distinct candidates of cfg.select.candidates with `pinned` applied (their order kept). A candidate is
    defined by the keys its preset and settings name: one whose definition a pin contradicts is dropped (with
    `--set model.encoder=mlp` no graph candidate is left); when every candidate is dropped, the user's own
    configuration is the one candidate."""
    out, seen, default = [], set(), leaves(Config())
    # every candidate shares the run's data, evaluation and search settings, including those a rule set without the
    # user (csmf bench caps the baselines' tuning past 100,000 items): the pick's configuration goes on to them
    shared = {k: v for k, v in leaves(cfg).items() if k.startswith(_FIXED)}
    for text in cfg.select.candidates:
        preset, *settings = text.split()
        try:
            base = override(load_config(preset), settings)
            defining = set(read_leaves(preset)) | {a.split("=", 1)[0].strip() for a in settings}
        except ConfigError as err:
            raise ConfigError(f"select.candidates: {text!r}: {err}") from None
        values = leaves(base)
        moved = [k for k, v in values.items() if k.startswith(_FIXED) and default.get(k) != v]
        if moved:
            raise ConfigError(f"select.candidates: {text!r} sets {moved}; a candidate sets the model, not the data, "
                              "the evaluation or the search")  # fmt: skip
        if any(k in pinned and pinned[k] != values.get(k) for k in defining):
            continue
        chosen = with_values(base, {**shared, **pinned})
        key = json.dumps(config_to_dict(chosen), sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(Candidate(text, chosen))
    return out or [Candidate("as configured", cfg)]


def validation_score(model: Retriever, data: CascadeData, cfg: Config) -> dict[str, float]:
    """eval.tune_metric of each objective with validation pairs, on the validation split (the tuning view), the
    users scored from the history without the validation fold (CSMF.validation_view: a fitted model's own
    history holds the validation pairs, and a history-bag encoder would find them there)."""
    tuning = data.tuning_view()
    scorer = model.validation_view() if hasattr(model, "validation_view") else model
    out = {}
    # the objectives it trained (cascade.objectives may leave a stage out); a bare scorer is asked for every stage
    for stage in model.served(data) if hasattr(model, "served") else data.stages:
        if stage in data.valid and data.valid[stage].nnz > 0:
            result = evaluate_stage(scorer, tuning, stage, cfg.eval.ks, cfg.eval.score_budget_mb,
                                    sample=cfg.eval.valid_users, seed=cfg.seed)  # fmt: skip
            out[stage] = round(float(result[cfg.eval.tune_metric]), 6)
    return out


# picks made on the data shipped inside the package, by the same code and default candidates, so the README's main
# job trains its pick at once; found by the same key as a user's stored pick (tests/test_selection.py keeps it
# current), and never in place of one the user's own cache holds
SHIPPED = Path(__file__).parent / "datasets" / "selections"


def store_path(cfg: Config, data: CascadeData, found: list[Candidate]) -> Path:
    """Where the pick for this data and these candidates is kept (the seed is not part of the key: a pick made
    with one seed serves the others, as the benchmark tunes ALS with the first seed)."""
    root = Path(cfg.select.store_dir) if cfg.select.store_dir else user_cache("selections")
    digest = hashlib.sha256(data.fingerprint().encode())
    for c in found:  # what decides the candidates' weights: not where the data lies, not the harness
        part = training_part(config_to_dict(replace(c.cfg, seed=0)))
        part.pop("select", None)  # how the search runs, not what it compares
        part.pop("multitask", None)  # the multi-task baselines' settings: no candidate's fit reads them
        digest.update(json.dumps(part, sort_keys=True).encode())
    return Path(root) / f"{digest.hexdigest()[:32]}.json"


def select(
    cfg: Config,
    data: CascadeData,
    fit: Callable[[Config, str], Retriever],
    pinned: dict[str, Any] | None = None,
    log: Callable[[str], None] = logger.info,
    fit_stored: bool = True,
) -> tuple[Retriever | None, Config, dict]:
    """Fit the candidates with `fit(config, tag)`, keep the best on validation: (model, its config, record). The
    tag names the candidate when several are fit (a checkpoint folder each), "" when one model is trained.
    `fit_stored=False`: a stored pick is returned unfitted (model None), for a caller that needs only the config.

    The record (results files and reports) holds the metric, every trial (per-objective validation values,
    mean, seconds), the candidates skipped by the budget and the variants dropped behind their preset, the pick, and
    whether a stored pick was reused."""
    pinned = pins(cfg) if pinned is None else pinned
    found = candidates(scale_candidates(cfg, data.n_items, pinned, log), pinned)
    metric = f"mean validation {cfg.eval.tune_metric} over the objectives"
    record: dict[str, Any] = {"metric": metric, "candidates": [c.name for c in found], "budget_s": cfg.select.budget_s,
                              "trials": [], "skipped": [], "dropped": [], "variant_gap": cfg.select.variant_gap,
                              "reused": None}  # fmt: skip
    if len(found) == 1:
        record["pick"] = found[0].name
        return fit(found[0].cfg, ""), found[0].cfg, record
    path = store_path(cfg, data, found)
    stored, where = None, path
    if cfg.select.reuse:
        stored = _read_pick(path)
        if stored is None:  # a pick shipped with csmf for its bundled data (the JD main job)
            where = SHIPPED / path.name
            stored = _read_pick(where)
    if stored is not None and stored["pick"] in record["candidates"]:
        pick = found[record["candidates"].index(stored["pick"])]
        source = "a run shipped with csmf (`csmf train --dataset jd`) on" if where != path else "an earlier run on"
        log(f"selection: {pick.name!r}, chosen on validation by {source} this data ({where}; "
            "--set select.reuse=false searches again)")  # fmt: skip
        record |= {"pick": pick.name, "reused": str(where), "trials": stored["trials"]}
        return (fit(pick.cfg, "") if fit_stored else None), pick.cfg, record
    best: tuple[float, Retriever, Candidate] | None = None
    start = time.perf_counter()
    for n, candidate in enumerate(found):
        spent = time.perf_counter() - start
        budget = cfg.select.budget_s
        if n > 0 and budget > 0 and spent + spent / n > budget:
            record["skipped"].append(candidate.name)
            continue
        if behind := _variant_behind(candidate.name, record["trials"], cfg.select.variant_gap):
            record["dropped"].append(candidate.name)
            log(f"selection: {candidate.name!r} not fit: {behind}")
            continue
        log(f"selection: fitting candidate {n + 1}/{len(found)} {candidate.name!r}")
        began = time.perf_counter()
        model = fit(candidate.cfg, tag(candidate.name))
        # scored as its fit validated: a CSMF's configuration as the catalogue's size adapted it (past 100,000 items
        # a seeded sample of validation users; every user of 90k against 194k items took minutes a candidate)
        values = validation_score(model, data, getattr(model, "cfg", cfg))
        mean = float(np.mean(list(values.values()))) if values else float("nan")
        seconds = round(time.perf_counter() - began, 1)
        record["trials"].append({"candidate": candidate.name, "values": values, "mean": round(mean, 6),
                                 "seconds": seconds})  # fmt: skip
        log(f"selection: {candidate.name!r} {metric} {mean:.4f} ({seconds:.0f}s)")
        if best is None or mean > best[0]:  # ties keep the earlier candidate
            best = (mean, model, candidate)
    if record["skipped"]:
        log(f"selection: budget select.budget_s = {cfg.select.budget_s:g}s spent; not tried: {record['skipped']}")
    _, model, pick = best
    record["pick"] = pick.name
    log(f"selection: picked {pick.name!r} on validation")
    if cfg.select.reuse and not record["skipped"]:  # a pick from a cut search is not stored as final
        _write_pick(path, record)
    return model, pick.cfg, record


def _variant_behind(name: str, trials: list[dict], gap: float) -> str:
    """Why the variant `name` (a preset and settings) is not worth a fit ("" = it is): its bare preset, fit before
    it, scored more than `gap` below the best mean so far (select.variant_gap)."""
    preset, *settings = name.split()
    means = {t["candidate"]: t["mean"] for t in trials}
    best = max(means.values(), default=float("nan"))
    if gap <= 0 or not settings or preset not in means or not best > 0:
        return ""
    short = 1 - means[preset] / best
    return (f"its preset {preset!r} scored {means[preset]:.4f}, {short:.0%} below the best {best:.4f} (more than "
            f"select.variant_gap = {gap:g})") if short > gap else ""  # fmt: skip


def scale_candidates(cfg: Config, n_items: int, pinned: dict[str, Any],
                     log: Callable[[str], None] = logger.info) -> Config:  # fmt: skip
    """`cfg` with SCALE_CANDIDATE first among select.candidates past SCALE_ITEMS items (unless the user set the
    candidates, or the search is off), said in the log; else `cfg` unchanged."""
    listed = cfg.select.candidates
    if n_items <= SCALE_ITEMS or not listed or "select.candidates" in pinned or SCALE_CANDIDATE in listed:
        return cfg
    log(f"selection: {SCALE_CANDIDATE!r} tried first ({n_items:,} items are above {SCALE_ITEMS:,}: the MLP with "
        "user-ID rows trains in a fraction of a graph fit and led on the 2.2M-row simulator)")  # fmt: skip
    return replace(cfg, select=replace(cfg.select, candidates=(SCALE_CANDIDATE, *listed)))


def tag(name: str) -> str:
    """A candidate as a folder name: "graph model.graph_hops=1" -> "graph_model.graph_hops-1"."""
    return "".join(c if c.isalnum() or c in "._" else ("-" if c == "=" else "_") for c in name)


def _read_pick(path: Path) -> dict | None:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # none yet, or unreadable: search again (and overwrite it)
    return stored if isinstance(stored, dict) and isinstance(stored.get("pick"), str) else None


def _write_pick(path: Path, record: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(".part")
        part.write_text(json.dumps({"pick": record["pick"], "trials": record["trials"]}, indent=2))
        part.replace(path)  # whole or not at all
    except OSError:
        pass  # a read-only cache: the search simply runs again next time
