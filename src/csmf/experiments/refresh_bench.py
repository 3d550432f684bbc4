"""`csmf bench --suite refresh`: a refresh on new data (csmf.refresh, `csmf train --init-from`) against a training
from scratch on both periods, on two periods of the simulator (issue 29, part 4).

Period 1 is `csmf simulate` with [sim]; period 2 the same world's next 30 days (`csmf simulate --period 2`): every
user again, then a quarter more users and a quarter more items, with ids after the first period's. Three trainings of
one configuration (the one given, without a configuration search, and without the teacher cache, so no fit reads
another's work):
  run 1  from scratch on period 1;
  (a)    run 1 refreshed on period 2, DEFAULT_EPOCHS epochs a stage;
  (b)    from scratch on periods 1 and 2: the training pairs of both splits, in (a)'s id maps.
(a) and (b) train back to back, each timed over its fit (wall and CPU seconds). Both rank period 2's test pairs (less
any pair either period trains on) with the same exclusions (every training pair of both periods); each model scores
its users from its own history, as its export would serve them ((a): period 2's, (b): both periods'); (a) is also
shown scoring from both periods' history. Forgetting: period 1's test pairs ranked by run 1 and by (a), each scoring
from period 1's history.

One world per seed of bench.suite_seeds (the first with --quick). Writes `<out_dir>/refresh/` (`refresh-quick` with
--quick): per seed the logs and the three run folders, and refresh.json with every figure; and
`<report_dir>/refresh.md`. A rerun trains everything again.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import os
import platform
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from csmf.config import Config
from csmf.data.datasets import load_dataset
from csmf.data.schema import CascadeData, binary, difference, union
from csmf.data.simulate import simulate, simulate_next_period
from csmf.evaluation import evaluate
from csmf.models.csmf import CSMF
from csmf.refresh import DEFAULT_EPOCHS, Refresh, extend_ids
from csmf.trained import TrainedCascade

logger = logging.getLogger(__name__)
QUICK = {"n_users": 1000, "n_items": 800, "exposures_per_user": 30}  # --quick: a smoke run of minutes
BARS = {"recall": 0.97, "time": 1 / 3}  # (a) against (b): R@50 at least 0.97x, training time at most 1/3


def run_refresh(cfg: Config, quick: bool = False, epochs: int = DEFAULT_EPOCHS,
                log: Callable[[str], None] = logger.info) -> Path:  # fmt: skip
    """One world per seed of bench.suite_seeds (the first only with --quick; the seed is the simulator's and the
    models'): simulate both periods, train run 1, (a) and (b), evaluate; write refresh.json and the report, its path."""
    sim = replace(cfg.sim, **QUICK) if quick else cfg.sim
    base = replace(cfg, sim=sim, select=replace(cfg.select, candidates=()),
                   train=replace(cfg.train, teacher_cache=False))  # fmt: skip
    suite = "refresh-quick" if quick else "refresh"
    root = Path(cfg.bench.out_dir) / suite
    seeds = cfg.bench.suite_seeds[:1] if quick else cfg.bench.suite_seeds
    worlds = [one_world(replace(base, seed=seed, sim=replace(sim, seed=seed)), root / f"seed-{seed}", epochs, log)
              for seed in seeds]  # fmt: skip
    result = {
        "generated": f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "epochs": epochs,
        "worlds": worlds,
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "refresh.json").write_text(json.dumps(result, indent=2, default=float))
    path = Path(cfg.bench.report_dir) / f"{suite}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(refresh_report(result, suite))
    log(f"wrote {path}")
    return path


def one_world(cfg: Config, root: Path, epochs: int, log: Callable[[str], None]) -> dict:
    """Both periods of `cfg.sim`'s world in `root`, the three trainings and their figures."""
    sim = cfg.sim
    for name in ("run1", "a", "b"):  # every training from nothing: a resumed one would time nothing
        shutil.rmtree(root / name, ignore_errors=True)
    new_users, new_items = sim.n_users // 4, sim.n_items // 4
    paths = {1: root / "data" / "p1.parquet", 2: root / "data" / "p2.parquet"}
    simulate(sim, paths[1], progress=False)
    simulate_next_period(sim, paths[2], new_users, new_items, progress=False)
    first, second = (load_dataset(replace(cfg, data=replace(cfg.data, dataset=str(p)))) for p in paths.values())
    log(f"refresh bench, seed {cfg.seed}: period 1 {first.n_users:,} users x {first.n_items:,} items, period 2 "
        f"{second.n_users:,} x {second.n_items:,} ({new_users:,} new users, {new_items:,} new items)")  # fmt: skip

    run1, seconds1 = _timed(lambda: CSMF(cfg, run_dir=str(root / "run1" / "checkpoints")).fit(first))
    run1.save(root / "run1" / "model")
    log(f"run 1 (period 1 from scratch): {seconds1['wall']:.1f}s")

    warm = Refresh(root / "run1", epochs)
    warm.config(replace(warm.cfg, data=replace(warm.cfg.data, dataset=str(paths[2]))))
    second = warm.align(second)  # period 2 in run 1's id maps (data preparation, as (b)'s merge: not timed)
    refreshed, seconds_a = _timed(lambda: warm.fit(second, run_dir=root / "a" / "checkpoints"))
    log(f"(a) refresh of run 1 on period 2: {seconds_a['wall']:.1f}s")
    # period 1 in the same id maps: every id of it is known there
    first_wide, _ = extend_ids(first, second.user_ids, second.n_users, second.item_ids, second.n_items)
    both = both_periods(first_wide, second)
    scratch, seconds_b = _timed(lambda: CSMF(run1.cfg, run_dir=str(root / "b" / "checkpoints")).fit(both))
    log(f"(b) from scratch on periods 1 + 2: {seconds_b['wall']:.1f}s")

    ks, budget = cfg.eval.ks, cfg.eval.score_budget_mb
    held = period_two_test(both)
    histories = {"both": both.train | both.side, "first": first_wide.train | first_wide.side}
    return {
        "seed": cfg.seed,
        "sim": {
            "users": sim.n_users,
            "items": sim.n_items,
            "exposures": sim.exposures_per_user,
            "new_users": new_users,
            "new_items": new_items,
        },  # fmt: skip
        "rows": {"period1": _pairs(first), "period2": _pairs(second)},
        "encoder": run1.cfg.model.encoder,
        "teacher": {"scratch": run1.cfg.train.distill, "refresh": refreshed.cfg.train.distill},
        "seconds": {"run1": seconds1, "a": seconds_a, "b": seconds_b},
        "period2": {
            "a": _r50(evaluate(refreshed, held, ks, budget)),
            "b": _r50(evaluate(scratch, held, ks, budget)),
            "a_both_histories": _r50(evaluate(scoring_from(refreshed, histories["both"]), held, ks, budget)),
        },
        "period1": {
            "run1": _r50(evaluate(run1, first, ks, budget)),
            "a": _r50(evaluate(scoring_from(refreshed, histories["first"]), first_wide, ks, budget)),
        },
        "refresh": warm.record,
        "phases": {
            "a": refreshed.phases,
            "b": [{k: p.get(k) for k in ("phase", "seconds", "best_epoch")} for p in scratch.phases],
        },  # fmt: skip
    }


def both_periods(first: CascadeData, second: CascadeData) -> CascadeData:
    """Periods 1 and 2 as one training set (`first` already in `second`'s id maps): each split's pairs of either
    period; a pair's context and recency rank from period 2 where it has them (its later rows), the recency ranks
    of period 2 following the user's period-1 ones."""

    def joined(a: dict[str, sp.csr_matrix], b: dict[str, sp.csr_matrix]) -> dict[str, sp.csr_matrix]:
        return {name: union(a[name], m) if name in a else m for name, m in b.items()}

    recency = None
    if first.recency is not None and second.recency is not None:
        later = second.recency.tocsr(copy=True)
        shift = np.asarray(first.recency.max(axis=1).todense()).ravel()  # (U,) each user's latest period-1 rank
        later.data = later.data + np.repeat(shift, np.diff(later.indptr))
        recency = _prefer(later, first.recency)
    holdout = [m for m in (first.valid_holdout, second.valid_holdout) if m is not None]
    return replace(
        second, name="periods-1-2", train=joined(first.train, second.train), valid=joined(first.valid, second.valid),
        side=joined(first.side, second.side), valid_holdout=union(*holdout) if holdout else None,
        context={name: _prefer(m, first.context[name]) if name in first.context else m
                 for name, m in second.context.items()},
        recency=recency,
    )  # fmt: skip


def period_two_test(both: CascadeData) -> CascadeData:
    """`both` with its test side (period 2's test pairs) cut to the pairs neither period trains on: the one ranking
    (a) and (b) are measured on."""
    trained = union(*both.train.values(), *both.side.values())
    return replace(both, name="period-2-test", test={s: difference(m, trained) for s, m in both.test.items()})


def scoring_from(model: CSMF, history: dict[str, sp.csr_matrix]) -> CSMF:
    """`model` scoring its users from `history` (matrices in its id maps) instead of the history it was fit on."""
    view, trained = copy.copy(model), model.trained
    if trained is None:
        raise RuntimeError(f"{model.name} is not fitted; fit it before scoring it")
    view.trained = TrainedCascade(trained.model, trained.objectives, history, trained.top, shared=trained.shared)
    return view


def _prefer(first: sp.csr_matrix, fallback: sp.csr_matrix) -> sp.csr_matrix:
    """`first`'s entries, and `fallback`'s where `first` has none."""
    return sp.csr_matrix(first + fallback - fallback.multiply(binary(first)))


def _timed(fit: Callable[[], CSMF]) -> tuple[CSMF, dict[str, float]]:
    """(fit(), its wall and CPU seconds): CPU time counts every thread, so it is the measure less moved by other
    processes on a shared machine."""
    usage, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    model = fit()
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    return model, {"wall": round(time.perf_counter() - t0, 3), "cpu": round(cpu, 3)}


def _pairs(data: CascadeData) -> dict[str, int]:
    return {s: int(data.train[s].nnz + data.test[s].nnz) for s in data.stages}


def _r50(metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {s: {"recall@50": round(m["recall@50"], 4), "ndcg@50": round(m["ndcg@50"], 4), "users": m["users"]}
            for s, m in metrics.items()}  # fmt: skip


def refresh_report(result: dict, suite: str) -> str:
    """The markdown report of one refresh bench (refresh.json): a row per world (seed) and stage."""
    worlds = result["worlds"]
    w0, s = worlds[0], worlds[0]["sim"]
    lines = [
        "# Refresh on new data: `csmf train --init-from` against a training from scratch", "",
        f"Regenerate: `csmf bench --suite refresh{' --quick' if suite.endswith('quick') else ''}` (every figure "
        f"below is in `results/{suite}/refresh.json`). Generated {result['generated']} on {result['machine']}.", "",
        f"Simulator, one world per seed ({', '.join(str(w['seed']) for w in worlds)}; the seed is the world's and "
        f"the models'): period 1 = `csmf simulate` with {s['users']:,} users, {s['items']:,} items, "
        f"{s['exposures']} exposures a user; period 2 = `csmf simulate --period 2`: the same world's next 30 days, "
        f"every user again plus {s['new_users']:,} new users and {s['new_items']:,} new items. Encoder "
        f"`{w0['encoder']}`, one configuration for every run (no search; distillation teacher "
        f"`{w0['teacher']['scratch'] or 'none'}` from scratch, `{w0['teacher']['refresh'] or 'none'}` in the refresh, "
        f"its default). (a) refreshes run 1 (from scratch on period 1) on period 2 with {result['epochs']} epochs a "
        "stage; (b) trains from scratch on both periods' training pairs. Both rank period 2's test pairs that "
        "neither period trains on, every training pair of both periods excluded; each scores its users from its own "
        "history, as its export serves them.", "",
        "## Period 2 (the new data): test R@50 per stage", "",
        "| seed | stage | (a) refresh | (b) from scratch, both periods | (a) / (b) | (a) scoring from both periods' "
        "history |", "|---:|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    ratios, times = [], []
    for w in worlds:
        p2 = w["period2"]
        for stage, b in p2["b"].items():
            a, wide = p2["a"][stage]["recall@50"], p2["a_both_histories"][stage]["recall@50"]
            ratios.append(a / max(b["recall@50"], 1e-9))
            lines.append(f"| {w['seed']} | {stage} | {a:.4f} | {b['recall@50']:.4f} | {ratios[-1]:.3f} | "
                         f"{wide:.4f} |")  # fmt: skip
    lines += ["", f"Bar: (a) / (b) at least {BARS['recall']} on every stage: lowest {min(ratios):.3f}.", "",
              "## Training time ((a) and (b) back to back in one process, on a shared 2-core machine)", "",
              "| seed | run 1: period 1 from scratch, wall / CPU s | (a) refresh on period 2 | (b) from scratch on "
              "periods 1 + 2 | (a) / (b) wall | (a) / (b) CPU |", "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for w in worlds:
        sec = w["seconds"]
        ratio = {k: sec["a"][k] / max(sec["b"][k], 1e-9) for k in ("wall", "cpu")}
        times.append(max(ratio.values()))
        cells = " | ".join(f"{sec[r]['wall']:.1f} / {sec[r]['cpu']:.1f}" for r in ("run1", "a", "b"))
        lines.append(f"| {w['seed']} | {cells} | {ratio['wall']:.3f} | {ratio['cpu']:.3f} |")
    lines += ["", f"Bar: (a) / (b) at most {BARS['time']:.3f}: highest {max(times):.3f}. CPU seconds count every "
              "thread of the process: the measure other processes on the machine move least.", "",
              "## Forgetting: period 1's test R@50, scored from period 1's history", "",
              "| seed | stage | run 1 (period 1) | (a) after the refresh | change |",
              "|---:|---|---:|---:|---:|"]  # fmt: skip
    for w in worlds:
        for stage, before in w["period1"]["run1"].items():
            after = w["period1"]["a"][stage]["recall@50"]
            lines.append(f"| {w['seed']} | {stage} | {before['recall@50']:.4f} | {after:.4f} | "
                         f"{after - before['recall@50']:+.4f} |")  # fmt: skip
    r = w0["refresh"]
    users, items = r["users"], r["items"]
    maps = (f"Id maps of (a), seed {w0['seed']}: users {users['known']:,} known (rows kept), {users['new']:,} new; "
            f"items {items['known']:,} known, {items['new']:,} new.")  # fmt: skip
    lines += ["", maps, ""]
    return "\n".join(lines)
