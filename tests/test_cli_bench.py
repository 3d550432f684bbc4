"""The `csmf` command end to end (simulate, bench, data), result files, and the TOML config."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from csmf.cli import main
from csmf.config import (
    ALSConfig,
    BenchConfig,
    Config,
    ConfigError,
    DataConfig,
    config_from_dict,
    load_config,
    override,
    save_config,
)
from csmf.data.logtable import load_log
from csmf.data.split import split_log
from csmf.experiments.bench import run_model

REQUIRED_KEYS = {"model", "dataset", "seed", "config", "versions", "train_seconds", "params", "metrics"}
METRIC_KEYS = {"recall@10", "ndcg@10", "recall@20", "ndcg@20", "recall@50", "ndcg@50"}
SIM_STAGES = {"exposure", "click", "conversion"}
FAST_ALS = ["--set", "als.factors=8", "--set", "als.iterations=3"]


@pytest.fixture(scope="module")
def sim_log_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "sim.parquet"
    assert main(["simulate", "--out", str(path), "--users", "200", "--items", "100", "--quiet"]) == 0
    return path


@pytest.fixture(scope="module")
def bench_out(sim_log_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("results")
    argv = ["bench", "--dataset", str(sim_log_path), "--models", "popularity,als", "--no-tune", "--out", str(out)]
    assert main([*argv, *SMALL_COST, "--quiet"]) == 0
    return out


SMALL_COST = ["--set", "bench.cost_items=3000", "--set", "bench.cost_users=64", "--quiet"]


def read_result(out: Path, dataset: str, model: str) -> dict:
    return json.loads((out / dataset / f"{model}.json").read_text())


def test_simulate_command(tmp_path, capsys):
    out = tmp_path / "nested" / "s.csv"
    assert main(["simulate", "--out", str(out), "--users", "50", "--items", "40", "--seed", "4", "--quiet"]) == 0
    printed = capsys.readouterr().out
    log = load_log(out)
    assert f"wrote {out}: {log.report.rows_read:,} rows" in printed
    assert f"click {int(log.labels[:, 1].sum()):,}" in printed
    assert log.n_users == 50 and log.n_items <= 40
    assert (tmp_path / "nested" / "s.csv.truth.npz").exists()


def test_bench_result_layout(bench_out, sim_log_path):
    data = split_log(load_log(sim_log_path), name="sim")
    test_users = {s: int((np.diff(data.test[s].indptr) > 0).sum()) for s in data.stages}
    for model in ("popularity", "als"):
        result = read_result(bench_out, "sim", model)
        assert REQUIRED_KEYS <= set(result)
        assert result["model"] == model
        assert result["dataset"] == "sim"
        assert result["seed"] == 0
        assert set(result["metrics"]) == SIM_STAGES
        for stage, metrics in result["metrics"].items():
            assert set(metrics) == METRIC_KEYS, stage
            assert all(0.0 <= v <= 1.0 for v in metrics.values()), (model, stage, metrics)
            # Recall can only grow with K.
            assert metrics["recall@10"] <= metrics["recall@20"] <= metrics["recall@50"]
        assert result["eval_users"] == test_users
        assert result["config"]["bench"]["tune"] is False
        assert result["config"]["data"]["dataset"] == str(sim_log_path)
        assert result["train_seconds"] >= 0
        assert {"python", "numpy", "torch", "implicit"} <= set(result["versions"])
    pop = read_result(bench_out, "sim", "popularity")
    als = read_result(bench_out, "sim", "als")
    assert pop["params"] == 0
    settings = als["config"]["model_settings"]
    assert set(settings) == SIM_STAGES
    per_stage = [(data.n_users + data.n_items) * settings[s]["factors"] for s in data.stages]
    assert als["params"] == sum(per_stage)
    assert all(als["tuning"][s]["note"] == "not tuned" for s in data.stages)
    # Cost: ALS serves a fused query over its concatenated per-objective factors; popularity has no index.
    width = sum(settings[s]["factors"] for s in data.stages)
    assert als["cost"]["index_width"] == width and als["cost"]["index_bytes_per_item"] == 4 * width
    assert als["cost"]["vectors_per_item"] == len(data.stages) and als["cost"]["query_ratio_1m"] > 0
    assert pop["cost"]["vectors_per_item"] == 0 and pop["cost"]["query_ratio_1m"] is None


def test_bench_table_lists_every_model(bench_out):
    table = (bench_out / "sim" / "table.md").read_text()
    quality, cost = table.split("Cost of a fused top-50 query")
    lines = quality.splitlines()
    assert lines[0] == "# sim"
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| model")]
    assert sorted(r.split("|")[1].strip() for r in rows) == ["als", "popularity"]
    cost_rows = [line for line in cost.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert sorted(r.split("|")[1].strip() for r in cost_rows) == ["als", "popularity"]
    assert "| popularity | 0 | 0 | 0 |" in cost  # no parameters, no vector index
    pop = read_result(bench_out, "sim", "popularity")
    pop_row = next(r for r in rows if r.startswith("| popularity "))
    assert f"{pop['metrics']['click']['recall@10']:.4f}" in pop_row
    header = next(line for line in lines if line.startswith("| model"))
    assert "click R@10" in header and "conversion N@50" in header


def test_bench_on_packaged_jd(tmp_path):
    assert (
        main(["bench", "--dataset", "jd", "--models", "popularity", "--no-tune", "--out", str(tmp_path), *SMALL_COST])
        == 0
    )
    result = read_result(tmp_path, "jd", "popularity")
    assert set(result["metrics"]) == {"view", "purchase"}
    assert result["eval_users"] == {"view": 6_959, "purchase": 2_579}  # click hold-out / tst_buy users
    # The popularity row of the README's JD table (deterministic: counts, no seed).
    readme = {
        "view": {"recall@10": 0.0214, "ndcg@10": 0.0129, "recall@50": 0.0747, "ndcg@50": 0.0286},
        "purchase": {"recall@10": 0.0172, "ndcg@10": 0.0088, "recall@50": 0.0491, "ndcg@50": 0.0182},
    }
    for stage, expected in readme.items():
        for metric, value in expected.items():
            assert round(result["metrics"][stage][metric], 4) == value, (stage, metric)
    assert all(set(m) == METRIC_KEYS for m in result["metrics"].values())
    assert (tmp_path / "jd" / "table.md").exists()


def test_bench_is_deterministic_for_a_seed(sim_log_path, tmp_path):
    runs = []
    for name in ("a", "b"):
        argv = ["bench", "--dataset", str(sim_log_path), "--models", "popularity,als", "--no-tune"]
        assert main([*argv, "--out", str(tmp_path / name), *FAST_ALS, *SMALL_COST, "--quiet"]) == 0
        runs.append({m: read_result(tmp_path / name, "sim", m)["metrics"] for m in ("popularity", "als")})
    assert runs[0] == runs[1]
    assert runs[0]["als"] != runs[0]["popularity"]


def test_bench_records_the_seed(sim_log_path, tmp_path):
    argv = ["bench", "--dataset", str(sim_log_path), "--models", "popularity", "--no-tune", "--seed", "3"]
    assert main([*argv, "--out", str(tmp_path), *SMALL_COST, "--quiet"]) == 0
    assert read_result(tmp_path, "sim", "popularity")["seed"] == 3


def test_data_command_reports_a_clean_split(sim_log_path, capsys):
    assert main(["data", "--dataset", str(sim_log_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "leak check: clean" in out
    assert "cascade exposure -> click -> conversion" in out


def test_config_error_exits_2_naming_the_field(capsys):
    assert main(["bench", "--set", "als.nope=1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("csmf: error:")
    assert "als.nope" in err and "'nope'" in err
    assert main(["bench", "--set", "als.iterations=many", "--quiet"]) == 2
    assert "als.iterations: expected int, got 'many'" in capsys.readouterr().err


def test_config_file_error_exits_2_naming_file_and_key(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[als]\nfactorz = [8]\n")
    assert main(["bench", "--config", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "factorz" in err


def test_data_errors_exit_2_naming_the_file(tmp_path, capsys):
    missing = tmp_path / "missing.csv"
    assert main(["bench", "--dataset", str(missing), "--models", "popularity", "--quiet"]) == 2
    assert f"{missing}: file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,item_id,click\n1,1,1\n1,2,1\n2,1,5\n")
    assert main(["data", "--dataset", str(bad), "--stages", "click", "--quiet"]) == 2
    assert f"{bad}:4: stage column 'click' has value" in capsys.readouterr().err
    assert main(["data", "--dataset", "jd", "--set", f"data.jd_dir={tmp_path}", "--quiet"]) == 2
    assert f"not found in {tmp_path}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["data", "--dataset", "jd", "--stages", "view,bogus", "--quiet"],
        ["simulate", "--out", "OUT/sim.json", "--users", "10", "--quiet"],
        ["data", "--dataset", "SIM", "--set", "data.split=latest", "--quiet"],
        ["bench", "--dataset", "SIM", "--models", "bogus", "--out", "OUT", "--quiet"],
    ],
    ids=["jd-stage", "sim-suffix", "split", "model"],
)
def test_bad_user_input_exits_2(argv, sim_log_path, tmp_path, capsys):
    argv = [a.replace("OUT", str(tmp_path)).replace("SIM", str(sim_log_path)) for a in argv]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("csmf: error:")


def test_bench_tunes_on_validation_with_a_tiny_grid(sim_log_path):
    cfg = Config(
        data=DataConfig(dataset=str(sim_log_path)),
        als=ALSConfig(factors=(4, 8), regularization=(0.1,), alpha=(10.0,), aux_weights=(0.1,), iterations=2),
        bench=BenchConfig(tune=True),
    )
    data = split_log(load_log(sim_log_path), name="sim")
    result = run_model(cfg, data, "als", progress=False)
    for stage in data.stages:
        record = result["tuning"][stage]
        assert record["metric"] == "recall@50"
        assert [t["params"]["factors"] for t in record["trials"]] == [4, 8]
        # The best trial; on a tie the incumbent (the first grid point, since 128 is not on the grid).
        best = max(record["trials"], key=lambda t: t["value"])
        assert record["best"] == best["params"]
        assert result["config"]["model_settings"][stage]["factors"] == best["params"]["factors"]
        assert result["config"]["model_settings"][stage]["iterations"] == 2
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        run_model(cfg, data, "nope", progress=False)


# ----- config -------------------------------------------------------------------------------------


def test_load_config_from_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        "seed = 7\n"
        "[data]\n"
        'dataset = "log.csv"\n'
        'stages = ["click", "buy"]\n'
        'user_features = ["age"]\n'
        "test_frac = 0.25\n"
        "[als]\n"
        "factors = [8, 16]\n"
        "iterations = 4\n"
        "[bench]\n"
        "tune = false\n"
        'models = ["popularity"]\n'
    )
    cfg = load_config(path)
    assert cfg.seed == 7
    assert cfg.data == replace(
        DataConfig(), dataset="log.csv", stages=("click", "buy"), user_features=("age",), test_frac=0.25
    )
    assert cfg.als == replace(ALSConfig(), factors=(8, 16), iterations=4)
    assert cfg.bench == replace(BenchConfig(), tune=False, models=("popularity",))
    assert cfg.sim == Config().sim and cfg.itemknn == Config().itemknn and cfg.eval == Config().eval


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[als]\nnope = 1\n", "als: unknown key(s) ['nope']"),
        ("bogus = 1\n", "unknown key(s) ['bogus']"),
        ("[als]\niterations = 1.5\n", "als.iterations: expected int, got 1.5"),
        ("[data]\nstages = 3\n", "data.stages: expected a list, got 3"),
        ("als = 3\n", "als: expected a table, got 3"),
        ('[bench]\ntune = "maybe"\n', "bench.tune: expected bool, got 'maybe'"),
        ("[als\n", "not valid TOML"),
    ],
)
def test_load_config_errors_name_file_and_key(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


def test_load_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.toml")


@pytest.mark.parametrize(
    "cfg",
    [
        Config(),
        Config(
            seed=5,
            data=DataConfig(dataset="x.parquet", stages=("a", "b"), user_features=("seg",), item_features=()),
            als=ALSConfig(factors=(8,), alpha=(0.5, 2.0), num_threads=2),
            bench=BenchConfig(models=("als",), tune=False, out_dir="out"),
        ),
    ],
    ids=["defaults", "custom"],
)
def test_save_and_load_round_trip(tmp_path, cfg):
    path = tmp_path / "cfg.toml"
    save_config(cfg, path)
    assert load_config(path) == cfg


def test_override_assignments():
    cfg = override(
        Config(),
        ["als.factors=64,128", "data.user_features=none", "bench.tune=false", "eval.ks=5,50", "seed=9"],
    )
    assert cfg.als.factors == (64, 128)
    assert cfg.data.user_features is None
    assert cfg.bench.tune is False
    assert cfg.eval.ks == (5, 50)
    assert cfg.seed == 9
    assert override(Config(), ["data.user_features=a, b"]).data.user_features == ("a", "b")
    with pytest.raises(ConfigError, match="'als' is a section"):
        override(Config(), ["als=1"])
    with pytest.raises(ConfigError, match="'seed' is not a section"):
        override(Config(), ["seed.x=1"])
    with pytest.raises(ConfigError, match="expected section.field=value"):
        override(Config(), ["als.factors"])
    assert config_from_dict({}) == Config()


def test_bench_on_a_catalogue_smaller_than_k(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["user_id,item_id,view,buy"]
    for u in range(60):
        for i in rng.choice(10, size=6, replace=False):
            rows.append(f"{u},{i},1,{int(rng.random() < 0.4)}")
    path = tmp_path / "ten-items.csv"
    path.write_text("\n".join(rows) + "\n")
    argv = ["bench", "--dataset", str(path), "--models", "popularity,csmf", "--no-tune", "--out", str(tmp_path)]
    assert main([*argv, "--set", "train.max_epochs=1,1", *SMALL_COST]) == 0  # k = 50 > 10 items
    result = read_result(tmp_path, "ten-items", "csmf")
    assert result["cost"]["query_seconds_1m"] > 0 and 0 < result["metrics"]["buy"]["recall@50"] <= 1


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("cascade.prune=cpq", "cascade.prune: 'cpq' is not one of ['cpp', 'fixed', 'none']"),
        ("model.encoder=gnn", "model.encoder: 'gnn' is not one of ['graph', 'mlp']"),
        ("train.distill=bert", "train.distill: 'bert' is not one of ['ease', 'als', 'itemknn', '']"),
        ("itemknn.similarity=bm25,jaccard", "itemknn.similarity: 'jaccard' is not one of ['bm25', 'cosine']"),
        ("cascade.tau=0.1,1.5", "cascade.tau: must be one or more thresholds in [0, 1), got 0.1,1.5"),
        ("model.dim=0", "model.dim: must be > 0, got 0"),
        ("train.select_metric=recall@7", "train.select_metric: 'recall@7' needs K = 7 in eval.ks"),
        ("train.select_metric=hits@50", "train.select_metric: must be recall@K or ndcg@K"),
    ],
)
def test_a_bad_config_value_fails_before_any_work_naming_key_and_choices(assignment, message, capsys, monkeypatch):
    def no_work(*_args, **_kw):
        raise AssertionError("the data was loaded before the config was checked")

    monkeypatch.setattr("csmf.data.datasets.load_dataset", no_work)
    assert main(["train", "--dataset", "jd", "--out", "unused", "--set", assignment, "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_a_bad_value_in_a_config_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[cascade]\nprune = "cpq"\n')
    with pytest.raises(ConfigError, match=re.escape(f"{path}: cascade.prune: 'cpq' is not one of")):
        load_config(path)


@pytest.mark.parametrize("command", ["serve", "loadtest", "querybench"])
def test_serving_commands_take_config_and_set(command, tmp_path, capsys):
    argv = [command, "--set", "serve.index=annoy"] + (["--artifact", str(tmp_path)] if command != "querybench" else [])
    assert main(argv) == 2
    assert "serve.index: 'annoy' is not one of ['exact', 'hnsw', 'milvus']" in capsys.readouterr().err
    path = tmp_path / "serve.toml"
    path.write_text("[serve]\nport = 0\n")
    assert main([command, "--config", str(path), *argv[3:]]) == 2
    assert f"{path}: serve.port: must be a port, 1..65535, got 0" in capsys.readouterr().err


def test_serve_flags_override_the_config_file(tmp_path):
    import argparse

    from csmf.cli import _serve_config

    path = tmp_path / "serve.toml"
    path.write_text('[serve]\nindex = "hnsw"\nmax_ids = 50\n')
    args = argparse.Namespace(config=str(path), set=[], seed=None, max_ids=7, index=None, command="serve")
    s = _serve_config(args).serve
    assert (s.index, s.max_ids, s.port) == ("hnsw", 7, 8000)


def test_bench_reuses_the_selections_fit_of_the_pick_for_the_csmf_row(sim_log_path, tmp_path):
    """The CSMF row is the model the selection fit with the picked config: the same numbers as fitting that config
    anew, without a second fit."""
    small = ["model.dim=16", "train.max_epochs=2", "train.user_batch_size=64", "train.distill=", "bench.cost_items=0",
             "bench.sweep_points=0", f"select.store_dir={tmp_path / 'picks'}"]  # fmt: skip
    out = tmp_path / "searched"
    argv = ["bench", "--dataset", str(sim_log_path), "--models", "csmf", "--out", str(out), "--quiet",
            "--set", "select.candidates=graph,graph model.graph_hops=1"]  # fmt: skip
    assert main([*argv, *[a for s in small for a in ("--set", s)]]) == 0
    searched = read_result(out, "sim", "csmf")
    assert searched["fit_reused"] == "selection" and searched["selection"]["trials"]
    hops = searched["config"]["model"]["graph_hops"]
    again = tmp_path / "pinned"
    pinned = ["bench", "--dataset", str(sim_log_path), "--models", "csmf", "--out", str(again), "--quiet",
              "--set", f"model.graph_hops={hops}", "--set", "select.candidates="]  # fmt: skip
    assert main([*pinned, *[a for s in small for a in ("--set", s)]]) == 0
    fresh = read_result(again, "sim", "csmf")
    assert fresh["fit_reused"] is None and fresh["metrics"] == searched["metrics"]


def test_past_the_scale_limit_every_models_validation_ranks_a_sample(sim_log_path, tmp_path, monkeypatch, capsys):
    from csmf import rules
    from csmf.config import Config
    from csmf.experiments.bench import _sampled_validation

    monkeypatch.setattr(rules, "SCALE_ITEMS", 50)  # the 100-item log counts as a large catalogue
    monkeypatch.setattr(rules, "SCALE_VALID_USERS", 30)
    lines: list[str] = []
    assert _sampled_validation(Config(), 50, None, lines.append).eval.valid_users == 0 and lines == []
    assert _sampled_validation(Config(), 51, None, lines.append).eval.valid_users == 30
    assert _sampled_validation(Config(), 51, {"eval.valid_users": 0}, lines.append).eval.valid_users == 0  # pinned
    calls = []
    import csmf.experiments.bench as bench

    real = bench.evaluate_stage
    monkeypatch.setattr(bench, "evaluate_stage", lambda *a, **k: calls.append(k.get("sample")) or real(*a, **k))
    argv = ["bench", "--dataset", str(sim_log_path), "--models", "als", "--out", str(tmp_path), "--quiet"]
    assert main([*argv, "--set", "als.factors=8", "--set", "als.iterations=2", "--set", "bench.cost_items=0"]) == 0
    assert "eval.valid_users = 30: validation (the tuning of every model)" in capsys.readouterr().out
    assert calls and set(calls) == {30}  # ALS's tuning grid ranked the sample
