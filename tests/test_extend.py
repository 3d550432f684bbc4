"""`csmf extend` and csmf.extend on a tiny simulated log: a finished exposure -> click run grown by conversion keeps
exposure bit-identical, reports click's change, keeps the index's shape, resumes after an interruption, refuses
what it cannot do, and exports a model that serves all three objectives with per-request weights.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from csmf.cli import main
from csmf.config import load_config, override
from csmf.data.datasets import load_dataset
from csmf.data.split import split_log
from csmf.extend import ExtensionError, ExtensionTrainer, extend_model, room
from csmf.models.csmf import CSMF

TINY = ["--set", "model.dim=16", "--set", "train.max_epochs=1", "--set", "select.candidates="]
BASE = ["--set", "cascade.objectives=exposure,click"]  # conversion is a stage of the data, left for later

pytestmark = pytest.mark.usefixtures("one_thread")


def train(log: Path, out: Path, *sets: str) -> Path:
    assert main(["train", "--dataset", str(log), "--out", str(out), "--quiet", *TINY, *sets]) == 0
    return out


@pytest.fixture(scope="module")
def base_run(sim_parquet, tmp_path_factory, one_thread) -> Path:
    """A finished exposure -> click run on a log whose stages are exposure, click and conversion (read-only)."""
    return train(sim_parquet[0], tmp_path_factory.mktemp("extend") / "base", *BASE)


@pytest.fixture(scope="module")
def extended(base_run, tmp_path_factory, one_thread) -> Path:
    """A copy of the base run, extended by conversion (read-only)."""
    run = tmp_path_factory.mktemp("extended") / "run"
    shutil.copytree(base_run, run)
    assert main(["extend", "--run", str(run), "--stage", "conversion", "--quiet"]) == 0
    return run


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def test_train_with_cascade_objectives_trains_only_those(base_run):
    summary = json.loads((base_run / "metrics.json").read_text())
    assert set(summary["metrics"]) == {"exposure", "click"}
    assert CSMF.load(base_run / "model").trained.objectives == ("exposure", "click")
    assert len(list((base_run / "checkpoints").glob("phase-*.pt"))) == 4  # train-1, prune-1, recover-1, train-2


def test_demo_weights_must_name_the_objectives_trained(sim_parquet, tmp_path, capsys):
    argv = ["train", "--dataset", str(sim_parquet[0]), "--out", str(tmp_path / "run"), "--quiet", *TINY, *BASE]
    assert main([*argv, "--weights", "conversion:1"]) == 2
    assert "unknown stage 'conversion'; stages are ['exposure', 'click']" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_earlier_objectives_score_bit_identically_and_the_last_ones_change_is_reported(base_run, extended):
    before, after = CSMF.load(extended / "model-before-conversion"), CSMF.load(extended / "model")
    assert after.trained.objectives == ("exposure", "click", "conversion")
    users = np.arange(before.inputs.n_users)
    # exposure, the objective before the previous last: vectors and scores bit-identical, every user and item
    mask_before, mask_after = before.model.group_mask(1), after.model.group_mask(1)
    assert torch.equal(before.item_vectors() * mask_before, after.item_vectors() * mask_after)
    assert torch.equal(before.user_vectors(users, {"exposure": 1.0}), after.user_vectors(users, {"exposure": 1.0}))
    assert torch.equal(before.score(users, "exposure"), after.score(users, "exposure"))
    # the previous last objective gave up output units to conversion and was re-trained by AR: it moved
    assert not torch.equal(before.score(users, "click"), after.score(users, "click"))
    assert before.item_vectors().shape == after.item_vectors().shape == (before.inputs.n_items, 16)
    owner_before, owner_after = before.model.output_owner, after.model.output_owner
    assert torch.equal(owner_before == 1, owner_after == 1)
    moved = int((owner_after == 3).sum())  # click's units conversion took
    assert moved >= room(before.model, before.cfg) >= 1
    assert int((owner_after == 2).sum()) == int((owner_before == 2).sum()) - moved

    report = json.loads((extended / "extend-conversion.json").read_text())
    assert report["identical"] == {"exposure": {"item_vectors": True, "user_vectors": True, "scores": True}}
    click = report["change"]["click"]["recall@50"]
    assert click["before"] == json.loads((base_run / "metrics.json").read_text())["metrics"]["click"]["recall@50"]
    assert click["relative"] == pytest.approx(click["after"] / click["before"] - 1)
    assert 0 < report["previous_last"]["top50_overlap"] <= 1
    assert report["item_vectors"] == {"before": [before.inputs.n_items, 16], "after": [before.inputs.n_items, 16]}
    assert report["room"]["freed_units"] == moved
    assert [p["phase"] for p in report["phases"]] == ["prune-2", "recover-2", "train-3"]
    assert report["train_seconds"] > 0 and report["wall_seconds"] >= report["train_seconds"]
    data = load_dataset(load_config(str(extended / "config.toml")))
    assert report["data_fingerprint"] == data.fingerprint()

    # the run folder describes the grown model: its phases, config and metrics
    phases = json.loads((extended / "checkpoints" / "phases.json").read_text())
    assert [p["phase"] for p in phases][4:] == ["prune-2", "recover-2", "train-3"]
    assert load_config(str(extended / "config.toml")).cascade.objectives == ("exposure", "click", "conversion")
    summary = json.loads((extended / "metrics.json").read_text())
    assert set(summary["metrics"]) == {"exposure", "click", "conversion"}
    assert summary["metrics"] == report["metrics"]["after"] and summary["extended"][0]["stage"] == "conversion"


def test_the_log_reports_each_objective_before_and_after(base_run, tmp_path, capsys):
    run = copy_of(base_run, tmp_path)
    assert main(["extend", "--run", str(run), "--stage", "conversion", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "exposure: recall@50" in out and "(bit-identical)" in out
    assert "click: recall@50" in out and "the previous last stage: top-50 overlap" in out
    assert "conversion (new): recall@50" in out and "item vectors: 200 x 16 before, 200 x 16 after" in out


def test_an_interrupted_extension_resumes_to_the_model_of_an_uninterrupted_one(base_run, extended, tmp_path,
                                                                               monkeypatch, capsys):  # fmt: skip
    run = copy_of(base_run, tmp_path)
    whole = ExtensionTrainer.run_phase

    def stop_before_recovery(self, index):
        if index == 5:  # prune-2 is checkpointed, recover-2 not
            raise KeyboardInterrupt
        return whole(self, index)

    monkeypatch.setattr(ExtensionTrainer, "run_phase", stop_before_recovery)
    with pytest.raises(KeyboardInterrupt):
        main(["extend", "--run", str(run), "--stage", "conversion", "--quiet"])
    assert sorted(p.name for p in (run / "checkpoints").glob("phase-*.pt"))[-1] == "phase-04-prune-2.pt"
    assert CSMF.load(run / "model").trained.objectives == ("exposure", "click")  # the old model still serves
    monkeypatch.setattr(ExtensionTrainer, "run_phase", whole)
    capsys.readouterr()
    assert main(["extend", "--run", str(run), "--stage", "conversion", "--quiet"]) == 0
    assert "resuming after phase prune-2" in capsys.readouterr().out
    resumed, whole_run = CSMF.load(run / "model").model.state_dict(), CSMF.load(extended / "model").model.state_dict()
    assert resumed.keys() == whole_run.keys() and all(torch.equal(resumed[k], whole_run[k]) for k in resumed)
    a = json.loads((run / "extend-conversion.json").read_text())
    b = json.loads((extended / "extend-conversion.json").read_text())
    assert a["metrics"] == b["metrics"] and a["identical"] == b["identical"]


def refused(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def listing(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.name != "train.lock"}


def test_a_stage_already_served_or_not_in_the_data_is_refused(base_run, tmp_path, capsys):
    run = copy_of(base_run, tmp_path)
    files = listing(run)
    err = refused(["extend", "--run", str(run), "--stage", "click"], capsys)
    assert "already serves 'click' (stage 2 of exposure -> click)" in err
    err = refused(["extend", "--run", str(run), "--stage", "purchase"], capsys)
    assert "'purchase' is not a stage of" in err and "exposure, click, conversion" in err
    assert "cascade.objectives" in err
    assert listing(run) == files


def test_an_unfinished_run_is_refused(base_run, tmp_path, capsys):
    run = copy_of(base_run, tmp_path)
    shutil.rmtree(run / "model")
    err = refused(["extend", "--run", str(run), "--stage", "conversion"], capsys)
    assert "no saved model" in err and f"csmf train --config {run / 'config.toml'} --out {run}" in err
    run = copy_of(base_run, tmp_path / "second")
    (run / "checkpoints" / "phase-03-train-2.pt").unlink()  # training stopped after recover-1
    err = refused(["extend", "--run", str(run), "--stage", "conversion"], capsys)
    assert "stopped after phase 3 of 4" in err and "finish it first" in err
    assert not (run / "extend-conversion.json").exists()


def test_other_data_is_refused_by_its_fingerprint(base_run, sim_parquet, tmp_path, capsys):
    table = pq.read_table(sim_parquet[0])
    other = tmp_path / "other.parquet"
    pq.write_table(table.slice(0, table.num_rows - 50), other)  # the same log without its last 50 rows
    run = copy_of(base_run, tmp_path)
    files = listing(run)
    err = refused(["extend", "--run", str(run), "--stage", "conversion", "--dataset", str(other)], capsys)
    assert "trained on data of fingerprint" in err and "drop --dataset/--stages" in err
    assert listing(run) == files


def test_a_last_stage_with_one_output_unit_leaves_no_room(sim_parquet, tmp_path, capsys):
    run = train(sim_parquet[0], tmp_path / "narrow", *BASE, "--set", "model.dim=8")  # click owns 1 of 8 units
    err = refused(["extend", "--run", str(run), "--stage", "conversion"], capsys)
    assert "no free room for 'conversion'" in err and "owns 1 of the D = 8 output units" in err
    assert not (run / "extend-conversion.json").exists()


def test_naive_fine_tuning_is_refused(sim_parquet, tmp_path, capsys):
    run = train(sim_parquet[0], tmp_path / "naive", *BASE, "--set", "cascade.prune=none")
    err = refused(["extend", "--run", str(run), "--stage", "conversion"], capsys)
    assert "cascade.prune = 'none' (naive fine-tuning)" in err


def test_room_is_the_reserve_of_a_stage_to_come_at_most_half_the_last_stages_units():
    class Owners:  # what room reads of a backbone
        def __init__(self, owners: list[int]):
            self.output_owner = torch.tensor(owners)

    cfg = load_config("graph")
    assert room(Owners([1] * 112 + [2] * 16), cfg) == 8  # JD's default: half of purchase's 16 (the reserve is 16)
    assert room(Owners([1] * 96 + [2] * 32), cfg) == 16  # a last stage with more than twice the reserve gives it
    assert room(Owners([1] * 7 + [2]), cfg) == 0  # one unit: nothing to give
    assert room(Owners([1] * 96 + [2] * 32), replace(cfg, cascade=replace(cfg.cascade, min_share=0.05))) == 7


def test_the_python_api_grows_a_fitted_model_and_leaves_it_as_it_was(sim_data):
    cfg = override(load_config("graph"), ["model.dim=16", "train.max_epochs=1", "cascade.objectives=exposure,click"])
    model = CSMF(cfg).fit(sim_data)
    state = {k: v.clone() for k, v in model.model.state_dict().items()}
    grown = extend_model(model, sim_data, "conversion")
    assert grown.trained.objectives == ("exposure", "click", "conversion")
    assert grown.cfg.cascade.objectives == ("exposure", "click", "conversion")
    assert model.trained.objectives == ("exposure", "click")
    assert all(torch.equal(state[k], v) for k, v in model.model.state_dict().items())  # not changed in place
    users = np.arange(sim_data.n_users)
    assert torch.equal(model.score(users, "exposure"), grown.score(users, "exposure"))
    assert [p["phase"] for p in grown.phases] == ["train-1", "prune-1", "recover-1", "train-2", "prune-2",
                                                  "recover-2", "train-3"]  # fmt: skip
    with pytest.raises(ExtensionError, match="already serves 'click'"):
        extend_model(model, sim_data, "click")


def test_other_data_is_refused_by_the_python_api(sim_log, sim_data):
    cfg = override(load_config("graph"), ["model.dim=16", "train.max_epochs=1", "cascade.objectives=exposure,click"])
    model = CSMF(cfg).fit(sim_data)
    other = split_log(sim_log, test_frac=0.2, valid_frac=0.1, seed=1, by="random", name="sim")  # another split
    with pytest.raises(ExtensionError, match="is not the data the model was fit on"):
        extend_model(model, other, "conversion")


def test_the_export_serves_all_three_objectives_with_per_request_weights(extended, tmp_path):
    from csmf.serving.artifact import load_artifact
    from csmf.serving.index import build_index
    from csmf.serving.serve import Recommender

    assert main(["export", "--run", str(extended), "--out", str(tmp_path / "artifact")]) == 0
    artifact = load_artifact(tmp_path / "artifact")
    model = CSMF.load(extended / "model")
    assert tuple(artifact.stages) == ("exposure", "click", "conversion")
    assert np.array_equal(artifact.item_vectors, model.item_vectors().numpy())
    recommender = Recommender(artifact, build_index(artifact.item_vectors))
    user = 5
    uid = artifact.user_ids[user]
    rankings = []
    for weights in ({"exposure": 1.0}, {"conversion": 1.0}, {"exposure": 0.2, "click": 0.5, "conversion": 1.0}):
        served = [item["item_id"] for item in recommender.recommend([uid], 10, weights, True)[0].items]
        scores = model.score_fused(np.array([user]), weights)[0].clone()  # (N,): the trained model's fused scores
        scores[torch.from_numpy(artifact.seen(user).astype(np.int64))] = float("-inf")
        offline = [artifact.item_ids[i] for i in torch.topk(scores, 10).indices.numpy()]
        assert served == offline
        rankings.append(served)
    assert rankings[0] != rankings[1]  # the new objective's weight moves the ranking


def test_the_quick_suite_compares_the_grown_cascade_with_one_trained_from_scratch_and_resumes(tmp_path):
    from csmf.config import Config
    from csmf.experiments.growth import run_growth

    cfg = override(Config(), [f"bench.out_dir={tmp_path / 'results'}", f"bench.report_dir={tmp_path / 'reports'}"])
    lines: list[str] = []
    report = run_growth(cfg, quick=True, log=lines.append).read_text()
    assert report == (tmp_path / "reports" / "extend-quick.md").read_text()
    assert "| objective | base | extended | change | scratch exposure -> click -> conversion |" in report
    assert "objectives before the previous last: exposure; bit-identical after the extension" in report
    assert "torch.equal): exposure\n" in report
    assert "click (the previous last objective) R@50" in report and "conversion R@50" in report
    assert "x the from-scratch exposure -> click -> conversion cascade's" in report and "wall time" in report
    assert (tmp_path / "results" / "extend-quick" / "sim" / "run" / "extend-conversion.json").exists()
    lines.clear()
    run_growth(cfg, quick=True, log=lines.append)  # every step is read back: nothing trains again
    assert not any("training" in line or "extending" in line for line in lines)
