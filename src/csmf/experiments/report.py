"""The suite report: `<report_dir>/<suite>.md` and its PNG plots, built only from the suite's result files.

Every number in the report is read from `<out_dir>/<suite>/<dataset>/<run>.json` (written by
csmf.experiments.suite), so the report regenerates from the same run and never mixes in older results.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI
import matplotlib.pyplot as plt  # noqa: E402

from csmf.config import Config  # noqa: E402
from csmf.experiments.bench import cost_table  # noqa: E402

METRICS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50")
SHORT = {"recall@10": "R@10", "ndcg@10": "N@10", "recall@50": "R@50", "ndcg@50": "N@50"}


# what each suite is meant to take on a 2-core machine (issue 12: the paper suite in under 2 hours)
SUITE_BUDGET_MIN = {"paper": 120}


def load_results(folder: Path) -> dict[str, dict]:
    """The suite's aggregated results of one dataset, in the suite's row order."""
    results = [json.loads(p.read_text()) for p in folder.glob("*.json") if p.name != "selection.json"]
    return {r["model"]: r for r in sorted(results, key=lambda r: (r.get("row", 1_000), r["model"]))}


def stages_of(results: dict[str, dict]) -> list[str]:
    stages: list[str] = []
    for r in results.values():
        stages += [s for s in r["metrics"] if s not in stages]
    return stages


def _in(results: dict[str, dict], group: str) -> list[dict]:
    return [r for r in results.values() if group in r.get("groups", [])]


def _one_seed(r: dict, rows: list[dict]) -> bool:
    """A seeded row that ran fewer seeds than the table's others (bench.suite_multitask_seeds): no spread to show."""
    most = max((len(x.get("seeds", ())) for x in rows), default=0)
    return not r.get("deterministic") and 0 < len(r.get("seeds", ())) < most


def _cell(r: dict, stage: str, metric: str, bold: bool = False, spread: bool = True) -> str:
    if stage not in r["metrics"]:
        return ""
    mean, std = r["metrics"][stage][metric], r["metrics_std"][stage][metric]
    text = f"{mean:.4f} ± {std:.4f}" if spread else f"{mean:.4f}"
    return f"**{text}**" if bold else text


def metric_table(rows: list[dict], stages: list[str], metrics: tuple[str, ...] = METRICS) -> str:
    """Mean ± std over seeds; the best mean of each column in bold."""
    head = ["model"] + [f"{s} {SHORT[m]}" for s in stages for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    best = {
        (s, m): max((r["metrics"][s][m] for r in rows if s in r["metrics"]), default=None)
        for s in stages
        for m in metrics
    }
    for r in rows:
        few = _one_seed(r, rows)
        mark = (" *" if r.get("deterministic") else "") + (f" † (seed {min(r['seeds'])})" if few else "")
        cells = [r["model"] + mark]
        for s in stages:
            for m in metrics:
                top = s in r["metrics"] and r["metrics"][s][m] == best[(s, m)] and len(rows) > 1
                cells.append(_cell(r, s, m, bold=top, spread=not few))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def standing(rows: list[dict], stages: list[str], reference: str = "csmf") -> list[str]:
    """One line per column: where `reference` ranks, and every model whose mean is ahead of it."""
    ref = next((r for r in rows if r["model"] == reference), None)
    if ref is None:
        return []
    lines = []
    for s in stages:
        if s not in ref["metrics"]:
            continue
        for m in ("recall@50", "ndcg@50"):
            mine = ref["metrics"][s][m]
            ahead = sorted(
                ((r["metrics"][s][m], r["model"]) for r in rows if s in r["metrics"] and r["metrics"][s][m] > mine),
                reverse=True,
            )
            if ahead:
                names = ", ".join(f"{name} {v:.4f}" for v, name in ahead)
                lines.append(f"- {s} {SHORT[m]}: csmf {mine:.4f}; **ahead of it: {names}**")
            else:
                lines.append(f"- {s} {SHORT[m]}: csmf {mine:.4f} is the best of the table")
    return lines


def cpp_binding(r: dict) -> str:
    """Whether CPP's tau criterion or the min_share floor decided each prune of the output dimensions of a
    CSMF result (first seed's phases): the words the ablation section prints."""
    prunes = [p for p in r.get("tuning") or [] if isinstance(p, dict) and p.get("phase", "").startswith("prune")]
    parts, tau_bound = [], []
    for p in prunes:
        b = (p.get("bound") or {}).get("output")
        if b is None:
            return ""  # a result from before the bound was recorded
        tau_bound.append(b["tau_units"] >= b["floor_units"])
        which = "tau" if tau_bound[-1] else "the min_share floor"
        parts.append(f"{p['phase']}: tau {p['tau']} frees {b['tau_units']} output dimensions, the floor "
                     f"{b['floor_units']}, so {which} decided ({b['freed_units']} freed)")  # fmt: skip
    if not parts:
        return ""
    never = not any(tau_bound)
    tail = (" CPP's criterion never bound in this configuration: its smallest columns hold more than tau of the "
            "mass before the floor's count is reached, so w/o CPP (the fixed share at the same floor) frees the "
            "same columns." if never else "")  # fmt: skip
    return "- Where CPP's criterion bound (csmf, first seed): " + "; ".join(parts) + "." + tail


def ablation_deltas(rows: list[dict], stages: list[str]) -> list[str]:
    ref = next((r for r in rows if r["model"] == "csmf"), None)
    binding = cpp_binding(ref) if ref is not None else ""
    out = [binding] if binding else []
    for r in rows:
        if ref is None or r is ref:
            continue
        parts = []
        for s in stages:
            for m in ("recall@50", "ndcg@50"):
                a, b = ref["metrics"][s][m], r["metrics"][s][m]
                parts.append(f"{s} {SHORT[m]} {100 * (b - a) / a:+.1f}%")
        not_hurt = [s for s in stages if r["metrics"][s]["recall@50"] >= ref["metrics"][s]["recall@50"]]
        verdict = (
            "the ablation is below csmf on every objective's R@50"
            if not not_hurt
            else f"**the ablation is not below csmf on R@50 of: {', '.join(not_hurt)}**"
        )
        why = ""
        if not_hurt and r["model"] in ABLATION_WHY:
            same = all(r["metrics"][s] == ref["metrics"][s] for s in stages)
            why = " " + ABLATION_WHY[r["model"]][0 if same else 1]
        out.append(f"- {r['model']} vs csmf: " + ", ".join(parts) + f" ({verdict})" + why)
    return out


# Why an ablation can fail to hurt (docs/method.md has the measurements): (when identical, otherwise)
ABLATION_WHY = {
    "csmf-no-cpp": (
        "Identical, by construction here: `cascade.min_share` gives each later stage a floor of columns, and "
        "when that floor binds before tau does, CPP and the fixed share free the same columns.",
        "CPP differs from the fixed share only where tau frees more than the `cascade.min_share` floor.",
    ),
    "csmf-no-aml": (
        "Identical: the additive margin is inert under a softmax whose gradient at a missed positive is "
        "already saturated (docs/method.md, AML).",
        "Within seed noise: the margin mostly re-weights positives the full-catalogue softmax and the "
        "distillation already rank (docs/method.md, AML).",
    ),
    "csmf-no-ar": (
        "Identical: accuracy recovery did not run.",
        "Accuracy recovery re-fits the kept columns after pruning, which keeps the earlier objective's "
        "accuracy at the cost of the columns the next stage inherits: without it the later stage gains a "
        "little and the earlier one loses.",
    ),
}


def later_stage_share(r: dict) -> str:
    """Mean share of units owned by each stage after the cascade, over the masked layers (first seed)."""
    ownership = r["config"].get("model_settings", {}).get("ownership", {})
    if not ownership:
        return ""
    owners = sorted({int(k) for table in ownership.values() for k in table if int(k) > 0})
    shares = [sum(float(t.get(str(o), t.get(o, 0.0))) for t in ownership.values()) / len(ownership) for o in owners]
    return " / ".join(f"{v:.2f}" for v in shares)


def on_common_seeds(rows: list[dict]) -> list[dict]:
    """The rows with metrics (mean, std) over the seeds all of them ran: the tau sweep's other taus run
    fewer seeds than csmf (bench.suite_tau_seeds), and a mean over other seeds would not compare."""
    common = set.intersection(*(set(r["seeds"]) for r in rows)) if rows else set()
    out = []
    for r in rows:
        per = [r["seeds"][k] for k in sorted(common)]
        mean, std = {}, {}
        for s, metrics in per[0].items():
            values = {m: [p[s][m] for p in per] for m in metrics}
            mean[s] = {m: statistics.fmean(v) for m, v in values.items()}
            std[s] = {m: (statistics.stdev(v) if len(v) > 1 else 0.0) for m, v in values.items()}
        out.append({**r, "metrics": mean, "metrics_std": std, "seeds_used": sorted(common, key=int)})
    return out


def tau_table(rows: list[dict], stages: list[str]) -> str:
    head = ["tau", "units per stage"] + [f"{s} {SHORT[m]}" for s in stages for m in ("recall@50", "ndcg@50")]
    lines = ["| " + " | ".join(head) + " |", "|---:|---|" + "---:|" * (len(head) - 2)]
    for r in sorted(rows, key=lambda r: r["tau"]):
        cells = [f"{r['tau']:g}", later_stage_share(r)]
        cells += [_cell(r, s, m) for s in stages for m in ("recall@50", "ndcg@50")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("weight_sweep")]


def sweep_table(rows: list[dict]) -> str:
    """Per model and pair of objectives: each objective's R@K of the fused ranking at every weight."""
    lines = []
    for r in rows:
        for entry in r["weight_sweep"]:
            a, b = entry["pair"]
            k = entry["k"]
            head = [f"weight on {b} (1 - on {a})"] + [f"{s} R@{k}" for s in entry["recall"]]
            lines += [
                f"**{r['model']}**, {a} -> {b} (top-{k} overlap of the end points: {entry['overlap']:.1%})",
                "",
                "| " + " | ".join(head) + " |",
                "|---:|" + "---:|" * len(entry["recall"]),
            ]
            for j, w in enumerate(entry["weights"]):
                lines.append(f"| {w:g} | " + " | ".join(f"{v[j]:.4f}" for v in entry["recall"].values()) + " |")
            lines.append("")
    return "\n".join(lines)


def sweep_summary(rows: list[dict]) -> list[str]:
    """One line per model and pair: how far each end objective moves between the end points."""
    out = []
    for r in rows:
        for entry in r["weight_sweep"]:
            a, b = entry["pair"]
            ra, rb = entry["recall"][a], entry["recall"][b]
            rising = all(y >= x - 1e-9 for x, y in zip(rb, rb[1:], strict=False))
            falling = all(y <= x + 1e-9 for x, y in zip(ra, ra[1:], strict=False))
            shape = "monotone" if rising and falling else "not monotone"
            out.append(
                f"- {r['model']} {a} -> {b}: {b} R@50 {rb[0]:.4f} -> {rb[-1]:.4f}, {a} R@50 {ra[0]:.4f} -> "
                f"{ra[-1]:.4f} ({shape}); end-point top-50 overlap {entry['overlap']:.1%}"
            )
    return out


# ----- plots --------------------------------------------------------------------------------------


def plot_tau(rows: list[dict], stages: list[str], path: Path, dataset: str) -> None:
    rows = sorted(rows, key=lambda r: r["tau"])
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    taus = [r["tau"] for r in rows]
    for s in stages:
        ax.errorbar(taus, [r["metrics"][s]["recall@50"] for r in rows],
                    yerr=[r["metrics_std"][s]["recall@50"] for r in rows], marker="o", capsize=3, label=s)  # fmt: skip
    ax.set_xlabel("tau (CPP cumulative-mass threshold)")
    ax.set_ylabel("Recall@50")
    ax.set_title(f"{dataset}: CSMF by tau (seeds {', '.join(rows[0]['seeds_used'])})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_main(rows: list[dict], stages: list[str], path: Path, dataset: str) -> None:
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rows)), 3.8), dpi=100)
    width = 0.8 / len(stages)
    for j, s in enumerate(stages):
        xs = [i + (j - (len(stages) - 1) / 2) * width for i in range(len(rows))]
        ys = [r["metrics"].get(s, {}).get("recall@50", 0.0) for r in rows]
        es = [r["metrics_std"].get(s, {}).get("recall@50", 0.0) for r in rows]
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=s)
    ax.set_xticks(range(len(rows)), [r["model"] for r in rows], rotation=35, ha="right")
    ax.set_ylabel("Recall@50")
    ax.set_title(f"{dataset}: Recall@50 per objective (mean ± std)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_cost(rows: list[dict], path: Path, dataset: str) -> None:
    rows = [r for r in rows if r.get("cost") and r["cost"].get("index_bytes_per_item")]
    at_1m = all(r["cost"].get("query_ratio_1m") is not None for r in rows)
    key = "query_ratio_1m" if at_1m else "query_ratio_catalogue"
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 0.35 * len(rows) + 1.5), dpi=100)
    names = [r["model"] for r in rows]
    left.barh(names, [r["cost"][key] for r in rows], color="tab:blue")
    left.axvline(1.0, color="grey", lw=0.8)
    left.set_xlabel("fused top-50 time / single two-tower" + (" (1M items)" if key.endswith("1m") else ""))
    right.barh(names, [r["cost"]["index_bytes_per_item"] for r in rows], color="tab:orange")
    right.set_xlabel("index bytes per item")
    right.set_yticks([])
    fig.suptitle(f"{dataset}: serving cost of a fused query")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sweep(rows: list[dict], path: Path, dataset: str) -> None:
    """Trade-off curves: R@50 of the pair's first objective (x) against its second (y), one line per model."""
    pairs = [tuple(e["pair"]) for e in rows[0]["weight_sweep"]]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 4.2), dpi=100, squeeze=False)
    for ax, pair in zip(axes[0], pairs, strict=True):
        for r in rows:
            entry = next((e for e in r["weight_sweep"] if tuple(e["pair"]) == pair), None)
            if entry is None or r["model"] == "popularity":  # far below the rest: it would flatten the plot
                continue
            xs, ys = entry["recall"][pair[0]], entry["recall"][pair[1]]
            mine = r["model"] == "csmf"
            ax.plot(xs, ys, marker="o", ms=3, label=r["model"], lw=2.4 if mine else 1.0, zorder=3 if mine else 2,
                    color="black" if mine else None)  # fmt: skip
        ax.set_xlabel(f"{pair[0]} Recall@50")
        ax.set_ylabel(f"{pair[1]} Recall@50")
        ax.set_title(f"{dataset}: weight {pair[0]} -> {pair[1]}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----- the report ---------------------------------------------------------------------------------


def _selection_lines(path: Path) -> list[str]:
    """The candidates the neural rows' configuration was chosen from on validation, and the pick."""
    if not path.exists():
        return []
    record = json.loads(path.read_text())["record"]
    lines = ["### Configuration chosen on validation", "",
             f"The neural rows (CSMF, its ablations, the baselines of its trainer, the single and multi-task towers) "
             f"use the candidate with the best {record['metric']} (`select.candidates`, first seed):", "",
             "| candidate | validation per objective | mean | fit s |", "|---|---|---:|---:|"]  # fmt: skip
    for t in record["trials"]:
        values = ", ".join(f"{s} {v:.4f}" for s, v in t["values"].items())
        mark = " **(picked)**" if t["candidate"] == record["pick"] else ""
        lines.append(f"| `{t['candidate']}`{mark} | {values} | {t['mean']:.4f} | {t['seconds']:.0f} |")
    if record.get("skipped"):
        lines.append(f"\nNot tried within the budget of {record['budget_s']:g} s: {record['skipped']}.")
    if record.get("dropped"):
        lines.append(f"\nNot fit, their bare preset scored more than {record['variant_gap']:.0%} below the best "
                     f"(`select.variant_gap`): {record['dropped']}.")  # fmt: skip
    return [*lines, ""]


def _selection_seconds(folder: Path) -> float:
    """What choosing the neural rows' configuration cost the suite (0 when it ran no search)."""
    path = folder / "selection.json"
    return float(json.loads(path.read_text()).get("seconds", 0.0)) if path.exists() else 0.0


def write_report(root: Path, datasets: list[str], report_dir: Path, suite: str, cfg: Config, minutes: float) -> Path:
    plots = report_dir / suite
    plots.mkdir(parents=True, exist_ok=True)
    command = "csmf bench --suite paper" + (" --quick" if suite.endswith("-quick") else "")
    seeds = ", ".join(map(str, cfg.bench.suite_seeds))
    total = 0.0
    body: list[str] = []
    for dataset in datasets:
        results = load_results(root / dataset)
        total += sum(r.get("wall_seconds", 0.0) for r in results.values()) + _selection_seconds(root / dataset)
        stages = stages_of(results)
        main, ablation, taus = _in(results, "main"), _in(results, "ablation"), _in(results, "tau")
        summary = root / dataset / "dataset.txt"
        body += [f"## {dataset}", "", f"Objectives in cascade order: {' -> '.join(stages)}.", ""]
        if summary.exists():
            body += ["```", summary.read_text().rstrip(), "```", ""]
        body += _selection_lines(root / dataset / "selection.json")
        body += ["### Main table", "", metric_table(main, stages), ""]
        body += ["Where CSMF stands on each objective (R@50, N@50; means over seeds):", "", *standing(main, stages), ""]
        plot_main(main, stages, plots / f"main-{dataset}.png", dataset)
        body += [f"![Recall@50 per model]({suite}/main-{dataset}.png)", ""]
        body += ["### Cost of a fused multi-objective query", "", cost_table(main, train_seconds=True), ""]
        plot_cost(main, plots / f"cost-{dataset}.png", dataset)
        body += [f"![serving cost]({suite}/cost-{dataset}.png)", ""]
        swept = sweep_rows(main)
        if swept:
            body += ["### Objective weights", "",
                     "Each row of a table is one fused ranking, (1 - w) s_a + w s_b, scored on every objective's test "
                     "users (mean over seeds). The end-point overlap is the share of the top-50 the two single-"
                     "objective weightings have in common: 100% means the weight knob does nothing.", "",
                     *sweep_summary(swept), ""]  # fmt: skip
            plot_sweep(swept, plots / f"weights-{dataset}.png", dataset)
            body += [f"![weight trade-off]({suite}/weights-{dataset}.png)", "", sweep_table(swept), ""]
        body += ["### Ablations", "", metric_table(ablation, stages), "", *ablation_deltas(ablation, stages), ""]
        if taus:
            taus = on_common_seeds(taus)
            used = ", ".join(taus[0]["seeds_used"])
            body += ["### Tau sensitivity", "",
                     f"Every tau on the seeds all of them ran ({used}; `bench.suite_tau_seeds`), csmf's default "
                     "tau included, so the rows compare.", "", tau_table(taus, stages), ""]  # fmt: skip
            plot_tau(taus, stages, plots / f"tau-{dataset}.png", dataset)
            body += [f"![tau sweep]({suite}/tau-{dataset}.png)", ""]
    budget = SUITE_BUDGET_MIN.get(suite)
    head = [
        f"# CSMF benchmark report: `{suite}`",
        "",
        f"Regenerate: `{command}` (results in `{root}/`, resumable: finished runs are skipped). "
        "Every number below is read from that run's result files.",
        "",
        f"- generated {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on {platform.machine()} "
        f"with {os.cpu_count()} cores, Python {platform.python_version()}",
        f"- seeds: {seeds} (mean ± sample std over seeds; `*` = deterministic model, one run; `†` = the first "
        "seed only, `bench.suite_multitask_seeds`); ALS and item-kNN are tuned on validation with the first seed and "
        "refit with each seed",
        f"- compute: {total / 60:.1f} min summed over every (model, seed) run and the configuration search; "
        f"this invocation {minutes:.1f} min"
        + (f" (**above the {budget} min budget of this suite**)" if budget and total / 60 > budget else ""),
        "- query cost: exact inner-product top-50 for a batch of users, first seed, as a ratio to a "
        "single-objective two-tower (one D-wide vector per item) timed in the same call",
        "",
    ]
    path = report_dir / f"{suite}.md"
    path.write_text("\n".join(head + body))
    return path
