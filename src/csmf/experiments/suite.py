"""`csmf bench --suite paper`: every model, the ablations and the tau sweep, over several seeds.

Layout under `<out_dir>/<suite>/<dataset>/`:
  seeds/<run>/seed-<k>.json   one result per (run, seed), written as soon as it finishes; a rerun skips
                              every file already there (the suite resumes after a kill)
  <run>.json                  the foundation layout with `metrics` = mean over seeds, `metrics_std`,
                              and `seeds` = {seed: metrics}
The report (`<report_dir>/<suite>.md` and its plots) is written by csmf.experiments.report from those files only.

Runs that share stage-1 pretraining (single-<first stage>, csmf and its ablations, packnet, naive-ft, the
tau sweep) load it from a per-suite cache instead of retraining it (bit-identical, see csmf.cascade).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from csmf.config import Config, ConfigError, config_to_dict, override, same_training
from csmf.data.datasets import load_dataset
from csmf.data.schema import CascadeData
from csmf.experiments.bench import Fitted, build_tuned_as, choose_config, run_model, versions
from csmf.experiments.sweep import mean_sweeps
from csmf.models.multitask import KINDS as MULTITASK_KINDS
from csmf.selection import candidates, pins

logger = logging.getLogger(__name__)

MAIN_BASELINES = ("popularity", "als", "itemknn", "ease")
MAIN_NEURAL = ("naive-ft", "packnet", "shared-bottom", "mmoe", "ple", "mvke", "csmf")
ABLATION = ("csmf", "csmf-no-cpp", "csmf-no-aml", "csmf-no-ar")
MULTITASK = frozenset(MULTITASK_KINDS)
TUNED = frozenset({"als", "itemknn", "ease"})  # searched on validation with the first seed, refit with the others
DETERMINISTIC = frozenset({"popularity", "itemknn", "ease"})  # no seed enters them: one run stands for every seed

# `--quick`: the same suite, shrunk to a smoke test (the small simulator only, 2 seeds, 2 taus, short
# training, small grids and cost catalogue). Flags and --set given on the command line apply on top.
QUICK_SETS = (
    "bench.suite_datasets=sim",
    "bench.suite_seeds=0,1",
    "bench.suite_taus=0.1,0.3",
    "bench.suite_cost_items=100000",
    "bench.cost_users=256",
    "bench.suite_sim_users=1500",
    "bench.suite_sim_items=1000",
    "sim.exposures_per_user=30",
    "train.max_epochs=4,4",
    "multitask.max_epochs=4",
    "als.factors=32,64",
    "als.regularization=0.1",
    "als.alpha=10",
    "als.aux_weights=0,0.3",
    "itemknn.neighbours=50,200",
    "itemknn.aux_weights=0,0.3",
)


@dataclass(frozen=True)
class Run:
    """One row of the suite: a model name from the bench, optionally with a cascade tau override."""

    name: str
    model: str
    groups: tuple[str, ...]
    tau: float | None = None
    cost: bool = True  # measure query cost (first seed); a tau variant costs what csmf costs

    def config(self, cfg: Config, seed: int) -> Config:
        cfg = replace(cfg, seed=seed)
        if self.tau is not None:
            cfg = replace(cfg, cascade=replace(cfg.cascade, tau=(self.tau,)))
        return cfg


Prefit = tuple[Fitted, Config]  # the selection's fit of the pick, and the config it was fit with


def suite_runs(cfg: Config, stages: tuple[str, ...]) -> list[Run]:
    """The rows of one dataset: main table, ablations, tau sweep (a tau equal to csmf's default reuses csmf)."""
    default_tau = cfg.cascade.tau[0] if len(set(cfg.cascade.tau)) == 1 else None
    runs: dict[str, Run] = {}

    def add(name: str, model: str, group: str, tau: float | None = None, cost: bool = True) -> None:
        if name in runs:
            runs[name] = replace(runs[name], groups=runs[name].groups + (group,))
        else:
            runs[name] = Run(name, model, (group,), tau, cost)

    for name in MAIN_BASELINES + tuple(f"single-{s}" for s in stages) + MAIN_NEURAL:
        add(name, name, "main")
    for name in ABLATION:
        add(name, name, "ablation", cost=name == "csmf")
    for tau in cfg.bench.suite_taus:
        if default_tau is not None and abs(tau - default_tau) < 1e-12:
            add("csmf", "csmf", "tau")
            runs["csmf"] = replace(runs["csmf"], tau=None)
        else:
            add(f"csmf-tau{tau:g}", "csmf", "tau", tau=tau, cost=False)
    return list(runs.values())


def seeds_of(run: Run, seeds: tuple[int, ...], tau_seeds: int, multitask_seeds: int = 0) -> tuple[int, ...]:
    """The seeds a row runs: one for a deterministic model, the first `tau_seeds` for a tau-sweep-only row, the
    first `multitask_seeds` for a multi-task row (0 = every seed)."""
    if run.name in DETERMINISTIC:
        return seeds[:1]
    if run.groups == ("tau",) and tau_seeds > 0:
        return seeds[:tau_seeds]
    if run.model in MULTITASK and multitask_seeds > 0:
        return seeds[:multitask_seeds]
    return seeds


def tau_of(run: Run, cfg: Config) -> float:
    return run.tau if run.tau is not None else cfg.cascade.tau[0]


# ----- one (run, seed) -----------------------------------------------------------------------------


def seed_result(
    run: Run,
    cfg: Config,
    seed: int,
    data: CascadeData,
    folder: Path,
    first: dict | None,
    progress: bool,
    log: Callable[[str], None],
    prefit: Prefit | None = None,
) -> dict:
    """The result of `run` with `seed`, from its file when an earlier invocation wrote it.

    `first` is the run's result on the suite's first seed (None for the first seed itself): ALS and
    item-kNN reuse the settings it chose on validation, and only the first seed measures query cost. `prefit`: the
    selection's fit of the pick and its config; the CSMF row whose config it is takes that model."""
    path = folder / "seeds" / run.name / f"seed-{seed}.json"
    run_cfg = run.config(cfg, seed)
    if path.exists():
        done = json.loads(path.read_text())
        if not same_training(done["suite_config"], config_to_dict(run_cfg)):
            raise ConfigError(
                f"{path} was written with another config than this suite's; delete it or use another --out"
            )
        return done
    checkpoints = folder / "checkpoints" / f"{run.name}-seed-{seed}"
    bench = replace(
        run_cfg.bench,
        cost_items=run_cfg.bench.suite_cost_items if (run.cost and first is None) else 0,
        pretrain_cache=str(folder / "pretrain-cache"),
        checkpoint_dir=str(checkpoints),
    )
    t0 = time.perf_counter()
    builder = None
    if first is not None and run.model in TUNED:
        builder = build_tuned_as(run.model, first["config"]["model_settings"], first["seed"])
    fitted = None
    if prefit is not None and run.model == "csmf" and same_training(config_to_dict(prefit[1]), config_to_dict(run_cfg)):
        fitted = prefit[0]  # the same config and seed the search fit: the same model, not fit twice
    curves = folder / "tensorboard" / f"{run.name}-seed-{seed}"  # csmf.tracking: one TensorBoard run per row and seed
    result = run_model(replace(run_cfg, bench=bench), data, run.model, progress, builder, fitted, curves)
    result.update(model=run.name, wall_seconds=round(time.perf_counter() - t0, 3), suite_config=config_to_dict(run_cfg))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
    shutil.rmtree(checkpoints, ignore_errors=True)  # the result is safe: phase checkpoints are no longer needed
    seconds = f"fit {result['train_seconds']:.1f}s, tuning {result['tuning_seconds']:.1f}s"
    log(f"{data.name} {run.name} seed {seed}: {seconds}, {result['wall_seconds']:.0f}s in all")
    return result


def aggregate(run: Run, per_seed: dict[int, dict], deterministic: bool) -> dict:
    """The foundation layout with mean metrics, their standard deviation and the per-seed metrics."""
    first = per_seed[min(per_seed)]
    stages = list(first["metrics"])
    mean, std = {}, {}
    for s in stages:
        names = list(first["metrics"][s])
        values = {m: [r["metrics"][s][m] for r in per_seed.values()] for m in names}
        mean[s] = {m: statistics.fmean(v) for m, v in values.items()}
        std[s] = {m: (statistics.stdev(v) if len(v) > 1 else 0.0) for m, v in values.items()}
    seconds = [r["train_seconds"] for r in per_seed.values()]
    sweeps = [r["weight_sweep"] for r in per_seed.values() if r.get("weight_sweep")]
    return {
        **first,
        "seed": min(per_seed),
        "metrics": mean,
        "metrics_std": std,
        "seeds": {str(k): r["metrics"] for k, r in sorted(per_seed.items())},
        "weight_sweep": mean_sweeps(sweeps) if sweeps else None,  # mean over seeds
        "deterministic": deterministic,
        "train_seconds": statistics.fmean(seconds),
        "train_seconds_per_seed": {str(k): r["train_seconds"] for k, r in sorted(per_seed.items())},
        "tuning_seconds": statistics.fmean(r["tuning_seconds"] for r in per_seed.values()),
        "wall_seconds": sum(r.get("wall_seconds", 0.0) for r in per_seed.values()),
        "versions": versions(),
    }


# ----- the suite ------------------------------------------------------------------------------------


def _sim_size(cfg: Config, dataset: str) -> list[str]:
    """The suite's simulator size (bench.suite_sim_*), applied to the sim dataset only."""
    b, sets = cfg.bench, []
    if dataset == "sim" and b.suite_sim_users > 0:
        sets.append(f"sim.n_users={b.suite_sim_users}")
    if dataset == "sim" and b.suite_sim_items > 0:
        sets.append(f"sim.n_items={b.suite_sim_items}")
    return sets


def _selected(cfg: Config, data: CascadeData, folder: Path, progress: bool,
              log: Callable[[str], None]) -> tuple[Config, Prefit | None]:  # fmt: skip
    """The neural rows' configuration, chosen on validation among select.candidates with the first seed (as ALS is
    tuned) and kept in <dataset>/selection.json, so a resumed suite reuses it; the report shows its trials. With it,
    the pick as the search fit it (first seed), which the CSMF row of that seed takes instead of a second fit."""
    if not cfg.select.candidates:
        return cfg, None
    path = folder / "selection.json"
    if path.exists():  # the pick, rebuilt with today's pins (a changed setting then shows as another config)
        pick = json.loads(path.read_text())["record"]["pick"]
        found = {c.name: c.cfg for c in candidates(cfg, pins(cfg))}
        if pick in found:
            return found[pick], None
    first = replace(cfg, seed=cfg.bench.suite_seeds[0])
    began = time.perf_counter()
    searched, record, fitted = choose_config(first, data, None, progress, log, True, folder / "tensorboard" / "select")
    chosen = replace(searched, seed=cfg.seed)
    if record is None:  # one candidate: nothing was searched
        return chosen, None
    # the search's compute (or the one fit of a stored pick) counts in the suite's total: the CSMF row that takes
    # this fit does not count it again
    seconds = round(time.perf_counter() - began, 1)
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps({"record": record, "config": config_to_dict(chosen), "seconds": seconds}, indent=2))
    tmp.replace(path)
    return chosen, (fitted, searched)


def run_suite(
    cfg: Config, suite: str = "paper", progress: bool = True, log: Callable[[str], None] = logger.info
) -> Path:
    """Run (or resume) every row of the suite on every dataset and seed; write the report. Returns its path."""
    from csmf.experiments.report import write_report

    if not cfg.bench.suite_seeds:
        raise ConfigError("bench.suite_seeds: give at least one seed")
    if importlib.util.find_spec("matplotlib") is None:  # fail now, not after hours of training
        raise ConfigError("the suite's report draws plots with matplotlib: pip install 'csmf[report]'")
    root = Path(cfg.bench.out_dir) / suite
    t0 = time.perf_counter()
    datasets = []
    for dataset in cfg.bench.suite_datasets:
        dcfg = override(cfg, [f"data.dataset={dataset}", *_sim_size(cfg, dataset)])
        data = load_dataset(dcfg, progress)
        log(data.summary())
        folder = root / data.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "dataset.txt").write_text(data.summary() + "\n")
        dcfg, prefit = _selected(dcfg, data, folder, progress, log)
        runs = suite_runs(dcfg, data.stages)
        unknown = sorted(set(cfg.bench.suite_rows) - {r.name for r in runs})
        if unknown:
            raise ConfigError(f"bench.suite_rows: no rows named {unknown}; rows: {[r.name for r in runs]}")
        seeds = cfg.bench.suite_seeds
        for row, run in enumerate(runs):
            if cfg.bench.suite_rows and run.name not in cfg.bench.suite_rows:
                continue  # a subset: this row keeps whatever results it already has
            used = seeds_of(run, seeds, cfg.bench.suite_tau_seeds, cfg.bench.suite_multitask_seeds)
            per_seed: dict[int, dict] = {}
            for seed in used:
                first = per_seed.get(used[0])
                per_seed[seed] = seed_result(run, dcfg, seed, data, folder, first, progress, log, prefit)
            result = aggregate(run, per_seed, run.name in DETERMINISTIC)
            result.update(row=row, groups=list(run.groups), tau=tau_of(run, dcfg) if "tau" in run.groups else None)
            (folder / f"{run.name}.json").write_text(json.dumps(result, indent=2))
        datasets.append(data.name)
    minutes = (time.perf_counter() - t0) / 60
    path = write_report(root, datasets, Path(cfg.bench.report_dir), suite, cfg, minutes)
    log(f"wrote {path} ({minutes:.1f} min this invocation)")
    return path
