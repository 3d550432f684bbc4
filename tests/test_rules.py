"""Cross-field config rules (csmf.rules): a combination that cannot train is refused before any data loads,
in one message naming every key involved, never with a traceback at the first batch."""

from __future__ import annotations

import time

import pytest

from csmf.cli import main
from csmf.config import Config, ConfigError, load_config, override
from csmf.rules import (
    SCALE_HISTORY,
    SCALE_NEIGHBOURS,
    SCALE_PATIENCE,
    SCALE_TUNE_FITS,
    SCALE_VALID_USERS,
    SCALE_WEIGHT_DECAY,
    cap_tuning,
    check_training,
    fit_to_size,
    training_problems,
)


def test_the_hinge_on_the_in_batch_path_fails_in_seconds_naming_both_keys(capsys, monkeypatch):
    def no_loading(*_a, **_k):
        raise AssertionError("the data must not load")

    monkeypatch.setattr("csmf.data.datasets.load_dataset", no_loading)
    start = time.perf_counter()
    argv = ["train", "--dataset", "jd", "--set", "cascade.aml_form=hinge", "--set", "model.encoder=mlp"]
    assert main(argv) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert "cascade.aml_form = 'hinge'" in err and "model.encoder = 'mlp' trains on batches of pairs" in err
    assert "train.distill" not in err  # the default teacher is turned off where no per-user loss reads it
    assert "Traceback" not in err
    # a teacher the user asked for is kept, and its conflict named beside the hinge's
    assert main([*argv, "--set", "train.distill=ease"]) == 2
    assert "train.distill = 'ease'" in capsys.readouterr().err


def test_each_rule_names_its_keys_and_a_valid_config_passes():
    assert training_problems(Config()) == []
    assert training_problems(load_config("mlp")) == []
    assert training_problems(override(load_config("stream"), ["data.cache_dir=/tmp/c"])) == []
    hinge_mlp = override(load_config("mlp"), ["cascade.aml_form=hinge"])
    (problem,) = training_problems(hinge_mlp)
    assert "cascade.aml_form = 'hinge'" in problem and "model.encoder = 'mlp'" in problem
    # past the limit the cascade's per-user loss takes a pool (teacher and hinge keep working); the multi-task
    # towers' needs the whole catalogue
    small = override(Config(), ["train.full_softmax_max_items=500"])
    assert training_problems(small, n_items=13_465) == []
    (problem,) = training_problems(small, n_items=13_465, cascade=False)
    assert "below the catalogue of 13,465 items" in problem and "train.distill" in problem
    assert training_problems(small, cascade=False) == []  # size unknown yet
    (problem,) = training_problems(override(Config(), ["train.stream=true", "train.distill="]))
    assert "data.cache_dir is not set" in problem and "model.encoder = 'graph' builds its graph" in problem
    assert "use model.encoder = 'mlp'" in problem and "aux_weight" not in problem
    # history bags and other stages' rows stream (csmf.data.stream_history, Cache.weighted_batches)
    both = ["data.cache_dir=/c", "model.history=true", "train.aux_weight=0.2"]
    assert training_problems(override(load_config("stream"), both)) == []
    # a teacher does not, and says why, without offering the graph encoder (which does not stream either)
    (problem,) = training_problems(override(load_config("stream"), ["data.cache_dir=/c", "train.distill=ease"]))
    assert "train.stream = true trains on streamed rows (a teacher does not stream: it is fit on every" in problem
    assert "or train.stream = false" in problem and "'graph'" not in problem
    (problem,) = training_problems(override(Config(), ["runtime.device=cuda"]))
    assert "model.encoder = 'graph' trains on ['cpu'] only" in problem
    # the multi-task towers train on the CPU without AML: only the loss and teacher rules are theirs
    assert training_problems(override(Config(), ["runtime.device=cuda"]), cascade=False) == []
    assert training_problems(hinge_mlp, cascade=False) == []
    assert training_problems(override(load_config("mlp"), ["train.distill=ease"]), cascade=False) != []
    (problem,) = training_problems(override(Config(), ["runtime.device=auto"]), device="cuda")
    assert "runtime.device = 'auto' chose cuda" in problem
    with pytest.raises(ConfigError, match="cannot train: .*hinge"):
        check_training(hinge_mlp)


def test_every_subcommand_takes_a_config_file(capsys):
    for command in ("bench", "simulate", "train", "export", "serve", "loadtest", "querybench", "trainspeed", "data"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--config" in capsys.readouterr().out, command


def test_defaults_the_catalogue_size_rules_out_are_adapted_and_said():
    cfg = override(Config(), ["train.full_softmax_max_items=500"])
    assert fit_to_size(cfg, 400) == (cfg, [])  # the whole catalogue fits: nothing changes
    adapted, notes = fit_to_size(cfg, 13_465)  # the cascade: a pooled per-user loss, smoothing by neighbours
    assert adapted.train.distill == "ease" and adapted.model.graph_neighbours == SCALE_NEIGHBOURS
    assert training_problems(adapted, n_items=13_465) == []
    (note,) = notes
    assert f"model.graph_neighbours = {SCALE_NEIGHBOURS}" in note and "13,465 items are above" in note
    # 13,465 items: whole histories, every validation user; past 100,000 items neither
    assert adapted.model.history_max == 0 and adapted.eval.valid_users == 0
    big, notes = fit_to_size(cfg, 150_000)
    assert big.model.history_max == SCALE_HISTORY and f"model.history_max = {SCALE_HISTORY}" in notes[1]
    # the graph encoder trains with weight decay there (an item holds a few pairs); not below
    assert big.train.weight_decay == SCALE_WEIGHT_DECAY and "train.weight_decay = 1.0" in notes[2]
    assert adapted.train.weight_decay == 0 and fit_to_size(load_config("mlp"), 150_000)[0].train.weight_decay == 0
    # ... and a bounded schedule: patience 1, at most 3 epochs a stage, AR only where pruning cost over 5%, on 10%
    assert (big.train.patience, big.train.max_epochs, big.cascade.recover_skip) == (SCALE_PATIENCE, (3,), 0.05)
    assert big.cascade.recover_frac == 0.1 and "(was 0.3)" in notes[6]
    assert [n.split(":")[0] for n in notes[3:7]] == [
        "train.patience = 1",
        "train.max_epochs = 3",
        "cascade.recover_skip = 0.05",
        "cascade.recover_frac = 0.1",
    ]
    assert fit_to_size(cfg, 150_000, pinned={"cascade.recover_frac"})[0].cascade.recover_frac == 0.3
    assert (adapted.train.patience, adapted.train.max_epochs, adapted.cascade.recover_skip) == (2, (24,), 0.0)
    assert fit_to_size(cfg, 150_000, pinned={"train.max_epochs"})[0].train.max_epochs == (24,)
    mlp_big, _ = fit_to_size(load_config("mlp"), 150_000, pinned=())  # the in-memory MLP cascade too
    assert (mlp_big.train.patience, mlp_big.train.max_epochs, mlp_big.cascade.recover_skip) == (1, (3, 3), 0.05)
    streamed, _ = fit_to_size(load_config("stream"), 150_000, pinned=())  # a streamed run keeps its schedule
    assert (streamed.train.max_epochs, streamed.cascade.recover_frac, streamed.cascade.recover_skip) == ((1,), 0.3, 0)
    # a teacher's list stops where its weights leave e^-5 of their mass (rank 5 x decay 5 = 25)
    assert big.train.distill_top == 25 and "train.distill_top = 25" in notes[7] and "0.7%" in notes[7]
    assert big.eval.valid_users == SCALE_VALID_USERS and "eval.valid_users = 10,000" in notes[8]
    assert fit_to_size(cfg, 150_000, pinned={"train.distill_top"})[0].train.distill_top == 100
    mlp_small, _ = fit_to_size(load_config("mlp"), 13_465, pinned=())  # its loss limit is 0: still whole histories
    assert mlp_small.model.history_max == 0
    assert fit_to_size(override(cfg, ["eval.valid_users=500"]), 150_000)[0].eval.valid_users == 500
    capped, notes = cap_tuning(cfg, 150_000, pinned=())  # the bench's baselines: a bounded search past 100k items
    assert capped.bench.tune_max_fits == SCALE_TUNE_FITS and "bench.tune_max_fits = 4" in notes[0]
    assert cap_tuning(cfg, 13_465, pinned=()) == (cfg, [])
    assert cap_tuning(cfg, 150_000, pinned={"bench.tune_max_fits"}) == (cfg, [])
    # the multi-task towers' per-user loss needs the whole catalogue: their teacher goes
    towers, notes = fit_to_size(cfg, 13_465, cascade=False)
    assert towers.train.distill == "" and "train.distill = '' (was 'ease')" in notes[0]
    assert training_problems(towers, n_items=13_465, cascade=False) == []
    # keys the user set are kept (check_training names the conflict), the others still adapt
    pinned, notes = fit_to_size(
        override(cfg, ["train.distill=itemknn", "model.graph_neighbours=8"]), 13_465, cascade=False
    )
    assert pinned.train.distill == "itemknn" and pinned.model.graph_neighbours == 8 and notes == []
    assert pinned.model.history_max == 0  # the multi-task towers read no truncated bags
    assert training_problems(pinned, n_items=13_465, cascade=False) != []
    kept, _ = fit_to_size(cfg, 13_465, pinned={"train.distill"}, cascade=False)
    assert kept.train.distill == "ease" and kept.model.graph_neighbours == SCALE_NEIGHBOURS
    # the MLP encoder trains on pairs at any size: its teacher goes, it has no graph
    mlp, notes = fit_to_size(override(load_config("mlp"), ["train.distill=ease"]), 100, pinned=())
    assert mlp.train.distill == "" and mlp.model.graph_neighbours == 0 and "trains on pairs" in notes[0]
