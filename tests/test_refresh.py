"""Refresh on new data (csmf train --init-from, csmf.refresh) on two periods of a tiny simulated world: known ids keep
their rows, new ones start as a fresh model's, the ownership is the run's, earlier stages stay frozen while later
ones fine-tune, incompatible runs and settings are refused naming the field, and the run folder records its source."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL_SIM

from csmf.backbones import build_backbone
from csmf.checkpoints import CheckpointError, load_checkpoint
from csmf.cli import main
from csmf.config import Config, ConfigError, override
from csmf.data.errors import DataError
from csmf.data.logtable import load_log
from csmf.data.simulate import simulate, simulate_next_period
from csmf.data.split import split_log
from csmf.models.csmf import CSMF
from csmf.refresh import Refresh, extend_ids, id_positions, refresh_model
from csmf.trained import TrainedCascade

TINY = [
    "--config", "mlp", "--set", "model.user_hidden=16", "--set", "model.id_dim=8", "--set", "model.history_dim=8",
    "--set", "model.dim=8", "--set", "model.user_id=true", "--set", "train.max_epochs=1", "--set",
    "train.batch_size=256", "--set", "select.candidates=",
]  # fmt: skip
NEW_USERS, NEW_ITEMS = 60, 40

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def periods(tmp_path_factory, one_thread) -> dict[str, Path]:
    """Two periods of one simulated world and a finished run on the first."""
    folder = tmp_path_factory.mktemp("periods")
    simulate(SMALL_SIM, folder / "p1.parquet", progress=False)
    simulate_next_period(SMALL_SIM, folder / "p2.parquet", NEW_USERS, NEW_ITEMS, progress=False)
    run = folder / "run1"
    assert main(["train", "--dataset", str(folder / "p1.parquet"), "--out", str(run), "--quiet", *TINY]) == 0
    return {"p1": folder / "p1.parquet", "p2": folder / "p2.parquet", "run": run}


def period(path: Path, name: str = "sim"):
    return split_log(load_log(path), test_frac=0.2, valid_frac=0.1, seed=0, name=name)


def test_id_positions_keep_known_ids_and_append_new_ones_in_order():
    at, new = id_positions(np.array(["7", "3", "5"]), 3, np.array([5, 9, 7, 1]), 4)  # ids compared as text
    assert at.tolist() == [2, 3, 0, 4] and new == 2


def test_known_ids_keep_their_rows_and_new_ids_start_as_a_fresh_model(periods):
    warm = Refresh(periods["run"])
    data = warm.align(period(periods["p2"]))
    source = warm.inputs
    assert (data.n_users, data.n_items) == (source.n_users + NEW_USERS, source.n_items + NEW_ITEMS)
    assert data.user_ids[: source.n_users].tolist() == source.user_ids.tolist()  # the id maps extended
    # a user's pairs moved with it: its new-data history sits at its old index
    new_log = load_log(periods["p2"])
    user = int(np.flatnonzero(new_log.user_ids.astype(str) == source.user_ids[7])[0])
    pairs = set(new_log.item_ids[new_log.items[new_log.users == user]].astype(str))
    exposure = data.train["exposure"] + data.test["exposure"]
    assert set(data.item_ids[exposure[7].indices]) <= pairs and exposure[7].nnz > 0

    cfg = warm.checked
    fresh = build_backbone(data, cfg, cfg.seed, warm.objectives).state_dict()  # what a training from scratch starts
    tables = {"user.id_emb.weight": source.n_users, "item.id_emb.weight": source.n_items,
              "user.history.weight": source.n_items}  # fmt: skip
    for key, known in tables.items():
        assert torch.equal(warm.warm[key][:known], warm.state[key])  # exact, before any training
        assert torch.equal(warm.warm[key][known:], fresh[key][known:])  # seeded, as a fresh model's
        assert warm.warm[key].shape[0] > known
    for key, tensor in warm.state.items():  # every other parameter and every owner: the run's
        if key not in tables:
            assert torch.equal(warm.warm[key], tensor), key


def test_a_known_feature_value_keeps_its_row_when_a_new_value_moves_the_codes(periods):
    warm = Refresh(periods["run"])
    data = period(periods["p2"])
    category = data.item_features["item_category"].copy()
    category[np.flatnonzero(data.item_ids >= SMALL_SIM.n_items)[0]] = -1  # a new item brings a value sorting first
    warm.align(replace(data, item_features={**data.item_features, "item_category": category}))
    before, after = warm.state["item.feat_emb.item_category.weight"], warm.warm["item.feat_emb.item_category.weight"]
    assert after.shape[0] == before.shape[0] + 1
    assert torch.equal(after[1:], before)  # every known value one row down, where its code now points
    assert warm.record["feature_values"]["item.item_category"] == {"kept": before.shape[0], "new": 1}


def owners(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.endswith("owner")}


def trainable(model, stage: int) -> dict[str, torch.Tensor]:
    """Per parameter, the entries stage `stage` may change (what the masks keep of a gradient of ones)."""
    params = dict(model.named_parameters())
    for p in params.values():
        p.grad = torch.ones_like(p)
    model.mask_grads(stage)
    out = {name: p.grad != 0 for name, p in params.items()}
    for p in params.values():
        p.grad = None
    return out


def test_the_ownership_is_the_runs_and_earlier_stages_stay_frozen_while_later_ones_fine_tune(periods, tmp_path):
    source = CSMF.load(periods["run"] / "model")
    model, data = refresh_model(periods["run"], period(periods["p2"]), run_dir=tmp_path / "checkpoints")
    for key, owner in owners(source.model).items():
        assert torch.equal(owners(model.model)[key], owner), key
    assert model.model.ownership() == source.model.ownership()

    # the weights after refresh-1 against the final ones: stages 2 and 3 changed only what they own
    after_first, _ = load_checkpoint(tmp_path / "checkpoints" / "phase-00-refresh-1.pt")
    later = {k: trainable(model.model, 2)[k] | trainable(model.model, 3)[k] for k in trainable(model.model, 2)}
    final = model.model.state_dict()
    for key, changeable in later.items():
        assert torch.equal(final[key][~changeable], after_first[key][~changeable]), key
    assert any(not torch.equal(final[k], after_first[k]) for k in later)  # and they did train
    # so the first objective scores bit-identically after stages 2 and 3 fine-tuned
    history = data.train | data.side
    first = build_backbone(data, model.cfg, model.cfg.seed, model.trained.objectives)
    first.load_state_dict(after_first)
    users = np.arange(data.n_users)
    expected = TrainedCascade(first, model.trained.objectives, history, 3).score(users, "exposure")
    scored = TrainedCascade(model.model, model.trained.objectives, history, 3).score(users, "exposure")
    assert torch.equal(scored, expected)
    # and the first stage did fine-tune from the run's weights: its units moved
    start = Refresh(periods["run"])
    start.align(period(periods["p2"]))
    assert not torch.equal(after_first["item.id_emb.weight"], start.warm["item.id_emb.weight"])


def test_refresh_cli_records_its_source_data_and_config_and_resumes(periods, tmp_path, capsys):
    out = tmp_path / "run2"
    argv = ["train", "--init-from", str(periods["run"]), "--dataset", str(periods["p2"]), "--out", str(out), "--quiet",
            "--refresh-epochs", "2"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "metrics.json").read_text())
    record = summary["refresh"]
    assert record["init_from"] == str(periods["run"].resolve()) and record["epochs"] == 2
    assert record["users"] == {"known": SMALL_SIM.n_users, "new": NEW_USERS, "absent": 0}
    assert record["items"]["new"] == NEW_ITEMS
    assert [p["phase"] for p in summary["phases"]] == ["refresh-1", "refresh-2", "refresh-3"]
    assert all(1 <= len(p["epochs"]) <= 2 for p in summary["phases"])
    assert json.loads((out / "checkpoints" / "refresh.json").read_text()) == record
    _, meta = load_checkpoint(out / "checkpoints" / "phase-02-refresh-3.pt")
    data = Refresh(periods["run"]).align(period(periods["p2"], name="p2"))
    assert meta["data"] == record["data"] == data.fingerprint()  # the new data's fingerprint
    source = json.loads((periods["run"] / "metrics.json").read_text())["config"]
    assert summary["config"]["model"] == source["model"]  # the run's model, no search
    assert summary["config"]["select"]["candidates"] == [] and "candidates = []" in (out / "config.toml").read_text()
    assert summary["config"]["data"]["dataset"] == str(periods["p2"].resolve())
    assert set(summary["metrics"]) == {"exposure", "click", "conversion"}

    assert main(argv) == 0  # every phase done: it resumes and trains nothing
    assert "resuming after phase refresh-3" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["metrics"] == summary["metrics"]
    other = [*argv[:-1], "1"]  # the same folder with another schedule is refused, not mixed
    assert main(other) == 2
    assert "holds a refresh" in capsys.readouterr().err

    assert main(["export", "--run", str(out), "--out", str(tmp_path / "artifact"), "--quiet"]) == 0
    manifest = json.loads((tmp_path / "artifact" / "manifest.json").read_text())
    assert manifest["n_users"] == SMALL_SIM.n_users + NEW_USERS


def test_settings_that_change_the_model_and_another_cascade_are_refused_naming_the_field(periods, tmp_path, capsys):
    warm = Refresh(periods["run"])
    for setting, field in (("model.dim=16", "model.dim"), ("model.encoder=graph", "model.encoder"),
                           ("model.user_hidden=32", "model.user_hidden"), ("cascade.prune=none", "cascade.prune"),
                           ("cascade.objectives=exposure,click", "cascade.objectives"),
                           ("data.stages=exposure,click", "data.stages")):  # fmt: skip
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            warm.config(override(warm.cfg, [setting]))
    kept = warm.config(override(warm.cfg, ["train.lr=0.001", "model.dropout=0.1", "train.distill=ease"]))
    assert kept.train.distill == "ease" and kept.train.lr == (0.001,)  # training settings may change

    data = period(periods["p2"])
    two = replace(data, stages=("exposure", "click"), train={s: data.train[s] for s in ("exposure", "click")})
    with pytest.raises(DataError, match="a refresh keeps the cascade"):
        Refresh(periods["run"]).align(two)
    no_features = replace(data, item_features={})
    with pytest.raises(DataError, match="item features"):
        Refresh(periods["run"]).align(no_features)

    out = str(tmp_path / "run")
    base = ["train", "--init-from", str(periods["run"]), "--dataset", str(periods["p2"]), "--out", out, "--quiet"]
    for extra, words in ((["--set", "model.id_dim=16"], "model.id_dim: 8 in"), (["--stages", "exposure,click"],
                         "data.stages"), (["--refresh-epochs", "0"], "--refresh-epochs 0"),
                         (["--nproc", "2"], "one process")):  # fmt: skip
        assert main([*base, *extra]) == 2
        assert words in capsys.readouterr().err
    assert main(["train", "--dataset", str(periods["p2"]), "--out", out, "--refresh-epochs", "1"]) == 2
    assert "--init-from" in capsys.readouterr().err
    assert main([*base[:2], str(tmp_path), *base[3:]]) == 2  # a folder without a finished run
    assert "no saved model" in capsys.readouterr().err
    # a run folder that holds a training from scratch is not resumed as a refresh
    scratch = tmp_path / "scratch"
    assert main(["train", "--dataset", str(periods["p2"]), "--out", str(scratch), "--quiet", *TINY]) == 0
    assert main([*base[:-3], "--out", str(scratch), "--quiet"]) == 2  # its data differs too: in the new id maps
    assert "holds checkpoints trained on other data" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="training from scratch"):
        refresh_model(periods["run"], period(periods["p2"]), run_dir=scratch / "checkpoints")


def test_a_refresh_fine_tunes_without_the_runs_teacher_unless_asked(periods, tmp_path):
    run = tmp_path / "graph"  # the default encoder, which distils from an EASE teacher
    argv = ["train", "--dataset", str(periods["p1"]), "--out", str(run), "--quiet", "--set", "model.dim=8", "--set",
            "train.max_epochs=1", "--set", "select.candidates="]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((run / "metrics.json").read_text())["config"]["train"]["distill"] == "ease"
    warm = Refresh(run)
    assert warm.cfg.train.distill == "" and warm.config(warm.cfg).train.distill == ""
    warm.align(period(periods["p2"]))
    assert warm.record["teacher"] == ""
    asked = Refresh(run)
    asked.config(override(asked.cfg, ["train.distill=ease"]))
    asked.align(period(periods["p2"]))
    assert asked.record["teacher"] == "ease"


def test_the_refresh_bench_measures_both_periods_and_writes_its_report(tmp_path, one_thread):
    from csmf.experiments.refresh_bench import both_periods, period_two_test, run_refresh

    cfg = override(Config(), ["sim.n_users=240", "sim.n_items=160", "sim.exposures_per_user=20", "model.dim=8",
                              "train.max_epochs=1", "bench.suite_seeds=0", f"bench.out_dir={tmp_path / 'results'}",
                              f"bench.report_dir={tmp_path / 'reports'}"])  # fmt: skip
    report = run_refresh(cfg, epochs=1).read_text()
    result = json.loads((tmp_path / "results" / "refresh" / "refresh.json").read_text())
    (world,) = result["worlds"]
    assert world["refresh"]["users"]["new"] == 60 and world["refresh"]["items"]["known"] > 0
    assert set(world["period2"]["a"]) == set(world["period2"]["b"]) == {"exposure", "click", "conversion"}
    assert world["seconds"]["a"]["wall"] > 0 and world["teacher"] == {"scratch": "ease", "refresh": ""}
    assert "at least 0.97 on every stage: lowest" in report and "## Forgetting" in report

    # the merged training set holds both periods' pairs; the test side keeps only pairs neither period trains on
    data = period(tmp_path / "results" / "refresh" / "seed-0" / "data" / "p2.parquet")
    first = period(tmp_path / "results" / "refresh" / "seed-0" / "data" / "p1.parquet")
    warm = Refresh(tmp_path / "results" / "refresh" / "seed-0" / "run1")
    second = warm.align(data)
    wide, _ = extend_ids(first, second.user_ids, second.n_users, second.item_ids, second.n_items)
    both = both_periods(wide, second)
    assert both.train["click"].nnz == (wide.train["click"] + second.train["click"]).astype(bool).sum()
    held = period_two_test(both)
    trained = (sum(both.train.values()) > 0).astype(int)
    assert held.test["exposure"].multiply(trained).nnz == 0 < held.test["exposure"].nnz
