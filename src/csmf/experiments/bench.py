"""`csmf bench`: load a dataset, tune each model on validation, fit, evaluate on test, write results.

Results: `<out_dir>/<dataset>/<model>.json` (stable layout, read by scripts and later issues) and
`<out_dir>/<dataset>/table.md` (every result file in that folder, one row per model).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from csmf import distributed, rules
from csmf.config import Config, ConfigError, config_to_dict
from csmf.data.datasets import dataset_name, load_dataset  # noqa: F401 (re-exported: csmf.experiments.bench.load_dataset)
from csmf.data.schema import CascadeData
from csmf.data.split import cold_item_view
from csmf.evaluation import evaluate, evaluate_stage, metric_values
from csmf.experiments.cost import query_cost
from csmf.experiments.sweep import weight_sweep
from csmf.experiments.tuning import coordinate_search
from csmf.models.als import ALS, ALSSettings
from csmf.models.csmf import CSMF, ID_ONLY, NO_CONTEXT, VARIANTS
from csmf.models.ease import EASE, EASESettings
from csmf.models.itemknn import ItemKNN, ItemKNNSettings
from csmf.models.multitask import KINDS, MultiTask
from csmf.models.popularity import Popularity
from csmf.retriever import Retriever
from csmf.selection import candidates, pins, select
from csmf.tracking import Tracker

logger = logging.getLogger(__name__)

# ----- model builders: tune on the validation view, then fit on train ------------------------------


def _tuned(
    cfg: Config,
    data: CascadeData,
    grid: dict,
    fixed: dict,
    settings_cls: type,
    make: Callable[[dict], Retriever],
    progress: bool,
) -> tuple[Retriever, dict]:
    """Per stage: coordinate search on the tuning view, then one final fit with the best settings.

    `grid` holds the searched fields, `fixed` the ones the config sets outright; the search starts
    from the settings class defaults (or the first grid value when a default is not on the grid).
    """
    tuning_data = data.tuning_view()
    defaults = asdict(settings_cls())
    start = {k: (defaults[k] if defaults[k] in v else v[0]) for k, v in grid.items()}

    def settings(point: dict):
        return settings_cls(**{**defaults, **fixed, **point})

    chosen, record = {}, {}
    for stage in data.stages:
        has_valid = stage in data.valid and data.valid[stage].nnz > 0
        if not (cfg.bench.tune and has_valid):
            chosen[stage] = settings(start)
            record[stage] = {"metric": None, "note": "not tuned" if has_valid else "no validation pairs"}
            continue

        def objective(point: dict, stage: str = stage) -> float:
            model = make({stage: settings(point)}).fit(tuning_data)
            result = evaluate_stage(model, tuning_data, stage, cfg.eval.ks, cfg.eval.score_budget_mb,
                                    sample=cfg.eval.valid_users, seed=cfg.seed)  # fmt: skip
            return result[cfg.eval.tune_metric]

        search = coordinate_search(grid, objective, start, progress=progress, desc=f"tune {stage}",
                                   max_fits=cfg.bench.tune_max_fits)  # fmt: skip
        chosen[stage] = settings(search.best)
        record[stage] = search.as_dict(cfg.eval.tune_metric)
    return make(chosen), record


def build_popularity(cfg: Config, data: CascadeData, progress: bool) -> tuple[Retriever, dict]:
    return Popularity(), {}


def build_als(cfg: Config, data: CascadeData, progress: bool) -> tuple[Retriever, dict]:
    a = cfg.als
    grid = {"factors": a.factors, "regularization": a.regularization, "alpha": a.alpha, "aux_weight": a.aux_weights}
    fixed = {"iterations": a.iterations}
    return _tuned(cfg, data, grid, fixed, ALSSettings, lambda s: ALS(s, cfg.seed, a.num_threads), progress)


def build_itemknn(cfg: Config, data: CascadeData, progress: bool) -> tuple[Retriever, dict]:
    k = cfg.itemknn
    grid = {"similarity": k.similarity, "neighbours": k.neighbours, "aux_weight": k.aux_weights}
    fixed = {"bm25_k1": k.bm25_k1, "bm25_b": k.bm25_b}
    return _tuned(cfg, data, grid, fixed, ItemKNNSettings, lambda s: ItemKNN(s, k.num_threads), progress)


def build_ease(cfg: Config, data: CascadeData, progress: bool) -> tuple[Retriever, dict]:
    e = cfg.ease
    grid = {"l2": e.l2, "aux_weight": e.aux_weights}
    return _tuned(cfg, data, grid, {}, EASESettings, EASE, progress)


def build_tuned_as(name: str, chosen: dict[str, dict], tuned_on: int):
    """ALS or item-kNN with the per-stage settings an earlier run chose on validation (no new search):
    the paper suite tunes on its first seed and refits the later seeds with the same settings."""

    def build(cfg: Config, data: CascadeData, progress: bool) -> tuple[Retriever, dict]:
        note = {s: {"note": f"settings chosen on validation with seed {tuned_on}"} for s in chosen}
        if name == "als":
            settings = {s: ALSSettings(**v) for s, v in chosen.items()}
            return ALS(settings, cfg.seed, cfg.als.num_threads), note
        if name == "itemknn":
            return ItemKNN({s: ItemKNNSettings(**v) for s, v in chosen.items()}, cfg.itemknn.num_threads), note
        if name == "ease":
            return EASE({s: EASESettings(**v) for s, v in chosen.items()}), note
        raise ConfigError(f"{name}: only als, itemknn and ease are tuned by search")

    return build


def build_neural(name: str) -> Callable[[Config, CascadeData, bool], tuple[Retriever, dict]]:
    """CSMF, its ablations and single-objective two-towers: epochs are chosen on validation inside fit."""

    def build(cfg: Config, data: CascadeData, progress: bool) -> tuple[Retriever, dict]:
        b = cfg.bench
        run_dir, cache = b.checkpoint_dir or None, b.pretrain_cache or None
        return CSMF.variant(name, cfg, progress=progress, run_dir=run_dir, pretrain_cache=cache), {}

    return build


def build_multitask(kind: str) -> Callable[[Config, CascadeData, bool], tuple[Retriever, dict]]:
    """shared-bottom, mmoe, ple, mvke: trained jointly on every objective, epoch chosen on validation."""

    def build(cfg: Config, data: CascadeData, progress: bool) -> tuple[Retriever, dict]:
        return MultiTask(kind, cfg, progress=progress), {}

    return build


MODELS: dict[str, Callable[[Config, CascadeData, bool], tuple[Retriever, dict]]] = {
    "popularity": build_popularity,
    "als": build_als,
    "itemknn": build_itemknn,
    "ease": build_ease,
    **{name: build_neural(name) for name in (*VARIANTS, ID_ONLY, NO_CONTEXT)},
    **{kind: build_multitask(kind) for kind in KINDS},
}


def model_builder(name: str) -> Callable[[Config, CascadeData, bool], tuple[Retriever, dict]]:
    if name in MODELS:
        return MODELS[name]
    if name.startswith("single-"):
        return build_neural(name)
    raise ConfigError(f"bench.models: unknown model {name!r}; choose from {sorted(MODELS)} or single-<stage>")


# ----- results ------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("csmf", "numpy", "scipy", "torch", "implicit", "pyarrow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


Fitted = tuple[Retriever, float]  # a model already fit, and the seconds its fit took


def run_model(
    cfg: Config,
    data: CascadeData,
    model_name: str,
    progress: bool = True,
    builder: Callable | None = None,
    fitted: Fitted | None = None,
    track_dir: str | Path | None = None,
) -> dict:
    """Fit (or take `fitted`: a model already fit with `cfg`, and its fit seconds), evaluate and measure one row.
    Its curves and test metrics go to `track_dir` (default <out_dir>/<dataset>/tensorboard/<model>; csmf.tracking)."""
    folder = Path(track_dir) if track_dir else Path(cfg.bench.out_dir) / data.name / "tensorboard" / model_name
    opened = Tracker.open(folder, cfg, f"{data.name} {model_name}") if distributed.ranks().main else Tracker.off()
    with opened as tracker:
        return _run_model(cfg, data, model_name, progress, builder, fitted, tracker)


def _run_model(cfg: Config, data: CascadeData, model_name: str, progress: bool, builder: Callable | None,
               fitted: Fitted | None, tracker: Tracker) -> dict:  # fmt: skip
    t0 = time.perf_counter()
    if fitted is None:
        model, tuning = (builder or model_builder(model_name))(cfg, data, progress)
        model.tracker = tracker  # the neural models report their epochs
        t1 = time.perf_counter()
        model.fit(data)
        t2 = time.perf_counter()
    else:
        (model, seconds), tuning = fitted, {}
        t1, t2 = t0, t0 + seconds
    tuning = tuning or getattr(model, "phases", {})
    t3 = time.perf_counter()
    metrics = evaluate(model, data, cfg.eval.ks, cfg.eval.score_budget_mb, model.served(data), progress)
    eval_seconds = time.perf_counter() - t3
    tracker.test({s: metric_values(m) for s, m in metrics.items()})
    b = cfg.bench
    cost = (
        query_cost(model, data, model.served(data), cfg.model.dim, b.cost_users, b.cost_items, seed=cfg.seed)
        if b.cost_items > 0
        else None
    )
    served = model.served(data)
    cold = None
    if b.cold_items > 0:  # the same model ranked for the test pairs of items with few training pairs
        view, n_cold = cold_item_view(data, b.cold_items)
        found = evaluate(model, view, cfg.eval.ks, cfg.eval.score_budget_mb, served, progress=False)
        cold = {"max_train_pairs": b.cold_items, "items": n_cold,
                "metrics": {s: metric_values(m) for s, m in found.items()},
                "eval_users": {s: m["users"] for s, m in found.items()}}  # fmt: skip
    t4 = time.perf_counter()
    sweep = weight_sweep(model, data, served, b.sweep_points, budget_mb=cfg.eval.score_budget_mb,
                         max_scores=b.sweep_max_scores, seed=cfg.seed) if (
        b.sweep_points >= 2 and len(served) >= 2) else None  # fmt: skip
    sweep_seconds = time.perf_counter() - t4
    return {
        "model": model_name,
        "dataset": data.name,
        "seed": cfg.seed,
        # the model's own config: a variant (csmf-no-aml, packnet, ...) is the bench config edited
        "config": {**config_to_dict(getattr(model, "cfg", cfg)), "model_settings": model.settings()},
        "versions": versions(),
        "train_seconds": round(t2 - t1, 3),
        "fit_reused": "selection" if fitted is not None else None,  # the selection's fit of the picked config
        "tuning_seconds": round(t1 - t0, 3),
        # what measuring costs beside the fit: the full-catalogue test evaluation and the weight sweep
        "eval_seconds": round(eval_seconds, 3),
        "sweep_seconds": round(sweep_seconds, 3),
        "params": model.num_params(),
        "metrics": {s: metric_values(m) for s, m in metrics.items()},
        "eval_users": {s: m["users"] for s, m in metrics.items()},
        # with per-row context the metrics average over (user, context) requests (csmf.data.context)
        "eval_requests": {s: m["requests"] for s, m in metrics.items() if "requests" in m} or None,
        "cost": cost,
        "weight_sweep": sweep,
        "cold_items": cold,
        "tuning": tuning,
        "data_report": data.report.as_dict(),
    }


def write_result(result: dict, out_dir: str | Path) -> Path:
    folder = Path(out_dir) / result["dataset"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{result['model']}.json"
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
    return path


TABLE_METRICS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50")


def markdown_table(results: list[dict]) -> str:
    stages: list[str] = []
    for r in results:
        stages += [s for s in r["metrics"] if s not in stages]
    short = {"recall": "R", "ndcg": "N"}
    head = ["model"] + [f"{s} {short[m.split('@')[0]]}@{m.split('@')[1]}" for s in stages for m in TABLE_METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for r in results:
        cells = [r["model"]]
        for s in stages:
            for m in TABLE_METRICS:
                v = r["metrics"].get(s, {}).get(m)
                cells.append("" if v is None else f"{v:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_table(results: list[dict], train_seconds: bool = False) -> str:
    """Parameters, index size and fused top-50 query time (ratio to a single D-wide two-tower, same run);
    `train_seconds` adds each model's fit time (the suite report's column)."""
    head = (
        "| model | params | vectors / item | index bytes / item | fused top-50 time ratio (catalogue) | "
        "ratio (1M items) |" + (" train s / seed |" if train_seconds else "")
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|" + ("---:|" if train_seconds else "")]
    for r in results:
        c = r.get("cost")
        if not c:
            continue
        big = "n/a (no index)" if c.get("query_ratio_1m") is None else f"{c['query_ratio_1m']:.2f}"
        lines.append(
            f"| {r['model']} | {c['params']:,} | {c['vectors_per_item']} | {c['index_bytes_per_item']} | "
            f"{c['query_ratio_catalogue']:.2f} | {big} |" + (f" {r['train_seconds']:.0f} |" if train_seconds else "")
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def write_table(out_dir: str | Path, dataset: str) -> tuple[Path, str]:
    folder = Path(out_dir) / dataset
    results = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    table = markdown_table(results)
    costs = cost_table(results)
    if costs:
        table += (
            "\n\nCost of a fused top-50 query for a batch of users (ratio to a single-objective two-tower):\n\n" + costs
        )
    path = folder / "table.md"
    path.write_text(f"# {dataset}\n\n{table}\n")
    return path, table


NEURAL = (*VARIANTS, ID_ONLY, NO_CONTEXT, *KINDS)  # the rows that train on the model/train/cascade sections


def is_neural(name: str) -> bool:
    return name in NEURAL or name.startswith("single-")


def choose_config(cfg: Config, data: CascadeData, pinned: dict | None, progress: bool, log: Callable[[str], None],
                  fit_stored: bool = True, track_dir: str | Path | None = None,
                  ) -> tuple[Config, dict | None, Fitted | None]:  # fmt: skip
    """The configuration of the neural rows, chosen on validation among select.candidates by fitting CSMF with
    each (csmf.selection), as ALS and item-kNN are tuned: (the pick's config, the selection record, and the
    fitted pick with its fit seconds, which the CSMF row reuses instead of fitting the same model again; None,
    None when the user's pins leave one candidate). `fit_stored=False`: a stored pick is not fit (no CSMF row
    will take it), and the third item is None. Each fit's curves go to `track_dir`/<candidate> (default
    <out_dir>/<dataset>/tensorboard/select; csmf.tracking)."""
    fitted: dict[int, Fitted] = {}
    pinned = pins(cfg) if pinned is None else pinned
    track_root = Path(track_dir) if track_dir else Path(cfg.bench.out_dir) / data.name / "tensorboard" / "select"

    def fit(candidate: Config, tag: str) -> CSMF:
        b = candidate.bench
        run_dir = str(Path(b.checkpoint_dir) / "select" / (tag or "pick")) if b.checkpoint_dir else None
        name, main = tag or "pick", distributed.ranks().main
        opened = Tracker.open(track_root / name, candidate, f"{data.name} select {name}") if main else Tracker.off()
        with opened as tracker:
            start = time.perf_counter()
            model = CSMF(candidate, progress=progress, run_dir=run_dir, pretrain_cache=b.pretrain_cache or None,
                         pinned=set(pinned), tracker=tracker)  # fmt: skip
            model.fit(data)
            fitted[id(model)] = (model, time.perf_counter() - start)
        return model

    found = candidates(cfg, pinned)
    if len(found) == 1:  # the pins leave one: nothing to search, nothing to fit here
        return found[0].cfg, None, None
    model, chosen, record = select(cfg, data, fit, pinned, log, fit_stored)
    return chosen, record, (fitted[id(model)] if model is not None else None)


def _sampled_validation(cfg: Config, n_items: int, pinned: dict | None, log: Callable[[str], None]) -> Config:
    """rules.sample_validation for every model of the bench (the peers' tuning grids too: each grid point of ALS
    ranked ~90k validation users against 194k items on the 2.2M-row simulator), said in the log."""
    cfg, notes = rules.sample_validation(cfg, n_items, pinned or {})
    if notes:
        log(f"eval.valid_users = {cfg.eval.valid_users:,}: validation (the tuning of every model) ranks a seeded "
            f"sample of users against the whole catalogue, the test every user ({n_items:,} items are above "
            f"{rules.SCALE_ITEMS:,})")  # fmt: skip
    cfg, notes = rules.cap_tuning(cfg, n_items, pinned or {})
    for note in notes:
        log(note)
    return cfg


def run_bench(cfg: Config, progress: bool = True, log: Callable[[str], None] = logger.info,
              pinned: dict | None = None) -> str:  # fmt: skip
    """Fit and evaluate each of bench.models; the neural rows share one configuration chosen on validation
    (select.candidates; `pinned`: the keys the user fixed, csmf.selection.pins)."""
    for name in cfg.bench.models:  # before loading: a typo should not cost a data load
        model_builder(name)
    data = load_dataset(cfg, progress)
    log(data.summary())
    log(data.report.render())
    cfg = _sampled_validation(cfg, data.n_items, pinned, log)
    selection = picked = None
    if cfg.select.candidates and any(is_neural(n) for n in cfg.bench.models):
        # a stored pick is fit here only for a CSMF row to take (a search fits every candidate anyway)
        cfg, selection, picked = choose_config(cfg, data, pinned, progress, log, fit_stored="csmf" in cfg.bench.models)
    results = []
    for name in cfg.bench.models:
        # the CSMF row is the model the selection fit with the pick (the same config and seed): not fit twice
        result = run_model(cfg, data, name, progress, fitted=picked if name == "csmf" else None)
        if selection is not None and is_neural(name):
            result["selection"] = selection
        results.append(result)
        path = write_result(result, cfg.bench.out_dir)
        dim = result["config"]["model_settings"].get("vector_dim")
        size = f", {result['params']:,} parameters" + (f", item vectors of dimension {dim}" if dim else "")
        log(f"{name}: wrote {path} (fit {result['train_seconds']:.1f}s, tuning {result['tuning_seconds']:.1f}s{size})")
    _, table = write_table(cfg.bench.out_dir, data.name)
    log(table)
    if cfg.bench.cold_items > 0:
        cold = results[0]["cold_items"]
        head = (f"cold items: the test pairs of the {cold['items']:,} items with at most {cold['max_train_pairs']} "
                "training pairs, ranked among those items")  # fmt: skip
        cold_table = markdown_table([{**r, "metrics": r["cold_items"]["metrics"]} for r in results])
        (Path(cfg.bench.out_dir) / data.name / "cold_table.md").write_text(f"{head}\n\n{cold_table}\n")
        log(f"{head}\n{cold_table}")
    return table
