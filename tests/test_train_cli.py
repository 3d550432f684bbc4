"""`csmf train` end to end on a tiny simulated log: run folder, metrics, demo tables, resume, bench wiring."""

from __future__ import annotations

import json

import pytest
import torch

from csmf.cli import main

TINY = [
    "--set", "model.user_hidden=16", "--set", "model.id_dim=8", "--set", "model.history_dim=8",
    "--set", "model.dim=8", "--set", "train.max_epochs=1", "--set", "train.batch_size=256",
]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls on a busy 2-core machine are far faster on one thread (see test_cascade.py).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_train_writes_run_folder_and_shows_two_weightings(sim_parquet, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--dataset", str(sim_parquet[0]), "--out", str(out), "--quiet", *TINY]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["metrics"]) == {"exposure", "click", "conversion"}
    assert summary["vector_dim"] == 8
    assert (out / "config.toml").exists()
    assert len(list((out / "checkpoints").glob("phase-*.pt"))) == len(summary["phases"]) == 7
    assert printed.count("top-10 for user") == 2
    assert "'exposure': 1.0" in printed and "'conversion': 1.0" in printed

    # A second call finds every phase done: it resumes, trains nothing, and reports the same metrics.
    assert main(argv) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["metrics"] == summary["metrics"]
    assert "resuming after phase train-3" in capsys.readouterr().out


def test_train_rejects_unknown_weight_stage(sim_parquet, tmp_path, capsys):
    argv = ["train", "--dataset", str(sim_parquet[0]), "--out", str(tmp_path), "--weights", "buy=1", "--quiet", *TINY]
    assert main(argv) == 2
    assert "'buy' is not a stage" in capsys.readouterr().err


def test_bench_runs_csmf_variants_and_single(sim_parquet, tmp_path, capsys):
    argv = ["bench", "--dataset", str(sim_parquet[0]), "--models", "csmf-no-ar,single-click", "--out", str(tmp_path)]
    assert main([*argv, "--quiet", *TINY]) == 0
    no_ar = json.loads((tmp_path / "sim" / "csmf-no-ar.json").read_text())
    single = json.loads((tmp_path / "sim" / "single-click.json").read_text())
    assert set(no_ar["metrics"]) == {"exposure", "click", "conversion"}
    assert set(single["metrics"]) == {"click"}
    assert no_ar["params"] == single["params"] > 0  # same backbone, no extra parameters
    assert not any(p["phase"].startswith("recover") for p in no_ar["tuning"])
    assert "item vectors of dimension 8" in capsys.readouterr().out
