"""`csmf bench --suite extend`: what growing a trained cascade by one objective (`csmf extend`) gives up and gains,
against cascades trained from scratch with the new objective in each place (issue 29), with wall times.

Per dataset: the cascade without the new objective (a stage of the data that cascade.objectives leaves out) is
trained into a run folder as `csmf train` writes it, the run is extended in place (csmf.extend.extend_run: every
objective's test metrics before and after, the bit-identity checks), and each listed order of the whole cascade is
trained from scratch on the same data. Layout under <bench.out_dir>/extend[-quick]/<dataset>/: run/ (the run
folder, extend-<stage>.json in it), scratch-<order>.json and their checkpoints; the report is
<bench.report_dir>/extend[-quick].md. Resumable: a finished step is read back, an interrupted one resumes.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from csmf.config import Config, ConfigError, config_to_dict, load_config, override, same_training, save_config
from csmf.data.datasets import load_dataset
from csmf.data.schema import CascadeData
from csmf.evaluation import evaluate
from csmf.extend import describe, extend_run
from csmf.models.csmf import CSMF
from csmf.models.teachers import teacher_lists

logger = logging.getLogger(__name__)
BARS = {"kept": 0.02, "new": 0.95}  # issue 29: the previous last objective within 2%; the new >= 0.95x scratch


@dataclass(frozen=True)
class Growth:
    """One dataset of the suite: its data settings, the cascade trained first, the objective added, and the orders
    of the whole cascade trained from scratch to compare with (the first is the one the bars compare against)."""

    name: str
    sets: tuple[str, ...]
    base: tuple[str, ...]
    stage: str
    orders: tuple[tuple[str, ...], ...]


def growths(cfg: Config, quick: bool) -> list[Growth]:
    b = cfg.bench
    sim = ("exposure", "click")
    if quick:  # the small simulator, two epochs a stage: the whole suite in about a minute
        small = ("data.dataset=sim", "sim.n_users=300", "sim.n_items=200", "train.max_epochs=2")
        return [Growth("sim", small, sim, "conversion", (("exposure", "click", "conversion"),))]
    jd = ("data.dataset=jd", "data.stages=view,favorite,purchase")  # favorites a stage: its own test split
    suite_sim = ("data.dataset=sim", f"sim.n_users={b.suite_sim_users}", f"sim.n_items={b.suite_sim_items}")
    return [
        # favourites follow views and come before purchases in the funnel (JD's cascade order, split.JD_STAGES);
        # appended to a trained view -> purchase cascade, favorite comes last: both orders are trained from scratch
        Growth(
            "jd",
            jd,
            ("view", "purchase"),
            "favorite",
            (("view", "favorite", "purchase"), ("view", "purchase", "favorite")),
        ),  # fmt: skip
        Growth("sim", suite_sim, sim, "conversion", (("exposure", "click", "conversion"),)),
    ]


def run_growth(
    cfg: Config, quick: bool = False, progress: bool = False, log: Callable[[str], None] = logger.info
) -> Path:
    """Run (or resume) every dataset of the suite; write the report. Returns its path."""
    suite = "extend-quick" if quick else "extend"
    root = Path(cfg.bench.out_dir) / suite
    results = {g.name: grow(g, cfg, root / g.name, progress, log) for g in growths(cfg, quick)}
    path = Path(cfg.bench.report_dir) / f"{suite}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(growth_report(results, suite))
    log(f"wrote {path}")
    return path


def grow(g: Growth, cfg: Config, folder: Path, progress: bool, log: Callable[[str], None]) -> dict:
    """The base run, its extension and the from-scratch cascades of one dataset (each read back when done)."""
    base_cfg = override(cfg, [*g.sets, f"cascade.objectives={','.join(g.base)}", "select.candidates="])
    data = load_dataset(base_cfg, progress=progress)
    teachers = _teachers(base_cfg, data, folder, log)
    run = folder / "run"
    base = _base(base_cfg, data, run, progress, log)
    extension_file = run / f"extend-{g.stage}.json"
    if not extension_file.exists():
        log(f"{g.name}: extending {' -> '.join(g.base)} with {g.stage}")
        extend_run(run, g.stage, progress=progress, log=log)
    extension = json.loads(extension_file.read_text())
    scratch = {}
    for order in g.orders:
        name = "-".join(order)
        scratch[name] = _scratch(override(base_cfg, [f"cascade.objectives={','.join(order)}"]), data,
                                 folder / f"scratch-{name}", progress, log)  # fmt: skip
    return {"growth": g.__dict__, "data": data.summary(), "teacher_seconds": teachers, "base": base,
            "extension": extension, "scratch": scratch}  # fmt: skip


def _teachers(cfg: Config, data: CascadeData, folder: Path, log: Callable[[str], None]) -> float:
    """Fit (or read from the disk cache) every stage's distillation teacher before anything is timed: the steps
    then read them from memory alike, so no step's wall time holds a teacher fit another step was spared. Returns
    the seconds the first run of the suite took for it (kept in <folder>/teachers.json)."""
    if not cfg.train.distill:
        return 0.0
    start, tuning = time.perf_counter(), data.tuning_view()
    for objective in data.stages:
        teacher_lists(tuning, objective, cfg)
    seconds = round(time.perf_counter() - start, 2)
    log(f"{data.name}: teachers of {', '.join(data.stages)} ready in {seconds:.1f}s")
    record = folder / "teachers.json"
    if not record.exists():
        folder.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"seconds": seconds}))
    return float(json.loads(record.read_text())["seconds"])


def _base(cfg: Config, data: CascadeData, run: Path, progress: bool, log: Callable[[str], None]) -> dict:
    """The run folder `csmf train` would write for `cfg` (model, config.toml, checkpoints, metrics.json), trained
    here unless it is there; a folder trained with another config is refused, not mixed in."""
    summary_path = run / "metrics.json"
    if summary_path.exists() and (run / "model" / "model.pt").exists():  # trained (and maybe extended since)
        trained = config_to_dict(load_config(str(run / "config.toml")))
        if not same_training(_but_objectives(trained), _but_objectives(config_to_dict(cfg))):
            raise ConfigError(f"{run} holds a run of another config; remove it or use another bench.out_dir")
        return {"train_seconds": json.loads(summary_path.read_text())["train_seconds"]}
    log(f"{data.name}: training {' -> '.join(cfg.cascade.objectives)} into {run}")
    start = time.perf_counter()
    model = CSMF(cfg, run_dir=str(run / "checkpoints"), progress=progress, log=log).fit(data)
    seconds = time.perf_counter() - start
    run.mkdir(parents=True, exist_ok=True)
    save_config(model.cfg, run / "config.toml")
    model.save(run / "model")
    metrics = evaluate(model, data, cfg.eval.ks, cfg.eval.score_budget_mb, model.served(data), progress)
    summary = {"dataset": data.name, "seed": cfg.seed, "train_seconds": round(seconds, 2), "metrics": metrics,
               "vector_dim": int(model.item_vectors().shape[1]), "ownership": model.model.ownership(),
               "phases": model.phases, "config": config_to_dict(model.cfg)}  # fmt: skip
    summary_path.write_text(json.dumps(summary, indent=2, default=float))
    return {"train_seconds": summary["train_seconds"]}


def _but_objectives(config: dict) -> dict:
    """A saved config without cascade.objectives: an extension appends to it, the rest stays as trained."""
    return {**config, "cascade": {k: v for k, v in config["cascade"].items() if k != "objectives"}}


def _scratch(cfg: Config, data: CascadeData, folder: Path, progress: bool, log: Callable[[str], None]) -> dict:
    path = folder.with_suffix(".json")
    if path.exists():
        return json.loads(path.read_text())
    log(f"{data.name}: training {' -> '.join(cfg.cascade.objectives)} from scratch")
    start = time.perf_counter()
    model = CSMF(cfg, run_dir=str(folder / "checkpoints"), progress=progress, log=log).fit(data)
    seconds = time.perf_counter() - start
    result = {"objectives": list(model.trained.objectives), "train_seconds": round(seconds, 2),
              "metrics": evaluate(model, data, cfg.eval.ks, cfg.eval.score_budget_mb, model.served(data), progress),
              "ownership": model.model.ownership(), "phases": model.phases}  # fmt: skip
    path.write_text(json.dumps(result, indent=2, default=float))
    return result


def growth_report(results: dict[str, dict], suite: str) -> str:
    lines = [f"# Growing a trained cascade by one objective: `{suite}`", "",
             f"Regenerate: `csmf bench --suite extend{' --quick' if suite.endswith('quick') else ''}` (resumable). "
             "Per dataset: the cascade without the new objective is trained (`csmf train` with `cascade.objectives` "
             "leaving it out), grown by it (`csmf extend`), and the whole cascade is trained from scratch in each "
             "order listed, all on the same data, split and seed. Test R@50 / N@50 over the full catalogue.", "",
             f"- generated {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on {platform.machine()} with "
             f"{os.cpu_count()} cores, Python {platform.python_version()}", ""]  # fmt: skip
    for name, r in results.items():
        lines += _dataset_section(name, r)
    return "\n".join(lines)


def _dataset_section(name: str, r: dict) -> list[str]:
    g, ext, base = r["growth"], r["extension"], r["base"]
    before, after = ext["metrics"]["before"], ext["metrics"]["after"]
    orders = list(r["scratch"])
    objectives = ext["objectives"]["after"]
    lines = [f"## {name}", "", "```", r["data"], "```", "",
             f"Settings: {', '.join(f'`{s}`' for s in g['sets'])}; base cascade {' -> '.join(g['base'])}, then "
             f"`csmf extend --stage {g['stage']}`.", ""]  # fmt: skip
    head = ["objective", "base", "extended", "change", *[f"scratch {o.replace('-', ' -> ')}" for o in orders]]
    for metric, label in (("recall@50", "R@50"), ("ndcg@50", "N@50")):
        lines += [f"**{label}**", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for o in objectives:
            b = before.get(o, {}).get(metric)
            a = after.get(o, {}).get(metric)
            cells = [o, _num(b), _num(a), f"{100 * (a / b - 1):+.2f}%" if a is not None and b else "new"]
            cells += [_num(r["scratch"][s]["metrics"].get(o, {}).get(metric)) for s in orders]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["What changed (`csmf extend`'s own report):", "", "```", *describe(ext), "```", ""]
    last = ext["previous_last"]["objective"]
    kept = ext["change"][last]["recall@50"]["relative"]
    first = orders[0]
    new_ratio = after[g["stage"]]["recall@50"] / r["scratch"][first]["metrics"][g["stage"]]["recall@50"]
    identical = [o for o, s in ext["identical"].items() if all(s.values())]
    lines += [
        f"- objectives before the previous last: {', '.join(ext['identical']) or 'none'}; bit-identical after the "
        f"extension (user vectors, item vectors, every user's scores; torch.equal): {', '.join(identical) or 'none'}",
        f"- {last} (the previous last objective) R@50 {100 * kept:+.2f}% "
        f"({'within' if abs(kept) <= BARS['kept'] else 'outside'} the {100 * BARS['kept']:.0f}% bar); "
        f"top-50 overlap with its rankings before: {ext['previous_last']['top50_overlap']}",
        f"- {g['stage']} R@50 {new_ratio:.3f}x the from-scratch {first.replace('-', ' -> ')} cascade's "
        f"({'meets' if new_ratio >= BARS['new'] else 'below'} the {BARS['new']}x bar)"
        + "".join(f"; {after[g['stage']]['recall@50'] / r['scratch'][o]['metrics'][g['stage']]['recall@50']:.3f}x "
                  f"{o.replace('-', ' -> ')}'s" for o in orders[1:]),
        f"- output units moved from {last} to {g['stage']}: {ext['room']['freed_units']} (at least "
        f"{ext['room']['floor_units']}); ownership after: {json.dumps(ext['ownership']['after'])}; from scratch "
        + "; ".join(f"{o.replace('-', ' -> ')}: {json.dumps(r['scratch'][o]['ownership'])}" for o in orders),
        f"- wall time (every stage's distillation teacher made ready beforehand, fit or read from csmf's disk "
        f"cache: {r['teacher_seconds']:.0f} s on the suite's first run; each step then reads them from memory alike): "
        f"base training {base['train_seconds']:.0f} s; the extension {ext['train_seconds']:.0f} s of "
        f"training ({ext['wall_seconds']:.0f} s with loading, {ext['eval_seconds']:.0f} s evaluating before and after)"
        + "".join(f"; from scratch {o.replace('-', ' -> ')} {r['scratch'][o]['train_seconds']:.0f} s" for o in orders),
        "",
    ]  # fmt: skip
    return lines


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
