"""`csmf bench --suite`: its rows, shared pretraining, seeds aggregation, resume, and the report."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

import csmf.experiments.suite as suite_module
from csmf.cascade import CascadeTrainer
from csmf.cli import main
from csmf.config import Config, ConfigError, override
from csmf.data.logtable import load_log
from csmf.data.split import split_log
from csmf.experiments.suite import suite_runs
from csmf.models.teachers import teacher_for

TINY_SUITE = [
    "--set", "bench.suite_sim_users=160", "--set", "bench.suite_sim_items=120",
    "--set", "sim.exposures_per_user=20",
    "--set", "train.max_epochs=1,1", "--set", "bench.suite_cost_items=2000", "--set", "bench.cost_users=32",
    "--set", "als.factors=8", "--set", "als.iterations=2", "--set", "itemknn.neighbours=20",
    "--set", "itemknn.aux_weights=0", "--set", "als.aux_weights=0", "--set", "multitask.expert_dim=16",
    "--set", "multitask.max_epochs=1",
    "--set", "select.candidates=graph,graph model.graph_hops=1",
]  # fmt: skip


def test_suite_rows_reuse_csmf_for_the_default_tau():
    cfg = override(Config(), ["bench.suite_taus=0.05,0.1,0.3"])
    runs = {r.name: r for r in suite_runs(cfg, ("view", "purchase"))}
    assert set(runs) == {
        "popularity", "als", "itemknn", "ease", "single-view", "single-purchase", "naive-ft", "packnet",
        "shared-bottom", "mmoe", "ple", "mvke", "csmf", "csmf-no-cpp", "csmf-no-aml", "csmf-no-ar",
        "csmf-tau0.05", "csmf-tau0.3",
    }  # fmt: skip
    assert runs["csmf"].groups == ("main", "ablation", "tau") and runs["csmf"].tau is None
    assert runs["csmf-tau0.3"].groups == ("tau",) and runs["csmf-tau0.3"].model == "csmf"
    assert runs["csmf-tau0.3"].config(cfg, 2).cascade.tau == (0.3,)
    assert runs["csmf-tau0.3"].config(cfg, 2).seed == 2
    assert not runs["csmf-no-aml"].cost and runs["mmoe"].cost


def _tiny_data(sim_parquet):
    path, _ = sim_parquet
    return split_log(load_log(path), 0.2, 0.1, 0, name="sim")


def test_shared_pretraining_is_bit_identical_to_training_afresh(sim_parquet, tmp_path):
    data = _tiny_data(sim_parquet)
    cfg = override(Config(), ["train.max_epochs=2,1", "train.extra_negatives=64"])
    fresh = CascadeTrainer(data, cfg, teacher=teacher_for(cfg)).run()
    cache = tmp_path / "cache"
    first = CascadeTrainer(data, cfg, pretrain_cache=cache, teacher=teacher_for(cfg))
    first.run()
    assert len(list(cache.glob("pretrain-*.pt"))) == 1
    again = CascadeTrainer(data, cfg, pretrain_cache=cache, teacher=teacher_for(cfg))
    shared = again.run()
    assert again.history[0].get("cached") is True and "cached" not in first.history[0]
    for name, tensor in fresh.model.state_dict().items():
        assert torch.equal(tensor, shared.model.state_dict()[name]), name
    # another seed is another pretraining: it must not be served from the cache
    other = CascadeTrainer(data, override(cfg, ["seed=1"]), pretrain_cache=cache, teacher=teacher_for(cfg))
    assert other.pretrain.path != again.pretrain.path


def test_variant_results_record_the_variant_config(sim_parquet):
    from csmf.experiments.bench import run_model

    data = _tiny_data(sim_parquet)
    cfg = override(Config(), ["train.max_epochs=1,1", "bench.cost_items=0"])
    result = run_model(cfg, data, "csmf-no-aml", progress=False)
    assert result["config"]["cascade"]["aml_m0"] == 0.0


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("suite")
    out, reports = root / "results", root / "reports"
    argv = ["bench", "--suite", "paper", "--quick", "--out", str(out), "--set", f"bench.report_dir={reports}",
            *TINY_SUITE, "--quiet"]  # fmt: skip
    assert main(argv) == 0
    return out, reports, argv


def test_suite_writes_seeds_means_and_the_report(tiny_suite):
    out, reports, _ = tiny_suite
    folder = out / "paper-quick" / "sim"
    csmf = json.loads((folder / "csmf.json").read_text())
    assert set(csmf["seeds"]) == {"0", "1"}
    for metric in ("recall@50", "ndcg@50"):
        per_seed = [csmf["seeds"][s]["conversion"][metric] for s in ("0", "1")]
        assert csmf["metrics"]["conversion"][metric] == pytest.approx(statistics.fmean(per_seed))
        assert csmf["metrics_std"]["conversion"][metric] == pytest.approx(statistics.stdev(per_seed))
    assert csmf["cost"]["vectors_per_item"] == 1 and csmf["groups"] == ["main", "ablation", "tau"]
    assert json.loads((folder / "csmf-no-aml.json").read_text())["config"]["cascade"]["aml_m0"] == 0.0
    itemknn = json.loads((folder / "itemknn.json").read_text())
    assert itemknn["deterministic"] and set(itemknn["seeds"]) == {"0"}
    als_seed1 = json.loads((folder / "seeds" / "als" / "seed-1.json").read_text())
    assert "seed 0" in json.dumps(als_seed1["tuning"])  # refit with the settings chosen on seed 0
    assert not (folder / "checkpoints").exists() or not any((folder / "checkpoints").iterdir())
    report = (reports / "paper-quick.md").read_text()
    for section in ("### Main table", "### Cost of a fused", "### Objective weights", "### Ablations",
                    "### Tau sensitivity"):  # fmt: skip
        assert section in report
    sweep = csmf["weight_sweep"]  # mean over the seeds' sweeps, one entry per pair of objectives
    assert [e["pair"] for e in sweep] == [["exposure", "click"], ["exposure", "conversion"], ["click", "conversion"]]
    assert "top-50 overlap" in report and (reports / "paper-quick" / "weights-sim.png").exists()
    # the multi-task rows ran the first seed only (bench.suite_multitask_seeds = 1), and the table says so
    mmoe = json.loads((folder / "mmoe.json").read_text())
    assert set(mmoe["seeds"]) == {"0"} and "| mmoe † (seed 0) | " in report and "| csmf | " in report
    assert "| mmoe † (seed 0) | " + f"{mmoe['metrics']['exposure']['recall@10']:.4f} |" in report  # no ± 0.0000
    # the other tau ran the first seed only (bench.suite_tau_seeds = 1); the tau table compares csmf on it
    assert set(json.loads((folder / "csmf-tau0.3.json").read_text())["seeds"]) == {"0"}
    seed0 = csmf["seeds"]["0"]["conversion"]["recall@50"]
    tau_section = report.split("### Tau sensitivity")[1]
    assert "seeds all of them ran (0;" in tau_section and f"| {seed0:.4f}" in tau_section.split("| 0.1 |")[1]
    assert f"{csmf['metrics']['conversion']['recall@50']:.4f} ± " in report
    for plot in ("main-sim.png", "cost-sim.png", "tau-sim.png"):
        assert (reports / "paper-quick" / plot).read_bytes()[:4] == b"\x89PNG"
    # the neural rows' configuration was chosen on validation with the first seed, and every neural row used it
    chosen = json.loads((folder / "selection.json").read_text())
    trials = chosen["record"]["trials"]
    assert [t["candidate"] for t in trials] == ["graph", "graph model.graph_hops=1"]
    assert chosen["record"]["pick"] == max(trials, key=lambda t: t["mean"])["candidate"]
    assert csmf["config"]["model"]["graph_hops"] == chosen["config"]["model"]["graph_hops"]
    # the first seed's CSMF row is the search's fit of the pick; the other seeds fit their own
    reused = {p.stem: json.loads(p.read_text())["fit_reused"] for p in (folder / "seeds" / "csmf").glob("seed-*.json")}
    assert reused["seed-0"] == "selection" and all(v is None for k, v in reused.items() if k != "seed-0")
    assert "### Configuration chosen on validation" in report and "**(picked)**" in report
    # the search's compute counts in the suite's total, beside every (row, seed) run
    rows = sum(json.loads(p.read_text())["wall_seconds"] for p in folder.glob("*.json") if p.name != "selection.json")
    total = (rows + chosen["seconds"]) / 60
    rounding = 0.05 * (len(trials) + 1)  # each figure is rounded to 0.1 s
    assert chosen["seconds"] >= sum(t["seconds"] for t in trials) - rounding and f"compute: {total:.1f} min" in report
    # the ablation section says whether CPP's tau or the min_share floor decided each prune
    binding = report.split("### Ablations")[1]
    assert "Where CPP's criterion bound (csmf, first seed): prune-1: tau 0.1 frees" in binding


def test_suite_rows_runs_a_subset_and_names_unknown_rows(tiny_suite, monkeypatch, capsys):
    out, reports, argv = tiny_suite
    trained = []

    def record(cfg, data, name, *args, **kwargs):
        trained.append(name)
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(suite_module, "run_model", record)
    assert main([*argv, "--set", "bench.suite_rows=csmf,als"]) == 0  # both finished: nothing retrains
    assert trained == []
    assert main([*argv, "--set", "bench.suite_rows=cmsf"]) == 2
    assert "bench.suite_rows: no rows named ['cmsf']" in capsys.readouterr().err


def test_suite_resumes_without_retraining_and_refuses_another_config(tiny_suite, monkeypatch):
    out, reports, argv = tiny_suite

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(suite_module, "run_model", no_training)
    assert main(argv) == 0  # every (run, seed) file exists: only the report is rebuilt
    sets = [*suite_module.QUICK_SETS, *(a for a in argv if "=" in a), f"bench.out_dir={out}", "train.lr=0.02"]
    with pytest.raises(ConfigError, match="another config"):
        suite_module.run_suite(override(Config(), sets), "paper-quick", progress=False, log=lambda _: None)


def test_quick_needs_a_suite(capsys):
    assert main(["bench", "--quick"]) == 2
    assert "--suite" in capsys.readouterr().err


def test_suite_without_matplotlib_fails_before_training(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["bench", "--suite", "paper", "--quick", "--out", str(tmp_path)]) == 2
    assert "pip install 'csmf[report]'" in capsys.readouterr().err
    assert not (tmp_path / "paper-quick").exists()


def test_plain_bench_does_not_time_a_synthetic_catalogue_unless_asked(sim_parquet, tmp_path):
    argv = ["bench", "--dataset", str(sim_parquet[0]), "--models", "popularity", "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    assert json.loads((tmp_path / "sim" / "popularity.json").read_text())["cost"] is None
